"""``oialr-tune report``: a Markdown report with plots of a sweep, written into its results directory.

Files written (all in RESULTS_DIR, overwritten on each run)::

    report.md                  the report; links the images below by relative path
    report_pareto.png          val metric vs trainable fraction: every trial, the Pareto front, full rank
    report_best_so_far.png     best-so-far val metric vs trial number and vs wall time, per arm
    report_ranks.png           per-layer rank (and trainable fraction) over epochs, best OIALR trial
    report_importance.png      Optuna hyperparameter importances per arm (study.db)

A plot that has nothing to show (no study, fewer than two finished trials, no per-epoch ranks) is
left out and the report says why. Figures are drawn with matplotlib's object API on an Agg canvas:
no pyplot global state, no display, no server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from oialr_tune.files import writable_folder
from oialr_tune.results import (
    SIZE_METRIC,
    BestTrial,
    SweepResults,
    TrialInfo,
    best_trial,
    metric_direction,
    open_results,
    pareto_rows,
)
from oialr_tune.stats import in_words
from oialr_tune.sweep_state import REPORT_FILE, RETRAIN_DIR, SUMMARY_FILE
from oialr_tune.trust import check_folder
from oialr_tune.tuning.study import importances

__all__ = ["PLOTS", "write_report"]

PLOTS = {
    "pareto": "report_pareto.png",
    "best_so_far": "report_best_so_far.png",
    "ranks": "report_ranks.png",
    "importance": "report_importance.png",
}
ARM_STYLE = {
    "oialr": {"color": "tab:blue", "label": "OIALR"},
    "baseline": {"color": "tab:orange", "label": "full rank"},
}
TOP_TRIALS = 10


def _new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # attach a raster canvas: savefig needs no pyplot backend
    return fig


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df:
        return pd.Series(np.nan, index=df.index)
    return pd.to_numeric(df[column], errors="coerce")


# --- plots ---------------------------------------------------------------------------------------


def plot_pareto(res: SweepResults, metric: str, best: dict[str, BestTrial], path: Path) -> str:
    """Scatter of every usable trial (metric vs trainable fraction), the OIALR Pareto front, full rank."""
    fig = _new_figure(6.4, 5.0)
    ax = fig.add_subplot()
    if "oialr" in res.arms:
        df = res.usable("oialr", metric)
        y, x = _numeric(df, metric), _numeric(df, SIZE_METRIC)
        stopped = _numeric(df, "training_iteration") < res.space.budget.max_epochs
        ax.scatter(x[~stopped], y[~stopped], s=28, color="tab:blue", alpha=0.8, label="OIALR trial")
        if stopped.any():
            ax.scatter(x[stopped], y[stopped], s=28, facecolors="none", edgecolors="tab:blue", alpha=0.6,
                       label="OIALR trial (stopped early)")
        front = pareto_rows(res, "oialr", metric)
        if len(front):
            ax.step(_numeric(front, SIZE_METRIC).fillna(1.0), _numeric(front, metric), where="post", color="tab:blue",
                    lw=1.5, label="Pareto front")
        if "oialr" in best:
            b = best["oialr"].trial
            ax.scatter([b.trainable_fraction], [b.metrics.get(metric)], s=160, marker="*", color="gold",
                       edgecolors="black", zorder=5, label=f"best OIALR ({b.trial_id})")
    if "baseline" in res.arms:
        df = res.usable("baseline", metric)
        ax.scatter(_numeric(df, SIZE_METRIC).fillna(1.0), _numeric(df, metric), marker="x", s=36,
                   color="tab:orange", label="full-rank trial")
        if "baseline" in best:
            value = best["baseline"].trial.metrics.get(metric)
            ax.axhline(value, color="tab:orange", ls="--", lw=1, label=f"best full rank ({value:.4g})")
    ax.set_xlabel("trainable fraction (of the full-rank model's parameters)")
    ax.set_ylabel(metric)
    ax.set_xlim(0, 1.05)
    ax.set_title(f"{res.name}: {metric} vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncol=3)  # below the axes: never hides a point
    fig.savefig(path)
    return ("every finished trial; hollow = stopped early by ASHA (not candidates for `best` or the front when "
            "any trial ran every epoch); star = the configuration `best` returns")


def _trial_times(res: SweepResults, arm: str, rows: pd.DataFrame) -> pd.Series:
    """Seconds from the arm's start to each trial's last result (Ray's result timestamps).

    Falls back to the running sum of trial durations (as if trials ran one after another) when
    Ray's result files are missing.
    """
    ends, starts = {}, []
    for _, r in rows.iterrows():
        h = res.history(arm, str(r["trial_id"]))
        if h is None or "timestamp" not in h or h.empty:
            continue
        first = h.iloc[0]
        starts.append(float(first["timestamp"]) - float(first.get("time_this_iter_s", 0.0) or 0.0))
        ends[r.name] = float(h["timestamp"].iloc[-1])
    if len(ends) == len(rows) and starts:
        t0 = min(starts)
        return pd.Series({k: v - t0 for k, v in ends.items()}).loc[rows.index]
    return _numeric(rows, "time_total_s").fillna(0.0).cumsum()


def plot_best_so_far(res: SweepResults, metric: str, path: Path) -> str:
    """Best-so-far metric per arm vs trial number (creation order) and vs wall time since the arm began."""
    fig = _new_figure(10, 4)
    by_trial, by_time = fig.subplots(1, 2)
    better = np.fmax if metric_direction(res, metric) == "max" else np.fmin
    for arm in res.arms:
        rows = res.trials[res.trials["arm"] == arm]
        ok = rows.index.isin(res.usable(arm, metric).index)
        values = _numeric(rows, metric).where(ok)  # failed trials count as tries but never improve
        running = better.accumulate(values.to_numpy())
        style = ARM_STYLE.get(arm, {"color": None, "label": arm})
        by_trial.step(np.arange(1, len(rows) + 1), running, where="post", **style)
        by_trial.scatter(np.arange(1, len(rows) + 1), values, s=12, alpha=0.4, color=style["color"])
        t = _trial_times(res, arm, rows).to_numpy()
        order = np.argsort(t, kind="stable")
        by_time.step(t[order], better.accumulate(values.to_numpy()[order]), where="post", **style)
        by_time.scatter(t, values, s=12, alpha=0.4, color=style["color"])
    by_trial.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_trial.set_xlabel("trial (in the order Ray created them)")
    by_time.set_xlabel("wall time since the arm started (s)")
    for ax in (by_trial, by_time):
        ax.set_ylabel(f"best {metric} so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res.name}: search progress")
    fig.savefig(path)
    return "dots are single trials; the arms ran one after the other, each timed from its own start"


def plot_ranks(history: pd.DataFrame, trial_id: str, path: Path) -> str | None:
    """Per-layer rank over epochs (left axis) and trainable fraction (right axis); None if no ranks."""
    if "ranks" not in history:
        return None
    ranks = pd.DataFrame.from_records(history["ranks"].map(lambda r: r if isinstance(r, dict) else {}).tolist())
    if ranks.empty:
        return None
    epochs = _numeric(history, "epoch") if "epoch" in history else _numeric(history, "training_iteration")
    fig = _new_figure(7, 4.2)
    ax = fig.add_subplot()
    for layer in ranks.columns:
        ax.plot(epochs, ranks[layer], marker="o", ms=3, label=f"layer {layer}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("rank (min(m, n) while still dense)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if SIZE_METRIC in history:
        twin = ax.twinx()
        twin.plot(epochs, _numeric(history, SIZE_METRIC), color="black", ls="--", lw=1.2, label="trainable fraction")
        twin.set_ylabel("trainable fraction")
        twin.set_ylim(0, 1.05)
        twin.legend(fontsize=8, loc="upper right")
    ncol = 1 if len(ranks.columns) <= 8 else 2
    ax.legend(fontsize=7, loc="lower left", ncol=ncol)
    ax.set_title(f"ranks during training, best OIALR trial {trial_id}")
    fig.savefig(path)
    return f"{len(ranks.columns)} low-rank-eligible layers; ranks at the end of each epoch"


def param_importances(res: SweepResults, arm: str, metric: str) -> tuple[dict[str, float] | None, str]:
    """Optuna's importances of an arm's searched keys for `metric`, or None and the reason why not.

    Raises UserError naming ``study.db`` when it is there but unreadable.
    """
    return importances(res.study_path, arm, maximize=metric_direction(res, metric) == "max")


def plot_importances(importances: dict[str, dict[str, float]], metric: str, path: Path) -> None:
    """Horizontal bars, one panel per arm."""
    fig = _new_figure(5 * len(importances), 0.6 + 0.45 * max(len(v) for v in importances.values()) + 1)
    axes = fig.subplots(1, len(importances), squeeze=False)[0]
    for ax, (arm, values) in zip(axes, importances.items(), strict=True):
        keys = list(values)[::-1]
        ax.barh(keys, [values[k] for k in keys], color=ARM_STYLE.get(arm, {}).get("color", "gray"))
        ax.set_xlabel(f"importance for {metric}")
        ax.set_title(ARM_STYLE.get(arm, {}).get("label", arm))
        ax.set_xlim(0, 1)
    fig.savefig(path)


# --- the report ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of `rows` restricted to `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _pareto_set(res: SweepResults, metric: str) -> list[TrialInfo]:
    """The OIALR arm's Pareto set (metric vs trainable fraction), smallest first; any objective mode."""
    if "oialr" not in res.arms:
        return []
    return [res.trial_info(r.to_dict()) for _, r in pareto_rows(res, "oialr", metric).iterrows()]


def _shown(params: dict[str, Any]) -> dict[str, Any]:
    """Searched values for a table: a sampled null prints as ``null`` (blank means not searched)."""
    return {k: "null" if v is None else v for k, v in params.items()}


def _top_trials(res: SweepResults, metric: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The best trials of all arms by `metric` (failed/diverged ones left out), as table rows."""
    frames = [res.usable(arm, metric) for arm in res.arms]
    df = pd.concat(frames) if frames else res.trials.iloc[:0]
    df = df.assign(_key=_numeric(df, metric)).sort_values("_key", ascending=metric_direction(res, metric) == "min")
    columns = ["arm", "trial_id", metric, *(["val_acc"] if metric != "val_acc" else []), SIZE_METRIC,
               "training_iteration", *(p.key for p in res.space.search)]  # fmt: skip
    rows = []
    for _, r in df.head(TOP_TRIALS).iterrows():
        row = r.to_dict()
        rows.append({**{c: row.get(c) for c in columns}, **_shown(res.params_of(row, str(row["arm"])))})
    return rows, columns


def write_report(results_dir: str | Path, *, trust_code: bool = False) -> Path:
    """Write ``report.md`` and its PNGs into `results_dir`; returns the report's path.

    Raises UserError (before writing anything) when the directory holds no experiment, is not
    writable, or holds an unreadable ``study.db``, and when it names user code but this user's key
    did not sign it, unless `trust_code` (see `oialr_tune.trust`).
    """
    res = open_results(results_dir)
    check_folder(res.path, trust_code, "report")
    metric = res.space.objective.metric
    writable_folder(res.path, "results folder")
    importances_found = {arm: param_importances(res, arm, metric) for arm in res.arms}
    best, notes = _best_per_arm(res)
    md = _overview(res, metric)
    md += _best_section(res, metric, best)
    md += _pareto_section(res, metric, best)
    md += _search_progress_section(res, metric)
    md += _ranks_section(res, best)
    md += _importances_section(res, metric, importances_found)
    rows, columns = _top_trials(res, metric)
    md += [f"## Top {TOP_TRIALS} trials by {metric}", "", markdown_table(rows, columns), ""]
    retrain_summary = res.path / RETRAIN_DIR / SUMMARY_FILE
    if retrain_summary.is_file():
        md += _retrain_section(retrain_summary)
    if notes:
        md += ["## Notes", ""] + [f"- {k}: {v}" for k, v in notes.items()] + [""]
    report = res.path / REPORT_FILE
    report.write_text("\n".join(md))
    return report


def _best_per_arm(res: SweepResults) -> tuple[dict[str, BestTrial], dict[str, str]]:
    """Each arm's best trial; for an arm without a finished trial, a note saying why instead."""
    best: dict[str, BestTrial] = {}
    notes: dict[str, str] = {}
    for arm in res.arms:
        try:
            best[arm] = best_trial(res, arm=arm)
        except Exception as e:  # an arm without a finished trial: the report says so, and goes on
            notes[f"best {arm}"] = str(e)
    return best, notes


def _overview(res: SweepResults, metric: str) -> list[str]:
    """Title, description, and the sweep at a glance: objective, budget, trials, model and data."""
    space = res.space
    md = [f"# Sweep report: {res.name}", ""]
    if space.description:
        md += [space.description, ""]
    counts = {arm: int((res.trials["arm"] == arm).sum()) for arm in res.arms}
    usable = {arm: len(res.usable(arm, metric)) for arm in res.arms}
    b = space.budget
    mode = "multi-objective with trainable fraction" if space.objective.is_multi else space.objective.mode
    md += [
        f"- results: `{res.path}`",
        f"- objective: **{metric}** ({mode})",
        f"- budget per arm: {b.num_samples} trials × ≤ {b.max_epochs} epochs; scheduler {space.scheduler()}; "
        f"sampler {space.strategy.sampler}; baseline `{space.baseline}`",
        "- trials: " + ", ".join(f"{arm} {usable[arm]} usable of {counts[arm]}" for arm in res.arms)
        + " (failed and diverged trials are left out of everything below)",
        f"- model `{space.base['model']['name']}` on `{space.base['data']['name']}`",
        "",
    ]  # fmt: skip
    return md


def _best_section(res: SweepResults, metric: str, best: dict[str, BestTrial]) -> list[str]:
    """The best configuration per arm, and tuned OIALR against tuned full rank on validation."""
    md = ["## Best configuration per arm", ""]
    best_rows = [
        {"arm": arm, "trial_id": bt.trial.trial_id, metric: bt.trial.metrics.get(metric),
         SIZE_METRIC: bt.trial.trainable_fraction, "epochs": bt.trial.metrics.get("training_iteration"),
         **_shown(bt.trial.params)}
        for arm, bt in best.items()
    ]  # fmt: skip
    param_cols = [p.key for p in res.space.search]
    md += [markdown_table(best_rows, ["arm", "trial_id", metric, SIZE_METRIC, "epochs", *param_cols]), ""]
    if "oialr" in best and "baseline" in best:
        o, f = best["oialr"].trial, best["baseline"].trial
        a, b = o.metrics[metric], f.metrics[metric]
        md += [
            f"Tuned OIALR vs tuned full rank on validation: {metric} {a:.4g} vs {b:.4g}, OIALR "
            f"{in_words(a, b, metric_direction(res, metric))} with {o.trainable_fraction:.1%} of the trainable "
            "parameters. Validation scores picked these configurations, so they are optimistic; "
            "`oialr-tune retrain` measures both on the test split.",
            "",
        ]
    md += [f"Full trainer config: `oialr-tune best {res.path} --format yaml > best.yaml`.", ""]
    return md


def _pareto_section(res: SweepResults, metric: str, best: dict[str, BestTrial]) -> list[str]:
    """The accuracy vs trainable-parameters plot, and the OIALR Pareto set."""
    md = ["## Accuracy vs trainable parameters", ""]
    caption = plot_pareto(res, metric, best, res.path / PLOTS["pareto"])
    md += [f"![{metric} vs trainable fraction]({PLOTS['pareto']})", "", caption + ".", ""]
    front = _pareto_set(res, metric)
    if front:
        md += ["Pareto set (OIALR): no other trial is both more accurate and smaller. Pick one under a size "
               "budget with `oialr-tune best RESULTS_DIR --max-trainable-fraction F`.", ""]  # fmt: skip
        rows = [{"trial_id": p.trial_id, metric: p.metrics.get(metric), SIZE_METRIC: p.trainable_fraction,
                 "epochs": p.metrics.get("training_iteration"), **_shown(p.params)} for p in front]  # fmt: skip
        param_cols = [p.key for p in res.space.search]
        md += [markdown_table(rows, ["trial_id", metric, SIZE_METRIC, "epochs", *param_cols]), ""]
    return md


def _search_progress_section(res: SweepResults, metric: str) -> list[str]:
    """The best-so-far plot."""
    caption = plot_best_so_far(res, metric, res.path / PLOTS["best_so_far"])
    return ["## Search progress", "", f"![best {metric} so far]({PLOTS['best_so_far']})", "", caption + ".", ""]


def _ranks_section(res: SweepResults, best: dict[str, BestTrial]) -> list[str]:
    """The best OIALR trial's ranks over training, or why they are not plotted (then no stale plot stays)."""
    md = ["## Ranks during training (best OIALR trial)", ""]
    ranks_note = "no finished OIALR trial"
    if "oialr" in best:
        history = res.history("oialr", best["oialr"].trial.trial_id)
        ranks_note = "its per-epoch results (Ray's result.json) were not found"
        if history is not None:
            caption = plot_ranks(history, best["oialr"].trial.trial_id, res.path / PLOTS["ranks"])
            ranks_note = "its per-epoch results hold no `ranks`"
            if caption is not None:
                md += [f"![ranks over training]({PLOTS['ranks']})", "", caption + ".", ""]
                ranks_note = ""
            md += _dense_layers_note(history)
    if ranks_note:
        _remove(res.path / PLOTS["ranks"])
        md += [f"Not plotted: {ranks_note}.", ""]
    return md


def _importances_section(res: SweepResults, metric: str,
                         found: dict[str, tuple[dict[str, float] | None, str]]) -> list[str]:
    """Optuna's hyperparameter importances per arm (table and plot), or why they were not computed."""
    md = ["## Hyperparameter importances (Optuna)", ""]
    importances: dict[str, dict[str, float]] = {}
    for arm in res.arms:
        values, why = found[arm]
        if values:
            importances[arm] = values
            md += [f"**{arm}** ({why}):", "", markdown_table(
                [{"parameter": k, "importance": v} for k, v in values.items()], ["parameter", "importance"]), ""]
        else:
            md += [f"**{arm}**: not computed: {why}.", ""]
    if importances:
        plot_importances(importances, metric, res.path / PLOTS["importance"])
        md += [f"![hyperparameter importances]({PLOTS['importance']})", ""]
    else:
        _remove(res.path / PLOTS["importance"])
    return md


def _dense_layers_note(history: pd.DataFrame) -> list[str]:
    """Which weight layers OIALR left dense and why (grouped convs, thin layers, kept head), if any."""
    if "dense_layers" not in history or history.empty:
        return []
    value = history["dense_layers"].iloc[-1]
    dense = json.loads(value) if isinstance(value, str) else value
    if not isinstance(dense, dict) or not dense:
        return []
    return ["Layers kept dense:", "", *(f"- `{name}`: {why}" for name, why in dense.items()), ""]


def _retrain_section(path: Path) -> list[str]:
    """The test-split results of ``oialr-tune retrain`` (its default output folder), if present."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    m = summary.get("test_metric", "test_acc")
    rows = []
    for arm, s in summary.get("arms", {}).items():
        acc, frac = s.get(m, {}), s.get("trainable_fraction", {})
        rows.append({
            "arm": arm, "trial_id": s.get("trial_id"), "seeds": acc.get("n"),
            f"{m} mean": acc.get("mean"), f"{m} std": acc.get("std"),
            "trainable_fraction": frac.get("mean"),
        })  # fmt: skip
    lines = ["## Final retraining (test split)", "",
             f"From `{path.parent}` (train on {summary.get('train_on')}, seeds {summary.get('seeds')}).", "",
             markdown_table(rows, ["arm", "trial_id", "seeds", f"{m} mean", f"{m} std", "trainable_fraction"]),
             ""]  # fmt: skip
    c = summary.get("comparison")
    if c and c.get("low") is not None:
        lines += [f"OIALR − full rank {m}: {c['difference']:+.4f}, 95 % Welch interval "
                  f"[{c['low']:+.4f}, {c['high']:+.4f}]: {c['verdict']}.", ""]  # fmt: skip
    elif c:
        lines += [f"OIALR − full rank {m}: {c['difference']:+.4f} (too few seeds for an interval).", ""]
    return lines


def _remove(path: Path) -> None:
    """Drop a stale plot from an earlier report that this run could not redraw."""
    path.unlink(missing_ok=True)
