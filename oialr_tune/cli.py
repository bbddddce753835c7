"""The ``oialr-tune`` command line: one subcommand per user job, each a thin call into its module.

Bad input raises :class:`~oialr_tune.errors.UserError` anywhere below; here it becomes one line on
stderr and exit status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from . import __version__
from .errors import UserError, one_line
from .metrics import SELECTABLE_DIRECTIONS
from .space import ARMS, BASELINES
from .tuning.driver import LOGGERS  # Ray-free at import: Ray loads only when a sweep runs


def _train(args: argparse.Namespace) -> None:
    from .checks import check_run
    from .config import load_train_config

    cfg = load_train_config(args.config)
    check_run(cfg)  # what a sweep checks first: a model that does not fit the data is one line, not a traceback
    if args.workers == 1:
        _train_and_print(cfg, args.checkpoint_dir)
        return
    import torch.multiprocessing as mp

    from . import distributed

    gpu = distributed.check_workers(cfg, args.workers)  # bad input: before any process starts
    try:
        distributed.launch(_train_and_print, args.workers, cfg, args.checkpoint_dir, gpu=gpu)
    except mp.ProcessExitedException as e:
        raise SystemExit(e.exit_code) from None


def _train_and_print(cfg: Any, checkpoint_dir: str | None) -> None:
    """One run of ``oialr-tune train`` (or one worker of it: only rank 0 prints)."""
    from . import distributed
    from .progress import TrainProgress
    from .trainer import train

    workers = distributed.current()
    main = workers is None or workers.main
    # Progress on stderr (a start line, then a bar on a terminal or a line per epoch); the result on stdout.
    # A UserError on a worker reaches `main` through `distributed.launch` as itself: one line, exit 2.
    result = train(cfg, checkpoint_dir=checkpoint_dir, evaluate_test=True, progress=TrainProgress() if main else None)
    if not main:
        return
    final = result.history[-1] if result.history else {}
    print(
        f"status={result.status} val_acc={final.get('val_acc', float('nan')):.4f} "
        f"test_acc={result.test_acc if result.test_acc is not None else float('nan'):.4f} "
        f"trainable_fraction={final.get('trainable_fraction', float('nan')):.3f} "
        f"wall={result.wall_time_s:.1f}s"
    )


def _sweep(args: argparse.Namespace) -> int:
    from .errors import EXIT_DISK_FULL, DiskFull, SweepInterrupted
    from .tuning import sweep

    if args.resume and args.space:
        raise UserError("--resume: takes the space from the sweep folder; drop the SPACE argument")
    try:
        sweep(
            args.space,
            name=args.name,
            results_dir=args.results_dir,
            resume=args.resume or False,
            address=args.address,
            baseline=args.baseline,
            verbose=0 if args.quiet else 1 + args.verbose,
            num_samples=args.num_samples,
            max_epochs=args.max_epochs,
            overrides=dict(args.set),
            log=args.log,
        )
    except DiskFull as exc:
        print(f"oialr-tune: sweep stopped: {exc}", file=sys.stderr)
        return EXIT_DISK_FULL
    except SweepInterrupted as exc:
        print(f"oialr-tune: sweep interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports a signal
    return 0


def _repaired(results_dir: str) -> str:
    """A results folder whose final writes a kill cut short is rebuilt from its journals before it is read."""
    from .tuning.collect import repair_if_incomplete

    return str(repair_if_incomplete(results_dir))


def _best(args: argparse.Namespace) -> None:
    from .best_format import format_best
    from .results import best_trial

    best = best_trial(_repaired(args.results_dir), arm=args.arm, objective=args.objective,
                      max_trainable_fraction=args.max_trainable_fraction)
    print(format_best(best, args.format))


def _add_parallel_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--address", default=None, help="run on this Ray cluster (default: a local Ray)")
    p.add_argument("--max-concurrent", type=_positive_int, default=None, metavar="N",
                   help=f"at most N {what} at once, each with the sweep's per-trial resources "
                        "(default: as many as fit; 1: one after another)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="data-parallel workers per run, each with the per-worker resources (default: the "
                        "sweep's resources.workers; a run's workers share one machine)")


def _add_trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="run the user code (import paths) a results folder names even if this user's key did not "
                        "sign it; a folder is data otherwise (see README, Reliability)")


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``; the value is read as YAML (``8`` an int, ``null`` None, ``[1, 2]`` a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{key}: value is not YAML: {value!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _retrain(args: argparse.Namespace) -> None:
    from .retrain import format_summary, retrain

    summary = retrain(
        _repaired(args.results_dir), seeds=args.seeds, first_seed=args.first_seed, epochs=args.epochs,
        train_on=args.train_on, out=args.out, from_trial=args.from_trial, from_checkpoint=args.from_checkpoint,
        arms=[args.arm] if args.arm else None, address=args.address, max_concurrent=args.max_concurrent,
        workers=args.workers, trust_code=args.trust_code,
    )  # fmt: skip
    print(format_summary(summary))


def _report(args: argparse.Namespace) -> None:
    from .report import write_report

    print(write_report(_repaired(args.results_dir), trust_code=args.trust_code))


def _compare(args: argparse.Namespace) -> None:
    from .compare import compare, summarize

    table = compare(args.space, trials=args.trials, seeds=args.seeds, out=args.out, resume=args.resume,
                    max_trainable_fraction=args.max_trainable_fraction, address=args.address,
                    max_concurrent=args.max_concurrent, workers=args.workers, trust_code=args.trust_code)
    for s in summarize(table):
        diff = f"  diff {s['diff']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}] {s['verdict']}" if "diff" in s else ""
        print(f"{s['label']:<34} {s['metric']} {s['mean']:.4f} ± {s['std']:.4f}  "
              f"trainable {s['trainable_fraction']:.1%}{diff}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oialr-tune",
        description="Hyperparameter search for OIALR low-rank training: sweep, then best, retrain and report.",
    )
    parser.add_argument("--version", action="version", version=f"oialr-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one OIALR (or full-rank) training run from a YAML config")
    p.add_argument("config", help="trainer config YAML")
    p.add_argument("--checkpoint-dir", default=None, help="where to checkpoint (and resume from)")
    p.add_argument("--workers", type=int, default=1,
                   help="data-parallel worker processes on this machine (one GPU each on GPUs; gloo on CPU)")
    p.set_defaults(run=_train)

    p = sub.add_parser("sweep", help="tune OIALR (and a full-rank baseline) with Ray Tune + Optuna + ASHA")
    p.add_argument("space", nargs="?", default=None,
                   help="search-space YAML, or a packaged space name (default: quickstart)")
    p.add_argument("--name", default=None, help="results folder name (default: <space name>-<date>-<time>)")
    p.add_argument("--log", action="append", default=[], choices=LOGGERS,
                   help="also log every trial to this tracker (mlflow: a local store RESULTS/NAME/mlflow.db)")
    p.add_argument("--results-dir", default="results",
                   help="where sweeps go: a folder, a shared path or a URI Ray accepts (default: results)")
    p.add_argument("--resume", metavar="SWEEP_DIR", default=None,
                   help="continue an interrupted sweep from its folder (e.g. results/quickstart-20250101-120000)")
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: local Ray)")
    p.add_argument("--baseline", choices=BASELINES, default=None,
                   help="override the space's full-rank baseline arm")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="also show Ray's own progress output")
    p.add_argument("--num-samples", type=_positive_int, default=None, metavar="N",
                   help="trials per arm (default: the space's budget.num_samples)")
    p.add_argument("--max-epochs", type=_positive_int, default=None, metavar="N",
                   help="epochs per trial at most (default: the space's budget.max_epochs)")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="set a value of the space by dotted key, e.g. budget.grace_period=1 or "
                        "base.optimizer.weight_decay=0.01 (repeatable; the value is YAML)")
    p.set_defaults(run=_sweep)

    p = sub.add_parser("best", help="the best trial of a sweep: config, metrics, checkpoint (Pareto set if multi)")
    p.add_argument("results_dir", help="a sweep's results folder (results/<name>)")
    p.add_argument("--arm", choices=ARMS, default="oialr", help="which arm (default: oialr)")
    p.add_argument("--objective", choices=list(SELECTABLE_DIRECTIONS), default=None,
                   help="rank trials by this metric (default: the sweep's objective)")
    p.add_argument("--format", choices=["table", "yaml", "json"], default="table",
                   help="table for people; yaml = the trainer config only (pipe it to a file for `train`); json")
    p.add_argument("--max-trainable-fraction", type=float, default=None, metavar="F",
                   help="only trials with trainable fraction <= F (multi: the most accurate Pareto point under F)")
    p.set_defaults(run=_best)

    p = sub.add_parser("retrain", help="retrain the best config(s) with fresh seeds; test once; save the models")
    p.add_argument("results_dir", help="a sweep's results folder (results/<name>)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="number of seeds (default: 3)")
    p.add_argument("--first-seed", type=int, default=1000,
                   help="seeds are FIRST_SEED, FIRST_SEED+1, ... (default: 1000)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the tuned config's)")
    p.add_argument("--train-on", choices=["train", "train+val"], default="train",
                   help="train+val also trains on the validation split (then there are no val metrics)")
    p.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/retrain)")
    p.add_argument("--from-trial", default=None, metavar="ID", help="retrain this trial instead of its arm's best")
    p.add_argument("--from-checkpoint", action="store_true",
                   help="fine-tune from the chosen trial's checkpoint instead of training from scratch")
    p.add_argument("--arm", choices=ARMS, default=None, help="only this arm (default: every arm)")
    _add_parallel_options(p, "seeds")
    _add_trust_option(p)
    p.set_defaults(run=_retrain)

    p = sub.add_parser("report", help="write report.md and PNG plots into a sweep's results folder")
    p.add_argument("results_dir", help="a sweep's results folder (results/<name>)")
    _add_trust_option(p)
    p.set_defaults(run=_report)

    p = sub.add_parser("compare", help="tuned OIALR vs tuned full rank (+ untuned, gate-off), retrained over seeds")
    p.add_argument("space", nargs="?", default=None, help="search space YAML or packaged name (default: quickstart)")
    p.add_argument("--trials", type=int, default=None, help="trials per arm (default: the space's num_samples)")
    p.add_argument("--seeds", type=int, default=5, help="fresh seeds per arm for the final test (default 5)")
    p.add_argument("--out", default=None, help="output folder (default results/<space>-compare-<time>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted compare in --out")
    p.add_argument("--max-trainable-fraction", type=float, default=None,
                   help="tuned OIALR arms retrain their best trial at or under this trainable fraction")
    _add_parallel_options(p, "retrains")
    _add_trust_option(p)
    p.set_defaults(run=_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        rc = run(args) or 0
    except UserError as exc:
        if args.debug:
            raise
        print(f"oialr-tune: error: {one_line(str(exc), limit=None)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left early (`oialr-tune best DIR | head`): it has what it wanted. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again, and exit as a
        # SIGPIPE'd command would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    if argv is None and run is _sweep:
        _exit_now(rc)
    return rc


def _exit_now(rc: int) -> None:
    """End the ``oialr-tune sweep`` process without the interpreter's teardown.

    A sweep that returned has stopped Ray, joined its threads and written its files (atomically,
    each closed); what is left is Python freeing torch, Ray and pandas module by module, about
    1.5 s of a quickstart's wall time (benchmarks/sweep_fixed_cost.py). Only for the command line
    (`main` given no `argv`): a caller in the same process gets its return value as usual.
    """
    import logging

    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        return  # the normal exit path knows what to do with a closed pipe
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
