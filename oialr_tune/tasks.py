"""What a run learns and how it is scored: the training loss and the evaluation metrics of a task.

* ``classification`` (default): cross-entropy (with the config's label smoothing in training,
  and soft targets when mixup/cutmix is on, `Task.mix`); metrics ``loss`` (plain cross-entropy)
  and ``acc``.
* ``regression``: mean squared error; metrics ``loss`` (MSE) and ``mae``. Targets may be scalars
  or vectors; they are compared in the model output's shape.
* A user's loss ``"module:fn"`` — ``fn(outputs, targets) -> scalar tensor`` — replaces the task's
  in training and is the reported ``loss``; user metrics ``{name: "module:fn"}`` —
  ``fn(outputs, targets) -> float`` on the whole split's outputs — are reported as ``val_<name>``
  (``test_<name>`` on the test split).

The names a config reports are `oialr_tune.metrics.reported_metrics`; the search space checks its
objective against them before a sweep starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oialr_tune import plugins
from oialr_tune.config import MixupConfig, TrainConfig
from oialr_tune.metrics import main_metric
from oialr_tune.precision import autocast


def _regression_targets(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Targets in the output's shape and dtype: (N,) scalar targets against (N, 1) outputs."""
    return y.to(out.dtype).reshape(out.shape)


@dataclass
class Task:
    """The loss and metrics of one run. Build it with :func:`task_for`."""

    kind: str = "classification"
    label_smoothing: float = 0.0
    loss_name: str | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    metric_fns: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = field(default_factory=dict)
    mixup: MixupConfig | None = None  # mixup/cutmix of training batches (None: off)
    seed: int = 0
    _mixer: Any = field(default=None, repr=False)  # timm's Mixup, built at the first batch

    @property
    def main_metric(self) -> str:
        """The task's own quality metric (without split prefix): ``acc`` or ``mae``."""
        return main_metric(self.kind)

    def train_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss minimised in training (mean over the batch).

        Classification takes class indices (smoothed by `label_smoothing`) or soft targets, rows of
        class probabilities (from mixup/cutmix, which already folded the smoothing in).
        """
        if self.loss_fn is not None:
            return self.loss_fn(out, y)
        if self.kind == "classification":
            smoothing = 0.0 if y.is_floating_point() else self.label_smoothing
            return F.cross_entropy(out, y, label_smoothing=smoothing)
        return F.mse_loss(out, _regression_targets(out, y))

    def mix(self, x: torch.Tensor, y: torch.Tensor, step: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix of training batch `step` by timm's `Mixup`: mixed inputs, soft targets.

        timm draws from NumPy's global generator; it is seeded from (seed, step) for this call and
        restored after, so a run stays deterministic and a resumed one mixes the same way. Without
        mixup, (x, y) unchanged.
        """
        if self.mixup is None or not self.mixup.enabled:
            return x, y
        if self._mixer is None:
            from timm.data import Mixup  # optional dependency, checked when the config was read

            m = self.mixup
            self._mixer = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                                switch_prob=m.switch_prob, mode="batch", label_smoothing=self.label_smoothing,
                                num_classes=num_classes)
        outer = np.random.get_state()
        np.random.seed([self.seed, step])
        try:
            return self._mixer(x, y)  # mixes x in place: a loader batch is a fresh tensor
        finally:
            np.random.set_state(outer)

    def _sums(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-batch sums of the loss and of the main metric (summed on the device, read once)."""
        out = out.float()
        if self.loss_fn is not None:
            loss = self.loss_fn(out, y).float() * len(y)
        elif self.kind == "classification":
            loss = F.cross_entropy(out, y, reduction="sum")
        else:
            loss = F.mse_loss(out, _regression_targets(out, y), reduction="sum") / out[0].numel()
        if self.kind == "classification":
            main = (out.argmax(dim=1) == y).sum()
        else:
            main = (out - _regression_targets(out, y)).abs().sum() / out[0].numel()
        return loss, main

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 precision: str = "fp32", prefix: str = "val",
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """``{prefix_loss, prefix_acc | prefix_mae, prefix_<user metric>...}`` of `model` over `loader`.

        Runs in eval mode (restoring the model's previous mode). Empty data gives NaN everywhere.
        `reduce` (data-parallel workers, each with a share of the split) sums the loss, metric and
        example count over the workers, so every worker returns the whole split's metrics; user
        metrics need the whole split's outputs, so a task with them must be given the whole split.
        """
        was_training = model.training
        model.eval()
        loss_sum = main_sum = None
        outputs, targets = [], []
        n = 0
        for x, y in loader:
            with autocast(x.device, precision):
                out = model(x)
            loss, main = self._sums(out, y)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            main_sum = main if main_sum is None else main_sum + main
            if self.metric_fns:
                outputs.append(out.float())
                targets.append(y)
            n += len(y)
        model.train(was_training)
        names = [f"{prefix}_loss", f"{prefix}_{self.main_metric}", *(f"{prefix}_{k}" for k in self.metric_fns)]
        if reduce is not None:
            device = next(model.parameters()).device  # NCCL reduces GPU tensors only
            sums = torch.tensor([float(loss_sum or 0.0), float(main_sum or 0.0), n], dtype=torch.float64)
            loss_sum, main_sum, total = reduce(sums.to(device)).tolist()
            n = int(total)
        if n == 0:
            return dict.fromkeys(names, float("nan"))
        result = {names[0]: float(loss_sum) / n, names[1]: float(main_sum) / n}
        if self.metric_fns:
            out_all, y_all = torch.cat(outputs), torch.cat(targets)
            for k, fn in self.metric_fns.items():
                value = plugins.call(fn, k, f"metrics.{k}", out_all, y_all)
                result[f"{prefix}_{k}"] = float(value)
        return result

    def worst(self, prefix: str = "val") -> dict[str, float]:
        """Metrics for a diverged run: the worst values, so searchers rank it last."""
        out = {f"{prefix}_loss": float("inf"), f"{prefix}_{self.main_metric}":
               0.0 if self.kind == "classification" else float("inf")}  # fmt: skip
        out.update({f"{prefix}_{k}": float("nan") for k in self.metric_fns})
        return out


def task_for(cfg: TrainConfig) -> Task:
    """The :class:`Task` a config describes, with its user loss and metrics resolved."""
    loss_fn = plugins.resolve(cfg.loss, "loss") if cfg.loss else None
    metric_fns = {k: plugins.resolve(v, f"metrics.{k}") for k, v in cfg.metrics.items()}
    return Task(cfg.task, cfg.label_smoothing, cfg.loss, loss_fn, metric_fns, cfg.mixup, cfg.seed)
