"""Tuning sweeps: Ray Tune runs trainer trials, Optuna proposes settings, ASHA stops weak trials.

The only module that imports Ray and Optuna (with its driver callback, `sweep_hooks`). One sweep
runs up to two *arms*, each a Ray Tune experiment in ``<results>/<name>/``:

* ``oialr``: OIALR on, searching the OIALR knobs and the learning-rate ranges of the space;
* ``baseline``: the same network at full rank (``oialr.enabled: false``), searching the same
  non-OIALR ranges with the same budget (``baseline: same-budget``), or one run of the base
  settings (``once``), or nothing (``none``) -- so "tuned OIALR beats full rank" is measured.

Why it is built the way it is:

* **Nothing reported finished is lost, whatever kills the driver.** Each ended trial is written
  to the arm's journal (fsynced) before its done line is printed, and trials.csv, summary.json
  and study.db are rebuilt from the journals (:mod:`oialr_tune.sweep_state`). On resume, Ray's
  saved state is restored only when it is signed by this user's key and agrees with the journal;
  otherwise (a kill mid-write, a full disk, a state older than the journal, a moved folder) the
  arm is rebuilt: a new Tuner whose searcher is told the journal's trials, for the trials left.
* **Resumable without an Optuna database during the run.** ``OptunaSearch(storage=...)`` breaks
  ``Tuner.restore`` after a killed driver: the searcher pickled with the experiment lags the
  database, re-tells trials the database already holds as finished, and Optuna refuses
  (``UpdateFinishedTrialError``). So the searcher keeps its study in memory, Ray pickles it
  with the experiment state, and ``study.db`` is written from Ray's record once the arms have
  finished (on a thread, while Ray stops): one source of truth, and the database is a derived,
  rebuildable view for Optuna's tools.
* **Cheap trials.** Actors are reused (a fresh process per trial costs more than a small trial);
  the trainer caches datasets per process; trials report every epoch but checkpoint only at the
  ASHA rungs, every ``checkpoint.every`` epochs and at the end; TensorBoard events are written
  when a trial ends, not flushed after every epoch (`_TensorBoardAtTrialEnd`); the experiment
  state is snapshot every few seconds so a killed sweep loses at most that much scheduling.
* **Same config, same result, whatever ran before in the process.** A trial builds its whole
  trainer config from the stored base and its sampled values, and the trainer seeds everything
  from that config; nothing is kept between trials but the dataset cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from oialr_tune import sweep_state
from oialr_tune.errors import UserError
from oialr_tune.files import remove_empty, writable_folder, write_atomic
from oialr_tune.space import (
    NAME_RE,
    SIZE_METRIC,
    Param,
    Resources,
    SearchSpace,
    load_space,
    preflight,
    space_from_dict,
    with_user_code,
)

if TYPE_CHECKING:  # pandas is imported where tables are built: Ray workers never need it
    import pandas as pd

SWEEP_FILE = "sweep.yaml"
STATE_FILE = "state.json"
TRIALS_FILE = "trials.csv"
SUMMARY_FILE = "summary.json"
STUDY_FILE = "study.db"
# How long the first look at a URI results folder may take before the sweep gives up (see _Store._probe).
_STORAGE_PROBE_S = 10.0
# Ray snapshots the experiment (trial list + pickled searcher) at most this often, in seconds. Its
# "auto" default is >= 10 s, during which a killed driver could lose trials that already finished.
_SNAPSHOT_PERIOD_S = "2"


class SweepInterrupted(Exception):
    """The sweep stopped before every arm finished (Ctrl-C, SIGTERM, a lost cluster, a full disk);
    it can be resumed. `signum` is the signal that stopped it (the CLI exits with 128 + it)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


@dataclass
class SweepResult:
    """What a sweep leaves behind, also readable later with :func:`load_sweep`.

    `trials` has one row per trial of every arm (the contents of ``trials.csv``); `best` maps an
    arm to its best trial (trial_id, config, val_acc, trainable_fraction, checkpoint); `pareto`
    holds the OIALR arm's non-dominated trials (accuracy vs trainable fraction) for ``mode: multi``.
    """

    path: str
    space: SearchSpace
    trials: pd.DataFrame
    best: dict[str, dict[str, Any]]
    pareto: pd.DataFrame | None = None
    summary_line: str = ""
    wall_time_s: float | None = None

    def best_config(self, arm: str = "oialr") -> dict[str, Any]:
        """The full trainer config (plain data) of an arm's best trial, ready for a retrain."""
        if arm not in self.best:
            raise UserError(f"{self.path}: no finished trial in arm {arm!r}")
        from oialr_tune.config import train_config_to_dict

        return train_config_to_dict(self.space.trial_config(arm, self.best[arm]["config"]))


# --- storage: a local folder or a URI that pyarrow (and so Ray) understands ------------------------


class _Store:
    """The sweep's folder. Ray writes its experiments there itself; this writes our small files.

    A local path is used as is, and so is a ``file://`` URI's path (then the local checks apply: a
    read-only folder is refused before Ray starts); another URI (``s3://``, ``gs://``...) goes
    through pyarrow, the same filesystem layer Ray uses for ``storage_path``.
    """

    def __init__(self, root: str):
        root = root.removeprefix("file://")
        # Set by the sweep: the folder's signature (local folders) and the key its journals are signed with.
        self.signature: sweep_state.Signature | None = None
        self.key: bytes | None = None
        self.is_local = "://" not in root
        if self.is_local:
            self.root = str(Path(root).expanduser().resolve())
            self._fs = None
            self._base = self.root
        else:
            import pyarrow.fs

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
        import pyarrow.fs

        return self._fs.get_file_info(self._fs_path(rel)).type != pyarrow.fs.FileType.NotFound

    def is_empty(self) -> bool:
        if self.is_local:
            p = Path(self.root)
            return not p.exists() or (p.is_dir() and not any(p.iterdir()))
        import pyarrow.fs

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
        import pyarrow.fs

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
    def local_file(self, rel: str):
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


