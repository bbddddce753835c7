"""Parallel retrain: `retrain --seeds N` as Ray tasks against the same N seeds one after another.

Both runs retrain the OIALR arm's best trial of RESULTS_DIR with the same seeds and epochs, one
with ``max_concurrent=1`` (in-process, one seed after another: what retrain did before) and one
with the default (every seed a Ray task with the sweep's per-trial resources). Reported: both
wall times and their ratio, and whether the per-seed metrics are identical. Writes
``results/benchmarks/retrain_parallel.md``.

    oialr-tune sweep                                   # a quickstart sweep, if you have none
    python benchmarks/retrain_parallel.py results/quickstart-... --seeds 4 --epochs 100
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

from oialr_tune.retrain import retrain


def timed(results_dir: Path, out: Path, seeds: int, epochs: int, max_concurrent: int | None) -> tuple[float, list]:
    start = time.perf_counter()
    retrain(results_dir, seeds=seeds, epochs=epochs, out=out, arms=["oialr"], max_concurrent=max_concurrent,
            log=lambda message: None)  # fmt: skip
    wall = time.perf_counter() - start
    with open(out / "metrics.csv", newline="") as f:
        rows = [(r["seed"], r["test_acc"], r["test_loss"], r["trainable_fraction"]) for r in csv.DictReader(f)]
    return wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sequential, seq_rows = timed(args.results_dir, Path(tmp, "seq"), args.seeds, args.epochs, 1)
        parallel, par_rows = timed(args.results_dir, Path(tmp, "par"), args.seeds, args.epochs, None)
    load = os.getloadavg()
    command = "python benchmarks/retrain_parallel.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Parallel retrain vs one seed after another",
        "",
        f"Command: `{command}`. {os.cpu_count()} CPUs; load average at the end {load[0]:.1f} / {load[1]:.1f} "
        f"(1 / 5 min). OIALR arm's best trial, {args.seeds} seeds × {args.epochs} epochs.",
        "",
        "| one after another (s) | parallel (s) | parallel / sequential | identical per-seed metrics |",
        "|---:|---:|---:|---|",
        f"| {sequential:.1f} | {parallel:.1f} | {parallel / sequential:.2f} | {seq_rows == par_rows} |",
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrain_parallel.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
