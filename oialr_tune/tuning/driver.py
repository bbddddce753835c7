"""`sweep`: run a tuning sweep, or resume one, in a folder this process holds.

Everything the user can get wrong (the space, the folder, the address) is checked before Ray
starts; the modules that need Ray (the arms, the cluster) are imported only then, so a refused
sweep answers at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from oialr_tune import sweep_state as state
from oialr_tune.errors import DiskFull, SweepInterrupted, UserError
from oialr_tune.files import remove_empty, writable_folder
from oialr_tune.metrics import SIZE_METRIC
from oialr_tune.results import SweepResults
from oialr_tune.space import (
    BASELINES,
    NAME_RE,
    SearchSpace,
    load_space,
    space_yaml,
    with_settings,
    with_user_code,
)
from oialr_tune.stats import in_words
from oialr_tune.sweep_state import SWEEP_FILE, TRIALS_FILE
from oialr_tune.tuning.storage import Store, drop_moved_state, open_sweep, read_state, write_state

__all__ = ["LOGGERS", "summary_line", "sweep"]

# Trackers a sweep can also log to (``--log``), each through Ray Tune's own logger callback.
LOGGERS = ("mlflow",)

# Ray snapshots the experiment (trial list + pickled searcher) at most this often, in seconds. Its
# "auto" default is >= 10 s, during which a killed driver could lose trials that already finished.
_SNAPSHOT_PERIOD_S = "2"


def sweep(
    space: SearchSpace | str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    results_dir: str | os.PathLike[str] = "results",
    resume: bool | str | os.PathLike[str] = False,
    address: str | None = None,
    baseline: str | None = None,
    verbose: int = 1,
    model: str | Callable[..., Any] | None = None,
    data: str | Callable[..., Any] | None = None,
    trainable: str | Callable[..., Any] | None = None,
    num_samples: int | None = None,
    max_epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    log: Sequence[str] = (),
) -> SweepResults:
    """Run a tuning sweep: the OIALR arm, then the full-rank baseline arm; return the results.

    Args:
        space: a :class:`SearchSpace`, a YAML path, a packaged space name, or None (quickstart).
        name: the sweep's folder under `results_dir`; default ``<space name>-<YYYYmmdd-HHMMSS>``.
        results_dir: a local folder, a shared path, or a URI Ray accepts as ``storage_path``.
        resume: continue an interrupted sweep: True with `name`, or the sweep's folder. The space
            is reloaded from its ``sweep.yaml``; arms that finished are not rerun. A local folder
            must be signed by this user's key and its sweep.yaml unedited (see `state`).
        address: join an existing Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``);
            None starts Ray on this machine (or uses the Ray already initialized in this process).
        baseline: override the space's ``baseline`` (same-budget, once, none).
        verbose: 0 silent, 1 one line per finished trial and a summary, 2 also Ray's own output.
        model, data, trainable: replace the space's ``model.name``, ``data.name`` or ``trainable``
            with an import path or a callable (shipped to Ray's workers; see `oialr_tune.plugins`).
        num_samples, max_epochs, overrides: run the space with another number of trials per arm,
            another epoch budget, or other values by dotted key (see `oialr_tune.space.with_settings`);
            the stored sweep.yaml holds the space as run.
        log: also send every trial's parameters and per-epoch metrics to these trackers, through
            Ray's own logger callbacks: ``mlflow`` writes one MLflow run per trial (tagged with its
            arm) into an experiment named after the sweep, in a local SQLite store ``mlflow.db`` in
            the results folder (offline; ``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow.db``).

    Raises UserError (before Ray starts, nothing written) for a bad space, folder or address, a
    folder another sweep holds, or (resume) an unsigned or edited folder; SweepInterrupted when
    the sweep stopped early (Ctrl-C, SIGTERM, a full disk, a lost cluster): it can then be resumed.
    """
    t0 = time.perf_counter()
    # Only the settings given (an empty `overrides`, as the CLI passes without --set, is none).
    settings = {k: v for k, v in {"num_samples": num_samples, "max_epochs": max_epochs, "overrides": overrides}.items()
                if v is not None and v != {}}  # fmt: skip
    if resume:
        store, space = _resumed_folder(space, resume, name, results_dir, settings)
    else:
        space = space if isinstance(space, SearchSpace) else load_space(space)
        if model is not None or data is not None or trainable is not None:
            space = with_user_code(space, model=model, data=data, trainable=trainable)
        if settings:
            space = with_settings(space, **settings)
        store = _new_folder(space, name, results_dir)
    if baseline is not None:
        if baseline not in BASELINES:
            raise UserError(f"--baseline: expected {', '.join(BASELINES)}, got {baseline!r}")
        if resume and baseline != space.baseline:
            raise UserError(f"--baseline: a resumed sweep keeps its baseline ({space.baseline})")
        space = dataclasses.replace(space, baseline=baseline)
    _check_loggers(log, store)
    from oialr_tune.checks import preflight  # torch: only for a space that passed validation

    space = preflight(space, local=address is None)
    if address is not None:
        from oialr_tune.tuning import cluster  # imports Ray: only for a sweep that passed the checks above

        cluster.check_address(address)
    # A local folder is created (or, resumed, proven writable) now: a read-only or misplaced one is
    # bad input, found before Ray starts. URIs are left to Ray.
    created = writable_folder(store.root, "results folder") if store.is_local else []
    saved = read_state(store)
    arms_done = saved["arms_done"]
    moved_from = saved.get("root") if saved.get("root") not in (None, store.root) else None
    lock = state.FolderLock(Path(store.root)) if store.is_local else None
    try:
        if lock is not None:
            lock.acquire()
            if not resume and set(os.listdir(store.root)) != {state.LOCK_FILE}:
                raise UserError(f"{store.root}: another sweep started in it; choose another --name")
        return _run_sweep(space, store, bool(resume), arms_done, address, verbose, t0, moved_from, tuple(log))
    finally:
        if lock is not None:
            lock.release()
        remove_empty(created)  # only folders left empty: a sweep refused before it wrote anything


def _check_loggers(log: Sequence[str], store: Store) -> None:
    """``--log`` names trackers this sweep can write to: known, installed, and a local results folder."""
    for tracker in log:
        if tracker not in LOGGERS:
            raise UserError(f"--log: expected one of {', '.join(LOGGERS)}, got {tracker!r}")
        if importlib.util.find_spec(tracker) is None:
            raise UserError(f"--log {tracker}: the {tracker} package is not installed "
                            f"(pip install 'oialr-tune[{tracker}]')")  # fmt: skip
        if not store.is_local:
            raise UserError(f"--log {tracker}: its file store goes into the results folder, which must be local "
                            f"(got {store.root})")  # fmt: skip


def _resumed_folder(
    space: SearchSpace | str | os.PathLike[str] | None,
    resume: bool | str | os.PathLike[str],
    name: str | None,
    results_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
) -> tuple[Store, SearchSpace]:
    """The folder of a sweep to resume (signed, sweep.yaml unedited) and the space it ran."""
    if resume is True:
        if not name:
            raise UserError("--resume: name the sweep folder to resume (results/<name>)")
        resume = Path(results_dir, name) if "://" not in str(results_dir) else f"{results_dir}/{name}"
    store, stored = open_sweep(resume, verify=True)
    if space is not None:
        given = space if isinstance(space, SearchSpace) else load_space(space)
        if given.to_dict() != stored.to_dict():
            raise UserError(f"{resume}: holds a sweep of a different space; resume without a space argument")
    if settings:
        raise UserError("--resume: a resumed sweep keeps its settings; drop --num-samples, --max-epochs and --set")
    return store, stored


def _new_folder(space: SearchSpace, name: str | None, results_dir: str | os.PathLike[str]) -> Store:
    """The (empty or absent) folder of a new sweep: ``<results_dir>/<name>``."""
    if name is None:
        name = f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if not NAME_RE.match(name):
        raise UserError(f"--name: expected letters, digits, '_', '-' or '.', got {name!r}")
    root = str(results_dir).rstrip("/") + "/" + name if "://" in str(results_dir) else str(Path(results_dir, name))
    store = Store(root)
    if not store.is_empty():
        raise UserError(f"{root}: already exists; resume it with --resume {root} or choose another --name")
    return store


def _run_sweep(
    space: SearchSpace,
    store: Store,
    resume: bool,
    arms_done: list[str],
    address: str | None,
    verbose: int,
    t0: float,
    moved_from: str | None = None,
    log: tuple[str, ...] = (),
) -> SweepResults:
    """The sweep proper, in a folder this process holds (see `sweep`); `moved_from`: where a resumed
    folder was when Ray last wrote its state, if it has moved or been copied since."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", _SNAPSHOT_PERIOD_S)
    # Ray also snapshots whenever a trial has saved `num_to_keep` checkpoints since the last one
    # (so its record never points at a deleted checkpoint) and warns when that is frequent; with
    # small trials it is, by design, and cheap: silence the warning, keep the snapshots.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray Tune, and torch for the trials' trainable, are imported only for a sweep that will run.
    from oialr_tune.tuning import cluster
    from oialr_tune.tuning.arm import run_arm
    from oialr_tune.tuning.collect import collect

    started = cluster.start_ray(address, verbose)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oialr-study")
    try:
        with _sigterm_as_interrupt() as stopped_by:
            try:
                cluster.check_cluster_fits(space.resources)
                if not resume:
                    store.key = state.load_key(create=True)
                    store.write_text(SWEEP_FILE, space_yaml(space))
                    write_state(store, [])
                    if store.is_local:
                        store.signature = state.Signature.create(Path(store.root), space.to_dict())
                        store.signature.save()
                if verbose:
                    print(f"sweep {space.name} -> {store.root}", flush=True)
                if moved_from is not None:
                    left = [arm for arm in space.arms() if arm not in arms_done]
                    if verbose:
                        print(f"moved from {moved_from}: Ray's state of {', '.join(left)} names that path; "
                              f"rebuilding from the journals", flush=True)
                    drop_moved_state(store, left)
                    write_state(store, arms_done)  # after the drop: a kill in between drops again
                for arm in space.arms():
                    if arm in arms_done:
                        if verbose:
                            print(f"[{arm}] already finished", flush=True)
                        continue
                    run_arm(space, arm, store, verbose, log)
                    arms_done.append(arm)
                    write_state(store, arms_done)
                res, studies = collect(space, store, pool)
            except KeyboardInterrupt:
                raise SweepInterrupted(
                    f"stopped; continue with: oialr-tune sweep --resume {store.root}", stopped_by[0]
                ) from None
            except DiskFull:
                raise
            except SweepInterrupted as e:
                e.signum = stopped_by[0]
                raise
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise DiskFull(f"disk full ({e.strerror}) writing {e.filename or store.root}; free some space and "
                               f"continue with: oialr-tune sweep --resume {store.root}") from None
    finally:
        if started:
            cluster.stop_ray()
        pool.shutdown(wait=True)
    studies.result()  # raises what writing study.db raised
    wall = time.perf_counter() - t0
    if verbose:
        print(summary_line(res), flush=True)
        print(f"results: {store.root} ({len(res.trials)} trials, {wall:.1f}s); TensorBoard: tensorboard --logdir "
              f"{store.root}", flush=True)
    _check_every_arm_finished(res, store)
    return res


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM (SLURM, Kubernetes, ``kill``) stops the sweep as Ctrl-C does: Ray's own SIGINT
    handling saves the experiment and ends `fit`, or, outside it, a KeyboardInterrupt. Yields a
    one-item list holding the signal that stopped the sweep (SIGINT unless SIGTERM came)."""
    stopped_by = [int(signal.SIGINT)]
    if threading.current_thread() is not threading.main_thread():
        yield stopped_by
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        stopped_by[0] = signum
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stopped_by
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_every_arm_finished(res: SweepResults, store: Store) -> None:
    """UserError when an arm has no finished trial: a sweep of nothing must not exit 0.

    Raised after the results are written (they hold the errors), so `best` and `report` can still
    show them; the message says where.
    """
    parts = []
    df = res.trials
    errors = 0
    for arm in res.space.arms():
        if arm not in res.summary["best"] and res.usable(arm).empty:  # (not merely none under the size budget)
            rows = df[df["arm"] == arm]
            errored = int((rows["status"] == "ERROR").sum())
            diverged = int((rows["trainer_status"] == "diverged").sum())
            errors += errored
            parts.append(f"arm {arm}: {errored} of {len(rows)} trials errored, {diverged} diverged")
    if parts:
        # Only errored trials have an error.txt; a diverged one ended normally with a non-finite loss.
        where = (f"; the errors are in the error column of {store.join(TRIALS_FILE)} and in full in "
                 f"{store.join('<arm>', 'trial_*', 'error.txt')}") if errors else (
                 f"; every trial's loss became non-finite (see trainer_status in {store.join(TRIALS_FILE)}): "
                 f"lower the learning rate range")
        raise UserError(f"{store.root}: no trial finished ({'; '.join(parts)}){where}")


def summary_line(res: SweepResults) -> str:
    """Each arm's best trial in one line, and how OIALR compares with full rank."""
    m = res.space.objective.metric
    best = res.summary["best"]

    def part(arm: str, label: str) -> str:
        b = best.get(arm)
        budget = res.space.objective.max_trainable_fraction if arm == "oialr" else None
        if b is None:
            return f"{label}: no finished trial" + (f" at or under trainable fraction {budget}" if budget else "")
        return f"{label} {m}={b[m]:.4f} (trainable fraction {_fraction(b):.3f}, trial {b['trial_id']})"

    line = part("oialr", "best OIALR")
    if "baseline" in res.space.arms():
        line += " vs " + part("baseline", "best full-rank")
        o, f = best.get("oialr"), best.get("baseline")
        if o and f:
            points = (100, " points") if m == "val_acc" else (1, "")  # accuracy gaps read best in points
            gap = in_words(o[m], f[m], res.space.objective.direction, *points)
            share = _fraction(o) / max(_fraction(f), 1e-12)
            line += f": OIALR {gap} with {share:.1%} of the trainable parameters"
    return line


def _fraction(best: Mapping[str, Any]) -> float:
    """A summary entry's trainable fraction (missing: full size, as in the ranking)."""
    value = best.get(SIZE_METRIC)
    return 1.0 if value is None else float(value)