# --- the trial: runs in a Ray worker process ------------------------------------------------------


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's epoch metrics in a form Ray logs well: numbers stay, structures are encoded.

    Ray's CSV/TensorBoard loggers and its dataframe want flat scalars; per-layer ranks are kept as
    one JSON string (a ViT has dozens of layers: one column each would swamp the tables).
    """
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k in ("ranks", "dense_layers"):  # dense_layers: weight layers OIALR leaves dense -> why
            out[k] = json.dumps(v, sort_keys=True)
        elif k == "oialr_events":
            out["oialr_events"] = len(v)
        elif k == "status":
            out["run_status"] = v  # Ray's result dicts have their own notion of done/status
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
    return out


class _ReportToRay:
    """Trainer callback: one ``ray.tune.report`` per epoch, with the checkpoint when one was written.

    Defined without subclassing at import time so this module imports without torch; it is
    registered with the trainer's `Callback` base inside the trial.
    """

    def __init__(self, extra: Mapping[str, Any]):
        self.extra = dict(extra)

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        row = _scalar_metrics(metrics)
        row.update(self.extra)
        row["reported_at"] = time.time()  # wall clock, for best-so-far-vs-time curves (Ray's is whole seconds)
        # Ray copies the folder into the trial's storage during `report`, so the trainer may
        # overwrite its checkpoint file afterwards.
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(row, checkpoint=checkpoint)

    def on_train_end(self, result: Any) -> None:
        pass


def run_trial(config: dict[str, Any], *, base: dict[str, Any], checkpoint_epochs: list[int],
              user_code: bytes | None = None) -> None:
    """One Ray Tune trial: the trainer on `base` with the sampled `config` (dotted keys).

    `user_code` is the driver's resolved user functions (`oialr_tune.plugins.pickled`), so a
    worker runs the same code even where it could not import it.

    Resumes from the trial's latest Ray checkpoint when there is one (a restored sweep, a retried
    failure). Everything the run depends on comes from `base` and `config`, so a reused worker
    process gives the same result as a fresh one; only the trainer's dataset cache survives.
    """
    import ray
    from ray import tune

    from oialr_tune import plugins
    from oialr_tune.config import train_config_from_dict, with_overrides
    from oialr_tune.trainer import Callback, train

    if user_code is not None:
        plugins.install(user_code)
    cfg = with_overrides(train_config_from_dict(base), config) if config else train_config_from_dict(base)
    cfg.checkpoint_every = 0  # the sweep decides when to checkpoint: `checkpoint_epochs`
    # Where the trial ran: the node, the worker process (reused across trials) and Ray's GPU ids.
    extra = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
    }
    reporter = type("ReportToRay", (_ReportToRay, Callback), {})(extra)
    work = Path(tempfile.mkdtemp(prefix="oialr-trial-"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(work))
        train(cfg, callbacks=[reporter], checkpoint_dir=work, resume=True, checkpoint_epochs=checkpoint_epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_trainable(space: SearchSpace, arm: str) -> Any:
    """The Ray trainable of one arm, with its per-trial resources (needs Ray initialized).

    Public so tests and benchmarks can drive it with their own ``Tuner``.
    """
    from ray import tune

    from oialr_tune import plugins

    base = space.arm_base(arm)
    user_code = plugins.pickled(base) if plugins.names_in(base) else None
    fn = tune.with_parameters(run_trial, base=base, checkpoint_epochs=space.checkpoint_epochs(), user_code=user_code)
    return tune.with_resources(fn, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default packs every sampled value into the name)."""
    return f"trial_{trial.trial_id}"


# --- the search: Optuna distributions, searcher, scheduler ----------------------------------------


def optuna_distribution(param: Param) -> Any:
    """The Optuna distribution of a searched key (also what ``study.db`` records)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if param.type == "categorical":
        return CategoricalDistribution(list(param.choices or ()))
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return FloatDistribution(
        float(param.low), float(param.high), log=param.type == "loguniform" or param.log, step=param.step
    )


def _startup_trials(space: SearchSpace) -> int:
    """Random trials before TPE models the results: `strategy.startup_trials`, or by default a
    quarter of the budget within [4, 10] (Optuna's 10 would leave little for TPE in 16 trials)."""
    if space.strategy.startup_trials is not None:
        return space.strategy.startup_trials
    return min(10, max(4, space.budget.num_samples // 4))


def _searcher(space: SearchSpace, arm: str, prior: list[dict[str, Any]]) -> Any:
    """OptunaSearch with a seeded TPE (or random) sampler, or None when the arm searches nothing.

    `prior` are trial rows of the arm that already ended (a rebuilt arm, see `_arm_tuner`): the
    searcher's study starts with them, so the sampler learns from them and proposes only new points.
    The study stays in memory (pickled with Ray's state), never in a database: see the module notes.
    """
    params = space.arm_params(arm)
    if not params:
        return None
    import optuna

    from oialr_tune.budget_search import BudgetedOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space.strategy.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=space.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=_startup_trials(space))
    metrics, modes = space.objective.metrics(arm), space.objective.modes(arm)
    multi = len(metrics) > 1
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=arm, directions=_directions(space, arm))
    study.add_trials(_optuna_trials(space, arm, prior))
    # With a size budget every told trial carries its constraint and TPE models the infeasible ones
    # apart (a random sampler ignores it: the budget then acts at the pick only).
    return BudgetedOptunaSearch(
        space={p.key: optuna_distribution(p) for p in params},
        metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0],
        sampler=sampler,
        storage=storage,
        study_name=arm,
        max_trainable_fraction=_size_budget(space, arm),
    )


def _size_budget(space: SearchSpace, arm: str) -> float | None:
    """The OIALR arm's `objective.max_trainable_fraction` (the baseline arm is full size by construction)."""
    return space.objective.max_trainable_fraction if arm == "oialr" else None


def _directions(space: SearchSpace, arm: str) -> list[str]:
    return ["maximize" if m == "max" else "minimize" for m in space.objective.modes(arm)]


