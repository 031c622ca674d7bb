"""`python -m sparsetrain.cli`: the same commands as the `sparsetrain` script (torchrun launches it this way)."""
import sys

from sparsetrain.cli.commands import main

sys.exit(main())
