"""The ``oialr-tune`` command line: one subcommand per user job, each a thin call into its module.

Bad input raises :class:`~oialr_tune.errors.UserError` anywhere below; here it becomes one line on
stderr and exit status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import UserError


def _train(args: argparse.Namespace) -> None:
    from .config import load_train_config
    from .trainer import train

    cfg = load_train_config(args.config)
    result = train(cfg, checkpoint_dir=args.checkpoint_dir, evaluate_test=True)
    final = result.history[-1] if result.history else {}
    print(
        f"status={result.status} val_acc={final.get('val_acc', float('nan')):.4f} "
        f"test_acc={result.test_acc if result.test_acc is not None else float('nan'):.4f} "
        f"trainable_fraction={final.get('trainable_fraction', float('nan')):.3f} "
        f"wall={result.wall_time_s:.1f}s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oialr-tune", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one OIALR (or full-rank) training run from a YAML config")
    p.add_argument("config", help="trainer config YAML")
    p.add_argument("--checkpoint-dir", default=None, help="where to checkpoint (and resume from)")
    p.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        return run(args) or 0
    except UserError as exc:
        if args.debug:
            raise
        print(f"oialr-tune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