def _scheduler(space: SearchSpace) -> Any:
    """ASHA on the main metric (per epoch = training_iteration), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler() != "asha":
        return FIFOScheduler()
    b = space.budget
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=space.objective.metric,
        mode=space.objective.direction,
        max_t=b.max_epochs,
        grace_period=b.grace_period,
        reduction_factor=b.reduction_factor,
    )


class _TensorBoardAtTrialEnd:
    """Ray's TensorBoard logger, but each trial's events are written once, when the trial ends.

    Ray's own (``TBXLoggerCallback``) writes and flushes (an fsync) the event file after every
    result, in the driver, on the path between a trial's ``tune.report`` and its next epoch: a
    cost per epoch that small trials feel (benchmarks/sweep_efficiency.py). Here results are kept
    in memory while a trial runs and written in one go at its end, under the same tags
    (``ray/tune/<key>``, step = epoch) with the trial's hyperparameters, so TensorBoard shows the
    same thing. Being a subclass of Ray's, it stops Ray from adding its own. A driver killed
    mid-trial leaves the running trials' epochs so far out of TensorBoard (result.json keeps them).
    """

    def __new__(cls) -> Any:
        from ray.tune.logger import TBXLoggerCallback

        class TensorBoardAtTrialEnd(TBXLoggerCallback):
            def __init__(self) -> None:
                super().__init__()
                self._pending: dict[Any, list[dict[str, Any]]] = {}

            def log_trial_start(self, trial: Any) -> None:
                self._pending[trial] = []

            def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
                self._pending.setdefault(trial, []).append(result)

            def log_trial_end(self, trial: Any, failed: bool = False) -> None:
                results = self._pending.pop(trial, [])
                if not results:
                    return
                trial.init_local_path()
                writer = self._trial_writer[trial] = self._summary_writer_cls(trial.local_path, flush_secs=3600)
                last: dict[str, Any] = {}
                for result in results:
                    step = result.get("training_iteration", 0)
                    for key, value in result.items():
                        if key in _NOT_TENSORBOARD or isinstance(value, bool) or not isinstance(value, (int, float)):
                            continue
                        if math.isfinite(value):
                            last[f"ray/tune/{key}"] = value
                            writer.add_scalar(f"ray/tune/{key}", value, global_step=step)
                if trial.evaluated_params and last:
                    self._try_log_hparams(trial, last)
                writer.close()
                del self._trial_writer[trial]

        return TensorBoardAtTrialEnd()


# Result keys Ray's TensorBoard logger leaves out too (plus our own bookkeeping: wall clock, process).
_NOT_TENSORBOARD = {"pid", "timestamp", "time_total_s", "training_iteration", "reported_at"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --- Ray session ------------------------------------------------------------------------------


def _check_address(address: str) -> None:
    """Fail fast, in one line, when no Ray cluster answers at an address (Ray itself retries for
    minutes). ``auto`` is checked by Ray quickly; ``host:port`` and ``ray://host:port`` get a TCP
    connect and then an HTTP/2 handshake with short timeouts: Ray's GCS and its client server speak
    gRPC, which answers the HTTP/2 preface with a SETTINGS frame at once, so a different service
    on that port (a typo, a stale port) is told apart without Ray's retry loop."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address: expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        conn = socket.create_connection((host or "127.0.0.1", int(port)), timeout=3)
    except OSError as e:  # refused, unreachable, unknown host, or no answer within the timeout
        raise UserError(f"--address: no Ray cluster reachable at {address} ({e.strerror or e})") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS cluster answers only a TLS handshake; let Ray try
        try:
            conn.settimeout(3)
            conn.sendall(_HTTP2_PREFACE)
            head = conn.recv(9)
        except TimeoutError:
            raise UserError(f"--address: {address} accepts connections but does not answer like Ray (gRPC)") from None
        except OSError as e:
            raise UserError(
                f"--address: {address} dropped the connection ({e.strerror or e}); not a Ray cluster"
            ) from None
    if len(head) < 4 or head[3] != 0x04:  # byte 3 of an HTTP/2 frame header is its type; 4 = SETTINGS
        raise UserError(f"--address: {address} is not a Ray cluster (it does not speak gRPC)")
    if not address.startswith("ray://"):
        _check_auth(address, f"{host or '127.0.0.1'}:{port}")


def _check_auth(address: str, gcs_address: str) -> None:
    """Fail fast, in one line, when the server is not a Ray GCS or refuses this process's credentials.

    Any gRPC server passes the HTTP/2 handshake; against one that is not Ray's GCS, ``ray.init``
    waits for ever and ignores SIGTERM. One call to the GCS, with a 5 s deadline, tells them apart.
    It also checks authentication: a cluster started with ``ray start`` uses tokens (Ray >= 2.52); a
    driver without the cluster's token is refused, and ``ray.init`` then retries for about 20 s,
    logging a warning per retry, before a generic "Failed to connect". The call carries the
    credentials ``ray.init`` would send (``RAY_AUTH_MODE``, then ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and is refused at once with an AuthenticationError.
    """
    try:
        from ray._raylet import InnerGcsClient
        from ray.exceptions import AuthenticationError, RpcError
    except ImportError:  # a Ray without this (private) client: let ray.init find out
        return
    try:
        with _stderr_silenced():  # Ray's C++ client logs the refusal on fd 2 itself
            InnerGcsClient.standalone(gcs_address, None, 5000)
    except AuthenticationError:
        sources = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise UserError(
                f"--address: the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
                f"and give this process the cluster's token ({sources})"
            ) from None
        raise UserError(
            f"--address: the Ray cluster at {address} refused this process's authentication token; "
            f"use the head node's token ({sources})"
        ) from None
    except RpcError as e:  # no answer within the deadline, or a gRPC error: not Ray's GCS
        raise UserError(f"--address: {address} speaks HTTP/2 but is not a Ray cluster ({e})") from None
    except Exception:  # anything else: ray.init says what it says
        return


