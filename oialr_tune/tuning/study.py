"""The Optuna side of a sweep's records: trials as Optuna trials, ``study.db`` written and read.

The searcher's study lives in memory while a sweep runs (see :mod:`oialr_tune.tuning`); ``study.db``
is derived from the journals afterwards, so it can always be rebuilt. Writing and reading it are
both here, so this module (with the rest of :mod:`oialr_tune.tuning`) is the only one that talks
to Optuna.

Writing stores the trials in one ORM session (`oialr_tune.tuning._internals.add_finished_trials`,
through Optuna's private table models): ``study.add_trials`` spends 20-30 ms per trial.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from oialr_tune.errors import UserError
from oialr_tune.files import replacing
from oialr_tune.metrics import SIZE_METRIC
from oialr_tune.space import Param, SearchSpace
from oialr_tune.sweep_state import STUDY_FILE
from oialr_tune.tuning._internals import add_finished_trials
from oialr_tune.tuning.storage import Store

__all__ = ["importances", "optuna_distribution", "optuna_trials", "size_constraint", "stopped_early", "write_studies"]


def optuna_distribution(param: Param) -> Any:
    """The Optuna distribution of a searched key (also what ``study.db`` records)."""
    if param.type == "categorical":
        return CategoricalDistribution(list(param.choices or ()))
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return FloatDistribution(
        float(param.low), float(param.high), log=param.type == "loguniform" or param.log, step=param.step
    )


def size_budget(space: SearchSpace, arm: str) -> float | None:
    """The OIALR arm's `objective.max_trainable_fraction` (the baseline arm is full size by construction)."""
    return space.objective.max_trainable_fraction if arm == "oialr" else None


def directions(space: SearchSpace, arm: str) -> list[str]:
    return ["maximize" if m == "max" else "minimize" for m in space.objective.modes(arm)]


def size_constraint(fraction: float | None, max_trainable_fraction: float) -> dict[str, float]:
    """A trial's constraints (Optuna's ``constraints=`` form): its final trainable fraction minus the budget.

    A trial that reported no fraction counts as full size.
    """
    return {SIZE_METRIC: (1.0 if fraction is None else float(fraction)) - max_trainable_fraction}


def stopped_early(result: Mapping[str, Any] | None) -> bool:
    """Whether a trial's last result is from a run that had not ended (``run_status`` running):
    the scheduler stopped it, so Optuna is told it was PRUNED."""
    return (result or {}).get("run_status") == "running"


