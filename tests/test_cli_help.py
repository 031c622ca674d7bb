"""The command line says what it does: every option of every subcommand has help text that shows its default, and
the lists the help gives (presets) are the code's own."""
import argparse

from sparsetrain.cli.commands import build_parser
from sparsetrain.config import PRESET_NAMES
from sparsetrain.nn.model import PRESETS


def commands(parser, path=()):
    """(command words, parser) of every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from commands(child, path + (name,))


def test_every_option_has_help_and_shows_its_default():
    leaves = list(commands(build_parser()))
    assert len(leaves) >= 17  # data x5, train, eval, generate, analyze, convert x5, bench, report, demo
    for path, parser in leaves:
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = " ".join(path) + " " + (action.option_strings or [action.dest])[0]
            assert action.help and action.help.strip(), f"{name} has no help text"
            if action.default is not None and action.default is not False:
                # the formatter appends "(default: X)"; a help that says its default in words keeps its own
                assert "default" in action.help or f"(default: {action.default})" in help_text, name


def test_help_texts_name_what_a_user_needs():
    parser = build_parser()
    helps = {" ".join(path): " ".join(p.format_help().split()) for path, p in commands(parser)}
    assert "(default: 32768)" in helps["data prepare"] and "use 4096" in helps["data prepare"]
    bench = dict(commands(parser))[("bench",)]
    preset = next(a for a in bench._actions if "--preset" in a.option_strings)
    assert "one or more of: " + ", ".join(PRESET_NAMES) in preset.help and preset.choices == PRESET_NAMES
    assert "README.md, section Training" in helps["train"] and "src/sparsetrain/config.py" in helps["train"]


def test_the_help_lists_the_models_presets():
    assert PRESET_NAMES == tuple(PRESETS)