@contextlib.contextmanager
def _stderr_silenced() -> Any:
    """Point file descriptor 2 at /dev/null for the duration (Ray's C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# The HTTP/2 client connection preface followed by an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def start_ray(address: str | None, verbose: int) -> bool:
    """Connect to (or start) Ray; returns True if this call started it (and should stop it).

    An already initialized Ray (a notebook, the test session) is used as is.
    """
    import logging

    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if verbose >= 2 else logging.WARNING,
        "log_to_driver": verbose >= 2,  # trial output stays in the trials' log files
    }
    if address is None:
        if verbose < 2:
            # Ray logs a warning about its token authentication on every local start; for a private
            # instance that this command starts and stops itself, it is noise.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # "local": always a fresh instance, never a cluster some other process started with `ray start`.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)
        return True
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError) as e:  # ValueError: ray:// without the ray[client] extra
        raise UserError(f"--address: {str(e).splitlines()[0]}") from None
    return True


def check_cluster_fits(r: Resources) -> None:
    """A trial (or retrain run) asking for more than the cluster has would wait forever: refuse it now."""
    import ray

    have = ray.cluster_resources()
    if r.cpu > have.get("CPU", 0):
        raise UserError(f"resources.cpu: {r.cpu} per trial but the Ray cluster has {have.get('CPU', 0)} CPU(s)")
    if r.gpu > have.get("GPU", 0):
        raise UserError(f"resources.gpu: {r.gpu} per trial but the Ray cluster has {have.get('GPU', 0)} GPU(s)")


# --- running one arm --------------------------------------------------------------------------


def _arm_tuner(space: SearchSpace, arm: str, store: _Store, ended: Mapping[str, dict[str, Any]], verbose: int) -> Any:
    """The restored Tuner when Ray's saved state of the arm can be trusted, else a new one.

    A new Tuner's searcher starts with the journal's ended trials and runs only the trials left;
    Ray's old state files of the arm are deleted first (its trial folders stay: they hold the
    ended trials' checkpoints and histories).
    """
    import ray
    from ray import tune

    trainable = make_trainable(space, arm)
    arm_path = store.join(arm)
    why_not = _why_not_restore(store, arm, ended)
    if why_not is None:
        if verbose:
            print(f"[{arm}] resuming {arm_path}", flush=True)
        return tune.Tuner.restore(arm_path, trainable, resume_unfinished=True, resume_errored=True)
    if ended or store.top_files(arm):
        if verbose:
            print(f"[{arm}] rebuilding from its journal ({len(ended)} trials ended): {why_not}", flush=True)
        for name in store.top_files(arm):
            store.remove(f"{arm}/{name}")
    prior = _rows_of(space, arm, ended)
    tune_config = tune.TuneConfig(
        search_alg=_searcher(space, arm, prior),
        scheduler=_scheduler(space),
        num_samples=space.arm_num_samples(arm) - len(prior),
        max_concurrent_trials=space.budget.max_concurrent or _slots(space.resources, ray.cluster_resources()),
        reuse_actors=True,
        trial_dirname_creator=_trial_dirname,
    )
    run_config = tune.RunConfig(
        name=arm,
        storage_path=store.root,
        # num_to_keep None (the default): Ray deletes nothing while the arm runs; see CheckpointPolicy.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=space.checkpoint.num_to_keep),
        failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
        verbose=1 if verbose >= 2 else 0,
        callbacks=[_sweep_callback(), _TensorBoardAtTrialEnd()],
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _sweep_callback() -> Any:
    from oialr_tune.sweep_hooks import SweepCallback

    return SweepCallback()


def _why_not_restore(store: _Store, arm: str, ended: Mapping[str, dict[str, Any]]) -> str | None:
    """None when Ray's saved state of the arm may be restored, else why not (in a few words).

    Restored only when every file Ray would unpickle is signed as it is now (local folders), its
    experiment state is whole, and the trials it holds as ended are exactly the journal's: a state
    that lags the journal would rerun (or re-propose) trials already reported done.
    """
    files = store.top_files(arm)
    if "tuner.pkl" not in files:
        return "no tuner.pkl"
    states = sorted(f for f in files if f.startswith("experiment_state-") and f.endswith(".json"))
    if not states:
        return "no experiment state"
    signature = store.signature
    if signature is not None and signature.unsigned_in(arm):
        return f"{', '.join(signature.unsigned_in(arm))} not signed as it is"
    try:
        state = json.loads(store.read_text(f"{arm}/{states[-1]}"))
        trials = [json.loads(t[0]) for t in state["trial_data"]]
        ray_ended = {t["trial_id"] for t in trials if t.get("status") in ("TERMINATED", "ERROR")}
    except (ValueError, KeyError, IndexError, TypeError):
        return f"{states[-1]} is incomplete"
    if ray_ended != set(ended):
        return f"its state holds {len(ray_ended)} ended trials, the journal {len(ended)}"
    return None


def _slots(resources: Resources, have: Mapping[str, float]) -> int:
    """How many trials fit at once on a cluster with resources `have` (``ray.cluster_resources()``).

    Passed to Ray as ``max_concurrent_trials`` when the space leaves ``budget.max_concurrent`` unset.
    With any searcher but its own random/grid one, Ray otherwise keeps at most *one* trial pending
    (``TUNE_MAX_PENDING_TRIALS_PG``), so trial workers start one after another, each waiting until
    the previous trial runs; with the limit they start together, and the searcher proposes no config
    that could not run yet.
    """
    fits = [have.get("CPU", 0) / resources.cpu] if resources.cpu > 0 else []
    if resources.gpu > 0:
        fits.append(have.get("GPU", 0) / resources.gpu)
    return max(1, int(min(fits, default=1) + 1e-9))


def _describe_arm(space: SearchSpace, arm: str) -> str:
    n = space.arm_num_samples(arm)
    if not space.arm_params(arm):
        return f"[{arm}] 1 trial at the base settings"
    sched = space.scheduler()
    if sched == "asha":
        b = space.budget
        sched = f"ASHA(grace={b.grace_period}, rf={b.reduction_factor:g}, rungs={space.rungs()})"
    what = "+".join(space.objective.metrics(arm))
    return (
        f"[{arm}] {n} trials x <= {space.budget.max_epochs} epochs, {space.strategy.sampler.upper()} + {sched}, "
        f"objective {what}, searching {', '.join(p.key for p in space.arm_params(arm))}"
    )


def _run_arm(space: SearchSpace, arm: str, store: _Store, verbose: int) -> None:
    """Run (or finish) one arm; raises SweepInterrupted if Ray stopped before every trial ended."""
    from oialr_tune import sweep_hooks

    if verbose:
        print(_describe_arm(space, arm), flush=True)
    signature = store.signature
    journal = _journal(store, arm)
    ended = sweep_state.ended_trials(journal.path, journal.key)
    total = space.arm_num_samples(arm)
    run = sweep_hooks.ArmRun(
        arm, total, space.objective.metrics(arm), journal, signature, store.relative, set(ended), verbose >= 1,
        out=sys.stdout,
    )
    sweep_hooks.ACTIVE = run
    try:
        if len(ended) < total:
            tuner = _arm_tuner(space, arm, store, ended, verbose)
            if signature is not None:
                signature.refresh(arm)  # tuner.pkl, written by the Tuner itself
            sweep_state.kill_point(f"arm-start:{arm}")
            # Ray prints its boxed experiment header and a TensorBoard hint (pointing into its /tmp
            # session) whatever its verbosity: only -v (verbose 2) shows Ray's own output. Our
            # progress lines go to the stdout captured in `run.out`.
            quiet = contextlib.redirect_stdout(io.StringIO()) if verbose < 2 else contextlib.nullcontext()
            try:
                with quiet:
                    tuner.fit()
            except Exception:
                if run.error is None:
                    raise
            if run.error is None and signature is not None:
                signature.refresh(arm)  # Ray's last snapshot
    finally:
        sweep_hooks.ACTIVE = None
        journal.close()
    if run.error is not None:
        raise SweepInterrupted(
            f"arm {arm}: cannot record trials ({run.error.strerror or run.error}); free the space and "
            f"continue with: oialr-tune sweep --resume {store.root}"
        )
    if len(run.ended) < total:
        raise SweepInterrupted(
            f"arm {arm} stopped with {len(run.ended)}/{total} trials ended; continue with: "
            f"oialr-tune sweep --resume {store.root}"
        )


def _journal(store: _Store, arm: str) -> sweep_state.Journal:
    """The arm's journal; for a URI store, a local copy uploaded after every ended trial."""
    key = store.key
    rel = sweep_state.JOURNAL_TEMPLATE.format(arm=arm)
    if store.is_local:
        return sweep_state.Journal(Path(store.root, rel), key)
    local = Path(tempfile.mkdtemp(prefix="oialr-journal-"), rel)
    if store.exists(rel):
        local.write_bytes(store.read_bytes(rel))
    return sweep_state.Journal(local, key, on_durable=lambda: store.write_bytes(rel, local.read_bytes()))


