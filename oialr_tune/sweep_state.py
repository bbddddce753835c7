"""A sweep folder's own durable state: the journal of ended trials, the signature, the lock.

Ray's experiment state is snapshot every few seconds, written in place and uploaded by a thread,
so after a kill it can lag, be truncated, or be missing; and it is a pickle, so resuming it runs
whatever code the folder holds. What a sweep promises therefore rests on small files of our own,
none of them a pickle, all written before anything is reported:

* ``journal-<arm>.jsonl``: append-only, one JSON object per line. An ``epoch`` line per reported
  epoch (not fsynced: a killed process loses nothing from the page cache) and an ``end`` line per
  ended trial, fsynced *before* its done line is printed. trials.csv and study.db are views
  rebuilt from it. A line torn by a kill (the last one) is skipped; every line carries an HMAC.
* ``signature.json``: the sweep's config (and its hash) and the SHA-256 of every file Ray will
  unpickle on resume (``<arm>/tuner.pkl``, ``experiment_state-*``, searcher state...), under an
  HMAC keyed by a secret in the user's config directory. ``sweep.yaml`` must equal that config.
  A folder this user did not write cannot pass, so ``--resume`` never unpickles it.
* ``.lock``: the pid and host of the one process that may write the folder.

It also names every file of a sweep folder (`SWEEP_FILE`, `TRIALS_FILE`, ...). It imports neither
Ray, Optuna nor torch: ``best``/``report`` read the journal too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oialr_tune.errors import UserError
from oialr_tune.files import write_atomic

# The name of every file a sweep folder holds: this module owns them all.
SWEEP_FILE = "sweep.yaml"  # the validated search space
STATE_FILE = "state.json"  # which arms have finished (the sweep's own bookkeeping)
TRIALS_FILE = "trials.csv"  # one row per trial, a view rebuilt from the journals
SUMMARY_FILE = "summary.json"  # the best trials (a retrain folder holds one too)
STUDY_FILE = "study.db"  # the Optuna study, written from the journals
SIGNATURE_FILE = "signature.json"
LOCK_FILE = ".lock"
JOURNAL_TEMPLATE = "journal-{arm}.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"  # a run's checkpoint (`oialr_tune.run_record`), in each Ray checkpoint folder
RETRAIN_DIR = "retrain"  # what `oialr-tune retrain` writes, by default
REPORT_FILE = "report.md"  # what `oialr-tune report` writes
MLFLOW_FILE = "mlflow.db"  # `sweep --log mlflow`: the MLflow tracking store
_FORMAT = 1
# The one fault-injection hook: `OIALR_TUNE_TEST_KILL_AT=<point>` in the driver's environment makes
# it SIGKILL its own process group when it reaches that point (see `kill_point`), so the kill-point
# tests hit each phase exactly. Read once, at import: unset, a kill point costs one comparison.
KILL_ENV = "OIALR_TUNE_TEST_KILL_AT"
_KILL_AT = os.environ.get(KILL_ENV)


def kill_point(*where: object) -> None:
    """SIGKILL this process group if `OIALR_TUNE_TEST_KILL_AT` names this point (tests only).

    The point is `where` joined by ``:`` (``kill_point("epoch", arm, 3)`` is ``epoch:oialr:3``),
    built only when the variable is set. A real kill, not an exception: nothing below gets to
    clean up, as with ``kill -9`` or an OOM.
    """
    if _KILL_AT is not None and ":".join(map(str, where)) == _KILL_AT:
        os.killpg(os.getpgrp(), signal.SIGKILL)


# --- the user's key ------------------------------------------------------------------------------


def key_path() -> Path:
    """``$XDG_CONFIG_HOME/oialr-tune/key`` (default ``~/.config/oialr-tune/key``): outside every
    results folder, so copying a folder does not copy the right to resume it elsewhere."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base, "oialr-tune", "key")


def load_key(create: bool) -> bytes | None:
    """The user's signing key; created (0600, in a 0700 folder) when `create` and missing.

    Returns None when there is no key and `create` is false (nothing this user signed exists).
    """
    path = key_path()
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # two first sweeps at once: one key wins
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
    try:
        key = path.read_text().strip()
    except OSError as e:
        raise UserError(f"{path}: cannot read the signing key ({e.strerror or e})") from None
    if len(key) < 32:
        raise UserError(f"{path}: not an oialr-tune signing key (too short); remove it to make a new one")
    return key.encode()


