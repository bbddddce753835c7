"""The exceptions the command line turns into an exit status: bad input (2), a stopped sweep (128 + signal),
a full disk (74)."""


class UserError(Exception):
    """Bad input (a config key, a path, a flag).

    The CLI prints the message as one line and exits with status 2, with no traceback
    (unless ``--debug``). Raise it before anything is written, naming the key or path.
    """


class SweepInterrupted(Exception):
    """The sweep stopped before every arm finished (Ctrl-C, SIGTERM, a lost cluster, a full disk);
    it can be resumed. `signum` is the signal that stopped it (the CLI exits with 128 + it)."""

    def __init__(self, message: str, signum: int = 2):  # 2: SIGINT
        super().__init__(message)
        self.signum = signum


class DiskFull(SweepInterrupted):
    """The sweep stopped because its folder's disk is full (ENOSPC); it can be resumed once space is freed.

    Not a signal: the CLI exits with :data:`EXIT_DISK_FULL`, sysexits' EX_IOERR, not 130 as after Ctrl-C.
    """

    def __init__(self, message: str):
        super().__init__(message, signum=0)


EXIT_DISK_FULL = 74
