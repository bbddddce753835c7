"""One arm of a sweep (``oialr`` or ``baseline``): a Ray Tune experiment, restored or rebuilt.

An arm's Ray state is restored only when it can be trusted (signed by this user, whole, and
agreeing with the arm's journal); otherwise the arm is rebuilt from its journal: a new Tuner
whose searcher is told the trials that already ended, for the trials left (see `oialr_tune.sweep_state`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import TBXLoggerCallback

from oialr_tune import sweep_state as state
from oialr_tune.errors import DiskFull, SweepInterrupted, UserError
from oialr_tune.space import SearchSpace
from oialr_tune.tuning import hooks
from oialr_tune.tuning._internals import ended_trial_ids, restored_callbacks
from oialr_tune.tuning.cluster import slots
from oialr_tune.tuning.collect import rows_of
from oialr_tune.tuning.search import scheduler, searcher
from oialr_tune.tuning.storage import Store
from oialr_tune.tuning.worker import make_trainable

__all__ = ["run_arm"]


class TensorBoardAtTrialEnd(TBXLoggerCallback):
    """TensorBoard events of each trial, written once, when the trial ends.

    Ray's own logger (``TBXLoggerCallback``) writes and flushes (an fsync) the event file after every
    result, in the driver, on the path between a trial's ``tune.report`` and its next epoch: a
    cost per epoch that small trials feel (benchmarks/sweep_efficiency.py). Here results are kept
    in memory while a trial runs and written in one go at its end, under the same tags
    (``ray/tune/<key>``, step = epoch) with the trial's hyperparameters, so TensorBoard shows the
    same thing. Being a subclass of Ray's, it stops Ray from adding its own; it overrides every
    hook and writes through tensorboardX's public API only. A driver killed mid-trial leaves the
    running trials' epochs so far out of TensorBoard (result.json keeps them).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[Any, list[dict[str, Any]]] = {}

    def log_trial_start(self, trial: Any) -> None:
        self._pending[trial] = []

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        self._pending.setdefault(trial, []).append(result)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        results = self._pending.pop(trial, [])
        if results:
            trial.init_local_path()
            _write_events(trial.local_path, results, trial.evaluated_params)


def _write_events(folder: str, results: list[dict[str, Any]], params: dict[str, Any]) -> None:
    """One TensorBoard event file in `folder`: each numeric result per epoch, then the hyperparameters
    against the last values (TensorBoard's HParams view)."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    writer = SummaryWriter(folder, flush_secs=3600)
    last: dict[str, Any] = {}
    for result in results:
        step = result.get("training_iteration", 0)
        for key, value in result.items():
            if key in _NOT_TENSORBOARD or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                last[f"ray/tune/{key}"] = value
                writer.add_scalar(f"ray/tune/{key}", value, global_step=step)
    # TensorBoard's hparams take numbers, strings and booleans (a null choice is left out).
    shown = {k: v for k, v in params.items() if isinstance(v, (str, bool, int, float))}
    if shown and last:
        for summary in hparams(hparam_dict=shown, metric_dict=last):
            writer.file_writer.add_summary(summary)
    writer.close()


# Result keys Ray's TensorBoard logger leaves out too (plus our own bookkeeping: wall clock, process).
_NOT_TENSORBOARD = {"pid", "timestamp", "time_total_s", "training_iteration", "reported_at"}


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default packs every sampled value into the name)."""
    return f"trial_{trial.trial_id}"


def _tuner(space: SearchSpace, arm: str, store: Store, ended: Mapping[str, dict[str, Any]], run: hooks.ArmRun,
           verbose: int, log: Sequence[str] = ()) -> Any:
    """The restored Tuner when Ray's saved state of the arm can be trusted, else a new one; either
    records into `run` (its journal callback is built for `run`).

    A new Tuner's searcher starts with the journal's ended trials and runs only the trials left;
    Ray's old state files of the arm are deleted first (its trial folders stay: they hold the
    ended trials' checkpoints and histories). A restored one runs the callbacks pickled in its
    ``tuner.pkl``, whose journal callback holds no run: it is replaced by `run`'s.
    """
    trainable = make_trainable(space, arm)
    arm_path = store.join(arm)
    why_not = _why_not_restore(store, arm, ended)
    if why_not is None:
        try:
            tuner = tune.Tuner.restore(arm_path, trainable, resume_unfinished=True, resume_errored=True)
        except (ImportError, AttributeError) as e:  # pickled by an older oialr-tune whose classes moved
            why_not = f"Ray's saved state does not load here ({type(e).__name__}: {e})"
        else:
            if verbose:
                print(f"[{arm}] resuming {arm_path}", flush=True)
            callbacks = restored_callbacks(tuner)
            callbacks[:] = [hooks.SweepCallback(run) if isinstance(c, hooks.SweepCallback) else c for c in callbacks]
            return tuner
    if ended or store.top_files(arm):
        if verbose:
            print(f"[{arm}] rebuilding from its journal ({len(ended)} trials ended): {why_not}", flush=True)
        for name in store.top_files(arm):
            store.remove(f"{arm}/{name}")
    prior = rows_of(space, arm, ended)
    tune_config = tune.TuneConfig(
        search_alg=searcher(space, arm, prior),
        scheduler=scheduler(space),
        num_samples=space.arm_num_samples(arm) - len(prior),
        max_concurrent_trials=space.budget.max_concurrent or slots(space.resources, ray.cluster_resources()),
        reuse_actors=space.resources.workers == 1,  # a multi-worker trial's actor owns its Train run: end it
        trial_dirname_creator=_trial_dirname,
    )
    run_config = tune.RunConfig(
        name=arm,
        storage_path=store.root,
        # num_to_keep None (the default): Ray deletes nothing while the arm runs; see CheckpointPolicy.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=space.checkpoint.num_to_keep),
        failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
        verbose=1 if verbose >= 2 else 0,
        callbacks=[hooks.SweepCallback(run), TensorBoardAtTrialEnd(), *_trackers(space, arm, store, log)],
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _trackers(space: SearchSpace, arm: str, store: Store, log: Sequence[str]) -> list[Any]:
    """Ray's own logger callbacks for the trackers the sweep was asked to log to (``--log``).

    MLflow: a local SQLite store ``mlflow.db`` in the results folder (MLflow 3 refuses its plain
    ``mlruns/`` file store unless told to; SQLite is its supported local, offline backend), one
    experiment per sweep (named after it), one run per trial with the searched values as
    parameters, the per-epoch numbers as metrics and the arm as a tag; no artifacts (checkpoints
    stay in Ray's folders).
    """
    if "mlflow" not in log:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = f"sqlite:///{Path(store.join(state.MLFLOW_FILE))}"
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=space.name, tags={"arm": arm}, save_artifact=False)]


