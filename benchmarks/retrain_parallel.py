"""Parallel retrain: `retrain --seeds N` (Ray tasks) against N single-seed retrains and against one after another.

Three ways to retrain the OIALR arm's best trial of RESULTS_DIR with seeds S..S+N-1, each a real
`oialr-tune retrain` command timed from start to exit (interpreter, imports and Ray included):

* N single-seed commands, ``--seeds 1 --first-seed s`` one after another (the issue's baseline);
* one command, ``--seeds N --max-concurrent 1``: in one process, one seed after another;
* one command, ``--seeds N``: every seed a Ray task with the sweep's per-trial resources.

Reported: the three wall times, the ratios of the parallel command to the other two, and whether
the per-seed metrics of the three are identical. Writes ``results/benchmarks/retrain_parallel.md``.

    oialr-tune sweep                                   # a quickstart sweep, if you have none
    python benchmarks/retrain_parallel.py results/quickstart-... --seeds 4 --epochs 100
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_SEED = 1000
KEYS = ("seed", "test_acc", "test_loss", "trainable_fraction")


def command(results_dir: Path, out: Path, epochs: int, *extra: str) -> float:
    """Wall seconds of one `oialr-tune retrain` process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oialr_tune.cli", "retrain", str(results_dir), "--arm", "oialr",
                    "--epochs", str(epochs), "--out", str(out), *extra],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def metrics(*outs: Path) -> list[tuple[str, ...]]:
    rows = []
    for out in outs:
        with open(out / "metrics.csv", newline="") as f:
            rows += [tuple(r[k] for k in KEYS) for r in csv.DictReader(f)]
    return sorted(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args()
    n, tmp = args.seeds, Path(tempfile.mkdtemp())
    singles = [tmp / f"single{i}" for i in range(n)]
    single = sum(command(args.results_dir, out, args.epochs, "--seeds", "1", "--first-seed", str(FIRST_SEED + i))
                 for i, out in enumerate(singles))  # fmt: skip
    sequential = command(args.results_dir, tmp / "seq", args.epochs, "--seeds", str(n), "--max-concurrent", "1")
    parallel = command(args.results_dir, tmp / "par", args.epochs, "--seeds", str(n))
    same = metrics(*singles) == metrics(tmp / "seq") == metrics(tmp / "par")
    load = os.getloadavg()
    cmd = "python benchmarks/retrain_parallel.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Parallel retrain vs single-seed runs and vs one seed after another",
        "",
        f"Command: `{cmd}`. {os.cpu_count()} CPUs; load average at the end {load[0]:.1f} / {load[1]:.1f} "
        f"(1 / 5 min). OIALR arm's best trial, {n} seeds × {args.epochs} epochs; each figure is one "
        f"`oialr-tune retrain` process (or, for the first, the sum of {n} of them) from start to exit.",
        "",
        f"| {n} × `--seeds 1` (s) | `--seeds {n} --max-concurrent 1` (s) | `--seeds {n}` parallel (s) "
        "| parallel / single-seed runs | parallel / one after another | identical per-seed metrics |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {single:.1f} | {sequential:.1f} | {parallel:.1f} | {parallel / single:.2f} | "
        f"{parallel / sequential:.2f} | {same} |",
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrain_parallel.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