# --- collecting results -----------------------------------------------------------------------


def _rows_of(space: SearchSpace, arm: str, ended: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per ended trial of an arm (a trials.csv row), from the arm's journal records."""
    keys = [p.key for p in space.arm_params(arm)]
    metric = space.objective.metric
    rows = []
    for trial_id, rec in ended.items():
        last, epochs = rec.get("result", {}), rec.get("epochs", [])
        history = [e.get(metric) for e in epochs] if epochs else [last.get(metric)]
        values = [v for v in history if _is_finite_number(v)]
        trainer_status = last.get("run_status")
        # Ray's status (TERMINATED or ERROR), and the trainer's verdict beside it: finished,
        # diverged, or running when ASHA stopped it.
        row: dict[str, Any] = {"arm": arm, "trial_id": trial_id, "status": rec["status"]}
        row["trainer_status"] = "error" if rec.get("error") else trainer_status
        row["stopped_early"] = rec["status"] == "TERMINATED" and trainer_status == "running"
        config = rec.get("config", {})
        for k in keys:
            row[f"config.{k}"] = config.get(k)
        best = (max if space.objective.direction == "max" else min)(values) if values else None
        row.update({
            metric: last.get(metric),
            f"best_{metric}": best,
            "val_acc": last.get("val_acc"),
            SIZE_METRIC: last.get(SIZE_METRIC),
            "trainable_params": last.get("trainable_params"),
            "training_iteration": int(last.get("training_iteration") or 0),
            "time_total_s": last.get("time_total_s"),
            "train_time_s": float(sum(e.get("train_time_s") or 0.0 for e in epochs)),
            "node_id": last.get("node_id"),
            "gpu_ids": last.get("gpu_ids"),
            "checkpoint": rec.get("checkpoint"),
            "error": rec.get("error"),
            "_history": history,
            "_params": {k: config.get(k) for k in keys},
            "_dir": rec.get("dir"),
        })  # fmt: skip
        rows.append(row)
    return rows


def _prune_checkpoints(store: _Store, trial_dir: str, keep: str | None) -> None:
    """Delete an ended trial's checkpoints except the one its journal record names.

    Runs once the arm is over: until then every checkpoint stays (see CheckpointPolicy), because
    the experiment state a killed driver leaves behind may name any of them.
    """
    if store.is_local:
        for ckpt in Path(store.root, trial_dir).glob("checkpoint_*"):
            if keep is None or ckpt != Path(store.root, keep):
                shutil.rmtree(ckpt, ignore_errors=True)
        return
    import pyarrow.fs

    fs = store._fs
    for info in fs.get_file_info(pyarrow.fs.FileSelector(store._fs_path(trial_dir), allow_not_found=True)):
        is_checkpoint = info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
        if is_checkpoint and (keep is None or info.path.rstrip("/") != store._fs_path(keep).rstrip("/")):
            fs.delete_dir(info.path)


def _trial_rows(space: SearchSpace, arm: str, store: _Store) -> list[dict[str, Any]]:
    """The arm's trial rows, from its journal."""
    journal = _journal(store, arm)
    return _rows_of(space, arm, sweep_state.ended_trials(journal.path, journal.key))


def _pareto(df: pd.DataFrame, metric: str, direction: str) -> pd.DataFrame:
    """Trials no other trial beats on both the metric and the trainable fraction."""
    ok = df.dropna(subset=[metric, SIZE_METRIC])
    sign = 1.0 if direction == "max" else -1.0
    keep = []
    for i, r in ok.iterrows():
        a, f = sign * r[metric], r[SIZE_METRIC]
        dominated = (
            (sign * ok[metric] >= a) & (ok[SIZE_METRIC] <= f) & ((sign * ok[metric] > a) | (ok[SIZE_METRIC] < f))
        ).any()
        if not dominated:
            keep.append(i)
    return ok.loc[keep].sort_values(SIZE_METRIC)


def _usable(df: pd.DataFrame, arm: str, metric: str) -> pd.DataFrame:
    """An arm's trials that ended normally (finished or stopped by ASHA), not diverged, with a metric."""
    ok = (df["arm"] == arm) & (df["status"] == "TERMINATED") & (df["trainer_status"] != "diverged")
    return df[ok & df[metric].notna()]


def _best(df: pd.DataFrame, space: SearchSpace, arm: str) -> dict[str, Any] | None:
    """An arm's best trial by its last reported metric (what its final checkpoint holds).

    In multi mode the OIALR arm's "best" is the most accurate trial of its Pareto set; the set
    itself is in :attr:`SweepResult.pareto`.
    """
    metric = space.objective.metric
    rows = _usable(df, arm, metric)
    budget = space.objective.max_trainable_fraction
    if budget is not None and arm == "oialr":  # the size budget, as `results.best_trial` applies it
        rows = rows[rows[SIZE_METRIC] <= budget]
    if rows.empty:
        return None
    r = rows.loc[rows[metric].idxmax() if space.objective.direction == "max" else rows[metric].idxmin()]
    return {
        "trial_id": r["trial_id"],
        "config": dict(r["_params"]),
        metric: _plain(r[metric]),
        "val_acc": _plain(r["val_acc"]),
        SIZE_METRIC: _plain(r[SIZE_METRIC]),
        "training_iteration": _plain(r["training_iteration"]),
        "checkpoint": r["checkpoint"],
    }


def _is_finite_number(v: Any) -> bool:
    """A real metric value: a number, not NaN or inf (pandas gives NaN for a missing cell)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def _plain(v: Any) -> Any:
    """numpy scalars / NaN -> plain JSON-able Python values."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _optuna_trials(space: SearchSpace, arm: str, rows: list[dict[str, Any]]) -> list[Any]:
    """Each trial row as the Optuna trial the searcher was told of.

    The value(s) are the last reported metric(s), as Ray's OptunaSearch reports them; the per-epoch
    values become intermediate values, the Ray trial id and status user attributes; a trial that
    errored or has no finite value is FAIL.
    """
    import optuna

    from oialr_tune.budget_search import size_constraint

    dists = {p.key: optuna_distribution(p) for p in space.arm_params(arm)}
    metrics = space.objective.metrics(arm)
    budget = _size_budget(space, arm)
    trials = []
    for row in rows:
        values = [row.get(m) for m in metrics]
        complete = row["status"] == "TERMINATED" and all(_is_finite_number(v) for v in values)
        constraints = None
        if budget is not None and complete:
            fraction = row.get(SIZE_METRIC)
            constraints = size_constraint(fraction if _is_finite_number(fraction) else None, budget)
        inter = {}
        if len(metrics) == 1:
            inter = {i + 1: v for i, v in enumerate(row["_history"]) if _is_finite_number(v)}
        trials.append(
            optuna.trial.create_trial(
                params={k: row[f"config.{k}"] for k in dists},
                distributions=dists,
                values=[float(v) for v in values] if complete else None,
                state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL,
                intermediate_values=inter,
                user_attrs={
                    "ray_trial_id": row["trial_id"],
                    "status": row["status"],
                    "epochs": row["training_iteration"],
                },
                constraints=constraints,
            )
        )
    return trials


def _write_study(space: SearchSpace, arm: str, rows: list[dict[str, Any]], store: _Store) -> None:
    """(Re)write the arm's Optuna study in ``study.db`` from its trial rows (see `_optuna_trials`).

    The study is rebuilt from scratch, so re-running this after a resume cannot duplicate trials.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with store.local_file(STUDY_FILE) as db:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=arm, storage=storage)
        study = optuna.create_study(storage=storage, study_name=arm, directions=_directions(space, arm))
        study.set_user_attr("space", space.name)
        study.add_trials(_optuna_trials(space, arm, rows))
        storage.engine.dispose()  # release the SQLite file before it is (maybe) uploaded


def _collect(
    space: SearchSpace, store: _Store, arms: list[str], pool: ThreadPoolExecutor
) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame | None, Future[None]]:
    """Write trials.csv, study.db and summary.json from the arms' journals; return them.

    Paths in them (checkpoints) are relative to the sweep folder, so a moved folder still works.

    study.db is written on a thread of `pool` (the returned future): Optuna's SQLite storage takes
    about 20 ms per trial, seconds on a big sweep, and nothing else needs to wait for it, so it
    overlaps stopping Ray.
    """
    per_arm = {arm: _trial_rows(space, arm, store) for arm in arms}
    for rows in per_arm.values():
        for row in rows:
            if row["_dir"]:
                _prune_checkpoints(store, row["_dir"], row["checkpoint"])

    def write_studies() -> None:
        for arm, rows in per_arm.items():
            _write_study(space, arm, rows, store)

    studies = pool.submit(write_studies)
    all_rows = [row for rows in per_arm.values() for row in rows]
    import pandas as pd

    full = pd.DataFrame(all_rows)
    for p in space.search:  # integer knobs stay integers in the CSV (the baseline rows leave gaps)
        col = f"config.{p.key}"
        if p.type == "int" and col in full:
            full[col] = full[col].astype("Int64")
    best = {arm: b for arm in arms if (b := _best(full, space, arm)) is not None}
    df = full.drop(columns=["_history", "_params", "_dir"])
    store.write_text(TRIALS_FILE, df.to_csv(index=False))
    sweep_state.kill_point("final-writes")
    pareto = None
    if space.objective.is_multi:
        pareto = _pareto(
            _usable(df, "oialr", space.objective.metric), space.objective.metric, space.objective.direction
        )
    summary = {
        "name": space.name,
        "objective": dataclasses.asdict(space.objective),
        "trials": {arm: int((df["arm"] == arm).sum()) for arm in arms},
        "best": best,
    }
    if pareto is not None:
        summary["pareto"] = [
            {"trial_id": r["trial_id"], space.objective.metric: _plain(r[space.objective.metric]),
             SIZE_METRIC: _plain(r[SIZE_METRIC])}
            for _, r in pareto.iterrows()
        ]  # fmt: skip
    store.write_text(SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return df, best, pareto, studies


def _summary_line(space: SearchSpace, best: dict[str, Any]) -> str:
    m = space.objective.metric

    def part(arm: str, label: str) -> str:
        b = best.get(arm)
        if b is None:
            return f"{label}: no finished trial"
        return f"{label} {m}={b[m]:.4f} (trainable fraction {b[SIZE_METRIC]:.3f}, trial {b['trial_id']})"

    line = part("oialr", "best OIALR")
    if "baseline" in space.arms():
        line += " vs " + part("baseline", "best full-rank")
        o, f = best.get("oialr"), best.get("baseline")
        if o and f:
            diff = (o[m] - f[m]) * (100 if m == "val_acc" else 1)
            unit = " points" if m == "val_acc" else ""
            share = o[SIZE_METRIC] / max(f[SIZE_METRIC], 1e-12)
            line += f": OIALR {diff:+.2f}{unit} with {share:.1%} of the trainable parameters"
    return line


# --- public API -------------------------------------------------------------------------------


def _read_state(store: _Store) -> dict[str, Any]:
    """Which arms have finished (``state.json``); read before Ray starts, so a damaged file is bad input."""
    if not store.exists(STATE_FILE):
        return {"arms_done": []}
    try:
        state = json.loads(store.read_text(STATE_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("arms_done"), list):
        raise UserError(
            f"{store.join(STATE_FILE)}: damaged (truncated or not this tool's JSON); delete it and resume "
            "again: each arm is then resumed from Ray's own record"
        )
    return state


def _open_existing(path: str | os.PathLike[str], verify: bool = False) -> tuple[_Store, SearchSpace]:
    """A sweep folder and its space. With `verify` (a resume), a local folder must carry this
    user's signature and an unedited sweep.yaml; the signature is then attached to the store."""
    store = _Store(str(path))
    if not store.exists(SWEEP_FILE):
        raise UserError(f"{path}: holds no sweep (no {SWEEP_FILE})")
    try:
        data = yaml.safe_load(store.read_text(SWEEP_FILE))
    except yaml.YAMLError:
        raise UserError(f"{path}/{SWEEP_FILE}: invalid YAML") from None
    if verify and not store.is_local:  # a bucket's state is not signed: its access control is the boundary
        store.key = sweep_state.load_key(create=True)
    elif verify:
        store.signature = sweep_state.Signature.verify(Path(store.root))
        diff = sweep_state.first_difference(store.signature.config, json.loads(json.dumps(data)))
        if diff is not None:
            key, was, now = diff
            raise UserError(
                f"{path}/{SWEEP_FILE}: edited since the sweep started ({key}: {was!r} -> {now!r}); a resumed sweep "
                f"keeps its config: restore it or start a new sweep"
            )
        store.key = store.signature.key
        for arm in ("oialr", "baseline"):  # every journal line must be this user's too
            sweep_state.ended_trials(Path(store.root, sweep_state.JOURNAL_TEMPLATE.format(arm=arm)), store.key)
    return store, space_from_dict(data, source=f"{path}/{SWEEP_FILE}")


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
) -> SweepResult:
    """Run a tuning sweep: the OIALR arm, then the full-rank baseline arm; return the results.

    Args:
        space: a :class:`SearchSpace`, a YAML path, a packaged space name, or None (quickstart).
        name: the sweep's folder under `results_dir`; default ``<space name>-<YYYYmmdd-HHMMSS>``.
        results_dir: a local folder, a shared path, or a URI Ray accepts as ``storage_path``.
        resume: continue an interrupted sweep: True with `name`, or the sweep's folder. The space
            is reloaded from its ``sweep.yaml``; arms that finished are not rerun. A local folder
            must be signed by this user's key and its sweep.yaml unedited (see `sweep_state`).
        address: join an existing Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``);
            None starts Ray on this machine (or uses the Ray already initialized in this process).
        baseline: override the space's ``baseline`` (same-budget, once, none).
        verbose: 0 silent, 1 one line per finished trial and a summary, 2 also Ray's own output.
        model, data, trainable: replace the space's ``model.name``, ``data.name`` or ``trainable``
            with an import path or a callable (shipped to Ray's workers; see `oialr_tune.plugins`).

    Raises UserError (before Ray starts, nothing written) for a bad space, folder or address, a
    folder another sweep holds, or (resume) an unsigned or edited folder; SweepInterrupted when
    the sweep stopped early (Ctrl-C, SIGTERM, a full disk, a lost cluster): it can then be resumed.
    """
    t0 = time.perf_counter()
    if resume:
        if resume is True:
            if not name:
                raise UserError("--resume: name the sweep folder to resume (results/<name>)")
            resume = Path(results_dir, name) if "://" not in str(results_dir) else f"{results_dir}/{name}"
        store, stored = _open_existing(resume, verify=True)
        if space is not None:
            given = space if isinstance(space, SearchSpace) else load_space(space)
            if given.to_dict() != stored.to_dict():
                raise UserError(f"{resume}: holds a sweep of a different space; resume without a space argument")
        space = stored
    else:
        space = space if isinstance(space, SearchSpace) else load_space(space)
        if model is not None or data is not None or trainable is not None:
            space = with_user_code(space, model=model, data=data, trainable=trainable)
        if name is None:
            name = f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
        if not NAME_RE.match(name):
            raise UserError(f"--name: expected letters, digits, '_', '-' or '.', got {name!r}")
        root = str(results_dir).rstrip("/") + "/" + name if "://" in str(results_dir) else str(Path(results_dir, name))
        store = _Store(root)
        if not store.is_empty():
            raise UserError(f"{root}: already exists; resume it with --resume {root} or choose another --name")
    if baseline is not None:
        if baseline not in ("same-budget", "once", "none"):
            raise UserError(f"--baseline: expected same-budget, once or none, got {baseline!r}")
        if resume and baseline != space.baseline:
            raise UserError(f"--baseline: a resumed sweep keeps its baseline ({space.baseline})")
        space = dataclasses.replace(space, baseline=baseline)
    space = preflight(space, local=address is None)
    if address is not None:
        _check_address(address)
    # A local folder is created (or, resumed, proven writable) now: a read-only or misplaced one is
    # bad input, found before Ray starts. URIs are left to Ray.
    created = writable_folder(store.root, "results folder") if store.is_local else []
    state = _read_state(store)
    lock = sweep_state.FolderLock(Path(store.root)) if store.is_local else None
    try:
        if lock is not None:
            lock.acquire()
            if not resume and set(os.listdir(store.root)) != {sweep_state.LOCK_FILE}:
                raise UserError(f"{store.root}: another sweep started in it; choose another --name")
        return _run_sweep(space, store, bool(resume), state, address, verbose, t0)
    finally:
        if lock is not None:
            lock.release()
        remove_empty(created)  # only folders left empty: a sweep refused before it wrote anything


