"""Where does a sweep's fixed cost go? Each piece of ``oialr-tune sweep`` outside its trials, timed.

`sweep_efficiency.py` splits a sweep's slot-seconds into training, per-trial overhead and a *fixed
cost* paid once per sweep. This benchmark times that fixed cost piece by piece, for the real command
``oialr-tune sweep SPACE -q --baseline none`` (``--num-samples N`` for a longer sweep), each run in
its own process:

* *interpreter start*: the parent's clock at launch to the child's first line;
* *CLI import*: ``import oialr_tune.cli``;
* *checks and imports before Ray*: ``sweep()`` entered to ``start_ray`` called (the space checks,
  ``preflight``: torch imported, the data loaded and one example through the model, Ray and Ray
  Tune imported); ``preflight``'s own span and the first imports of torch, ray, ray.tune, optuna
  and pandas are shown under it;
* *``ray.init``*: ``cluster.start_ray``;
* *Ray up → first trial starts*: the Tuner set up, the first worker process started and its
  trainable entered (from Ray's ``result.json``: a trial's start is its first report minus that
  report's ``time_this_iter_s``);
* *first trial on each fresh worker process*: its time from the trainable's start to its first
  report, minus training (the worker's imports of torch and the trainer, data loading, model
  build), summed over the processes (slot-seconds: the other slots may run trials meanwhile);
* *idle slots in the trial window beyond per-trial costs*: the window × slots, less every trial's
  span, less the gaps between consecutive trials on one process (those are per-trial cost);
  i.e. a later worker starting after the first, and the last trials finishing at different times;
* *last report → results*: Tune ending the experiment (``fit`` returning);
* *result writing*: ``collect`` on the driver's thread (trials.csv, summary.json; the journal
  read, checkpoints pruned);
* *study.db*: ``study.write_study`` (runs on a thread, overlapping ``ray.shutdown``; its span is
  shown, and what the driver still waits for after ``ray.shutdown``);
* *``ray.shutdown``*;
* *exit*: ``sweep()`` returned to the process gone (summary line, interpreter teardown).

The timing is done from outside the package: the child process is this script (``--_child``),
which installs an import hook that wraps those functions as their modules load, then calls
``oialr_tune.cli.main()`` with the command's ``sys.argv``, as the ``oialr-tune`` script does (a
CLI that ends the process with ``os._exit`` has its timings written first). Nothing in the
package is changed for it.

Phases in the driver while no trial runs cost wall × slots slot-seconds (every slot is idle);
the pieces inside the trial window are counted in slot-seconds directly. The *fixed cost* is
their sum; ``sweep_efficiency.py``'s figure (wall × slots − Σ training − trials × mean marginal
per-trial cost) is given beside it as a check.

Columns: ``--variant LABEL=DIR`` (repeatable) runs the command with ``PYTHONPATH=DIR`` (a checkout
of another commit, e.g. ``git worktree add /tmp/base <commit>``); columns run one after another,
interleaved over ``--repeats``, medians shown. A standalone timing of the result writers on the
sweep's own trials follows each column (``--_writers``: trials.csv + summary.json, and study.db,
3 times each, in a fresh process).

Usage::

    python benchmarks/sweep_fixed_cost.py --variant before=/tmp/base --variant after=. [--num-samples 256]
        [--repeats 3] [--out results/benchmarks]

The machine's 1-minute load average is recorded before and after each run.
"""

from __future__ import annotations

import argparse
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

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

# --- the child: the real CLI, with its phases timed -------------------------------------------------

# module -> functions to time (wrapped as the module finishes loading, before anyone binds them)
_WRAP = {
    "oialr_tune.tuning.driver": ["sweep"],
    "oialr_tune.checks": ["preflight"],
    "oialr_tune.tuning.cluster": ["start_ray"],
    "oialr_tune.tuning.arm": ["run_arm"],
    "oialr_tune.tuning.collect": ["collect"],
    "oialr_tune.tuning.study": ["write_study", "write_studies"],  # before / after 28dc656
    "ray": ["shutdown"],
}
_IMPORTS = ["oialr_tune.cli", "oialr_tune.tuning.driver", "torch", "ray", "ray.tune", "optuna", "pandas", "sqlalchemy"]