def _mac(key: bytes, payload: Mapping[str, Any]) -> str:
    return hmac.new(key, _canonical(payload), hashlib.sha256).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a sweep config in canonical JSON (key order and YAML spelling do not matter)."""
    return hashlib.sha256(_canonical(config)).hexdigest()


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (in `old`'s order, then keys only `new` has) where two configs differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for k in [*old, *(k for k in new if k not in old)]:
            diff = first_difference(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
            if diff is not None:
                return diff
        return None
    return None if old == new else (prefix or "(top level)", old, new)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the signature -------------------------------------------------------------------------------


@dataclass
class Signature:
    """``signature.json`` of a local sweep folder: its config and the digests of the files signed.

    `files` maps a path relative to the folder to its SHA-256. The HMAC covers everything, so
    neither a digest nor the config can be changed without the key.
    """

    root: Path
    key: bytes
    config: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    _seen: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, root: Path, config: Mapping[str, Any]) -> Signature:
        """A new folder's signature (the key is created on first use)."""
        key = load_key(create=True)
        assert key is not None
        return cls(root, key, json.loads(json.dumps(config)))

    @classmethod
    def verify(cls, root: Path) -> Signature:
        """The folder's signature if this user's key made it; UserError (one line) otherwise.

        Reads only JSON: nothing in the folder is unpickled before this has passed.
        """
        path = root / SIGNATURE_FILE
        refuse = (
            f"{root}: not signed by this user's key ({key_path()}); --resume runs only folders this user's "
            f"oialr-tune wrote, because Ray's state in them is a pickle that runs code when loaded"
        )
        key = load_key(create=False)
        if key is None or not path.is_file():
            raise UserError(refuse)
        try:
            data = json.loads(path.read_text())
            payload = {k: data[k] for k in ("format", "config", "config_sha256", "files")}
            mac = data["mac"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(refuse) from None
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, payload)):
            raise UserError(refuse)
        if payload["config_sha256"] != config_hash(payload["config"]):
            raise UserError(refuse)
        return cls(root, key, payload["config"], dict(payload["files"]))

    def save(self) -> None:
        payload = {
            "format": _FORMAT,
            "config": self.config,
            "config_sha256": config_hash(self.config),
            "files": dict(sorted(self.files.items())),
        }
        data = {**payload, "mac": _mac(self.key, payload)}
        write_atomic(self.root / SIGNATURE_FILE, (json.dumps(data, indent=1) + "\n").encode())

    def sign(self, *rels: str) -> None:
        """Record the current contents of these files (relative paths) and save."""
        for rel in rels:
            self.files[rel] = _sha256(self.root / rel)
        self.save()

    def refresh(self, folder: str) -> None:
        """Re-sign the files at the top of `folder` (an arm's Ray state) that changed since last seen.

        Called after every step of Ray's loop, so it costs a directory listing and a stat per file
        when nothing changed. Files that vanished are dropped from the signature.
        """
        now: dict[str, tuple[int, int]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / folder):
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    now[f"{folder}/{entry.name}"] = (st.st_mtime_ns, st.st_size)
        old = {rel: s for rel, s in self._seen.items() if rel.startswith(folder + "/")}
        gone = [rel for rel in self.files if rel.startswith(folder + "/") and rel not in now]
        if now == old and not gone:
            return
        for rel in gone:
            del self.files[rel]
            self._seen.pop(rel, None)
        changed = [rel for rel, s in now.items() if self._seen.get(rel) != s]
        self._seen.update(now)
        self.sign(*changed)

    def matches(self, rel: str) -> bool:
        """Whether a file still has the contents that were signed."""
        path = self.root / rel
        return rel in self.files and path.is_file() and hmac.compare_digest(self.files[rel], _sha256(path))

    def unsigned_in(self, folder: str) -> list[str]:
        """Files at the top of `folder` that are not signed as they are now (changed, or never signed)."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / folder):
                rel = f"{folder}/{entry.name}"
                if entry.is_file(follow_symlinks=False) and not self.matches(rel):
                    out.append(rel)
        return sorted(out)


# --- the journal ---------------------------------------------------------------------------------


class Journal:
    """An arm's append-only record of its trials (see the module docstring).

    One ``os.write`` per line on an ``O_APPEND`` descriptor, so lines never interleave; ``end``
    lines are fsynced before :meth:`append` returns, which also makes every earlier line durable.
    """

    def __init__(self, path: Path, key: bytes, on_durable: Callable[[], None] | None = None):
        self.path, self.key, self.on_durable = path, key, on_durable  # on_durable: upload to a URI store
        self._fd: int | None = None

    def append(self, record: Mapping[str, Any], durable: bool) -> None:
        """Add one record; with `durable`, return only once it is on disk. OSError (a full disk)
        propagates: a trial that could not be recorded must not be reported as done."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size and _last_byte(self.path, size) != b"\n":
                os.write(self._fd, b"\n")  # a line torn by a kill: start the next on its own line
        payload = dict(record)
        line = json.dumps({**payload, "mac": _mac(self.key, payload)}, sort_keys=True) + "\n"
        data = line.encode()
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"short write to {self.path}")
        if durable:
            os.fsync(self._fd)
            if self.on_durable is not None:
                self.on_durable()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(size - 1)
        return f.read(1)


