"""Reading a sweep's results directory: its trials, the best configuration, the Pareto set.

A results directory is what ``oialr-tune sweep`` writes under ``results/<name>/``:

* ``sweep.yaml``: the validated search space (base trainer config, ranges, objective, budget);
* ``trials.csv``: one row per trial of every arm (arm, trial_id, status, the sampled values as
  ``config.<dotted key>`` columns, final metrics, checkpoint path, error);
* ``summary.json``, ``study.db`` and Ray's experiment folders (``oialr/``, ``baseline/``).

Everything here reads ``sweep.yaml`` and ``trials.csv`` (a view of the journals, the sweep's record:
`oialr_tune.sweep_state`), checked against the journals, and never starts Ray, so ``best``
works on a copied or archived results folder. A trial's full trainer config is rebuilt from the
stored search space and its sampled values with the same code the sweep used
(:meth:`SearchSpace.trial_config`), so it is exactly the config the trial ran.

Failed, diverged and unfinished trials are ignored: a trial counts when Ray ended it normally
(``TERMINATED``: ran to the last epoch or stopped early by ASHA), it reported no error, the trainer
did not report it diverged (``trainer_status``), and its objective metric is finite. As in Optuna,
a trial ASHA stopped (pruned) is not a finished configuration: ``best`` and the summary pick among
the trials that ran the whole schedule whenever any did.

Per-epoch histories (for plots) come from Ray's own ``<arm>/trial_<id>/result.json`` files; the
per-layer ``ranks`` of each epoch are stored there as a JSON string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oialr_tune.errors import UserError
from oialr_tune.metrics import CONFIG_PREFIX, SELECTABLE_DIRECTIONS, SIZE_METRIC, trial_metric_columns
from oialr_tune.space import Param, SearchSpace, load_space
from oialr_tune.sweep_state import (
    CHECKPOINT_FILE,
    JOURNAL_TEMPLATE,
    STUDY_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    TRIALS_FILE,
    ended_trials,
)

__all__ = [
    "BestTrial", "SweepResults", "TrialInfo", "best_trial", "check_max_trainable_fraction", "find_results_dir",
    "incomplete", "open_results", "pareto_mask", "pareto_rows", "summarize",
]  # fmt: skip

# Ray's status of a trial that ended without error (ran out its epochs or was stopped by ASHA).
FINISHED_STATUSES = {"TERMINATED"}
# The trainer's verdict (``trainer_status`` column) of runs that produced nothing usable.
BROKEN_TRAINER_STATUSES = {"diverged", "error"}


def metric_direction(res: SweepResults, metric: str) -> str:
    """'max' or 'min': the sweep's own objective knows its direction (a user metric's is its mode)."""
    return res.space.objective.direction if metric == res.space.objective.metric else SELECTABLE_DIRECTIONS[metric]


@dataclass
class TrialInfo:
    """One trial: its sampled values, its full trainer config, its final metrics and checkpoint."""

    arm: str
    trial_id: str
    params: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: str | None

    @property
    def trainable_fraction(self) -> float:
        return float(self.metrics.get(SIZE_METRIC, float("nan")))

    @property
    def checkpoint_file(self) -> str | None:
        """The trainer's ``checkpoint.pt`` inside the trial's checkpoint folder, if it is there."""
        if self.checkpoint is None:
            return None
        path = Path(self.checkpoint) / CHECKPOINT_FILE
        return str(path) if path.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "arm": self.arm,
            "trial_id": self.trial_id,
            "params": self.params,
            "metrics": self.metrics,
            "trainable_fraction": self.trainable_fraction,
            "checkpoint": self.checkpoint,
            "checkpoint_file": self.checkpoint_file,
            "config": self.config,
        }


@dataclass
class BestTrial:
    """The answer of :func:`best_trial`: the chosen trial and how it was chosen.

    `pareto` is the Pareto set (objective metric vs trainable fraction) of the arm's finished
    trials, sorted by trainable fraction; it is filled for a multi-objective sweep.
    """

    results_dir: Path
    arm: str
    objective: str
    mode: str
    multi: bool
    trial: TrialInfo
    pareto: list[TrialInfo] = field(default_factory=list)
    max_trainable_fraction: float | None = None
    finished_trials: int = 0
    ignored_trials: int = 0
    completed_trials: int = 0  # finished trials that ran every epoch (not stopped early by ASHA)

    @property
    def config(self) -> dict[str, Any]:
        return self.trial.config

    @property
    def checkpoint(self) -> str | None:
        return self.trial.checkpoint

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (what ``best --format json`` prints)."""
        out = {
            "results_dir": str(self.results_dir),
            "arm": self.arm,
            "objective": {"metric": self.objective, "mode": self.mode, "multi": self.multi},
            "max_trainable_fraction": self.max_trainable_fraction,
            "finished_trials": self.finished_trials,
            "ignored_trials": self.ignored_trials,
            "completed_trials": self.completed_trials,
            **self.trial.to_dict(),
        }
        if self.multi:
            out["pareto"] = [{k: v for k, v in t.to_dict().items() if k != "config"} for t in self.pareto]
        return out


