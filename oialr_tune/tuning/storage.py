"""A sweep's folder: a local path, or a URI that pyarrow (and so Ray) understands.

Ray writes its experiments there itself; :class:`Store` writes our small files (sweep.yaml,
state.json, the journals, trials.csv, summary.json, study.db) and reads them back on resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import yaml

from oialr_tune import sweep_state as state
from oialr_tune.errors import UserError
from oialr_tune.files import write_atomic
from oialr_tune.space import ARMS, SearchSpace, space_from_dict
from oialr_tune.sweep_state import STATE_FILE, SWEEP_FILE

__all__ = ["Store", "open_sweep", "read_state", "write_state"]

# How long a URI's storage may take to answer its first look before the sweep refuses it.
_STORAGE_PROBE_S = 10.0


class Store:
    """The sweep's folder. Ray writes its experiments there itself; this writes our small files.

    A local path is used as is, and so is a ``file://`` URI's path (then the local checks apply: a
    read-only folder is refused before Ray starts); another URI (``s3://``, ``gs://``...) goes
    through pyarrow, the same filesystem layer Ray uses for ``storage_path``.
    """

    def __init__(self, root: str):
        root = root.removeprefix("file://")
        # Set by the sweep: the folder's signature (local folders) and the key its journals are signed with.
        self.signature: state.Signature | None = None
        self.key: bytes | None = None
        self.is_local = "://" not in root
        if self.is_local:
            self.root = str(Path(root).expanduser().resolve())
            self._fs = None
            self._base = self.root
        else:
            self.root = root.rstrip("/")
            try:
                self._fs, self._base = pyarrow.fs.FileSystem.from_uri(self.root)
            except Exception as e:
                raise UserError(f"{root}: not a storage path or URI pyarrow can open ({e})") from None
            self._probe()

    def _probe(self) -> None:
        """Look at the folder once, within `_STORAGE_PROBE_S`, or raise UserError naming the URI.

        Without network or credentials pyarrow's GCS client retries silently for 15 minutes (S3
        fails at once, in `from_uri`). The look runs on a daemon thread that is left behind on a
        timeout: nothing waits for it, and the command ends with its one-line error.
        """
        outcome: list[BaseException | None] = []

        def look() -> None:
            try:
                self._fs.get_file_info(self._base)
                outcome.append(None)
            except Exception as e:
                outcome.append(e)

        thread = threading.Thread(target=look, name="oialr-storage-probe", daemon=True)
        thread.start()
        thread.join(_STORAGE_PROBE_S)
        if not outcome:
            raise UserError(
                f"{self.root}: the storage did not answer within {_STORAGE_PROBE_S:g} s (no network or no credentials?)"
            )
        if outcome[0] is not None:  # the CLI prints a multi-line message as one line
            raise UserError(f"{self.root}: cannot reach the storage ({type(outcome[0]).__name__}: {outcome[0]})")

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if not self.is_local else str(Path(self.root, *parts))

    def _fs_path(self, rel: str) -> str:
        return f"{self._base}/{rel}" if rel else self._base

    def exists(self, rel: str = "") -> bool:
        if self.is_local:
            return Path(self.root, rel).exists()
        return self._fs.get_file_info(self._fs_path(rel)).type != pyarrow.fs.FileType.NotFound

    def is_empty(self) -> bool:
        if self.is_local:
            p = Path(self.root)
            return not p.exists() or (p.is_dir() and not any(p.iterdir()))
        info = self._fs.get_file_info(pyarrow.fs.FileSelector(self._base, allow_not_found=True))
        return not info

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            return Path(self.root, rel).read_bytes()
        with self._fs.open_input_stream(self._fs_path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def relative(self, fs_path: str) -> str:
        """A path Ray reports (local, or on the store's filesystem) relative to the sweep folder:
        what the folder's own files record, so that a moved or copied folder still works."""
        base = self.root if self.is_local else self._base
        return os.path.relpath(fs_path, base) if self.is_local else fs_path.removeprefix(base.rstrip("/") + "/")

    def top_files(self, rel: str) -> list[str]:
        """Names of the plain files directly in folder `rel` (an arm's Ray state)."""
        if self.is_local:
            folder = Path(self.root, rel)
            return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        infos = self._fs.get_file_info(pyarrow.fs.FileSelector(self._fs_path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File)

    def remove(self, rel: str) -> None:
        if self.is_local:
            Path(self.root, rel).unlink(missing_ok=True)
        else:
            self._fs.delete_file(self._fs_path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_local:
            path = Path(self.root, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)  # a reader never sees half a file, even after a crash
            return
        self._fs.create_dir(self._base, recursive=True)
        with self._fs.open_output_stream(self._fs_path(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    @contextlib.contextmanager
    def local_file(self, rel: str) -> Iterator[Path]:
        """A local path for `rel` (for SQLite): the file itself, or a temporary copy uploaded after."""
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            yield Path(self.root, rel)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, rel)
            if self.exists(rel):
                with self._fs.open_input_stream(self._fs_path(rel)) as f:
                    local.write_bytes(f.read())
            yield local
            self.write_bytes(rel, local.read_bytes())

    def prune_checkpoints(self, trial_dir: str, keep: str | None) -> None:
        """Delete a trial's ``checkpoint_*`` folders except `keep` (a path relative to the sweep folder)."""
        if self.is_local:
            for ckpt in Path(self.root, trial_dir).glob("checkpoint_*"):
                if keep is None or ckpt != Path(self.root, keep):
                    shutil.rmtree(ckpt, ignore_errors=True)
            return
        for info in self._fs.get_file_info(pyarrow.fs.FileSelector(self._fs_path(trial_dir), allow_not_found=True)):
            is_checkpoint = info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
            if is_checkpoint and (keep is None or info.path.rstrip("/") != self._fs_path(keep).rstrip("/")):
                self._fs.delete_dir(info.path)

    def journal(self, arm: str) -> state.Journal:
        """The arm's journal; for a URI store, a local copy uploaded after every ended trial."""
        key = self.key
        rel = state.JOURNAL_TEMPLATE.format(arm=arm)
        if self.is_local:
            return state.Journal(Path(self.root, rel), key)
        local = Path(tempfile.mkdtemp(prefix="oialr-journal-"), rel)
        if self.exists(rel):
            local.write_bytes(self.read_bytes(rel))
        return state.Journal(local, key, on_durable=lambda: self.write_bytes(rel, local.read_bytes()))


def read_state(store: Store) -> dict[str, Any]:
    """Which arms have finished, and where the folder was when Ray last wrote its state (``state.json``:
    ``arms_done``, ``root``); read before Ray starts, so a damaged file is bad input."""
    if not store.exists(STATE_FILE):
        return {"arms_done": []}
    try:
        saved = json.loads(store.read_text(STATE_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if (not isinstance(saved, dict) or not isinstance(saved.get("arms_done"), list)
            or not isinstance(saved.get("root", ""), str)):
        raise UserError(
            f"{store.join(STATE_FILE)}: damaged (truncated or not this tool's JSON); delete it and resume "
            "again: each arm is then resumed from Ray's own record"
        )
    return saved


def open_sweep(path: str | os.PathLike[str], verify: bool = False) -> tuple[Store, SearchSpace]:
    """A sweep folder and its space. With `verify` (a resume), a local folder must carry this
    user's signature and an unedited sweep.yaml; the signature is then attached to the store."""
    store = Store(str(path))
    if not store.exists(SWEEP_FILE):
        raise UserError(f"{path}: holds no sweep (no {SWEEP_FILE})")
    try:
        data = yaml.safe_load(store.read_text(SWEEP_FILE))
    except yaml.YAMLError:
        raise UserError(f"{path}/{SWEEP_FILE}: invalid YAML") from None
    if verify and not store.is_local:  # a bucket's state is not signed: its access control is the boundary
        store.key = state.load_key(create=True)
    elif verify:
        store.signature = state.verify_folder(Path(store.root), data, ARMS)
        store.key = store.signature.key
    return store, space_from_dict(data, source=f"{path}/{SWEEP_FILE}")



def write_state(store: Store, arms_done: list[str]) -> None:
    """Record the arms that finished and the folder's current place (``state.json``, see `read_state`)."""
    store.write_text(STATE_FILE, json.dumps({"arms_done": arms_done, "root": store.root}))


def drop_moved_state(store: Store, arms: list[str]) -> None:
    """Delete Ray's saved state of `arms` in a folder that moved (or was copied) since Ray wrote it.

    Ray's state records the storage path it was written under, and a restored Tuner keeps writing
    there: into the original folder of a copy, or nowhere for a moved one. Without it each arm is
    rebuilt from its journal (:mod:`oialr_tune.tuning.arm`), every new trial inside this folder.
    The trial folders stay: they hold the ended trials' checkpoints and histories.
    """
    for arm in arms:
        for name in store.top_files(arm):
            store.remove(f"{arm}/{name}")
        if store.signature is not None:
            store.signature.refresh(arm)
