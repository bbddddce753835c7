"""How much of a sweep's machine time goes into training? oialr-tune vs hand-written Ray Tune.

Columns (each runs as its own process, one after the other, never in parallel):

* ``ours``: the real command, ``oialr-tune sweep SPACE --baseline none`` (OIALR arm only; ``--arms
  both`` keeps the full-rank baseline arm too);
* ``ray defaults``: a hand-written Ray Tune script over the same trainer
  (``oialr_tune.trainer.train``) and the same search space, as the Ray docs write it: a function
  trainable, ``tune.report`` every epoch with a checkpoint every epoch, ``OptunaSearch`` + ASHA
  (same grace period, reduction factor and max epochs as the space), everything else Ray's default;
* ``ray reuse_actors``: the same script with ``TuneConfig(reuse_actors=True)``;
* ``--variant LABEL=DIR`` (optional, repeatable): ``ours`` again with ``PYTHONPATH=DIR``, i.e. with a
  patched copy of the package in DIR (used to measure proposed patches before they land).

Figures per column, from Ray's own per-trial records (``result.json``: every report carries the
trainer's ``train_time_s``, the time in training steps + validation of that epoch, and the
wall clock ``reported_at``) and the parent's clock around the process:

* *utilization* = Σ train_time_s ÷ (wall × CPU slots); slots = CPUs ÷ CPUs per trial. Given for the
  whole command (``end-to-end``: interpreter start, imports, Ray start, results, Ray stop) and for
  the *trial window* (first trial's start to the last report: what Tune itself controls);
* *per-trial overhead* = (wall × slots − Σ train_time_s) ÷ trials: the slot-seconds each trial costs
  beyond its own training, end-to-end and in the window;
* *trials per minute* (end-to-end).

A second table splits the slot-seconds: training; in-trial non-training time (a trial's span from its
trainable's start to its last report, minus its training: imports and data loading on a fresh
process, model build, reporting, checkpoint writes and copies); idle slots inside the window (worker
process start-up, scheduling, searcher); and the time outside the window.

Usage::

    python benchmarks/sweep_efficiency.py [--space quickstart] [--num-samples N] [--arms oialr|both]
        [--repeats 1] [--variant patched=/tmp/patched] [--only ours,...] [--out results/benchmarks]

``--num-samples N`` runs the space with N trials per arm (written as ``sweep_efficiency_nN.md``): the
fixed cost per sweep (Ray start, worker processes, imports) is paid once, so a long sweep shows what
each further trial costs.

The machine's load average is recorded before and after each run: on a shared machine it moves
the numbers (both training and overhead stretch when other processes take the cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


# --- the hand-written Ray Tune script (runs in a child process: `--column ray`) ---------------------


def hand_written(space_name: str, storage: str, reuse_actors: bool) -> None:
    """What a Ray Tune user writes around the trainer, with Ray's defaults. Prints one JSON line."""
    import logging
    import shutil

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from oialr_tune.space import load_space

    space = load_space(space_name)
    base = space.arm_base("oialr")
    domains = {
        "uniform": lambda p: tune.uniform(p.low, p.high),
        "loguniform": lambda p: tune.loguniform(p.low, p.high),
        "int": lambda p: tune.randint(int(p.low), int(p.high) + 1),
        "categorical": lambda p: tune.choice(list(p.choices)),
    }
    param_space = {p.key: domains[p.type](p) for p in space.arm_params("oialr")}

    def trainable(config: dict[str, Any]) -> None:
        from oialr_tune.config import train_config_from_dict, with_overrides
        from oialr_tune.run_record import Callback
        from oialr_tune.trainer import train

        cfg = with_overrides(train_config_from_dict(base), config)
        cfg.checkpoint_every = 1  # a checkpoint every epoch

        class Report(Callback):
            def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
                row = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
                row["pid"], row["reported_at"] = os.getpid(), time.time()
                ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
                tune.report(row, checkpoint=ckpt)

        work = tempfile.mkdtemp()
        try:
            checkpoint = tune.get_checkpoint()
            if checkpoint is not None:
                checkpoint.to_directory(work)
            train(cfg, callbacks=[Report()], checkpoint_dir=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    b = space.budget
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": space.resources.cpu}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric="val_acc", mode="max", seed=space.seed),
            scheduler=ASHAScheduler(metric="val_acc", mode="max", max_t=b.max_epochs,
                                    grace_period=b.grace_period, reduction_factor=b.reduction_factor),
            num_samples=b.num_samples,
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(name="oialr", storage_path=storage),
    )
    t0 = time.time()
    results = tuner.fit()
    t1 = time.time()
    print("RESULT " + json.dumps({"fit_start": t0, "fit_end": t1, "trials": len(results),
                                  "errors": len(results.errors)}), flush=True)
    ray.shutdown()