def child(launch: float, out: Path, argv: list[str]) -> int:
    t_start = time.time()
    import functools
    import importlib.abc
    import importlib.machinery

    spans: dict[str, list[list[float]]] = {}

    def wrap(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                spans.setdefault(name, []).append([t, time.time()])

        return timed

    class Hook(importlib.abc.MetaPathFinder):
        """Times the first import of `_IMPORTS` and wraps `_WRAP`'s functions as their modules load."""

        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name not in _WRAP and name not in _IMPORTS:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            real_exec = loader.exec_module

            def exec_module(module: Any) -> None:
                t = time.time()
                real_exec(module)
                spans.setdefault(f"import {name}", []).append([t, time.time()])
                for fn in _WRAP.get(name, []):
                    if hasattr(module, fn):  # write_study (before 28dc656) or write_studies: one key
                        key = f"{name}.write_study" if fn.startswith("write_stud") else f"{name}.{fn}"
                        setattr(module, fn, wrap(key, getattr(module, fn)))

            loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Hook())

    def record() -> None:
        out.write_text(json.dumps({"launch": launch, "start": t_start, "end": time.time(), "spans": spans}))

    real_exit = os._exit

    def exit_now(rc: int) -> None:  # a CLI that ends itself with os._exit: record first
        record()
        real_exit(rc)

    os._exit = exit_now  # type: ignore[assignment]
    from oialr_tune.cli import main

    sys.argv = ["oialr-tune", *argv]
    rc = main()  # no argv: as the `oialr-tune` command calls it
    record()
    return rc


def writers(results: Path, out: Path, repeats: int = 3) -> None:
    """Time the result writers alone on a finished sweep's trials: collect's own part and study.db."""
    from concurrent.futures import ThreadPoolExecutor

    from oialr_tune.tuning import collect as c
    from oialr_tune.tuning import study
    from oialr_tune.tuning.storage import open_sweep

    store, space = open_sweep(results)
    rows = {arm: c._trial_rows(space, arm, store) for arm in space.arms()}
    name = "write_studies" if hasattr(c, "write_studies") else "write_study"  # after / before 28dc656
    real = getattr(c, name)
    csv, db = [], []
    for _ in range(repeats):
        setattr(c, name, lambda *a, **k: None)  # collect without study.db
        with ThreadPoolExecutor(max_workers=1) as pool:
            t = time.perf_counter()
            c.collect(space, store, pool)[1].result()
            csv.append(time.perf_counter() - t)
        setattr(c, name, real)
        t = time.perf_counter()
        if name == "write_studies":
            study.write_studies(space, rows, store)
        else:
            for arm, r in rows.items():
                study.write_study(space, arm, r, store)
        db.append(time.perf_counter() - t)
    n = sum(len(r) for r in rows.values())
    out.write_text(json.dumps({"trials": n, "results_s": csv, "study_s": db}))


# --- the parent ----------------------------------------------------------------------------------------


def _load() -> float:
    return os.getloadavg()[0]


def _first(spans: dict, key: str) -> list[float] | None:
    s = spans.get(key)
    return s[0] if s else None