def pareto_mask(score: Sequence[float], size: Sequence[float]) -> np.ndarray:
    """Which points are Pareto-optimal when `score` is maximized and `size` minimized.

    A point is dropped when another is at least as good in both and strictly better in one.
    Exact duplicates are all kept.
    """
    s, z = np.asarray(score, dtype=float), np.asarray(size, dtype=float)
    keep = np.ones(len(s), dtype=bool)
    for i in range(len(s)):
        dominated = (s >= s[i]) & (z <= z[i]) & ((s > s[i]) | (z < z[i]))
        keep[i] = not dominated.any()
    return keep


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _plain(value: Any) -> Any:
    """numpy scalars to Python, NaN to None: values that YAML and JSON print plainly."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class SweepResults:
    """A results directory opened for reading (see the module docstring for its layout).

    Also what :func:`oialr_tune.sweep` returns. `path` is the folder (a URI string for a sweep
    written to remote storage); `summary` is ``summary.json`` (see :func:`summarize`).
    """

    def __init__(self, path: Path | str, space: SearchSpace, trials: pd.DataFrame, summary: dict[str, Any] | None):
        self.path, self.space, self.trials, self.summary = path, space, trials, summary

    def best(self, arm: str = "oialr", **kwargs: Any) -> BestTrial:
        """:func:`best_trial` of this sweep (same keyword arguments)."""
        return best_trial(self, arm=arm, **kwargs)

    def best_config(self, arm: str = "oialr") -> dict[str, Any]:
        """The full trainer config (plain data) of an arm's best trial, ready for a retrain."""
        return self.best(arm).config

    def _join(self, rel: str) -> str:
        return f"{self.path}/{rel}" if isinstance(self.path, str) else str(self.path / rel)

    @property
    def name(self) -> str:
        return self.space.name

    @property
    def arms(self) -> list[str]:
        """Arms that have at least one trial row, in the sweep's order."""
        present = set(self.trials["arm"]) if "arm" in self.trials else set()
        return [a for a in self.space.arms() if a in present]

    @property
    def study_path(self) -> Path:
        return self.path / STUDY_FILE

    # -- which trials count --

    def usable(self, arm: str, metric: str | None = None) -> pd.DataFrame:
        """The arm's trials that ended normally, without error, with a finite `metric` (default: the objective's)."""
        metric = metric or self.space.objective.metric
        df = self.trials[self.trials["arm"] == arm]
        ok = df["status"].astype(str).str.upper().isin(FINISHED_STATUSES)
        if "error" in df:
            ok &= df["error"].map(_is_blank)
        if "trainer_status" in df:  # the trainer's own verdict: a diverged run also ends TERMINATED
            ok &= ~df["trainer_status"].astype(str).isin(BROKEN_TRAINER_STATUSES)
        if "val_loss" in df:  # a diverged run reports val_loss = inf
            ok &= np.isfinite(pd.to_numeric(df["val_loss"], errors="coerce"))
        if metric not in df:
            raise UserError(f"--objective: {self.path / TRIALS_FILE} has no column {metric!r}")
        ok &= np.isfinite(pd.to_numeric(df[metric], errors="coerce"))
        return df[ok]

    # -- one trial --

    def params_of(self, row: Mapping[str, Any], arm: str) -> dict[str, Any]:
        """The values the searcher gave this trial, typed as the search space declares them."""
        out = {}
        for p in self.space.arm_params(arm):
            col = CONFIG_PREFIX + p.key
            if col not in row:
                raise UserError(f"{self.path / TRIALS_FILE}: column {col!r} missing for searched key {p.key}")
            out[p.key] = _typed(row[col], p)
        return out

    def trial_info(self, row: Mapping[str, Any]) -> TrialInfo:
        """A trial row as a :class:`TrialInfo` with its full, validated trainer config."""
        arm = str(row["arm"])
        params = self.params_of(row, arm)
        cfg = self.space.trial_config(arm, params)
        from oialr_tune.config import train_config_to_dict

        columns = trial_metric_columns(self.space.objective.metric)
        metrics = {c: _plain(row[c]) for c in columns if c in row}  # (an older trials.csv may lack some)
        ckpt = row.get("checkpoint")
        checkpoint = None
        if not _is_blank(ckpt):
            checkpoint = str(ckpt) if Path(str(ckpt)).is_absolute() else self._join(str(ckpt))
        return TrialInfo(arm, str(row["trial_id"]), params, train_config_to_dict(cfg), metrics, checkpoint)

    def trial_dir(self, arm: str, trial_id: str) -> Path | None:
        """Ray's folder of a trial (``<arm>/trial_<id>`` or any folder whose name ends in the id)."""
        arm_dir = self.path / arm
        if not arm_dir.is_dir():
            return None
        for candidate in [arm_dir / f"trial_{trial_id}", *sorted(arm_dir.glob(f"*{trial_id}*"))]:
            if (candidate / "result.json").is_file():
                return candidate
        return None

    def history(self, arm: str, trial_id: str) -> pd.DataFrame | None:
        """A trial's per-epoch results (Ray's ``result.json``: one JSON object per line), or None.

        ``ranks`` (a JSON string per epoch) is decoded into a dict. Unreadable lines are skipped:
        a trial killed mid-write leaves a partial last line.
        """
        folder = self.trial_dir(arm, trial_id)
        if folder is None:
            return None
        records = []
        for line in (folder / "result.json").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        if not records:
            return None
        df = pd.DataFrame.from_records(records)
        if "ranks" in df:
            df["ranks"] = df["ranks"].map(_decode_ranks)
        return df

    def find_trial(self, trial_id: str) -> TrialInfo:
        """The trial with this id (any arm). Raises UserError naming the id."""
        rows = self.trials[self.trials["trial_id"].astype(str) == str(trial_id)]
        if rows.empty:
            known = ", ".join(self.trials["trial_id"].astype(str).head(5))
            raise UserError(f"--from-trial: no trial {trial_id!r} in {self.path / TRIALS_FILE} (e.g. {known})")
        return self.trial_info(rows.iloc[0].to_dict())


