"""The one exception type a user sees as a single line (cli.py prints it, exits non-zero)."""


class RaysegError(Exception):
    """A fatal, user-fixable problem: bad input file, bad config, unwritable output."""
