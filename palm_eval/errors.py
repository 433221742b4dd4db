"""The one exception type users see.

Anything raised as `PalmEvalError` is a problem with the user's input (a name, a file, a length)
and is printed by the command-line tools as a single line that says what to do, without a traceback.
"""


class PalmEvalError(Exception):
    """A user-facing error: the message alone must tell the user what went wrong and how to fix it."""
