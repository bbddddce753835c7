"""The one exception type that means "the user gave us bad input"."""


class UserError(Exception):
    """Bad input (a config key, a path, a flag).

    The CLI prints the message as one line and exits with status 2, with no traceback
    (unless ``--debug``). Raise it before anything is written, naming the key or path.
    """