def _decode_ranks(value: Any) -> dict[str, int]:
    """The ``ranks`` entry of a result: a JSON string (as the sweep logs it) or already a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            decoded = json.loads(value)
            if isinstance(decoded, dict):
                return decoded
    return {}


def _typed(value: Any, param: Param) -> Any:
    """A CSV cell back to the type the search space gives it (CSV loses int vs float and null)."""
    if isinstance(value, np.generic):
        value = value.item()
    if param.type == "categorical":
        for choice in param.choices or ():
            if choice is None and _is_blank(value):
                return None
            if choice is not None and not _is_blank(value) and (choice == value or str(choice) == str(value)):
                return choice
        raise UserError(f"trials.csv: value {value!r} of {param.key} is not one of its choices {param.choices}")
    if _is_blank(value):
        raise UserError(f"trials.csv: no value for searched key {param.key}")
    return round(float(value)) if param.type == "int" else float(value)


def find_results_dir(results_dir: str | Path) -> Path:
    """The folder of a sweep's results, checked to hold them.

    A bare name that is not a folder here is also looked up under ``results/`` (where ``sweep``
    puts its folders), so ``oialr-tune best quickstart-20261201-011148`` works from the project root.
    Raises UserError naming the path when it does not exist or holds no experiment (no
    ``sweep.yaml`` or no ``trials.csv``).
    """
    path = Path(results_dir)
    if not path.is_dir() and len(path.parts) == 1 and (Path("results") / path).is_dir():
        path = Path("results") / path
    if not path.is_dir():
        raise UserError(f"{path}: no such results directory")
    if not (path / SWEEP_FILE).is_file():
        raise UserError(f"{path}: holds no experiment (no {SWEEP_FILE}; run `oialr-tune sweep` first)")
    if not (path / TRIALS_FILE).is_file():
        raise UserError(
            f"{path}: holds no finished sweep (no {TRIALS_FILE}; resume it with `oialr-tune sweep --resume {path}`)"
        )
    return path


def incomplete(path: Path) -> str | None:
    """Why the files derived from a sweep's journals (trials.csv, summary.json, study.db) are not whole, or None.

    A kill during the final writes leaves trials.csv without study.db; a damaged trials.csv may be
    cut mid-row (pandas would read the row with blanks, and `best` could pick the wrong trial). The
    journals (``journal-<arm>.jsonl``) record every ended trial, so they are the reference.
    """
    journals = sorted(path.glob(JOURNAL_TEMPLATE.format(arm="*")))
    trials_file = path / TRIALS_FILE
    text = trials_file.read_bytes()
    if not journals:  # a folder from before journals: detect what can be detected
        if text and not text.endswith(b"\n"):
            raise UserError(f"{trials_file}: cut off mid-row; rerun the sweep's final step with --resume {path}")
        return None
    ended = sum(len(ended_trials(j, key=None)) for j in journals)
    rows = text.count(b"\n") - 1 if text.endswith(b"\n") else -1
    missing = [f for f in (STUDY_FILE, SUMMARY_FILE) if not (path / f).is_file()]
    if rows == ended and not missing:
        return None
    return f"{', '.join(missing)} missing" if missing else f"{TRIALS_FILE} holds {max(rows, 0)} of {ended} ended trials"


def open_results(results_dir: str | Path) -> SweepResults:
    """Open a results directory written by ``oialr-tune sweep`` (see `find_results_dir`).

    Raises UserError naming the path when it holds no experiment, when its files are unreadable,
    or when they are incomplete (a sweep killed during its final writes): ``oialr-tune best``,
    ``report`` and ``retrain`` rebuild them from the journals first
    (:func:`oialr_tune.tuning.collect.repair_if_incomplete`).
    """
    path = find_results_dir(results_dir)
    why = incomplete(path)
    if why is not None:
        raise UserError(f"{path}: results incomplete ({why}); `oialr-tune best {path}` rebuilds them from the journals")
    sweep_file, trials_file = path / SWEEP_FILE, path / TRIALS_FILE
    try:
        space = load_space(sweep_file)
    except UserError as e:
        raise UserError(f"{sweep_file}: not a valid stored search space ({e})") from None
    try:
        trials = pd.read_csv(trials_file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{trials_file}: unreadable ({type(e).__name__})") from None
    for col in ("arm", "trial_id", "status"):
        if col not in trials:
            raise UserError(f"{trials_file}: column {col!r} missing")
    summary = None
    if (path / SUMMARY_FILE).is_file():
        try:
            summary = json.loads((path / SUMMARY_FILE).read_text())
        except json.JSONDecodeError:
            summary = None  # only informative: trials.csv holds every trial
    return SweepResults(path, space, trials, summary)


def check_max_trainable_fraction(value: float | None) -> None:
    """UserError unless `value` is None or > 0: a size budget no model can meet is a typo.

    Its own function so ``compare`` can refuse it before its sweeps run, not after.
    """
    if value is not None and not value > 0:
        raise UserError(f"--max-trainable-fraction: must be > 0, got {value}")


@dataclass
class _Ranking:
    """An arm's usable trials ranked for `best`: the one place that defines best and Pareto."""

    usable: pd.DataFrame
    completed: int  # how many usable trials ran the whole schedule (the candidates when any did)
    size: pd.Series  # trainable fraction of each usable trial; a missing one counts as full size (1.0)
    pareto: pd.DataFrame  # usable trials no other beats on both the metric and the size, smallest first
    candidates: pd.DataFrame  # trials that may be "best" (the Pareto set when multi), under the budget, best first
    multi: bool
    mode: str


