"""The one exception type for mistakes a user can fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input (a missing corpus, an unknown config key, ...). The message names the problem and the fix."""