def _run_sweep(
    space: SearchSpace,
    store: _Store,
    resume: bool,
    state: dict[str, Any],
    address: str | None,
    verbose: int,
    t0: float,
) -> SweepResult:
    """The sweep proper, in a folder this process holds (see `sweep`)."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", _SNAPSHOT_PERIOD_S)
    # Ray also snapshots whenever a trial has saved `num_to_keep` checkpoints since the last one
    # (so its record never points at a deleted checkpoint) and warns when that is frequent; with
    # small trials it is, by design, and cheap: silence the warning, keep the snapshots.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = start_ray(address, verbose)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oialr-study")
    try:
        with _sigterm_as_interrupt() as stopped_by:
            try:
                check_cluster_fits(space.resources)
                if not resume:
                    store.key = sweep_state.load_key(create=True)
                    store.write_text(SWEEP_FILE, yaml.safe_dump(space.to_dict(), sort_keys=False))
                    store.write_text(STATE_FILE, json.dumps({"arms_done": []}))
                    if store.is_local:
                        store.signature = sweep_state.Signature.create(Path(store.root), space.to_dict())
                        store.signature.save()
                if verbose:
                    print(f"sweep {space.name} -> {store.root}", flush=True)
                for arm in space.arms():
                    if arm in state["arms_done"]:
                        if verbose:
                            print(f"[{arm}] already finished", flush=True)
                        continue
                    _run_arm(space, arm, store, verbose)
                    state["arms_done"].append(arm)
                    store.write_text(STATE_FILE, json.dumps(state))
                df, best, pareto, studies = _collect(space, store, space.arms(), pool)
            except KeyboardInterrupt:
                raise SweepInterrupted(
                    f"stopped; continue with: oialr-tune sweep --resume {store.root}", stopped_by[0]
                ) from None
            except SweepInterrupted as e:
                e.signum = stopped_by[0]
                raise
    finally:
        if started:
            import ray

            ray.shutdown()
        pool.shutdown(wait=True)
    studies.result()  # raises what writing study.db raised
    line = _summary_line(space, best)
    wall = time.perf_counter() - t0
    if verbose:
        print(line, flush=True)
        print(f"results: {store.root} ({len(df)} trials, {wall:.1f}s); TensorBoard: tensorboard --logdir {store.root}",
              flush=True)
    _check_every_arm_finished(space, store, df, best)
    return SweepResult(store.root, space, df, _absolute(store, best), pareto, line, wall)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
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


def _absolute(store: _Store, best: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The best trials with their checkpoints as full paths (the files store them relative)."""
    return {arm: {**b, "checkpoint": store.join(b["checkpoint"]) if b.get("checkpoint") else None}
            for arm, b in best.items()}  # fmt: skip