@contextlib.contextmanager
def _ray_output_hidden() -> Iterator[None]:
    """Only -v (verbose 2) shows Ray's own output; our progress lines go to the stdout captured in
    the arm's `hooks.ArmRun.out`.

    Whatever its verbosity, Ray prints a boxed experiment header and a TensorBoard hint pointing
    into its /tmp session (stdout), and after an interrupt its own ``Tuner.restore(...)`` hint
    (logger ``ray.tune.tune``) beside ours. On a restore, Ray's OptunaSearch re-reports the epochs
    a trial already reported, and Optuna warns once per epoch that it ignores them.
    """
    tune_logger = logging.getLogger("ray.tune.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    # Ray logs each failed trial's traceback (per attempt) on stderr; our ERROR line says it once, with
    # the path of that traceback in the trial's error.txt. Read when `fit` builds its controller.
    printed_errors = os.environ.get(_PRINT_ERRORS)
    os.environ[_PRINT_ERRORS] = "0"
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The reported value is ignored because this `step")
            yield
    finally:
        tune_logger.setLevel(level)
        if printed_errors is None:
            os.environ.pop(_PRINT_ERRORS, None)
        else:
            os.environ[_PRINT_ERRORS] = printed_errors


_PRINT_ERRORS = "TUNE_PRINT_ALL_TRIAL_ERRORS"


def _why_not_restore(store: Store, arm: str, ended: Mapping[str, dict[str, Any]]) -> str | None:
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
        ray_ended = ended_trial_ids(store.read_text(f"{arm}/{states[-1]}"))
    except (ValueError, KeyError, IndexError, TypeError):
        return f"{states[-1]} is incomplete"
    if ray_ended != set(ended):
        return f"its state holds {len(ray_ended)} ended trials, the journal {len(ended)}"
    return None


def _describe_arm(space: SearchSpace, arm: str) -> str:
    n = space.arm_num_samples(arm)
    if not space.arm_params(arm):
        return f"[{arm}] 1 trial at the base settings"
    sched = space.scheduler()
    if sched == "asha":
        b = space.budget
        sched = f"ASHA(grace={b.grace_period}, rf={b.reduction_factor:g}, rungs={space.rungs()})"
    what = "+".join(space.objective.metrics(arm))
    b = space.budget
    return (
        f"[{arm}] {n} trials x <= {b.horizon} {b.unit}, {space.strategy.sampler.upper()} + {sched}, "
        f"objective {what}, searching {', '.join(p.key for p in space.arm_params(arm))}"
    )


def run_arm(space: SearchSpace, arm: str, store: Store, verbose: int, log: Sequence[str] = ()) -> None:
    """Run (or finish) one arm; raises SweepInterrupted if Ray stopped before every trial ended."""
    if verbose:
        print(_describe_arm(space, arm), flush=True)
    signature = store.signature
    journal = store.journal(arm)
    ended = state.ended_trials(journal.path, journal.key)
    total = space.arm_num_samples(arm)
    run = hooks.ArmRun(
        arm, total, space.objective.metrics(arm), journal, signature, store.relative, set(ended), verbose >= 1,
        out=sys.stdout,
    )
    try:
        if len(ended) < total:
            tuner = _tuner(space, arm, store, ended, run, verbose, log)
            if signature is not None:
                signature.refresh(arm)  # tuner.pkl, written by the Tuner itself
            state.kill_point("arm-start", arm)
            try:
                with _ray_output_hidden() if verbose < 2 else contextlib.nullcontext():
                    tuner.fit()
            except Exception:
                if run.error is None and run.fatal is None:
                    raise
            if run.error is None and signature is not None:
                signature.refresh(arm)  # Ray's last snapshot
    finally:
        journal.close()
    if run.fatal is not None:
        raise UserError(f"arm {arm}: {run.fatal}")
    if run.error is not None:
        if run.error.errno == errno.ENOSPC:
            raise DiskFull(
                f"disk full ({run.error.strerror or run.error}) recording arm {arm}'s trials in {store.root}; free "
                f"some space and continue with: oialr-tune sweep --resume {store.root}"
            )
        raise SweepInterrupted(
            f"arm {arm}: cannot record trials ({run.error.strerror or run.error}); free the space and "
            f"continue with: oialr-tune sweep --resume {store.root}"
        )
    if len(run.ended) < total:
        raise SweepInterrupted(
            f"arm {arm} stopped with {len(run.ended)}/{total} trials ended; continue with: "
            f"oialr-tune sweep --resume {store.root}"
        )

