"""The one exception type for a user's mistake (bad file, bad value, bad option).

The command line prints its message without a traceback and exits with status 2; library callers
can catch it as a ValueError.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file or value and what was expected."""