def _check_every_arm_finished(space: SearchSpace, store: _Store, df: pd.DataFrame, best: dict[str, Any]) -> None:
    """UserError when an arm has no finished trial: a sweep of nothing must not exit 0.

    Raised after the results are written (they hold the errors), so `best` and `report` can still
    show them; the message says where.
    """
    parts = []
    for arm in space.arms():
        if arm not in best:
            rows = df[df["arm"] == arm]
            errored = int((rows["status"] == "ERROR").sum())
            diverged = int((rows["trainer_status"] == "diverged").sum())
            parts.append(f"arm {arm}: {errored} of {len(rows)} trials errored, {diverged} diverged")
    if parts:
        raise UserError(
            f"{store.root}: no trial finished ({'; '.join(parts)}); the errors are in the error column of "
            f"{store.join(TRIALS_FILE)} and in full in {store.join('<arm>', 'trial_*', 'error.txt')}"
        )


def rebuild_results(path: str | os.PathLike[str]) -> None:
    """Rewrite a finished sweep's trials.csv, summary.json and study.db from its journals.

    For a folder whose final writes were cut short (a kill, a full disk) or whose trials.csv was
    damaged: the journals hold every ended trial, so nothing needs Ray.
    """
    store, space = _open_existing(path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        studies = _collect(space, store, space.arms(), pool)[3]
    studies.result()


def load_sweep(path: str | os.PathLike[str]) -> SweepResult:
    """Read a finished (or interrupted) sweep's results back from its folder, without Ray running.

    Raises UserError if the folder holds no sweep or its trials were never collected.
    """
    store, space = _open_existing(path)
    if not store.exists(TRIALS_FILE) or not store.exists(SUMMARY_FILE):
        raise UserError(f"{path}: the sweep has no results yet (resume it with --resume {path})")
    import pandas as pd

    df = pd.read_csv(io.StringIO(store.read_text(TRIALS_FILE)))
    summary = json.loads(store.read_text(SUMMARY_FILE))
    pareto = None
    if space.objective.is_multi:
        pareto = _pareto(
            _usable(df, "oialr", space.objective.metric), space.objective.metric, space.objective.direction
        )
    best = _absolute(store, summary.get("best", {}))
    return SweepResult(store.root, space, df, best, pareto, _summary_line(space, best))


__all__ = ["SweepInterrupted", "SweepResult", "load_sweep", "make_trainable", "rebuild_results", "run_trial", "sweep"]
