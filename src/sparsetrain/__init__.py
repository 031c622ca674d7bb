"""sparsetrain: train transformers faster by exploiting sparsity, measured honestly."""

__version__ = "0.1.0"