def read_journal(path: Path, key: bytes | None) -> Iterator[dict[str, Any]]:
    """The journal's records in order. A line torn by a kill (not valid JSON) is skipped.

    With `key`, every whole line must carry this user's HMAC (a resume trusts it); without, lines
    are read as plain data (``best`` on someone else's copy of a folder).
    """
    if not path.is_file():
        return
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            mac = record.pop("mac", None)
            if key is not None and (not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, record))):
                raise UserError(f"{path}:{n}: not signed by this user's key ({key_path()}); the journal was changed")
            yield record


def ended_trials(path: Path, key: bytes | None) -> dict[str, dict[str, Any]]:
    """trial_id -> (its end record, with its per-epoch records under ``epochs``), in end order.

    A trial can end more than once (an errored trial retried on resume): its first ``TERMINATED``
    end wins (that is what was printed done), else its latest end.
    """
    epochs: dict[str, dict[int, dict[str, Any]]] = {}
    ended: dict[str, dict[str, Any]] = {}
    for rec in read_journal(path, key):
        tid = rec.get("trial_id")
        if rec.get("kind") == "epoch":
            epochs.setdefault(tid, {})[int(rec.get("training_iteration", 0))] = rec
        elif rec.get("kind") == "end":
            if ended.get(tid, {}).get("status") == "TERMINATED":
                continue
            ended.pop(tid, None)  # re-insert: order by the latest end
            ended[tid] = rec
    for tid, rec in ended.items():
        upto = int(rec.get("result", {}).get("training_iteration") or 0)
        rec["epochs"] = [e for it, e in sorted(epochs.get(tid, {}).items()) if it <= upto]
    return ended


# --- the lock ------------------------------------------------------------------------------------


def verify_folder(root: Path, config: Any, arms: Iterable[str]) -> Signature:
    """This user's signature of the local sweep folder `root`, checked against its sweep.yaml `config`
    (plain data) and every journal line of `arms`; UserError naming what does not check."""
    signature = Signature.verify(root)
    diff = first_difference(signature.config, json.loads(json.dumps(config)))
    if diff is not None:
        key, was, now = diff
        raise UserError(
            f"{root}/{SWEEP_FILE}: edited since the sweep started ({key}: {was!r} -> {now!r}); a resumed sweep "
            f"keeps its config: restore it or start a new sweep"
        )
    for arm in arms:  # every journal line must be this user's too
        ended_trials(root / JOURNAL_TEMPLATE.format(arm=arm), signature.key)
    return signature


class FolderLock:
    """One writer per results folder: ``.lock`` holds the holder's pid, host and start time.

    Created with a hard link from a complete temporary file, so the lock file is never seen
    empty. A lock whose holder is a dead pid on this host is stale and taken over; a lock from
    another host cannot be checked and is respected.
    """

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self._held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_name(f".lock.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(me) + "\n")
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                    self._held = True
                    return
                except FileExistsError:
                    holder = self._holder()
                    if not self._stale(holder):
                        raise UserError(
                            f"{self.path.parent}: in use by oialr-tune pid {holder.get('pid')} on "
                            f"{holder.get('host')} since {holder.get('started')}; wait for it to end "
                            f"(or remove {self.path} if that process is gone)"
                        ) from None
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
            raise UserError(f"{self.path.parent}: another oialr-tune took the folder's lock at the same time")
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: Mapping[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
