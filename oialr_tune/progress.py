"""Console progress of one training run, for a person watching ``oialr-tune train``.

Opt-in: `oialr_tune.trainer.train` prints nothing unless it is given a :class:`TrainProgress` (the
CLI's ``train`` passes one; Ray trials, retrain and compare do not). It writes to stderr, so stdout
keeps only the run's result line:

* once the data is loaded and the model built (so a bad input is still one line of error):
  what trains, on which device, for how many epochs;
* then, on a terminal, one in-place bar over the optimizer steps that shows the last epoch's
  validation score; anywhere else (a pipe, a log file) one line per epoch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from oialr_tune.config import TrainConfig
from oialr_tune.run_record import Callback

PREFIX = "[train]"


class TrainProgress(Callback):
    """Start line, then a step bar (terminal) or one line per epoch; give it to `train(progress=...)`.

    Args:
        stream: where to write (default: ``sys.stderr`` at the time of the call).
        bar: an in-place bar instead of per-epoch lines; default: whether `stream` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, bar: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar = _is_terminal(self.stream) if bar is None else bar
        self._bar: Any = None
        self._epochs = 0

    def start(self, cfg: TrainConfig, device: torch.device | str, *, done_epochs: int = 0) -> None:
        """The first line: model and data (or the user's loop), OIALR or full rank, device, epochs."""
        self._epochs = cfg.schedule.epochs
        what = f"trainable {cfg.trainable}" if cfg.trainable else f"{cfg.model.name} on {cfg.data.name}"
        arm = "OIALR" if cfg.oialr.enabled else "full rank"
        resuming = f", resuming after epoch {done_epochs}" if done_epochs else ""
        epochs = f"{cfg.schedule.epochs} epoch" + ("s" if cfg.schedule.epochs != 1 else "")
        self._write(f"{PREFIX} {what} ({arm}) on {device}: {epochs}{resuming}")

    def begin_steps(self, total: int, done: int) -> None:
        """The built-in trainer knows its steps now (data loaded): open the bar, if there is one."""
        if self.bar and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False,
                             file=self.stream, desc=PREFIX)

    def step(self) -> None:
        """One optimizer step done."""
        if self._bar is not None:
            self._bar.update(1)

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """An epoch done: its line, or the bar's summary."""
        if self._bar is not None:
            self._bar.set_postfix_str(self._summary(metrics, short=True))
        else:
            self._write(f"{PREFIX} {self._summary(metrics)}")

    def close(self) -> None:
        """Remove the bar (the caller prints the run's result next)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _summary(self, metrics: dict[str, Any], *, short: bool = False) -> str:
        """``epoch 2/4: train_loss 0.3121 val_loss 0.2871 val_acc 0.9312 trainable 54.1% (1.3s)``."""
        parts = [f"epoch {metrics.get('epoch')}/{self._epochs}:"]
        shown = [k for k in metrics if k.startswith("val_")] if short else \
            ["train_loss", *(k for k in metrics if k.startswith("val_"))]
        parts += [f"{k} {_number(metrics.get(k))}" for k in shown]
        if isinstance(metrics.get("trainable_fraction"), (int, float)):
            parts.append(f"trainable {metrics['trainable_fraction']:.1%}")
        if metrics.get("status") == "diverged":
            parts.append("diverged")
        if not short and isinstance(metrics.get("train_time_s"), (int, float)):
            parts.append(f"({metrics['train_time_s']:.1f}s)")
        return " ".join(parts)

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _number(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
