"""Replay searches on the OIALR table: how fast does each strategy find a good configuration?

A simulated clock with 2 workers runs the tool's own searcher (`oialr_tune.tuning.search.searcher`,
Ray's OptunaSearch with our PRUNED/constraint handling) and scheduler (`scheduler`, Ray's ASHA)
the way Ray's TuneController drives them: `suggest`, one result per epoch to the scheduler and,
unless it says STOP, to the searcher, then `on_trial_complete` with the last result. A trial's
epochs take the seconds the table measured, as a + b × the epoch's trainable fraction fitted over
the whole table (the table was timed on a shared machine under varying load), plus a per-trial
overhead (the marginal per-trial cost of `oialr-tune sweep`, sweep_efficiency_n256_rerun.md).

The table (``benchmarks/search_table.py``) has 2+ seeds per cell. A proposed configuration is
snapped to the nearest cell (log scale for the LR and the frequency); each repeat sees one seed of
each cell (drawn per repeat, the same for every strategy: paired repeats, the sampler seed is the
repeat number too). A cell's truth is its seed mean. The incumbent is what ``oialr-tune best``
would pick from the trials ended so far (best last val_acc, within the size budget), scored by its
truth; regret = best truth in the table − incumbent truth.

    nice -n 15 python benchmarks/search_replay.py --table results/benchmarks/search_table.csv.gz \\
        --out results/benchmarks/search_quality_runs.csv.gz --repeats 50
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import math
import multiprocessing as mp
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_table import BUDGET, EPOCHS, GRID, KEYS, SPACE, read_table

OVERHEAD_S = 0.23  # marginal per-trial overhead of a sweep, sweep_efficiency_n256_rerun.md
WORKERS = 2
FULL_TRIALS = 64  # the budget: the simulated time of this many full trials on the workers
STRATEGIES = {  # name -> (sampler, scheduler: fifo / asha / hyperband)
    "random": ("random", "fifo"),
    "random+ASHA": ("random", "asha"),
    "TPE": ("tpe", "fifo"),
    "TPE+ASHA": ("tpe", "asha"),  # the tool's default
    "TPE-mv-CL+ASHA": ("tpe-mv-cl", "asha"),  # Optuna 5.1's TPE default (single objective), made explicit
    "TPE-indep+ASHA": ("tpe-indep", "asha"),  # the pre-5.0 default: independent TPE, no constant liar
    "TPE+Hyperband": ("tpe", "hyperband"),
    "GP": ("gp", "fifo"),
    "CMA-ES": ("cmaes", "fifo"),
}
OBJECTIVES = {"budget": BUDGET, "plain": None}
LOG_KEYS = ("optimizer.lr", "oialr.stability_frequency")


class Table:
    """The table's grid cells: their points, per-seed curves, and truths (seed means)."""

    def __init__(self, rows: list[dict[str, Any]]):
        cells: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r["phase"] in ("grid", "top") and len(r["val_acc"]) == EPOCHS:
                cells.setdefault(r["cell"], []).append(r)
        self.ids = sorted(cells)
        self.runs = [cells[c] for c in self.ids]
        self.points = np.array([[self._coord(k, cells[c][0][k]) for k in KEYS] for c in self.ids])
        self.truth = np.array([np.mean([r["val_acc"][-1] for r in rs]) for rs in self.runs])
        self.size = np.array([np.mean([r["fraction"][-1] for r in rs]) for rs in self.runs])
        # An epoch's seconds as a + b × trainable fraction, fitted over every epoch of the table:
        # the table was timed on a shared machine whose load varied, so a run's own seconds carry
        # the load at that moment; the fit keeps what the configuration decides (a smaller model
        # trains faster) and averages the load out.
        frac = np.concatenate([r["fraction"] for rs in self.runs for r in rs])
        secs = np.concatenate([r["seconds"] for rs in self.runs for r in rs])
        self.cost = np.linalg.lstsq(np.stack([np.ones_like(frac), frac], 1), secs, rcond=None)[0]

    def epoch_seconds(self, run: dict[str, Any], epoch: int) -> float:
        """Simulated seconds of a run's epoch (1-based), from the cost fit."""
        return float(self.cost[0] + self.cost[1] * run["fraction"][epoch - 1])

    @staticmethod
    def _coord(key: str, value: float) -> float:
        """A key's value on a [0, 1] scale over the grid's range (log for the LR and the frequency)."""
        lo, hi = GRID[key][0], GRID[key][-1]
        if key in LOG_KEYS:
            return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (value - lo) / (hi - lo)

    def nearest(self, config: dict[str, Any]) -> int:
        """Index of the cell nearest to a proposed configuration."""
        x = np.array([self._coord(k, float(config[k])) for k in KEYS])
        return int(np.argmin(((self.points - x) ** 2).sum(axis=1)))

    def best_truth(self, budget: float | None) -> float:
        ok = self.size <= budget if budget is not None else np.ones(len(self.ids), bool)
        return float(self.truth[ok].max())


