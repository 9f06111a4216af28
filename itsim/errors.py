"""Errors that reach the user as one clear line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment: `itsim` prints it and exits with code 2."""
