"""The exceptions the command line turns into an exit status: bad input (2), a stopped sweep (128 + signal),
a full disk (74); and `one_line`, which makes any error text fit the one line a bad input gets."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a config key, a path, a flag).

    The CLI prints the message as one line and exits with status 2, with no traceback
    (unless ``--debug``). Raise it before anything is written, naming the key or path.
    """


class LoopMistake(UserError):
    """A mistake of a user's training loop that every trial would repeat: it never calls
    ``trial.report``, or reports without a metric the sweep needs. A sweep stops at the first trial
    that shows one (`oialr_tune.tuning.hooks`) instead of failing all of them."""


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


def one_line(error: BaseException | str, limit: int | None = 300) -> str:
    """An exception (as ``Type: message``) or a message as one line, cut at `limit` characters (None: whole).

    Library errors span lines (torch's state-dict mismatch lists every tensor), and the promise of
    a bad input is one line on stderr: the lines are joined with ``"; "``, runs of spaces collapsed.
    """
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
