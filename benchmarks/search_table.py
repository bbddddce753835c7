"""Tabulate OIALR on the digits MLP: a grid of configurations trained with `train()`, per-epoch curves.

The table is what ``benchmarks/search_replay.py`` replays to compare searchers offline (the field's
tabular-benchmark approach: train every cell once, then simulate many searches on the table). The
space is ``digits_mlp_largeval`` (a 25 % validation split, 449 images) with 20 epochs; the grid
spans the five knobs OIALR adds or interacts with most: the learning rate, the σ cutoff, the
stability threshold, the delay and the check frequency. The other keys stay at the space's base.

Three phases, one row per run:

1. ``grid``: every cell with seeds 0 and 1 (seed noise is measured from these pairs);
2. ``top``: three more seeds for the best cells (by mean final val_acc, overall and among cells whose
   trainable fraction is within the size budget), so the incumbents' truths are seed means of 5;
3. ``offgrid``: random points of the continuous space with 2 seeds, to measure how much the grid misses.

Rows are written as they finish (gzip members of a few rows each), so a cut-short run is still a
usable table. Each run uses one torch thread; `--procs` processes run at once.

    nice -n 15 python benchmarks/search_table.py --out results/benchmarks/search_table.csv.gz
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import math
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path
from typing import Any

SPACE = "digits_mlp_largeval"
EPOCHS = 20
GRID: dict[str, list[Any]] = {
    "optimizer.lr": [3e-4, 7.5e-4, 1.9e-3, 4.7e-3, 1.2e-2, 3e-2],
    "oialr.sigma_cutoff_fraction": [0.02, 0.1, 0.2, 0.3],
    "oialr.stability_threshold": [0.5, 0.8, 0.9, 0.95],
    "oialr.delay": [0.05, 0.15, 0.3, 0.5],
    "oialr.stability_frequency": [5, 15, 30, 60],
}
KEYS = list(GRID)
COLUMNS = ["phase", "cell", *KEYS, "seed", "val_acc", "fraction", "seconds", "wall_s"]
BUDGET = 0.15  # the size budget the evidence uses on digits


def grid_cells() -> list[dict[str, Any]]:
    """Every grid cell, in a fixed order (its index is the cell id)."""
    return [dict(zip(KEYS, values, strict=True)) for values in itertools.product(*GRID.values())]


def off_grid_points(n: int, seed: int = 12345) -> list[dict[str, Any]]:
    """Random points inside the grid's box (log-uniform LR, uniform elsewhere, integer frequency)."""
    rng = random.Random(seed)
    lo_lr, hi_lr = math.log(GRID["optimizer.lr"][0]), math.log(GRID["optimizer.lr"][-1])
    pts = []
    for _ in range(n):
        pts.append({
            "optimizer.lr": math.exp(rng.uniform(lo_lr, hi_lr)),
            "oialr.sigma_cutoff_fraction": rng.uniform(0.02, 0.3),
            "oialr.stability_threshold": rng.choice(GRID["oialr.stability_threshold"]),
            "oialr.delay": rng.uniform(0.05, 0.5),
            "oialr.stability_frequency": rng.randint(5, 60),
        })  # fmt: skip
    return pts


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(job: tuple[str, int, dict[str, Any], int]) -> dict[str, Any]:
    """Train one configuration with one seed; its row (curves as space-separated numbers)."""
    from oialr_tune.config import train_config_from_dict, with_overrides
    from oialr_tune.space import load_space
    from oialr_tune.trainer import train

    phase, cell, point, seed = job
    base = load_space(SPACE).arm_base("oialr")
    base["schedule"]["epochs"] = EPOCHS
    base["seed"] = seed
    start = time.perf_counter()
    res = train(with_overrides(train_config_from_dict(base), point))
    wall = time.perf_counter() - start
    h = res.history
    return {
        "phase": phase, "cell": cell, **point, "seed": seed,
        "val_acc": " ".join(f"{e['val_acc']:.4f}" for e in h),
        "fraction": " ".join(f"{e['trainable_fraction']:.4f}" for e in h),
        "seconds": " ".join(f"{e['train_time_s']:.3f}" for e in h),
        "wall_s": f"{wall:.3f}",
    }  # fmt: skip


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The table's rows, curves parsed into lists of floats (a cut-short file gives what it holds)."""
    rows = []
    try:
        with gzip.open(path, "rt", newline="") as f:
            for raw in csv.DictReader(f):
                row: dict[str, Any] = dict(raw)
                for k in ("val_acc", "fraction", "seconds"):
                    row[k] = [float(v) for v in raw[k].split()]
                for k in KEYS:
                    row[k] = int(raw[k]) if k == "oialr.stability_frequency" else float(raw[k])
                row["cell"], row["seed"] = int(raw["cell"]), int(raw["seed"])
                rows.append(row)
    except (EOFError, OSError, csv.Error):  # a member cut short by a kill
        pass
    return rows