def _space(budget: float | None, seed: int) -> Any:
    """The tool's search space for the replay: digits_mlp_largeval's, searching the table's five keys."""
    from oialr_tune.space import Param, load_space

    space = load_space(SPACE)
    params = (
        Param("optimizer.lr", "loguniform", low=GRID["optimizer.lr"][0], high=GRID["optimizer.lr"][-1]),
        Param("oialr.sigma_cutoff_fraction", "uniform", low=0.02, high=0.3),
        Param("oialr.stability_threshold", "categorical", choices=tuple(GRID["oialr.stability_threshold"])),
        Param("oialr.delay", "uniform", low=0.05, high=0.5),
        Param("oialr.stability_frequency", "int", low=5, high=60),
    )
    budget_cfg = dataclasses.replace(space.budget, num_samples=FULL_TRIALS, max_epochs=EPOCHS)
    objective = dataclasses.replace(space.objective, max_trainable_fraction=budget)
    return dataclasses.replace(space, search=params, budget=budget_cfg, objective=objective, seed=seed)


def _sampler(kind: str, space: Any) -> Any:
    import optuna

    from oialr_tune.tuning.search import default_sampler, startup_trials

    n0 = startup_trials(space)
    if kind == "tpe-mv-cl":
        return optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=n0, multivariate=True, constant_liar=True)
    if kind == "tpe-indep":
        return optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=n0, multivariate=False, constant_liar=False)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=space.seed, n_startup_trials=n0)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=space.seed, n_startup_trials=n0, warn_independent_sampling=False)
    strategy = dataclasses.replace(space.strategy, sampler="random" if kind == "random" else "tpe")
    return default_sampler(dataclasses.replace(space, strategy=strategy))


