"""Errors that reach the user as one clear line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment: `itsim` prints it and exits with code 2."""


class Interrupted(Exception):
    """A job stopped on purpose before its end (a signal during training, after a checkpoint): `itsim`
    prints the one line (where it stopped, how to resume) and exits with `exit_code`, 128 + the
    signal's number as shells report it (143 for SIGTERM, 130 for SIGINT), so schedulers and scripts
    see that the job did not finish."""

    def __init__(self, message: str, exit_code: int = 143):
        super().__init__(message)
        self.exit_code = exit_code