class _Writer:
    """Appends rows to a gzip file, one gzip member per `every` rows (a valid multi-member gzip)."""

    def __init__(self, path: Path, every: int, header: bool):
        self.path, self.every, self.pending = path, every, []
        if header:
            self.pending.append(COLUMNS)
            self.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append([row[c] for c in COLUMNS])
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        buf = io.StringIO()
        csv.writer(buf).writerows(self.pending)
        with open(self.path, "ab") as f:
            f.write(gzip.compress(buf.getvalue().encode()))
        self.pending = []


def _best_cells(rows: list[dict[str, Any]], n: int) -> list[int]:
    """The n best grid cells by mean final val_acc, and the n best of those within the size budget."""
    by_cell: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["phase"] == "grid":
            by_cell.setdefault(r["cell"], []).append(r)
    mean = {c: sum(r["val_acc"][-1] for r in rs) / len(rs) for c, rs in by_cell.items()}
    frac = {c: sum(r["fraction"][-1] for r in rs) / len(rs) for c, rs in by_cell.items()}
    overall = sorted(mean, key=lambda c: -mean[c])[:n]
    feasible = sorted((c for c in mean if frac[c] <= BUDGET), key=lambda c: -mean[c])[:n]
    return sorted(set(overall) | set(feasible))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/benchmarks/search_table.csv.gz")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--cells", type=int, default=None, help="train only the first N cells (shuffled order)")
    ap.add_argument("--top", type=int, default=20, help="best cells (overall, and within budget) given 3 more seeds")
    ap.add_argument("--offgrid", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["phase"], r["cell"], r["seed"]) for r in read_table(out)} if out.exists() else set()
    writer = _Writer(out, every=16, header=not out.exists())

    cells = grid_cells()
    order = list(range(len(cells)))
    random.Random(0).shuffle(order)  # a cut-short run still covers the whole grid evenly
    order = order[: args.cells] if args.cells else order
    start = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.procs, initializer=_init_worker) as pool:
        def run(jobs: list[tuple[str, int, dict[str, Any], int]]) -> None:
            jobs = [j for j in jobs if (j[0], j[1], j[3]) not in done]
            for i, row in enumerate(pool.imap_unordered(run_one, jobs, chunksize=4)):
                writer.add(row)
                if i % 200 == 0:
                    print(f"{row['phase']}: {i}/{len(jobs)} runs, {time.time() - start:.0f} s", file=sys.stderr)
            writer.flush()

        run([("grid", c, cells[c], s) for c in order for s in (0, 1)])
        best = _best_cells(read_table(out), args.top)
        run([("top", c, cells[c], s) for c in best for s in (2, 3, 4)])
        run([("offgrid", i, p, s) for i, p in enumerate(off_grid_points(args.offgrid)) for s in (0, 1)])
    print(f"done: {len(read_table(out))} rows in {time.time() - start:.0f} s -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