class _Trial:
    """What Ray's ASHA needs of a trial: its id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def replay(table: Table, strategy: str, objective: str, repeat: int, horizon: float) -> list[tuple[float, int, int]]:
    """One simulated search; returns (time, epochs trained so far, incumbent cell) at each trial end."""
    import optuna
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from oialr_tune.metrics import SIZE_METRIC
    from oialr_tune.tuning.search import scheduler, searcher

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    budget = OBJECTIVES[objective]
    space = _space(budget, seed=repeat)
    kind, sched_kind = STRATEGIES[strategy]
    search = searcher(space, "oialr", [], sampler=_sampler(kind, space))
    brackets = 3 if sched_kind == "hyperband" else 1  # asynchronous Hyperband: ASHA over 3 brackets
    sched = FIFOScheduler() if sched_kind == "fifo" else scheduler(space, brackets=brackets)
    seed_rng = random.Random(10_000 + repeat)
    seen: dict[int, dict[str, Any]] = {}  # cell -> the seed's run this repeat sees

    def run_of(cell: int) -> dict[str, Any]:
        if cell not in seen:
            seen[cell] = seed_rng.choice(table.runs[cell])
        return seen[cell]

    events: list[tuple[float, int, str, int, int]] = []  # (time, order, trial id, cell, epoch)
    order, epochs_done, n = 0, 0, 0
    incumbent: tuple[float, float, int] | None = None  # (-score, size, cell) of best's pick
    out: list[tuple[float, int, int]] = []

    def start(now: float) -> None:
        nonlocal order, n
        tid = f"t{n:05d}"
        n += 1
        config = _flat(search.suggest(tid))
        cell = table.nearest(config)
        sched.on_trial_add(None, _Trial(tid))
        order += 1
        events.append((now + OVERHEAD_S + table.epoch_seconds(run_of(cell), 1), order, tid, cell, 1))

    for _ in range(WORKERS):
        start(0.0)
    while events:
        events.sort()
        now, _, tid, cell, epoch = events.pop(0)
        if now > horizon:
            break
        run = run_of(cell)
        epochs_done += 1
        last = epoch == EPOCHS
        result = {"val_acc": run["val_acc"][epoch - 1], SIZE_METRIC: run["fraction"][epoch - 1],
                  "training_iteration": epoch, "run_status": "finished" if last else "running", "trial_id": tid}
        decision = sched.on_trial_result(None, _Trial(tid), result)
        if decision != TrialScheduler.STOP:
            search.on_trial_result(tid, result)
        if decision == TrialScheduler.STOP or last:
            sched.on_trial_complete(None, _Trial(tid), result)
            search.on_trial_complete(tid, result)
            size = result[SIZE_METRIC]
            if budget is None or size <= budget:
                key = (-result["val_acc"], size, cell)
                incumbent = key if incumbent is None or key[:2] < incumbent[:2] else incumbent
            out.append((now, epochs_done, incumbent[2] if incumbent else -1))
            start(now)
        else:
            order += 1
            events.append((now + table.epoch_seconds(run, epoch + 1), order, tid, cell, epoch + 1))
    return out


def _job(args: tuple[str, str, str, int, float]) -> list[list[Any]]:
    table_path, strategy, objective, repeat, horizon = args
    warnings.filterwarnings("ignore", category=UserWarning)  # CMA-ES and GP say they ignore constraints
    table = _TABLES.setdefault(table_path, Table(read_table(table_path)))
    start = time.perf_counter()
    try:
        trace = replay(table, strategy, objective, repeat, horizon)
    except Exception as e:  # one sampler's failure must not lose the other replays; the log says so
        print(f"replay {strategy}/{objective}/{repeat} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    cpu = time.perf_counter() - start
    return [[strategy, objective, repeat, f"{t:.3f}", e, table.ids[c] if c >= 0 else -1, f"{cpu:.2f}"]
            for t, e, c in trace]


_TABLES: dict[str, Table] = {}
RUN_COLUMNS = ["strategy", "objective", "repeat", "time", "epochs", "incumbent_cell", "replay_cpu_s"]


def horizon_of(table: Table) -> float:
    """The simulated budget: FULL_TRIALS full-length trials (mean table seconds + overhead) over the workers."""
    full = np.mean([sum(table.epoch_seconds(r, e) for e in range(1, EPOCHS + 1)) + OVERHEAD_S
                    for rs in table.runs for r in rs])
    return float(FULL_TRIALS * full / WORKERS)


RNG = np.random.default_rng(0)
BOOT = 1000


def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50 % (robust, and tighter than the median)."""
    x = np.sort(x, axis=axis)
    n = x.shape[axis]
    lo, hi = n // 4, n - n // 4
    return np.take(x, range(lo, hi), axis=axis).mean(axis=axis)