def _rank(res: SweepResults, arm: str, metric: str, max_trainable_fraction: float | None) -> _Ranking:
    """Rank an arm's usable trials by `metric` (ties: the smaller model, then the earlier trial)."""
    mode = metric_direction(res, metric)
    usable = res.usable(arm, metric)
    epochs = pd.to_numeric(usable.get("training_iteration", pd.Series(math.inf, usable.index)), errors="coerce")
    completed = usable[epochs >= res.space.budget.max_epochs]  # not stopped early by ASHA
    pool = completed if len(completed) else usable
    multi = res.space.objective.is_multi and arm == "oialr" and metric != SIZE_METRIC
    score = pd.to_numeric(pool[metric], errors="coerce")
    score = score if mode == "max" else -score
    size = pd.to_numeric(usable.get(SIZE_METRIC, pd.Series(1.0, index=usable.index)), errors="coerce").fillna(1.0)
    pareto = pool[pareto_mask(score, size.loc[pool.index])]
    pareto = pareto.loc[size.loc[pareto.index].sort_values(kind="stable").index]
    candidates = pareto if multi else pool
    if max_trainable_fraction is not None:
        candidates = candidates[size.loc[candidates.index] <= max_trainable_fraction]
    order = pd.DataFrame({"score": score.loc[candidates.index], "size": size.loc[candidates.index]})
    order = order.sort_values(["score", "size"], ascending=[False, True], kind="stable")
    return _Ranking(usable, len(completed), size, pareto, candidates.loc[order.index], multi, mode)