# --- measuring a column ----------------------------------------------------------------------------


def _load() -> float:
    return os.getloadavg()[0]


def _trials(exp_dirs: list[Path]) -> list[dict[str, Any]]:
    """One record per trial from Ray's result.json files."""
    out = []
    for exp in exp_dirs:
        for f in sorted(exp.glob("*/result.json")):
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            if not rows:
                continue
            first, last = rows[0], rows[-1]
            out.append({
                "start": first["reported_at"] - first["time_this_iter_s"],  # the trainable's start
                "end": last["reported_at"],
                "train": sum(r["train_time_s"] for r in rows),
                "first_setup": first["time_this_iter_s"] - first["train_time_s"],
                "epochs": len(rows),
                "pid": first["pid"],
                "val_acc": last["val_acc"],
            })  # fmt: skip
    return out


def measure(label: str, cmd: list[str], env: dict[str, str], exp_dirs: list[Path], slots: int, log: Path) -> dict:
    load0 = _load()
    t0 = time.time()
    with log.open("w") as f:
        # Not from the checkout's folder: `python -m` would import the package from the current
        # directory ahead of PYTHONPATH, and a variant's patched copy would not be used.
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)
    t1 = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    trials = _trials(exp_dirs)
    wall = t1 - t0
    w0, w1 = min(t["start"] for t in trials), max(t["end"] for t in trials)
    window = w1 - w0
    train = sum(t["train"] for t in trials)
    spans = sum(t["end"] - t["start"] for t in trials)
    n = len(trials)
    # The first trial a process ran paid its imports and data loading; later ones reuse them. A
    # trial on a reused process costs its own non-training time plus the gap since the previous
    # trial on that process ended: the marginal per-trial overhead. The rest is fixed per sweep.
    last_end: dict[int, float] = {}
    fresh, reused, marginal, first_start = [], [], [], {}
    for t in sorted(trials, key=lambda t: t["start"]):
        if t["pid"] in last_end:
            reused.append(t["first_setup"])
            marginal.append((t["end"] - t["start"] - t["train"]) + (t["start"] - last_end[t["pid"]]))
        else:
            fresh.append(t["first_setup"])
            first_start[t["pid"]] = t["start"]
        last_end[t["pid"]] = t["end"]
    seen = set(last_end)
    starts = sorted(first_start.values())
    m = statistics.mean(marginal) if marginal else float("nan")
    return {
        "label": label, "trials": n, "epochs": sum(t["epochs"] for t in trials), "processes": len(seen),
        "wall_s": wall, "window_s": window, "train_s": train, "slots": slots,
        "util": train / (wall * slots), "util_window": train / (window * slots),
        "overhead_s": (wall * slots - train) / n, "overhead_window_s": (window * slots - train) / n,
        "trials_per_min": 60 * n / wall,
        "in_trial_s": spans - train, "idle_window_s": window * slots - spans,
        "outside_s": (wall - window) * slots, "before_s": w0 - t0, "after_s": t1 - w1,
        "setup_fresh_s": statistics.mean(fresh) if fresh else float("nan"),
        "setup_reused_s": statistics.mean(reused) if reused else float("nan"),
        "marginal_s": m, "fixed_slot_s": wall * slots - train - n * m if marginal else float("nan"),
        "second_process_after_s": starts[1] - starts[0] if len(starts) > 1 else float("nan"),
        "trial_train_mean_s": train / n,
        "best_val_acc": max(t["val_acc"] for t in trials),
        "load_before": load0, "load_after": _load(),
        "timeline": [[round(t["start"] - w0, 3), round(t["end"] - w0, 3), round(t["train"], 3), t["pid"], t["epochs"]]
                     for t in sorted(trials, key=lambda t: t["start"])],
    }  # fmt: skip


