"""Errors caused by the user's input. The CLI prints them as one line (set MEGASWIFT_DEBUG=1 for the traceback)."""


class UserError(Exception):
    """Mixed into error types whose message alone tells the user what to fix."""


class ArgumentError(UserError, ValueError):
    """A bad argument value; the message names the flag."""


class TrainDataError(UserError, ValueError):
    """Training data that cannot be used as given (an empty set, a split that leaves nothing, a missing column)."""