def pareto_rows(res: SweepResults, arm: str = "oialr", metric: str | None = None) -> pd.DataFrame:
    """An arm's Pareto set (`metric` vs trainable fraction, any objective mode) as trials.csv rows,
    smallest first: the trials no other trial beats on both."""
    return _rank(res, arm, metric or res.space.objective.metric, None).pareto


def _budget(res: SweepResults, arm: str, max_trainable_fraction: float | None) -> float | None:
    """The size budget that applies: the given one, else (OIALR arm) the space's own."""
    if max_trainable_fraction is None and arm == "oialr":
        return res.space.objective.max_trainable_fraction
    return max_trainable_fraction


def best_trial(
    results_dir: str | Path | SweepResults,
    *,
    arm: str = "oialr",
    objective: str | None = None,
    max_trainable_fraction: float | None = None,
) -> BestTrial:
    """The best finished trial of `arm` and (multi-objective sweeps) its Pareto set.

    Args:
        results_dir: a results directory (or an already opened one).
        arm: ``oialr`` or ``baseline``.
        objective: metric to rank by (``val_acc``, ``val_loss`` or ``trainable_fraction``);
            default: the sweep's objective metric.
        max_trainable_fraction: only trials at or under this trainable fraction count; for a
            multi-objective sweep this picks the most accurate Pareto point under the budget.
            Default for the OIALR arm: the space's ``objective.max_trainable_fraction``.

    Ties on the metric go to the smaller model, then to the earlier trial; a trial that reported
    no trainable fraction counts as full size. The sweep's own summary uses the same ranking.

    Raises UserError for a directory without an experiment, an arm the sweep did not run, or no
    trial that qualifies.
    """
    res = results_dir if isinstance(results_dir, SweepResults) else open_results(results_dir)
    if arm not in res.space.arms():
        raise UserError(f"--arm: sweep {res.name!r} has no {arm!r} arm (arms: {', '.join(res.space.arms())})")
    metric = objective or res.space.objective.metric
    if metric not in SELECTABLE_DIRECTIONS and metric != res.space.objective.metric:
        raise UserError(f"--objective: expected one of {', '.join(SELECTABLE_DIRECTIONS)}, got {metric!r}")
    max_trainable_fraction = _budget(res, arm, max_trainable_fraction)
    check_max_trainable_fraction(max_trainable_fraction)
    all_rows = res.trials[res.trials["arm"] == arm]
    ranking = _rank(res, arm, metric, max_trainable_fraction)
    if ranking.usable.empty:
        raise UserError(
            f"{res.path}: no finished trial in arm {arm!r} ({len(all_rows)} trials, all failed, diverged or unfinished)"
        )
    if ranking.candidates.empty:
        smallest = float(ranking.size.loc[(ranking.pareto if ranking.multi else ranking.usable).index].min())
        raise UserError(
            f"--max-trainable-fraction: no finished {arm} trial at or under {max_trainable_fraction} "
            f"(smallest is {smallest:.4g})"
        )
    return BestTrial(
        results_dir=Path(res.path) if not isinstance(res.path, str) else res.path,
        arm=arm,
        objective=metric,
        mode=ranking.mode,
        multi=ranking.multi,
        trial=res.trial_info(ranking.candidates.iloc[0].to_dict()),
        pareto=[res.trial_info(r.to_dict()) for _, r in ranking.pareto.iterrows()] if ranking.multi else [],
        max_trainable_fraction=max_trainable_fraction,
        finished_trials=len(ranking.usable),
        ignored_trials=len(all_rows) - len(ranking.usable),
        completed_trials=ranking.completed,
    )


