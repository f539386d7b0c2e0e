"""Errors caused by the user's input. The CLI prints them as one line (set MEGASWIFT_DEBUG=1 for the traceback)."""


class UserError(Exception):
    """Mixed into error types whose message alone tells the user what to fix."""


class ArgumentError(UserError, ValueError):
    """A bad argument value; the message names the flag."""


class TrainDataError(UserError, ValueError):
    """Training data that cannot be used as given (an empty set, a split that leaves nothing, a missing column)."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its type when it has none), cut at ``limit`` characters."""
    text = ' '.join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'