def is_finite_number(v: Any) -> bool:
    """A real metric value: a number, not NaN or inf (pandas gives NaN for a missing cell)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def optuna_trials(space: SearchSpace, arm: str, rows: Sequence[dict[str, Any]]) -> list[Any]:
    """Each trial row as the Optuna trial the searcher was told of.

    The per-epoch values become intermediate values, the Ray trial id and status user attributes.
    A trial the scheduler stopped early is PRUNED, as the searcher was told (see
    :mod:`oialr_tune.tuning.search`), with Optuna's value for a pruned trial: its last
    intermediate value (none for several objectives, which have no intermediate values). A trial
    that ran its schedule is COMPLETE with its last reported metric(s); one that errored or has no
    finite value is FAIL. The size constraint is set on complete and pruned trials alike.
    """
    dists = {p.key: optuna_distribution(p) for p in space.arm_params(arm)}
    metrics = space.objective.metrics(arm)
    budget = size_budget(space, arm)
    trials = []
    for row in rows:
        values = [row.get(m) for m in metrics]
        inter = {}
        if len(metrics) == 1:
            inter = {i + 1: v for i, v in enumerate(row["_history"]) if is_finite_number(v)}
        told = _told_state(row, values)
        if told == TrialState.PRUNED:
            values = [inter[max(inter)]] if inter else None
        elif told == TrialState.FAIL:
            values = None
        constraints = None
        if budget is not None and told != TrialState.FAIL:
            fraction = row.get(SIZE_METRIC)
            constraints = size_constraint(fraction if is_finite_number(fraction) else None, budget)
        trials.append(
            optuna.trial.create_trial(
                params={k: row[f"config.{k}"] for k in dists},
                distributions=dists,
                values=[float(v) for v in values] if values is not None else None,
                state=told,
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


def _told_state(row: Mapping[str, Any], values: Sequence[Any]) -> TrialState:
    """How a trial row was told to the searcher: PRUNED (stopped early), COMPLETE or FAIL."""
    if row["status"] != "TERMINATED":
        return TrialState.FAIL
    if row.get("stopped_early"):
        return TrialState.PRUNED
    return TrialState.COMPLETE if all(is_finite_number(v) for v in values) else TrialState.FAIL


def write_studies(space: SearchSpace, rows_by_arm: Mapping[str, Sequence[dict[str, Any]]], store: Store) -> None:
    """(Re)write ``study.db``: one Optuna study per arm (named after it), from its trial rows (see `optuna_trials`).

    The file is rebuilt from scratch, so re-running this after a resume cannot duplicate trials.
    Optuna creates the database and the studies; the trials go in with `_internals.add_finished_trials`, in one
    transaction of an in-memory SQLite database that SQLite's backup API then copies to the file
    (written beside it, then renamed over it). ``study.add_trials`` costs 20-30 ms per trial (a
    dozen ORM queries and a commit each); this, about 1 ms. The file is the same Optuna SQLite
    database, which ``optuna.load_study`` and optuna-dashboard read.
    """
    from sqlalchemy.pool import StaticPool  # Optuna's own dependency: one connection holds the memory database

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage("sqlite:///:memory:", engine_kwargs={"poolclass": StaticPool})
    try:
        for arm, rows in rows_by_arm.items():
            study = optuna.create_study(storage=storage, study_name=arm, directions=directions(space, arm))
            study.set_user_attr("space", space.name)
            add_finished_trials(storage, study, optuna_trials(space, arm, rows))
        with store.local_file(STUDY_FILE) as db, replacing(db) as tmp, contextlib.closing(sqlite3.connect(tmp)) as out:
            storage.engine.raw_connection().driver_connection.backup(out)
    finally:
        storage.engine.dispose()


def _check_study_file(path: Path) -> None:
    """Refuse a ``study.db`` that SQLite cannot read (truncated, garbage) or that holds no Optuna tables.

    Checked read-only, before Optuna opens it: Optuna would turn an empty file into a new study
    database, and fail on a damaged one with a traceback from deep in SQLAlchemy.
    """
    fix = "delete it to report without importances"
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: not a readable SQLite database ({e}); {fix}") from None
    if verdict != "ok":
        raise UserError(f"{path}: damaged SQLite database ({verdict}); {fix}")
    if "studies" not in tables:
        raise UserError(f"{path}: holds no Optuna study; {fix}")


def importances(path: Path, arm: str, maximize: bool) -> tuple[dict[str, float] | None, str]:
    """Optuna's importances of an arm's searched keys for its first objective, or None and why not.

    `path` is the sweep's ``study.db``; `maximize` says whether a higher metric is better. Raises
    UserError naming the file when it is there but unreadable.
    """
    if not path.is_file():
        return None, f"no {STUDY_FILE}"
    _check_study_file(path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
    try:
        try:
            study = optuna.load_study(study_name=arm, storage=storage)
        except KeyError:
            return None, f"no study named {arm!r} in {STUDY_FILE}"
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) < 2:
            return None, f"{len(complete)} finished trial(s); importances need at least 2"
        distinct = {k for k in complete[0].params if len({repr(t.params.get(k)) for t in complete}) > 1}
        if not distinct:
            return None, "every finished trial has the same values (nothing searched or nothing varied)"
        # The study stores the metric first ([val_acc] or [val_acc, trainable_fraction]). Optuna's
        # default evaluator (PED-ANOVA) explains *low* target values, so a maximized metric is negated.
        sign = -1.0 if maximize else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = optuna.importance.get_param_importances(
                    study, target=lambda t: sign * t.values[0], params=sorted(distinct)
                )
        except (RuntimeError, ValueError, ZeroDivisionError) as e:
            return None, f"Optuna could not compute them ({type(e).__name__}: {e})"
        return dict(values), f"PED-ANOVA over {len(complete)} finished trials"
    finally:
        storage.engine.dispose()