def _boot_ci(values: np.ndarray, stat: Any) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of a statistic over the repeats; `stat(samples, axis)`
    takes the resampled repeats along `axis`."""
    idx = RNG.integers(0, len(values), size=(BOOT, len(values)))
    stats = stat(values[idx], 1)
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def _read_runs(path: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    try:
        with gzip.open(path, "rt", newline="") as f:
            rows.extend(csv.DictReader(f))
    except EOFError:  # a cut-short replay: its last job may be partly written, so it is dropped
        last = [rows[-1][k] for k in ("strategy", "objective", "repeat")] if rows else None
        rows = [r for r in rows if [r["strategy"], r["objective"], r["repeat"]] != last]
    return rows


def _traces(runs_paths: list[str]) -> dict[tuple[str, str, int], np.ndarray]:
    """(strategy, objective, repeat) -> rows of (time, epochs, incumbent cell) at each trial end."""
    out: dict[tuple[str, str, int], list[tuple[float, float, int]]] = {}
    for r in (row for path in runs_paths for row in _read_runs(path)):
        key = (r["strategy"], r["objective"], int(r["repeat"]))
        out.setdefault(key, []).append((float(r["time"]), float(r["epochs"]), int(r["incumbent_cell"])))
    return {k: np.array(sorted(v)) for k, v in out.items()}


def _truth_of(table: Table, budget: float | None) -> dict[int, float]:
    """Cell id -> truth; -1 (no feasible trial yet) scores as the worst feasible cell."""
    ok = table.size <= budget if budget is not None else np.ones(len(table.ids), bool)
    truth = {c: float(t) for c, t in zip(table.ids, table.truth, strict=True)}
    truth[-1] = float(table.truth[ok].min())
    return truth


def _curve(trace: np.ndarray, truth: dict[int, float], grid: np.ndarray, col: int) -> np.ndarray:
    """The incumbent's truth at each grid point (time: col 0, epochs: col 1)."""
    values = np.array([truth[int(c)] for c in trace[:, 2]])
    pos = np.searchsorted(trace[:, col], grid, side="right") - 1
    return np.where(pos >= 0, values[np.maximum(pos, 0)], truth[-1])


def _time_to(trace: np.ndarray, truth: dict[int, float], target: float) -> float:
    hit = [t for t, _, c in trace if truth[int(c)] >= target - 1e-12]
    return hit[0] if hit else math.inf


def analyse(table: Table, runs_paths: list[str], horizon: float) -> dict[str, Any]:
    """Regret curves (IQM and 95 % CI), speedups over random and the pairwise table, per objective."""
    traces = _traces(runs_paths)
    strategies = [s for s in STRATEGIES if any(k[0] == s for k in traces)]
    tgrid = np.linspace(0, horizon, 41)[1:]
    egrid = np.linspace(0, FULL_TRIALS * EPOCHS, 41)[1:]
    res: dict[str, Any] = {"strategies": strategies, "tgrid": tgrid, "egrid": egrid, "objectives": {}}
    for obj, budget in OBJECTIVES.items():
        truth, best = _truth_of(table, budget), table.best_truth(budget)
        reps = {s: sorted(k[2] for k in traces if k[0] == s and k[1] == obj) for s in strategies}
        final = {s: np.array([_curve(traces[(s, obj, r)], truth, tgrid[-1:], 0)[0] for r in reps[s]])
                 for s in strategies}
        target = float(np.median(final["random"])) if "random" in final else math.nan
        o: dict[str, Any] = {"best": best, "target": target, "reps": reps, "curves": {}, "speed": {}, "pairs": {}}
        for s in strategies:
            rt = np.array([best - _curve(traces[(s, obj, r)], truth, tgrid, 0) for r in reps[s]])
            re = np.array([best - _curve(traces[(s, obj, r)], truth, egrid, 1) for r in reps[s]])
            o["curves"][s] = {
                "time": (iqm(rt, 0), *np.array([_boot_ci(rt[:, j], iqm) for j in range(len(tgrid))]).T),
                "epochs": (iqm(re, 0), *np.array([_boot_ci(re[:, j], iqm) for j in range(len(egrid))]).T),
                "final": rt[:, -1],
            }
            times = np.array([_time_to(traces[(s, obj, r)], truth, target) for r in reps[s]])
            med = float(np.median(times))
            ci = _boot_ci(times, lambda t, axis: horizon / np.median(t, axis=axis))
            reached = float(np.isfinite(times).mean())
            o["speed"][s] = {"median_t": med, "speedup": horizon / med, "ci": ci, "reached": reached}
            # Against random's own time to the same quality, on the paired repeats both have.
            common = [r for r in reps[s] if r in reps.get("random", [])]
            pair = np.array([[_time_to(traces[("random", obj, r)], truth, target),
                              _time_to(traces[(s, obj, r)], truth, target)] for r in common])
            if len(pair):
                ratio = lambda t, axis: np.median(t[..., 0], axis=axis) / np.median(t[..., 1], axis=axis)  # noqa: E731
                o["speed"][s]["vs_random"] = float(ratio(pair[None], 1)[0])
                o["speed"][s]["vs_random_ci"] = _boot_ci(pair, ratio)
        for a in strategies:
            for b in strategies:
                common = sorted(set(reps[a]) & set(reps[b]))
                fa = np.array([o["curves"][a]["final"][reps[a].index(r)] for r in common])
                fb = np.array([o["curves"][b]["final"][reps[b].index(r)] for r in common])
                o["pairs"][(a, b)] = float(np.mean((fa < fb) + 0.5 * (fa == fb))) if common else math.nan
        res["objectives"][obj] = o
    return res


