"""The command line: a parser and thin commands over the library (`sparsetrain --help`)."""
from sparsetrain.cli.commands import main

__all__ = ["main"]
