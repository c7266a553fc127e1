"""User-facing errors: one clear line, no traceback from deep inside."""


class InfLLMLiteError(Exception):
    """A problem with the user's input (path, file, config, argument).

    The CLI prints ``error: <message>`` and exits with status 1. The message must say
    what is wrong and, where it helps, what to do about it, in one line.
    """


def describe(error: BaseException) -> str:
    """An exception's message, or its type's name when it has none (``KeyError()``)."""
    return str(error) or type(error).__name__
