"""One exception type for every mistake a user can make.

The command line turns a `CompressError` into one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class CompressError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
