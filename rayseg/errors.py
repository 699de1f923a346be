"""The exceptions a user sees as a single line (cli.py prints them and exits non-zero)."""

import signal


class RaysegError(Exception):
    """A fatal, user-fixable problem: bad input file, bad config, unwritable output."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the command (rayseg.signals raises it; exit 128 + signum).

    A KeyboardInterrupt, so code that cleans up after Ctrl-C (Ray Data's executor) does so here.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
