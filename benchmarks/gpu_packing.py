"""Several trials per GPU: sweep throughput with 1, 2, 4 and 8 trials packed on one GPU.

The same 8-trial sweep (mnist5k small ViT, fixed epochs, FIFO so every trial runs fully, no
baseline arm) runs four times with ``resources.gpu`` = 1, 1/2, 1/4, 1/8, i.e. at most 1, 2, 4 or 8
trials on the GPU at once. Reported: sweep wall time, aggregate training examples/s (all trials'
epochs × training examples ÷ wall) and mean wall per trial, as ratios to one trial per GPU.

    python benchmarks/gpu_packing.py --out results/benchmarks     # needs a CUDA GPU and ray/optuna
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import torch

from oialr_tune.data import load_data
from oialr_tune.space import space_from_dict
from oialr_tune.tune import sweep

TRIALS, EPOCHS = 8, 5


def space(per_gpu: int) -> dict:
    return {
        "name": f"pack{per_gpu}",
        "base": {
            "device": "cuda",
            "model": {"name": "vit_small",
                      "args": {"patch_size": 7, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0}},
            "data": {"name": "mnist5k"},
            "schedule": {"batch_size": 64},
            "oialr": {"delay": 0.25, "stability_frequency": 50},
        },
        "search": {"optimizer.lr": {"type": "loguniform", "low": 5.0e-4, "high": 5.0e-3}},
        "objective": {"metric": "val_acc", "mode": "max"},
        "budget": {"num_samples": TRIALS, "max_epochs": EPOCHS},
        "strategy": {"scheduler": "fifo"},
        "resources": {"cpu": 1, "gpu": 1.0 / per_gpu},
        "baseline": "none",
        "seed": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    ray.init(num_cpus=16, num_gpus=1, include_dashboard=False)
    n_train = len(load_data(space_from_dict(space(1)).trial_config("oialr", {}).data, "cpu").train)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for per_gpu in (1, 2, 4, 8):
            start = time.perf_counter()
            result = sweep(space_from_dict(space(per_gpu)), name=f"pack{per_gpu}", results_dir=tmp, verbose=0)
            wall = time.perf_counter() - start
            trials: pd.DataFrame = result.trials
            epochs = float(trials["training_iteration"].sum())
            rows.append({
                "trials_per_gpu": per_gpu, "wall_s": wall, "examples_per_s": epochs * n_train / wall,
                "trial_wall_s": float(trials["time_total_s"].mean()), "best_val_acc": float(trials["val_acc"].max()),
            })  # fmt: skip
            print(rows[-1], flush=True)
    ray.shutdown()
    base = rows[0]
    device = torch.cuda.get_device_name(0)
    lines = [
        f"# Trials packed on one GPU ({device})",
        "",
        f"{TRIALS} trials × {EPOCHS} epochs of the mnist5k small ViT ({n_train} training images), FIFO, no "
        "baseline, `resources.gpu` = 1/n. Command: `python benchmarks/gpu_packing.py`.",
        "",
        "| trials per GPU | sweep wall (s) | training examples/s | × vs 1 per GPU | mean wall per trial (s) "
        "| best val acc |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['trials_per_gpu']} | {r['wall_s']:.1f} | {r['examples_per_s']:,.0f} | "
                     f"{r['examples_per_s'] / base['examples_per_s']:.2f} | {r['trial_wall_s']:.1f} | "
                     f"{r['best_val_acc']:.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