def checks(table: Table, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The pre-registered checks on the table: seed noise vs the best cells' margin, off-grid error, feasible share."""
    pairs = [(r0, r1) for rs in table.runs for r0 in rs for r1 in rs if r0["seed"] == 0 and r1["seed"] == 1]
    diffs = np.array([a["val_acc"][-1] - b["val_acc"][-1] for a, b in pairs])
    noise = float(diffs.std(ddof=1) / math.sqrt(2)) if len(diffs) > 1 else math.nan
    out: dict[str, Any] = {"cells": len(table.ids), "noise_sd": noise, "pairs": len(pairs)}
    for obj, budget in OBJECTIVES.items():
        ok = table.size <= budget if budget is not None else np.ones(len(table.ids), bool)
        t = np.sort(table.truth[ok])[::-1]
        top = int(np.argmax(table.truth * np.where(ok, 1, np.nan) if ok.any() else table.truth))
        n_top = len(table.runs[top])
        out[obj] = {"feasible": float(ok.mean()), "best": float(t[0]), "median": float(np.median(t)),
                    "second": float(t[1]) if len(t) > 1 else math.nan, "best_seeds": n_top,
                    "margin_sd": float((t[0] - np.median(t)) / noise) if noise else math.nan}
    off: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["phase"] == "offgrid":
            off.setdefault(r["cell"], []).append(r)
    errs = []
    for rs in off.values():
        c = table.nearest({k: rs[0][k] for k in KEYS})
        errs.append(np.mean([r["val_acc"][-1] for r in rs]) - table.truth[c])
    out["offgrid_n"] = len(errs)
    out["offgrid_mae"] = float(np.mean(np.abs(errs))) if errs else math.nan
    out["offgrid_best_gain"] = (float(max(np.mean([r["val_acc"][-1] for r in rs]) for rs in off.values())
                                - table.truth.max()) if off else math.nan)
    return out


def _fmt_ci(x: float, ci: tuple[float, float], digits: int = 1) -> str:
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    for row, obj in enumerate(OBJECTIVES):
        for col, (axis, grid) in enumerate((("time", res["tgrid"]), ("epochs", res["egrid"]))):
            ax = axes[row, col]
            for s in res["strategies"]:
                mid, lo, hi = res["objectives"][obj]["curves"][s][axis]
                ax.plot(grid, mid, label=s, lw=2.5 if s == "TPE+ASHA" else 1.2)
                ax.fill_between(grid, lo, hi, alpha=0.12)
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_xlabel("simulated seconds (2 workers)" if axis == "time" else "epochs trained")
            ax.set_ylabel(f"regret, val_acc ({obj})")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Search quality on the digits OIALR table: regret IQM with 95 % bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_md(res: dict[str, Any], chk: dict[str, Any], path: Path, horizon: float, header: str) -> None:
    """The report: checks, regret and speedup tables, the pairwise table."""
    L = [header, ""]
    n = chk["noise_sd"]
    L += ["## Checks on the table (before trusting the replay)", "",
          f"- Cells: {chk['cells']} with all {EPOCHS} epochs; seed pairs (seed 0 vs 1) for the noise: {chk['pairs']}.",
          f"- Seed noise: one run's final val_acc has SD {n:.4f} (from the seed-pair differences / √2; "
          f"a validation image is {1 / 450:.4f})."]
    for obj in OBJECTIVES:
        c = chk[obj]
        L.append(f"- {obj}: feasible cells {c['feasible']:.1%}; best cell {c['best']:.4f} "
                 f"(seed mean of {c['best_seeds']}), "
                 f"second {c['second']:.4f}, median {c['median']:.4f}: the best stands {c['margin_sd']:.1f} noise SDs "
                 f"above the median cell.")
    L.append(f"- Off-grid error: {chk['offgrid_n']} off-grid points, mean |their seed mean − nearest cell's truth| "
             f"{chk['offgrid_mae']:.4f}; best off-grid point − best cell {chk['offgrid_best_gain']:+.4f}.")
    L.append("")
    for obj, o in res["objectives"].items():
        strat = res["strategies"]
        what = f"val_acc, trainable fraction ≤ {BUDGET}" if obj == "budget" else "val_acc"
        L += [f"## Objective: {obj} ({what})", "",
              f"Best cell {o['best']:.4f}; random search's median final quality {o['target']:.4f} "
              f"(regret {o['best'] - o['target']:.4f}). Repeats per strategy: "
              + ", ".join(f"{s} {len(o['reps'][s])}" for s in strat) + ".", "",
              "Regret (best cell − incumbent's truth), IQM over repeats [95 % bootstrap interval], "
              "at fractions of the budget:", "",
              "| strategy | ⅛ | ¼ | ½ | full budget |", "| --- | --- | --- | --- | --- |"]
        for s in strat:
            mid, lo, hi = o["curves"][s]["time"]
            cells = [f"{mid[j] * 100:.2f} [{lo[j] * 100:.2f}, {hi[j] * 100:.2f}]" for j in (4, 9, 19, 39)]
            L.append(f"| {s} | " + " | ".join(cells) + " |")
        L += ["", "(regret in val_acc percentage points)", "",
              "Time to reach random search's median final quality; speedup = budget ÷ median time "
              "(∞ time if never reached), 95 % bootstrap interval over repeats:", "",
              "| strategy | median time (s) | share of repeats that reach it | budget ÷ median time | "
              "random's median time ÷ this one's (paired) |",
              "| --- | --- | --- | --- | --- |"]
        for s in strat:
            sp = o["speed"][s]
            vs = _fmt_ci(sp["vs_random"], sp["vs_random_ci"], 2) if "vs_random" in sp else ""
            row = f"| {s} | {sp['median_t']:.1f} | {sp['reached']:.0%} | {_fmt_ci(sp['speedup'], sp['ci'])}"
            L.append(f"{row} | {vs} |")
        L += ["", "Pairwise: share of paired repeats in which the row ends with lower regret than the column "
              "(ties ½):", "",
              "| | " + " | ".join(strat) + " |", "| --- |" + " --- |" * len(strat)]
        for a in strat:
            L.append(f"| {a} | " + " | ".join("" if a == b else f"{o['pairs'][(a, b)]:.2f}" for b in strat) + " |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


def sweep_check(table: Table, runs_paths: list[str], sweeps: list[str]) -> list[str]:
    """Real sweeps against the replay: the truth of the cell nearest to each sweep's best trial (as
    ``oialr-tune best`` picks it, within the size budget) next to the replay's band (2.5-97.5 % over
    repeats) of the incumbent's truth after as many ended trials, for the sweep's strategy."""
    from oialr_tune.results import best_trial

    traces = _traces(runs_paths)
    truth = _truth_of(table, BUDGET)
    lines = []
    for spec in sweeps:
        strategy, path = spec.split("=", 1)
        best = best_trial(path)
        n = best.finished_trials
        cell = table.nearest(best.trial.params)
        band = [truth[int(tr[min(n, len(tr)) - 1, 2])] for (s, o, _), tr in traces.items()
                if s == strategy and o == "budget"]
        lo, mid, hi = np.percentile(band, [2.5, 50, 97.5])
        verdict = "inside" if lo <= table.truth[cell] <= hi else "OUTSIDE"
        lines.append(f"- {strategy} sweep `{path}` ({n} trials): best trial val_acc "
                     f"{best.trial.metrics.get('val_acc'):.4f} at {best.trial.trainable_fraction:.3f} trainable; "
                     f"nearest cell's truth {table.truth[cell]:.4f}; replay after {n} trials: median {mid:.4f}, "
                     f"band [{lo:.4f}, {hi:.4f}]: {verdict}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", default="results/benchmarks/search_table.csv.gz")
    ap.add_argument("--out", default="results/benchmarks/search_quality_runs.csv.gz",
                    help="the replays' traces; several files, comma-separated, are read together with --report-only")
    ap.add_argument("--md", default="results/benchmarks/search_quality.md")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--repeats-slow", type=int, default=None, help="repeats for GP, the slow one (default: --repeats)")
    ap.add_argument("--first-repeat", type=int, default=0, help="start at this repeat (more repeats, another file)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="write the report from an existing --out")
    ap.add_argument("--check-sweep", action="append", default=[], metavar="STRATEGY=DIR",
                    help="with --report-only: print where a real sweep's best lands against the replay's band")
    ap.add_argument("--header", default="# Search quality on the digits OIALR table", help="the report's opening text")
    args = ap.parse_args(argv)
    rows = read_table(args.table)
    table = Table(rows)
    horizon = horizon_of(table)
    print(f"{len(table.ids)} cells, horizon {horizon:.1f} simulated s", file=sys.stderr)
    if not args.report_only:
        slow = args.repeats_slow if args.repeats_slow is not None else args.repeats
        jobs = [(args.table, s, o, r, horizon) for r in range(args.first_repeat, max(args.repeats, slow))
                for s in args.strategies.split(",") for o in OBJECTIVES
                if r < (slow if STRATEGIES[s][0] == "gp" else args.repeats)]
        jobs.sort(key=lambda j: STRATEGIES[j[1]][0] == "gp")  # the slow GP last: the rest is written first
        start = time.time()
        with gzip.open(args.out, "wt", newline="") as f, mp.get_context("spawn").Pool(args.procs) as pool:
            w = csv.writer(f)
            w.writerow(RUN_COLUMNS)
            for i, out in enumerate(pool.imap_unordered(_job, jobs)):
                w.writerows(out)
                f.flush()  # a cut-short replay leaves a readable file
                if i % 20 == 0:
                    print(f"{i}/{len(jobs)} replays, {time.time() - start:.0f} s", file=sys.stderr)
        print(f"done: {len(jobs)} replays in {time.time() - start:.0f} s -> {args.out}", file=sys.stderr)
    if args.check_sweep:
        print("\n".join(sweep_check(table, args.out.split(","), args.check_sweep)))
        return
    res = analyse(table, args.out.split(","), horizon)
    md = Path(args.md)
    header = (f"{args.header}\n\nTable: {len(table.ids)} cells; budget {horizon:.1f} simulated s = {FULL_TRIALS} full "
              f"trials on {WORKERS} workers; per-trial overhead {OVERHEAD_S} s; an epoch's simulated seconds "
              f"{table.cost[0]:.4f} + {table.cost[1]:.4f} × trainable fraction "
              "(least squares over the table's epochs).")
    write_md(res, checks(table, rows), md, horizon, header)
    plot(res, md.with_suffix(".png"))
    print(f"wrote {md} and {md.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
