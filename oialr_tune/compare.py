"""``oialr-tune compare``: does tuned OIALR match tuned full-rank training on this task?

One protocol, end to end, so the answer is measured rather than assumed:

1. **Tune both arms under the same budget** (one sweep, ``baseline: same-budget``): the same
   num_samples, epochs, ASHA settings and ranges for the shared learning-rate settings; the OIALR
   arm also searches its own knobs. Best trials are picked on the validation split only.
2. **Stability-gate ablation**: the same OIALR search with the gate off (every check cuts rank,
   as in the authors' final code), as a second sweep.
3. **Retrain** each arm's best config with the same S fresh seeds, plus OIALR with the library's
   default knobs at the base learning-rate settings (what tuning buys), and evaluate each model
   once on the held-out test split.
4. **Report** per arm: the sweep's objective on the test split (test accuracy; test_mae or
   test_loss for regression; test_f1 for a user metric val_f1) mean ± std and per seed, trainable
   fraction at the end, trainable and total parameters, wall times; for each OIALR arm minus tuned
   full rank, a Welch 95 % interval and a verdict (better / worse in the metric's own direction: a
   lower MAE is better). Files: ``comparison.md``, ``comparison.csv`` (one row per arm and seed:
   the numbers every figure in the .md is computed from) and ``comparison.png``.

Layout of ``OUT`` (default ``results/<space>-compare-<timestamp>``)::

    tuned/        sweep: tuned OIALR + tuned full rank (Ray Tune's layout, readable by best/report)
    gate_off/     sweep: OIALR with the stability gate off
    retrain/      per arm and seed: config, model files (as written by ``oialr-tune retrain``)
    comparison.md, comparison.csv, comparison.png
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from oialr_tune.config import train_config_from_dict
from oialr_tune.distributed import check_workers
from oialr_tune.errors import UserError
from oialr_tune.metrics import comparison_columns
from oialr_tune.results import best_trial, check_max_trainable_fraction
from oialr_tune.retrain import run_seed_anywhere, seed_jobs
from oialr_tune.space import SearchSpace, load_space, space_from_dict, with_settings
from oialr_tune.stats import finite, verdict, welch_interval
from oialr_tune.sweep_state import SWEEP_FILE, TRIALS_FILE
from oialr_tune.trust import check_folder
from oialr_tune.tuning.parallel import run_all

__all__ = ["ARMS", "compare", "summarize", "write_comparison"]

# (arm, label) in table order; the first is what the others are compared with.
ARMS = (
    ("full_rank_tuned", "tuned full rank"),
    ("oialr_tuned", "tuned OIALR"),
    ("oialr_untuned", "untuned OIALR (library defaults)"),
    ("oialr_gate_off", "tuned OIALR, stability gate off"),
)
REFERENCE = "full_rank_tuned"
def gate_off_space(space: SearchSpace) -> SearchSpace:
    """The same OIALR search with the stability gate disabled and no baseline arm."""
    data = space.to_dict()
    data["name"] = f"{space.name}-gate-off"
    data["base"] = copy.deepcopy(data["base"])
    data["base"]["oialr"]["stability_threshold"] = None
    data["search"] = {k: v for k, v in data["search"].items() if k != "oialr.stability_threshold"}
    data["baseline"] = "none"
    return space_from_dict(data, source=f"{space.name} (gate off)")


def untuned_config(space: SearchSpace) -> dict[str, Any]:
    """The space's base config with every OIALR knob at the library's default."""
    base = copy.deepcopy(space.base)
    base["oialr"] = {"enabled": True}
    return base


def _with_trials(space: SearchSpace, trials: int | None) -> SearchSpace:
    if trials is None:
        return space
    if trials < 1:
        raise UserError(f"--trials: must be >= 1, got {trials}")
    return with_settings(space, num_samples=trials)


def compare(
    space: SearchSpace | str | Path | None,
    *,
    trials: int | None = None,
    seeds: int | Sequence[int] = 5,
    first_seed: int = 1000,
    out: str | Path | None = None,
    resume: bool = False,
    max_trainable_fraction: float | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
    workers: int | None = None,
    trust_code: bool = False,
    log: Callable[[str], None] = lambda message: print(f"[compare] {message}", file=sys.stderr, flush=True),
) -> pd.DataFrame:
    """Run the whole protocol (module docstring) and write the comparison; returns the per-seed table.

    With `max_trainable_fraction` (or the space's ``objective.max_trainable_fraction``), the OIALR
    searches treat larger trials as infeasible (constrained TPE) and the tuned OIALR arms retrain
    their most accurate trial (on validation) among those that ended at or under that trainable
    fraction: the question becomes "does OIALR match full rank *at this size*", rather than at
    whatever size tuned best.

    The sweeps and the (arm, seed) retrains run on the Ray cluster at `address` (default: a local
    Ray); at most `max_concurrent` retrains run at once (1: one after another in this process).
    `workers` replaces the space's ``resources.workers``: every trial and retrain on that many
    data-parallel workers.
    A finished sweep that `resume` reuses from `out` must pass the trust rule (`oialr_tune.trust`)
    unless `trust_code`.
    """
    space, max_trainable_fraction = _protocol_space(space, trials, max_trainable_fraction, workers)
    metric, mode = space.objective.test_metric, space.objective.direction
    seed_list = list(range(first_seed, first_seed + seeds)) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) < 2:
        raise UserError(f"--seeds: need at least 2 seeds for an interval, got {len(seed_list)}")
    default_out = Path("results") / f"{space.name}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out) if out is not None else default_out
    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise UserError(f"--out: {out_dir} already holds files; pass --resume to continue it or pick another")
    if address is not None:  # before the first sweep writes into --out
        from oialr_tune.tuning.cluster import check_address

        check_address(address)
    elif space.resources.workers > 1:  # a local compare: this machine runs each retrain's workers
        check_workers(train_config_from_dict(space.base), space.resources.workers,
                      key="--workers" if workers else "resources.workers")

    tuned = _run_sweeps(out_dir, {"tuned": space, "gate_off": gate_off_space(space)}, address, trust_code, log)
    plans = _plans(space, tuned, max_trainable_fraction)
    # Every (arm, seed) retrain is independent: Ray runs them side by side (see oialr_tune.tuning.parallel).
    jobs = [job for arm, (config, _, _) in plans.items()
            for job in seed_jobs(arm, train_config_from_dict(config), seed_list, out_dir / "retrain", metric=metric,
                                 workers=space.resources.workers)]

    def done(i: int, row: dict[str, Any]) -> None:
        value = row.get(metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else value  # None for a run that diverged
        log(f"{row['arm']} seed {row['seed']} done ({row['status']}, {metric} {shown})")

    results = run_all(run_seed_anywhere, jobs, resources=space.resources, address=address,
                      max_concurrent=max_concurrent, on_done=done)  # fmt: skip
    columns = comparison_columns(metric)
    rows = [{**{k: row.get(k) for k in columns}, "tuning_wall_time_s": plans[row["arm"]][1],
             "source": plans[row["arm"]][2]} for row in results]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(out_dir / "comparison.csv", index=False)
    budget = "" if max_trainable_fraction is None else f" with trainable fraction <= {max_trainable_fraction}"
    write_comparison(out_dir, table, metric=metric, mode=mode, title=f"{space.name}: {space.budget.num_samples} "
                     f"trials per arm, {space.budget.max_epochs} epochs, {len(seed_list)} seeds{budget}")  # fmt: skip
    table.attrs.update(metric=metric, mode=mode)  # for `summarize` of the returned table
    log(f"wrote {out_dir / 'comparison.md'}")
    return table


def _protocol_space(
    space: SearchSpace | str | Path | None, trials: int | None, max_trainable_fraction: float | None,
    workers: int | None = None,
) -> tuple[SearchSpace, float | None]:
    """The space both tuned arms search (same budget, `trials` per arm, the size budget in the
    OIALR search, `workers` per trial), and the size budget that applies (given, or the space's own)."""
    check_max_trainable_fraction(max_trainable_fraction)
    space = space if isinstance(space, SearchSpace) else load_space(space)
    if workers is not None:  # validated with the batch sizes, as in the space's YAML
        space = with_settings(space, overrides={"resources.workers": workers})
    if max_trainable_fraction is not None:  # the budget goes into the OIALR searches, not only the pick
        objective = dataclasses.replace(space.objective, max_trainable_fraction=max_trainable_fraction)
        space = dataclasses.replace(space, objective=objective)
    budget = space.objective.max_trainable_fraction
    return _with_trials(dataclasses.replace(space, baseline="same-budget"), trials), budget


def _run_sweeps(
    out_dir: Path, sweeps: dict[str, SearchSpace], address: str | None, trust_code: bool,
    log: Callable[[str], None],
) -> dict[str, Path]:
    """Each sweep into ``out_dir/<folder>``: reused when it finished (and is trusted: its best configs
    are retrained), resumed when it was interrupted (a resume checks the folder's signature itself)."""
    from oialr_tune.tuning import sweep

    for folder, sp in sweeps.items():
        done = (out_dir / folder / TRIALS_FILE).exists()
        if done:
            check_folder(out_dir / folder, trust_code, "compare")
        log(f"{'reusing' if done else 'running'} sweep {folder} ({sp.budget.num_samples} trials per arm)")
        if done:
            continue
        if (out_dir / folder / SWEEP_FILE).exists():  # interrupted earlier: continue it from its own sweep.yaml
            sweep(None, resume=out_dir / folder, address=address)
        else:
            sweep(sp, name=folder, results_dir=out_dir, address=address)
    return {folder: out_dir / folder for folder in sweeps}


Plan = tuple[dict[str, Any], float, str]


def _plans(space: SearchSpace, tuned: dict[str, Path], budget: float | None) -> dict[str, Plan]:
    """Arm -> (the config it retrains, its tuning time in trial-seconds, where the config came from)."""

    def tuning_time(folder: str, arm: str) -> float:
        trials_df = pd.read_csv(tuned[folder] / TRIALS_FILE)
        return float(trials_df.loc[trials_df["arm"] == arm, "time_total_s"].fillna(0).sum())

    def best_oialr(folder: str) -> dict[str, Any]:
        return best_trial(tuned[folder], arm="oialr", max_trainable_fraction=budget).trial.config

    under = "" if budget is None else f" with trainable fraction <= {budget}"
    return {
        "full_rank_tuned": (best_trial(tuned["tuned"], arm="baseline").trial.config, tuning_time("tuned", "baseline"),
                            "best trial of tuned/ baseline arm"),
        "oialr_tuned": (best_oialr("tuned"), tuning_time("tuned", "oialr"), f"best trial of tuned/ oialr arm{under}"),
        "oialr_untuned": (untuned_config(space), 0.0, "space base config, OIALR knobs at library defaults"),
        "oialr_gate_off": (best_oialr("gate_off"), tuning_time("gate_off", "oialr"),
                           f"best trial of gate_off/ oialr arm{under}"),
    }  # fmt: skip


def summarize(table: pd.DataFrame, metric: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
    """Per arm: the figures of the comparison table, recomputed from the per-seed rows.

    `metric` is the test metric compared and `mode` ('max' or 'min') the direction that makes it
    better; by default those `compare` noted on the table it returned (else test_acc, max). The
    entry keys are ``mean``, ``std``, ``values`` of that metric.
    """
    metric = metric or table.attrs.get("metric", "test_acc")
    mode = mode or table.attrs.get("mode", "max")
    ref = finite(table.loc[table["arm"] == REFERENCE, metric])
    out = []
    for arm, label in ARMS:
        rows = table[table["arm"] == arm]
        if rows.empty:
            continue
        values = finite(rows[metric])
        entry: dict[str, Any] = {
            "arm": arm,
            "label": label,
            "metric": metric,
            "seeds": len(rows),
            "diverged": int((rows["status"] == "diverged").sum()),
            "mean": statistics.fmean(values) if values else math.nan,
            "std": statistics.stdev(values) if len(values) >= 2 else math.nan,
            "values": values,
            "trainable_fraction": float(rows["trainable_fraction"].mean()),
            "trainable_params": float(rows["trainable_params"].mean()),
            "total_params": float(rows["total_params"].mean()),
            "wall_time_s": float(rows["wall_time_s"].mean()),
            "tuning_wall_time_s": float(rows["tuning_wall_time_s"].iloc[0]),
        }
        if arm != REFERENCE and len(values) >= 2 and len(ref) >= 2:
            iv = welch_interval(values, ref)
            entry.update(diff=iv.difference, low=iv.low, high=iv.high, verdict=verdict(iv, mode))
        out.append(entry)
    return out


def write_comparison(out_dir: Path, table: pd.DataFrame, *, title: str, metric: str = "test_acc",
                     mode: str = "max") -> None:
    """``comparison.md`` and ``comparison.png`` from the per-seed table (also in ``comparison.csv``)."""
    summary = summarize(table, metric, mode)
    better = "higher" if mode == "max" else "lower"
    lines = [
        f"# OIALR vs full rank — {title}",
        "",
        f"{metric} over fresh seeds ({better} is better; best configs picked on validation only). "
        "Differences are arm − tuned full rank with a Welch 95 % interval.",
        "",
        f"| arm | {metric} (mean ± std) | per seed | trainable fraction | trainable / full-rank params | "
        "train wall (s/seed) | tuning wall (s, Σ trials) | OIALR − full rank [95 % CI] | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        diff = f"{s['diff']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}]" if "diff" in s else "—"
        lines.append(
            f"| {s['label']} | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in s['values'])} | {s['trainable_fraction']:.3f} | "
            f"{s['trainable_params']:,.0f} / {s['total_params']:,.0f} | {s['wall_time_s']:.1f} | "
            f"{s['tuning_wall_time_s']:.0f} | {diff} | {s.get('verdict', '—')} |"
        )
    lines += ["", f"![{metric} per arm](comparison.png)", ""]
    (out_dir / "comparison.md").write_text("\n".join(lines))
    _plot(out_dir / "comparison.png", summary, title, metric)


def _plot(path: Path, summary: list[dict[str, Any]], title: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, s in enumerate(summary):
        ax.scatter([i] * len(s["values"]), s["values"], color="C0", alpha=0.6, s=18)
        ax.errorbar(i + 0.15, s["mean"], yerr=s["std"], fmt="o", color="C3", capsize=4)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([f"{s['label']}\n{s['trainable_fraction']:.0%} trainable" for s in summary], fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