def summarize(res: SweepResults) -> dict[str, Any]:
    """What ``summary.json`` holds: each arm's best trial (as `best_trial` picks it, with the space's
    budget) and, for a multi-objective sweep, the OIALR arm's Pareto set. Checkpoints stay as
    trials.csv records them (relative to the folder)."""
    objective = res.space.objective
    metric = objective.metric
    best: dict[str, Any] = {}
    for arm in res.space.arms():
        ranking = _rank(res, arm, metric, _budget(res, arm, None))
        if ranking.candidates.empty:
            continue
        row = ranking.candidates.iloc[0]
        best[arm] = {
            "trial_id": str(row["trial_id"]),
            "config": res.params_of(row, arm),
            **{k: _plain(row.get(k)) for k in dict.fromkeys((metric, "val_acc", SIZE_METRIC, "training_iteration"))},
            "checkpoint": None if _is_blank(row.get("checkpoint")) else str(row["checkpoint"]),
        }
    summary: dict[str, Any] = {
        "name": res.space.name,
        "objective": dataclasses.asdict(objective),
        "trials": {arm: int((res.trials["arm"] == arm).sum()) for arm in res.space.arms()},
        "best": best,
    }
    if objective.is_multi:
        pareto = _rank(res, "oialr", metric, None).pareto
        summary["pareto"] = [
            {"trial_id": str(r["trial_id"]), metric: _plain(r[metric]), SIZE_METRIC: _plain(r.get(SIZE_METRIC))}
            for _, r in pareto.iterrows()
        ]
    return summary