def run_columns(args: argparse.Namespace, work: Path) -> list[dict]:
    from oialr_tune.space import load_space

    space = load_space(args.space)
    if args.num_samples:
        # The same space with N trials, as a YAML file that both the CLI and the script load.
        space = dataclasses.replace(space, budget=dataclasses.replace(space.budget, num_samples=args.num_samples))
        args.space = str(work / f"{space.name}.yaml")
        Path(args.space).write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    slots = max(1, int((os.cpu_count() or 1) // space.resources.cpu))
    base_env = {**os.environ, "RAY_ADDRESS": ""}
    cli = [sys.executable, "-m", "oialr_tune.cli", "sweep", args.space, "-q"]
    if args.arms == "oialr":
        cli += ["--baseline", "none"]
    arms = ["oialr"] if args.arms == "oialr" else space.arms()
    columns: list[tuple[str, list[str], dict[str, str], str]] = [("ours", cli, base_env, "ours")]
    if args.arms == "oialr":  # the hand-written script runs one arm
        me = [sys.executable, str(HERE), "--space", args.space, "--_column"]
        columns += [("ray defaults", [*me, "default"], base_env, "default"),
                    ("ray reuse_actors", [*me, "reuse"], base_env, "reuse")]
    for spec in args.variant:
        label, _, path = spec.partition("=")
        env = {**base_env, "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p)}
        where = subprocess.run([sys.executable, "-c", "import oialr_tune; print(oialr_tune.__file__)"], env=env,
                               cwd=work, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        if not Path(where).resolve().is_relative_to(Path(path).resolve()):
            raise SystemExit(f"variant {label}: imports {where}, not the copy in {path}")
        columns.append((label, cli, env, "ours"))
    if args.only:
        columns = [c for c in columns if c[0] in args.only.split(",")]
    rows = []
    for rep in range(args.repeats):
        for i, (label, cmd, env, kind) in enumerate(columns):
            d = work / f"r{rep}-c{i}"
            d.mkdir()
            if kind == "ours":
                full = [*cmd, "--results-dir", str(d), "--name", "s"]
                exps = [d / "s" / arm for arm in arms]
            else:
                full = [*cmd, "--_storage", str(d)]
                exps = [d / "oialr"]
            r = measure(label, full, env, exps, slots, d / "log.txt")
            r["repeat"] = rep
            rows.append(r)
            print(f"[{rep}] {label:20s} wall {r['wall_s']:6.1f}s window {r['window_s']:6.1f}s "
                  f"train {r['train_s']:6.1f}s util {r['util']:.0%} / window {r['util_window']:.0%} "
                  f"overhead/trial {r['overhead_s']:.2f}s / window {r['overhead_window_s']:.2f}s "
                  f"({r['trials']} trials, {r['epochs']} epochs, load {r['load_before']:.1f}->{r['load_after']:.1f})",
                  flush=True)  # fmt: skip
    return rows


# --- the report --------------------------------------------------------------------------------------


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(rows: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {lab: [r for r in rows if r["label"] == lab] for lab in labels}

    def fmt(lab: str, key: str, f: str) -> str:
        return format(_median(by[lab], key), f)

    head = "| | " + " | ".join(f"`{lab}`" for lab in labels) + " |\n|---|" + "---:|" * len(labels) + "\n"
    lines = [
        ("utilization, end-to-end", "util", ".0%"),
        ("utilization, trial window", "util_window", ".0%"),
        ("per-trial overhead, end-to-end (s)", "overhead_s", ".2f"),
        ("per-trial overhead, trial window (s)", "overhead_window_s", ".2f"),
        ("marginal per-trial overhead on a reused process (s)", "marginal_s", ".2f"),
        ("fixed cost per sweep (slot-s)", "fixed_slot_s", ".1f"),
        ("trials per minute", "trials_per_min", ".1f"),
        ("wall, end-to-end (s)", "wall_s", ".1f"),
        ("trial window (s)", "window_s", ".1f"),
        ("Σ train_time_s (s)", "train_s", ".1f"),
        ("trials / epochs trained", None, ""),
        ("worker processes", "processes", ".0f"),
        ("best val_acc", "best_val_acc", ".4f"),
    ]
    out = head
    for name, key, f in lines:
        if key is None:
            cells = [f"{_median(by[lab], 'trials'):.0f} / {_median(by[lab], 'epochs'):.0f}" for lab in labels]
        else:
            cells = [fmt(lab, key, f) for lab in labels]
        out += f"| {name} | " + " | ".join(cells) + " |\n"
    out += "\nWhere the slot-seconds went (wall × slots = the four parts; medians, seconds):\n\n"
    out += head
    for name, key, f in [
        ("training steps + validation", "train_s", ".1f"),
        ("in-trial, not training (imports, data, model build, report, checkpoint)", "in_trial_s", ".1f"),
        ("idle slots inside the window (process start, scheduling, searcher)", "idle_window_s", ".1f"),
        ("outside the window × slots (interpreter, imports, Ray start/stop, results)", "outside_s", ".1f"),
        ("… of which before the first trial starts (s of wall)", "before_s", ".1f"),
        ("… of which after the last report (s of wall)", "after_s", ".1f"),
        ("first trial on a fresh process: start → first report, minus training (s)", "setup_fresh_s", ".2f"),
        ("a trial on a reused process: the same (s)", "setup_reused_s", ".2f"),
        ("second worker process's first trial starts after the first's (s)", "second_process_after_s", ".2f"),
    ]:
        out += f"| {name} | " + " | ".join(fmt(lab, key, f) for lab in labels) + " |\n"
    return out


def write_report(rows: list[dict], args: argparse.Namespace, out: Path, elapsed: float) -> str:
    import torch

    cmd = "python benchmarks/sweep_efficiency.py " + " ".join(shlex.quote(a) for a in args.argv)
    loads = [r["load_before"] for r in rows] + [r["load_after"] for r in rows]
    ours = [r for r in rows if r["label"] == "ours"]
    u, uw = _median(ours, "util"), _median(ours, "util_window")
    o, ow = _median(ours, "overhead_s"), _median(ours, "overhead_window_s")
    verdict = (
        f"Targets for `ours` (utilization ≥ 75 %, per-trial overhead ≤ 0.5 s): end-to-end {u:.0%} and "
        f"{o:.2f} s — {'met' if u >= 0.75 and o <= 0.5 else 'missed'}; trial window {uw:.0%} and {ow:.2f} s — "
        f"{'met' if uw >= 0.75 and ow <= 0.5 else 'missed'}."
    )
    for label in dict.fromkeys(r["label"] for r in rows):
        got = [r for r in rows if r["label"] == label]
        f, m, t = _median(got, "fixed_slot_s"), _median(got, "marginal_s"), _median(got, "trial_train_mean_s")
        if m == m and label not in ("ray defaults",):  # nan-safe: only columns with reused processes
            need = f"{3 * f / (t - 3 * m):.0f}" if t > 3 * m else "no number of"
            verdict += (
                f" `{label}`: fixed {f:.1f} slot-s per sweep + {m:.2f} s per trial; at {t:.2f} s of training per "
                f"trial, 75 % end-to-end needs {need} trials (n ≥ 3·fixed ÷ (train − 3·marginal))."
            )
    variants = ""
    if args.variant:
        variants = " Further columns: `ours` with a patched copy of the package first on PYTHONPATH: " + ", ".join(
            f"`{v.partition('=')[0]}` = {v.partition('=')[2]}" for v in args.variant
        ) + " (the patches are listed below the tables)."
    trials = f" with {args.num_samples} trials per arm" if args.num_samples else ""
    arms = "OIALR arm only" if args.arms == "oialr" else "both arms"
    text = f"""# Sweep efficiency: oialr-tune vs hand-written Ray Tune

Task: search space `{args.space_name}`{trials} ({arms}), 1 CPU per trial,
{rows[0]['slots']} CPU slots. Machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU used,
torch {torch.__version__}, Python {platform.python_version()}; shared with other jobs: load average
{min(loads):.1f}–{max(loads):.1f} during the runs (1-minute load, sampled before and after each column).
{args.repeats} repeat(s), columns interleaved, medians shown; whole benchmark {elapsed / 60:.1f} min.

Command:

```
{cmd}
```

Columns: `ours` = `oialr-tune sweep {args.space_name}{' --baseline none' if args.arms == 'oialr' else ''}`;
`ray defaults` = a hand-written Ray Tune script over the same trainer and space (function trainable,
`tune.report` + a checkpoint every epoch, OptunaSearch + ASHA with the space's grace period /
reduction factor / max epochs, Ray's defaults otherwise, so one fresh worker process per trial);
`ray reuse_actors` = the same with `TuneConfig(reuse_actors=True)`.{variants}

Definitions: utilization = Σ `train_time_s` (training steps + validation, as the trainer reports per
epoch) ÷ (wall × slots). Per-trial overhead = (wall × slots − Σ `train_time_s`) ÷ trials, i.e. the
slot-seconds a trial costs beyond its own training. *End-to-end* wall is the whole command
(interpreter start to exit); the *trial window* runs from the first trial's start (its trainable's
start, from Ray's `time_this_iter_s`) to the last report. Which trials ASHA stops depends on timing,
so epochs trained differ between columns; the ratios are per training second and per trial.
*Marginal* per-trial overhead: for trials on a reused worker process, the trial's own non-training
time plus the gap since the previous trial on that process ended (what one more trial costs);
*fixed cost* = wall × slots − Σ training − trials × marginal (Ray start and stop, interpreter and
imports, each worker process's first imports and data loading, results): paid once per sweep.

{table(rows)}
{verdict}
"""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_efficiency_n{args.num_samples}" if args.num_samples else "sweep_efficiency"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="quickstart")
    p.add_argument("--num-samples", type=int, help="trials per arm (default: the space's budget.num_samples)")
    p.add_argument("--arms", choices=["oialr", "both"], default="oialr")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                   help="also run `ours` with PYTHONPATH=DIR (a patched copy of the package)")
    p.add_argument("--only", help="comma-separated column labels to run (default: all)")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    p.add_argument("--_column", choices=["default", "reuse"], help=argparse.SUPPRESS)
    p.add_argument("--_storage", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._column:
        hand_written(args.space, args._storage, reuse_actors=args._column == "reuse")
        return
    args.argv = sys.argv[1:]
    args.space_name = args.space
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="sweep-eff-") as tmp:
        rows = run_columns(args, Path(tmp))
    print(write_report(rows, args, Path(args.out), time.time() - start))


if __name__ == "__main__":
    main()
