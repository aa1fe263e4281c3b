"""One exception type for every mistake a user can make.

The command line turns a `CompressError` into one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class CompressError(Exception):
    """A problem with the user's input or environment, explained in one line."""