def analyse(c: dict, t1: float, exp_dirs: list[Path], slots: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE.parent))
    from sweep_efficiency import _trials

    trials = sorted(_trials(exp_dirs), key=lambda t: t["start"])
    sp = c["spans"]
    sweep = _first(sp, "oialr_tune.tuning.driver.sweep")
    ray_init = _first(sp, "oialr_tune.tuning.cluster.start_ray")
    collect = _first(sp, "oialr_tune.tuning.collect.collect")
    shutdown = next(s for s in sp["ray.shutdown"] if s[0] >= collect[1])  # the driver's, not one inside ray.init
    studies = sp.get("oialr_tune.tuning.study.write_study", [])
    w0, w1 = trials[0]["start"], max(t["end"] for t in trials)
    train = sum(t["train"] for t in trials)
    spans_sum = sum(t["end"] - t["start"] for t in trials)
    last_end: dict[int, float] = {}
    fresh, gaps, marginal = [], 0.0, []
    for t in trials:
        if t["pid"] in last_end:
            gaps += t["start"] - last_end[t["pid"]]
            marginal.append((t["end"] - t["start"] - t["train"]) + (t["start"] - last_end[t["pid"]]))
        else:
            fresh.append(t["first_setup"])
        last_end[t["pid"]] = t["end"]
    in_trial = spans_sum - train  # non-training time inside trials
    reused_nontrain = in_trial - sum(fresh)
    wall = t1 - c["launch"]
    m = statistics.mean(marginal) if marginal else float("nan")

    def imp(name: str) -> float:
        s = _first(sp, f"import {name}")
        return s[1] - s[0] if s else 0.0

    study_end = max((s[1] for s in studies), default=shutdown[1])
    pieces = {  # wall seconds; with the trial window they tile the wall clock
        "interpreter start": c["start"] - c["launch"],
        "CLI import (oialr_tune.cli)": imp("oialr_tune.cli"),
        # the CLI parsing its arguments and importing the sweep driver (pandas, pyarrow, yaml)
        "CLI → sweep() (driver import)": (sweep[0] - c["start"]) - imp("oialr_tune.cli"),
        "checks + imports before Ray": ray_init[0] - sweep[0],
        "ray.init (start_ray)": ray_init[1] - ray_init[0],
        "Ray up → first trial starts": w0 - ray_init[1],
        "last report → results (Tune ends)": collect[0] - w1,
        "result writing (collect: trials.csv, summary.json)": collect[1] - collect[0],
        "collect → ray.shutdown starts": shutdown[0] - collect[1],
        "ray.shutdown": shutdown[1] - shutdown[0],
        "waiting for study.db after ray.shutdown": max(0.0, study_end - shutdown[1]),
        "summary line, sweep() returns": c["end"] - max(study_end, shutdown[1]),
        "process exit (interpreter teardown, atexit)": t1 - c["end"],
    }
    driver_wall = sum(pieces.values())
    slot_pieces = {k: v * slots for k, v in pieces.items()}
    slot_pieces["first trial on each fresh worker (imports, data)"] = sum(fresh)
    slot_pieces["idle slots in the window, beyond per-trial gaps"] = (w1 - w0) * slots - spans_sum - gaps
    fixed = sum(slot_pieces.values())
    return {
        "wall_s": wall, "driver_outside_window_s": driver_wall, "window_s": w1 - w0, "train_s": train,
        "trials": len(trials), "processes": len(last_end), "slots": slots,
        "pieces_wall": pieces, "pieces_slot": slot_pieces, "fixed_slot_s": fixed,
        "per_trial_s": (reused_nontrain + gaps) / max(1, len(marginal)) if marginal else float("nan"),
        "fixed_slot_s_efficiency_formula": wall * slots - train - len(trials) * m,
        "util": train / (wall * slots),
        "preflight_s": (lambda s: s[1] - s[0] if s else 0.0)(_first(sp, "oialr_tune.checks.preflight")),
        "imports": {n: imp(n) for n in _IMPORTS if n != "oialr_tune.cli"},
        "study_span_s": sum(s[1] - s[0] for s in studies),
        "raw_spans": {k: [[a - c["launch"], b - c["launch"]] for a, b in v] for k, v in sp.items()},
    }  # fmt: skip


