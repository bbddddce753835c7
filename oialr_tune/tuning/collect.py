"""A sweep's results, collected from its journals: trials.csv, summary.json and study.db.

The journals (one per arm, see :mod:`state`) record every ended trial, so these files are derived
and can always be rebuilt, by the sweep when its arms are done or later by `rebuild_results`.
Paths in them (checkpoints) are relative to the sweep folder, so a moved folder still works.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from oialr_tune import sweep_state as state
from oialr_tune.errors import UserError
from oialr_tune.metrics import CONFIG_PREFIX, PLACEMENT_COLUMNS, TRIAL_RESULT_COLUMNS, trial_columns
from oialr_tune.results import SweepResults, find_results_dir, incomplete, summarize
from oialr_tune.space import SearchSpace
from oialr_tune.sweep_state import SUMMARY_FILE, TRIALS_FILE
from oialr_tune.tuning.storage import Store, open_sweep
from oialr_tune.tuning.study import is_finite_number, stopped_early, write_studies

__all__ = ["collect", "rebuild_results", "repair_if_incomplete", "rows_of"]


def rows_of(space: SearchSpace, arm: str, ended: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per ended trial of an arm (a trials.csv row, see `oialr_tune.metrics.trial_columns`,
    and its per-epoch objective values, ``_history``, and trial folder, ``_dir``), from the arm's journal records."""
    keys = [p.key for p in space.arm_params(arm)]
    metric = space.objective.metric
    rows = []
    for trial_id, rec in ended.items():
        last, epochs = rec.get("result", {}), rec.get("epochs", [])
        history = [e.get(metric) for e in epochs] if epochs else [last.get(metric)]
        values = [v for v in history if is_finite_number(v)]
        trainer_status = last.get("run_status")
        # Ray's status (TERMINATED or ERROR), and the trainer's verdict beside it: finished,
        # diverged, or running when ASHA stopped it.
        row: dict[str, Any] = {"arm": arm, "trial_id": trial_id, "status": rec["status"]}
        row["trainer_status"] = "error" if rec.get("error") else trainer_status
        row["stopped_early"] = rec["status"] == "TERMINATED" and stopped_early(last)
        config = rec.get("config", {})
        row.update({CONFIG_PREFIX + k: config.get(k) for k in keys})
        best = (max if space.objective.direction == "max" else min)(values) if values else None
        row.update({metric: last.get(metric), f"best_{metric}": best})
        row.update({k: last.get(k) for k in (*TRIAL_RESULT_COLUMNS, *PLACEMENT_COLUMNS)})
        row["training_iteration"] = int(last.get("training_iteration") or 0)
        row["train_time_s"] = float(sum(e.get("train_time_s") or 0.0 for e in epochs))
        row["workers"] = last.get("workers", 1)
        row.update({"checkpoint": rec.get("checkpoint"), "error": rec.get("error"),
                    "_history": history, "_dir": rec.get("dir")})  # (the last two: not columns)
        rows.append(row)
    return rows


def _trial_rows(space: SearchSpace, arm: str, store: Store) -> list[dict[str, Any]]:
    """The arm's trial rows, from its journal."""
    journal = store.journal(arm)
    return rows_of(space, arm, state.ended_trials(journal.path, journal.key))


def collect(space: SearchSpace, store: Store, pool: ThreadPoolExecutor) -> tuple[SweepResults, Future[None]]:
    """Write trials.csv, study.db and summary.json from the arms' journals; return the results.

    study.db is written on a thread of `pool` (the returned future): nothing else needs to wait for
    it, so it overlaps stopping Ray.
    """
    per_arm = {arm: _trial_rows(space, arm, store) for arm in space.arms()}
    all_rows = [row for rows in per_arm.values() for row in rows]
    for row in all_rows:
        if row["_dir"]:
            # Until the arm is over every checkpoint stays: the experiment state a killed driver
            # leaves behind may name any of them.
            store.prune_checkpoints(row["_dir"], row["checkpoint"])

    studies = pool.submit(write_studies, space, per_arm, store)
    searched = dict.fromkeys(p.key for arm in space.arms() for p in space.arm_params(arm))
    df = pd.DataFrame(all_rows, columns=trial_columns(space.objective.metric, searched))
    for p in space.search:  # integer knobs stay integers in the CSV (the baseline rows leave gaps)
        col = CONFIG_PREFIX + p.key
        if p.type == "int" and col in df:
            df[col] = df[col].astype("Int64")
    csv = df.to_csv(index=False)
    store.write_text(TRIALS_FILE, csv)
    state.kill_point("final-writes")
    # The summary is read from the CSV text, as `best` reads it later: the two cannot disagree.
    res = SweepResults(Path(store.root) if store.is_local else store.root, space, pd.read_csv(io.StringIO(csv)), None)
    res.summary = summarize(res)
    store.write_text(SUMMARY_FILE, json.dumps(res.summary, indent=2) + "\n")
    return res, studies


def rebuild_results(path: str | os.PathLike[str]) -> None:
    """Rewrite a finished sweep's trials.csv, summary.json and study.db from its journals.

    For a folder whose final writes were cut short (a kill, a full disk) or whose trials.csv was
    damaged: the journals hold every ended trial, so nothing needs Ray.
    """
    store, space = open_sweep(path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        studies = collect(space, store, pool)[1]
    studies.result()


def repair_if_incomplete(results_dir: str | os.PathLike[str]) -> Path:
    """Rebuild a sweep folder's trials.csv, summary.json and study.db from its journals when they
    are not whole (see `results.incomplete`), saying so on stderr; return the folder.

    What ``oialr-tune best``, ``report`` and ``retrain`` run before reading a folder.
    """
    path = find_results_dir(results_dir)
    why = incomplete(path)
    if why is None:
        return path
    try:
        rebuild_results(path)
    except OSError as e:
        raise UserError(f"{path}: results incomplete ({why}) and cannot be rewritten ({e.strerror or e})") from None
    print(f"oialr-tune: note: {path}: results were incomplete ({why}); rebuilt from the journals", file=sys.stderr)
    return path
