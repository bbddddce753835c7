"""The sweep driver's Ray Tune callback: journal every trial, then print it; keep the state signed.

A module of its own so that the callback is a module-level class: Ray pickles the callbacks into
``tuner.pkl``, and a class pickled by name runs this version's code on resume, not a copy frozen
into the folder. The callback is given the arm's run (`ArmRun`: the open journal, stdout) when it is
built; that run is this driver's, so the pickled copy carries none and does nothing, and a restored
arm is given this driver's callback again (`oialr_tune.tuning.arm`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ray import tune

from oialr_tune.metrics import PLACEMENT_COLUMNS, SIZE_METRIC, TRIAL_RESULT_COLUMNS
from oialr_tune.sweep_state import Journal, Signature, kill_point

# Last-result keys an end record keeps besides the objective: what trials.csv shows of a trial
# (`oialr_tune.metrics.trial_columns`) and the trainer's verdict (the worker's ``run_status``).
RESULT_KEYS = (*TRIAL_RESULT_COLUMNS, *PLACEMENT_COLUMNS, "run_status")


@dataclass
class ArmRun:
    """The arm the driver is running: where to record, what to print, what went wrong."""

    arm: str
    total: int
    metrics: list[str]
    journal: Journal
    signature: Signature | None  # None for a URI store: Ray's state there is not signed
    relative: Any  # fs path -> path relative to the sweep folder
    ended: set[str] = field(default_factory=set)
    print_progress: bool = True
    # Where the progress lines go: the real stdout, captured before Ray's own output is silenced.
    out: TextIO | None = None
    epochs_seen: int = 0
    warned: set[str] = field(default_factory=set)  # the trials' warnings printed so far (each once)
    error: OSError | None = None
    # A trial error that every trial would repeat (a loop that never reports): the sweep stops at it.
    fatal: str | None = None



def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class SweepCallback(tune.Callback):
    """One journal line per reported epoch; per ended trial a durable journal line, then its done line.

    `run` is the arm being run, which the callback records into and reports to (its `error`,
    `fatal` and `ended`, read by the driver after ``fit``).
    """

    def __init__(self, run: ArmRun) -> None:
        self.run: ArmRun | None = run

    def __getstate__(self) -> dict[str, Any]:
        """What Ray pickles into ``tuner.pkl``: no run (an open journal and this driver's stdout)."""
        return {"run": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        run = self.run
        if run is None or run.error is not None:
            return
        record = {"kind": "epoch", "trial_id": trial.trial_id, "training_iteration": result.get("training_iteration")}
        record.update({m: _json_number(result.get(m)) for m in run.metrics})
        record["train_time_s"] = _json_number(result.get("train_time_s"))
        try:
            run.journal.append(record, durable=False)
        except OSError as e:
            run.error = e
            return
        run.epochs_seen += 1
        warning = result.get("warning")  # a user loop's first report: loop settings it never read
        if warning and warning not in run.warned and run.print_progress:
            run.warned.add(warning)
            print(f"[{run.arm}] warning: {warning}", file=run.out or sys.stdout, flush=True)
        kill_point("epoch", run.arm, run.epochs_seen)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "ERROR")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed trial Ray will retry: a retry of a loop that never reports fails the same way, so stop."""
        run = self.run
        if run is not None and run.fatal is None and _never_reports(_error_text(trial)):
            self._ended(trial, "ERROR")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        run = self.run
        if run is None:
            return
        if run.error is not None:
            raise run.error  # ends fit(); the driver reports it and the sweep can be resumed
        if run.fatal is not None:
            raise StopSweep(run.fatal)  # ends fit(); run_arm raises it as bad input
        if run.signature is not None:
            try:
                run.signature.refresh(run.arm)
            except OSError as e:
                run.error = e

    def _ended(self, trial: Any, status: str) -> None:
        run = self.run
        if run is None or run.error is not None or run.fatal is not None:  # (fatal: the sweep is stopping)
            return
        last = trial.last_result or {}
        checkpoint = trial.checkpoint
        record = {
            "kind": "end",
            "trial_id": trial.trial_id,
            "status": status,
            "config": dict(trial.config),
            "result": {k: _json_number(last.get(k)) for k in (*run.metrics, *RESULT_KEYS)},
            "dir": run.relative(trial.path),
            "checkpoint": run.relative(checkpoint.path) if checkpoint is not None else None,
            "error": _error_text(trial) if status == "ERROR" else None,
        }
        try:
            run.journal.append(record, durable=True)  # on disk before anyone is told it is done
        except OSError as e:
            run.error = e
            return
        run.ended.add(trial.trial_id)
        traceback_file = str(Path(trial.path, "error.txt"))
        if status == "ERROR" and _never_reports(record["error"]):
            run.fatal = f"{_message(record['error'])} (stopped at the first trial; traceback: {traceback_file})"
        if run.print_progress:
            print(_progress_line(run, trial, record, traceback_file), file=run.out or sys.stdout, flush=True)
        kill_point("done", run.arm, len(run.ended))


class StopSweep(Exception):
    """Raised from the callback to end the arm's ``fit`` at an error every trial would repeat."""


def _progress_line(run: ArmRun, trial: Any, record: dict[str, Any], traceback_file: str) -> str:
    """The one line printed per ended trial: done (or diverged) with its metrics, or its error and traceback file."""
    r, last = record["result"], trial.last_result or {}
    head = f"[{run.arm}] {len(run.ended)}/{run.total} {trial.trial_id}"
    if record["status"] == "ERROR":  # once, in one line; Ray's traceback is in the file (-v shows it too)
        return f"{head} ERROR {_message(record['error'])} (traceback: {traceback_file})"
    params = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in sorted(trial.config.items()))
    what = "diverged" if r.get("run_status") == "diverged" else "done "
    metric = run.metrics[0]
    return (f"{head} {what} epochs={last.get('epoch', 0)} {metric}={_fmt(r.get(metric))} "
            f"frac={_fmt(r.get(SIZE_METRIC))} {params}")


_LOOP_MISTAKE = "LoopMistake: "  # how `oialr_tune.errors.LoopMistake` shows in a trial's error text


def _never_reports(error: str | None) -> bool:
    """Whether a trial's error is a user loop's mistake every trial would repeat: it never called
    ``trial.report``, or reported without the objective's metric (`oialr_tune.errors.LoopMistake`)."""
    return error is not None and _LOOP_MISTAKE in error


def _message(error: str | None) -> str:
    """A trial's error line without its exception class prefix (``oialr_tune.errors.UserError: ``)."""
    text = error or "error"
    head, sep, rest = text.partition(": ")
    return rest if sep and head.replace(".", "").replace("_", "").isalnum() and " " not in head else text


def _json_number(v: Any) -> Any:
    """Plain JSON values: numpy scalars become Python numbers (inf and NaN stay floats; Python's
    json writes and reads them)."""
    return v.item() if hasattr(v, "item") else v


def _error_text(trial: Any) -> str:
    """The last line of the trial's error, from Ray's text file (never its pickled exception).

    Read the trial's local copy: Ray writes it before calling the callbacks, while
    `trial.get_error()` reads the storage copy, which is synced only later.
    """
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:  # the file may be on a storage that just failed
        text = ""
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else "error"