def run_column(label: str, path: str, space: str, num_samples: int | None, d: Path, slots: int) -> dict:
    env = {
        **os.environ,
        "RAY_ADDRESS": "",
        "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p),
    }
    where = subprocess.run([sys.executable, "-c", "import oialr_tune; print(oialr_tune.__file__)"], env=env, cwd=d,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    if not Path(where).resolve().is_relative_to(Path(path).resolve()):
        raise SystemExit(f"{label}: imports {where}, not the copy in {path}")
    argv = ["sweep", space, "-q", "--baseline", "none", "--results-dir", str(d), "--name", "s"]
    if num_samples:
        argv += ["--num-samples", str(num_samples)]
    load0 = _load()
    launch = time.time()
    with (d / "log.txt").open("w") as f:
        proc = subprocess.run([sys.executable, str(HERE), "--_child", str(launch), str(d / "child.json"), "--", *argv],
                              env=env, stdout=f, stderr=subprocess.STDOUT, cwd=d)  # fmt: skip
    t1 = time.time()
    load1 = _load()
    if proc.returncode != 0:
        raise SystemExit(
            f"{label}: exit {proc.returncode}; see {d / 'log.txt'}:\n{(d / 'log.txt').read_text()[-3000:]}"
        )
    r = analyse(json.loads((d / "child.json").read_text()), t1, [d / "s" / "oialr"], slots)
    subprocess.run([sys.executable, str(HERE), "--_writers", str(d / "s"), str(d / "writers.json")], env=env, cwd=d,
                   check=True)  # fmt: skip
    w = json.loads((d / "writers.json").read_text())
    r.update(label=label, load_before=load0, load_after=load1, writers=w)
    return r


def _med(rows: list[dict], get: Any) -> float:
    return statistics.median(get(r) for r in rows)


def report(rows: list[dict], labels: list[str], args: argparse.Namespace, elapsed: float, cmd: str) -> str:
    by = {lab: [r for r in rows if r["label"] == lab] for lab in labels}
    first = rows[0]
    loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
    head = "| | " + " | ".join(f"`{lab}` wall (s) | `{lab}` slot-s" for lab in labels) + " |"
    sep = "|---|" + "---:|---:|" * len(labels)
    lines = [head, sep]
    for key in first["pieces_slot"]:
        cells = []
        for lab in labels:
            w = _med(by[lab], lambda r, k=key: r["pieces_wall"].get(k, float("nan")))
            s = _med(by[lab], lambda r, k=key: r["pieces_slot"][k])
            cells.append(f"{w:.2f}" if key in first["pieces_wall"] else "–")
            cells.append(f"{s:.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")

    def row(name: str, get: Any, fmt: str = "{:.2f}", slot: bool = True) -> None:
        cells = []
        for lab in labels:
            v = fmt.format(_med(by[lab], get))
            cells += ["", v] if slot else [v, ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row("**fixed cost, sum of the pieces**", lambda r: r["fixed_slot_s"])
    row("fixed cost, sweep_efficiency.py's formula", lambda r: r["fixed_slot_s_efficiency_formula"])
    row("per-trial cost on a reused worker (not fixed)", lambda r: r["per_trial_s"], slot=False)
    row("of 'checks + imports before Ray': preflight()", lambda r: r["preflight_s"], slot=False)
    for n in first["imports"]:
        row(f"… first import of {n} (nested, at its place)", lambda r, n=n: r["imports"][n], slot=False)
    row("study.db written (on a thread, overlaps ray.shutdown)", lambda r: r["study_span_s"], slot=False)
    row("Σ training (slot-s)", lambda r: r["train_s"])
    row("wall, end-to-end", lambda r: r["wall_s"], slot=False)
    row("utilization, end-to-end", lambda r: 100 * r["util"], fmt="{:.0f}%", slot=False)
    row("trials", lambda r: r["trials"], fmt="{:.0f}", slot=False)
    row("worker processes", lambda r: r["processes"], fmt="{:.0f}", slot=False)
    wl = ["", "Result writers alone, on the sweep's own trials (fresh process, median of 3 × runs; seconds):", "",
          "| | " + " | ".join(f"`{lab}`" for lab in labels) + " |", "|---|" + "---:|" * len(labels)]  # fmt: skip
    for key, name in (("results_s", "trials.csv + summary.json (collect without study.db)"), ("study_s", "study.db")):
        wl.append(
            f"| {name} | "
            + " | ".join(f"{_med(by[lab], lambda r, k=key: statistics.median(r['writers'][k])):.3f}" for lab in labels)
            + " |"
        )
    ntr = first["writers"]["trials"]
    per = " | ".join(f"{1000 * _med(by[lab], lambda r: statistics.median(r['writers']['study_s'])) / ntr:.1f}"
                     for lab in labels)  # fmt: skip
    wl.append(f"| study.db per trial (ms) | {per} |")
    per_run = "\n".join(
        f"- `{r['label']}` run {r['repeat']}: load {r['load_before']:.1f}→{r['load_after']:.1f}, "
        f"wall {r['wall_s']:.1f} s, "
        f"fixed {r['fixed_slot_s']:.1f} slot-s, training {r['train_s']:.1f} slot-s, utilization {r['util']:.0%}"
        for r in rows)  # fmt: skip
    import torch

    n_flag = f" --num-samples {args.num_samples}" if args.num_samples else ""
    columns = ", ".join("`{}` = package from `{}`".format(*v.split("=", 1)) for v in args.variant)
    return f"""# Sweep fixed cost, piece by piece

Task: `oialr-tune sweep {args.space} -q --baseline none{n_flag}`
({first["trials"]} trials, OIALR arm only), {first["slots"]} CPU slots. Machine: {os.cpu_count()} CPU cores
({platform.machine()}), no GPU used, torch {torch.__version__}, Python {platform.python_version()}; shared with other
jobs: load average {min(loads):.1f}–{max(loads):.1f} (1-minute, sampled before and after each run).
{args.repeats} repeat(s), columns interleaved, medians shown; whole benchmark {elapsed / 60:.1f} min.
Columns: {columns}.

Command:

```
{cmd}
```

How each piece is timed is in the script's docstring. Pieces in the driver while no trial runs
cost wall × slots; the two pieces inside the trial window are in slot-seconds directly.

{chr(10).join(lines)}
{chr(10).join(wl)}

Runs:

{per_run}
"""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        launch, out, rest = float(sys.argv[2]), Path(sys.argv[3]), sys.argv[5:]
        raise SystemExit(child(launch, out, rest))
    if len(sys.argv) > 1 and sys.argv[1] == "--_writers":
        writers(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="quickstart")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR", required=True)
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    args = p.parse_args()
    slots = os.cpu_count() or 1  # quickstart: 1 CPU per trial
    t0 = time.time()
    labels = [v.partition("=")[0] for v in args.variant]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fixedcost-") as tmp:
        for rep in range(args.repeats):
            for i, spec in enumerate(args.variant):
                label, _, path = spec.partition("=")
                d = Path(tmp, f"r{rep}-c{i}")
                d.mkdir()
                r = run_column(label, str(Path(path).resolve()), args.space, args.num_samples, d, slots)
                r["repeat"] = rep
                rows.append(r)
                print(f"[{rep}] {label:10s} wall {r['wall_s']:5.1f}s fixed {r['fixed_slot_s']:5.1f} slot-s "
                      f"train {r['train_s']:5.1f} util {r['util']:.0%} study.db {r['study_span_s']:.2f}s "
                      f"load {r['load_before']:.1f}->{r['load_after']:.1f}", flush=True)  # fmt: skip
    cmd = "python benchmarks/sweep_fixed_cost.py " + shlex.join(sys.argv[1:])
    text = report(rows, labels, args, time.time() - t0, cmd)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sweep_fixed_cost" + (f"_n{args.num_samples}" if args.num_samples else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"command": cmd, "runs": rows}, indent=1, default=float) + "\n")
    print(text)


if __name__ == "__main__":
    main()
