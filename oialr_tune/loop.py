"""Your own training loop under the tuner: ``trainable: "module:function"``, a function f(config, trial).

The function gets the trainer config with the searched values (`config`, a `TrainConfig`) and a
:class:`Trial`, and does everything else itself::

    def train(config, trial):
        model = trial.build_model(in_shape=(10,), num_outputs=1)      # or any nn.Module
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr)
        oialr = trial.oialr(model, optimizer, total_steps=config.schedule.epochs * steps_per_epoch)
        if trial.checkpoint:                                           # resuming: after trial.oialr
            model.load_state_dict(trial.checkpoint["model"]); optimizer.load_state_dict(...)
        for epoch in range(trial.start_epoch + 1, config.schedule.epochs + 1):
            ...; optimizer.step(); oialr.step()
            metrics = {"val_loss": ..., "val_acc": ...}
            if trial.evaluate_test and epoch == config.schedule.epochs:
                metrics.update(test_loss=..., test_acc=...)
            trial.report(epoch=epoch, checkpoint={"model": model.state_dict(), ...}, **metrics)

The loop's own settings are ``config.loop`` (``loop: {dropout: 0.1}`` in the config, searched as
``loop.dropout``): read them as ``config.loop["dropout"]``. A setting the loop has not read by its
first `trial.report` is warned about in one line (a misspelt or forgotten key would otherwise be
searched for nothing).

A run of one long epoch reports by optimizer step instead, ``trial.report(step=s, ...)``, every so
many steps up to ``config.schedule.steps`` (a sweep's ``budget.max_steps``; its ASHA rungs are then
steps); a resumed one continues after `trial.start_step`.

The first report must hold the metrics the sweep needs (its objective): otherwise one error names
the missing one and those that were reported, and the sweep stops at that first trial.

`trial.oialr` is the OIALR controller with the searched knobs, or (the full-rank baseline arm) a
:class:`~oialr_tune.oialr.FullRank`: the same attributes and methods, and it never changes the
model. `trial.report` adds what the tuner needs (trainable parameters and fraction, ranks, status),
saves the checkpoint with the controller's state when the sweep asks for one, and hands the epoch
to the sweep (Ray) or to retrain, exactly like the built-in trainer's epochs, so ASHA, the
baseline arm, best, retrain, report and compare work unchanged.

On several data-parallel workers (``resources.workers`` > 1, ``oialr-tune train --workers N``) every
worker runs the function; `trial.rank` and `trial.world_size` say which one it is, and::

    forward = trial.wrap(model)      # DDP, rebuilt by itself when OIALR replaces parameters: train through it
    loader = trial.loader(train_set, config.schedule.batch_size)     # this worker's share of each global batch
    val_part = trial.shard(val_set)                                  # this worker's part of a split
    loss_sum, correct, n = trial.sum(loss_sum, correct, n)           # totals over every worker
    trial.report(epoch=epoch, val_loss=loss_sum / n, val_acc=correct / n, ...)   # on every worker

Only rank 0 writes checkpoints; every rank resumes from them. A loop that never calls ``trial.wrap``
would train unsynchronized copies: a space that asks for several workers for it is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oialr_tune import distributed, plugins, run_record
from oialr_tune.config import TrainConfig, resolve_device
from oialr_tune.errors import LoopMistake, UserError
from oialr_tune.models import build_model
from oialr_tune.oialr import OIALR, FullRank
from oialr_tune.run_record import Callback
from oialr_tune.splits import GlobalBatchShard, contiguous_share


class _Stop(BaseException):
    """Raised by `Trial.report` to end a diverged run inside the user's loop.

    A BaseException, like GeneratorExit: the user's ``except Exception`` must not swallow it.
    """


class LoopSettings(Mapping[str, Any]):
    """``config.loop`` as the user's loop sees it: the settings, read like a dict, and which keys were read.

    Every way of reading a value (``[]``, ``get``, ``in``, ``items()``, ``**``) goes through
    ``__getitem__``, which records the key in `read`.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = dict(settings)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        value = self._settings[key]
        self.read.add(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return f"LoopSettings({self._settings!r})"


class Trial:
    """What a user's training loop gets besides its config (see the module docstring).

    Attributes:
        config: the trainer config with this trial's searched values; its ``loop`` is a `LoopSettings`.
        seed: the run's seed (torch's, numpy's and Python's global RNGs are seeded with it before
            the function is called).
        device: the torch device the run should use (``config.device`` resolved).
        evaluate_test: True in a retrain: report test_* metrics (e.g. test_loss, test_acc) at the
            last epoch; never used for tuning.
        checkpoint: what the last reported `checkpoint` was, when the run resumes; else None.
        start_epoch: the last epoch done before a resume (0 for a fresh run).
        start_step: the last step reported before a resume, for a loop that reports by step (else 0).
        rank / world_size: this worker and the number of data-parallel workers (0 and 1 on one process).
    """

    def __init__(self, cfg: TrainConfig, *, callbacks: Sequence[Callback], checkpoints: run_record.Checkpoints,
                 state: dict[str, Any] | None, evaluate_test: bool) -> None:
        self._cfg = cfg  # what checkpoints record: plain data
        self._loop = LoopSettings(cfg.loop)  # records which settings the loop reads
        self.config = dataclasses.replace(cfg, loop=self._loop)
        self.seed, self.evaluate_test = cfg.seed, evaluate_test
        self._workers = distributed.current()
        self.rank, self.world_size = (self._workers.rank, self._workers.world_size) if self._workers else (0, 1)
        self.device = distributed.local_device(resolve_device(cfg.device), self._workers)
        self.checkpoint = state["user"] if state else None
        self.start_epoch = state["epoch"] if state else 0
        self.start_step = (state.get("step") or 0) if state else 0
        self.history: list[dict[str, Any]] = state["history"] if state else []
        self.model: nn.Module | None = None
        self.model_shapes: tuple[tuple[int, ...], int] | None = None
        self.controller: OIALR | FullRank | None = None
        self.test_metrics: dict[str, float] = {}
        self._callbacks, self._checkpoints = callbacks, checkpoints
        self._controller_state = state["controller"] if state else None
        self._seen_events = 0
        self._last_at = (self.start_step if cfg.schedule.steps is not None else self.start_epoch)

    def build_model(self, in_shape: Iterable[int], num_outputs: int) -> nn.Module:
        """``config.model`` built for this data (from ``model.weights`` when given), on the run's device;
        retrain can then save and reload it as a model file (a model built otherwise is trained and
        tested but not saved)."""
        in_shape = tuple(int(d) for d in in_shape)
        model = build_model(self.config.model.name, in_shape, num_outputs, weights=self.config.model.weights,
                            **self.config.model.args)
        self.model_shapes = (in_shape, int(num_outputs))
        return model.to(self.device)

    def oialr(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int | None = None
              ) -> OIALR | FullRank:
        """The controller for `model` and `optimizer`: call ``.step()`` after each ``optimizer.step()``.

        `total_steps` (all optimizer steps of the run) is needed when ``oialr.delay`` is a fraction.
        On a resume the low-rank structure of the checkpoint is restored here: load the model's
        and optimizer's state after this call.
        """
        self.model = model
        delay = self.config.oialr.delay
        if self.config.oialr.enabled and isinstance(delay, float) and total_steps is None:
            raise UserError(f"trainable: oialr.delay {delay} is a fraction of the run: call trial.oialr(model, "
                            f"optimizer, total_steps=...)")  # fmt: skip
        controller = run_record.make_controller(model, optimizer, self.config.oialr, total_steps or 1)
        controller = controller or FullRank(model, optimizer)
        if self._controller_state is not None:
            controller.load_state_dict(self._controller_state)
            self._seen_events = len(controller.history)
        self.controller = controller
        return controller

    def attach(self, model: nn.Module, controller: OIALR | FullRank) -> None:
        """Report for a controller built and restored elsewhere, instead of one from `oialr`: the
        Lightning callback (`oialr_tune.lightning.OIALRCallback`) builds its own and resumes it from
        Lightning's checkpoint. Its rank events so far count as reported."""
        self.model, self.controller = model, controller
        self._seen_events = len(controller.history)

    def checkpoint_due(self, epoch: int) -> bool:
        """Whether `report` keeps the checkpoint of (1-based) `epoch`: build a costly one only then."""
        return self._checkpoints.due(epoch)

    def wrap(self, model: nn.Module) -> nn.Module:
        """What to train `model` through: itself on one process, else DDP that follows OIALR's changes."""
        return model if self._workers is None else _FollowingDDP(model, self)

    def loader(self, dataset: torch.utils.data.Dataset, batch_size: int, **kwargs: Any) -> torch.utils.data.DataLoader:
        """Shuffled batches of `dataset` for training: `batch_size` is the global batch, each worker gets its
        share of every one (a new order each pass, the same on every worker; a last short batch is dropped).
        `kwargs` go to the DataLoader."""
        g = torch.Generator().manual_seed(self.seed)
        shard = distributed.batch_shard(self._workers, batch_size)  # (0, 1) on one process: the same order
        sampler = GlobalBatchShard(len(dataset), batch_size, shard, g)  # type: ignore[arg-type]
        return torch.utils.data.DataLoader(dataset, batch_size // self.world_size, sampler=sampler, generator=g,
                                           **kwargs)

    def shard(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """This worker's contiguous part of `dataset` (an evaluation split); all of it on one process."""
        if self._workers is None:
            return dataset
        part = contiguous_share(len(dataset), self.rank, self.world_size)  # type: ignore[arg-type]
        return torch.utils.data.Subset(dataset, range(part.start, part.stop))

    def sum(self, *values: float | torch.Tensor) -> tuple[float, ...]:
        """Each value summed over the workers (e.g. loss sums, correct counts, example counts)."""
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return tuple(distributed.sum_over_workers(total).tolist())

    def rng_state(self, *generators: torch.Generator) -> dict[str, Any]:
        """Every random state the loop draws from, to put in its checkpoint: torch's (CPU and CUDA),
        numpy's global, Python's ``random``, and each of `generators` (a ``DataLoader``'s shuffling
        generator holds its data order). `restore_rng_state` puts them back on a resume, so the
        resumed trial continues the same random sequence and the same data order.
        """
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(),
                "python": random.getstate(), "generators": [g.get_state() for g in generators]}  # fmt: skip

    def restore_rng_state(self, state: dict[str, Any], *generators: torch.Generator) -> None:
        """Put back what `rng_state` saved (the same `generators`, in the same order). Call it on a
        resume after everything random before the first epoch (the model's initialisation)."""
        if len(generators) != len(state["generators"]):
            raise UserError(f"trainable: restore_rng_state got {len(generators)} generator(s); the checkpoint "
                            f"holds {len(state['generators'])}")  # fmt: skip
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        for g, g_state in zip(generators, state["generators"], strict=True):
            g.set_state(g_state)

    def report(self, *, epoch: int | None = None, step: int | None = None, checkpoint: Any = None,
               **metrics: float) -> None:
        """End of an epoch (1-based `epoch`), or, in a run reported by optimizer step, after `step`
        (``config.schedule.steps`` set; `epoch` then defaults to the number of reports): its metrics
        (val_* for tuning, test_* in a retrain) and state.

        `checkpoint` is tensors and plain data (state dicts, numbers), numpy arrays and RNG states
        (`rng_state`); it is kept when the sweep checkpoints this report and given back as
        `Trial.checkpoint` on a resume (read with an allow-list, see `oialr_tune.safe_load`).
        """
        if self.controller is None:
            raise UserError("trainable: call trial.oialr(model, optimizer) before trial.report(...)")
        at, last = self._position(epoch, step)
        if epoch is None:
            epoch = len(self.history) + 1
        self.test_metrics.update({k: float(v) for k, v in metrics.items() if k.startswith("test_")})
        values = {k: float(v) for k, v in metrics.items() if not k.startswith("test_")}
        warning = self._first_report_checks(values) if not self.history else None
        diverged = any(not math.isfinite(v) for k, v in values.items() if k.endswith("loss"))
        status = "diverged" if diverged else "finished" if last else "running"
        c = self.controller
        events = c.history[self._seen_events:]
        self._seen_events += len(events)
        train_loss = values.pop("train_loss", float("nan"))
        if step is not None:
            values["step"] = step  # what ASHA places this report by (`oialr_tune.tuning.search.scheduler`)
        row = run_record.epoch_row(epoch, train_loss=train_loss, metrics=values, controller=c, events=events,
                                   status=status)
        if warning is not None:
            row["warning"] = warning  # the sweep's driver prints it (`oialr_tune.tuning.hooks`)
        self.history.append(row)
        previous, self._last_at = self._last_at, at
        main = self._workers is None or self._workers.main  # rank 0 writes; every rank reports
        written = None if diverged or not main else self._checkpoints.save(at, lambda: run_record.checkpoint_payload(
            self._cfg, epoch=epoch, history=self.history, controller=c.state_dict(), user=checkpoint, step=step,
        ), since=previous)  # fmt: skip
        for cb in self._callbacks:
            cb.on_epoch_end(row, written)
        if diverged:
            raise _Stop

    def _position(self, epoch: int | None, step: int | None) -> tuple[int, bool]:
        """Where a report stands in the run (its epoch, or its step when the run counts steps) and
        whether it is the last one; a report of the other kind is a `LoopMistake`."""
        steps = self._cfg.schedule.steps
        if steps is None:
            if epoch is None or step is not None:
                raise LoopMistake(f"trainable: {self._cfg.trainable} reports by epoch: trial.report(epoch=...); "
                                  f"trial.report(step=...) needs schedule.steps (budget.max_steps in a sweep)")
            return epoch, epoch >= self._cfg.schedule.epochs
        if step is None:
            raise LoopMistake(f"trainable: schedule.steps is {steps} (budget.max_steps): {self._cfg.trainable} "
                              f"must report by optimizer step, trial.report(step=...)")  # fmt: skip
        return step, step >= steps

    def _first_report_checks(self, values: Mapping[str, float]) -> str | None:
        """At the first report: the metrics the callbacks need are there (else a `LoopMistake` naming
        them), and a loop setting never read yet is warned about: the one-line warning, or None."""
        needed = dict.fromkeys(m for cb in self._callbacks for m in cb.required_metrics)
        missing = [m for m in needed if m not in values]
        if missing:
            reported = ", ".join(sorted(k for k in values if k != "train_loss")) or "none"
            raise LoopMistake(f"trainable: {self._cfg.trainable} reported no {', '.join(missing)}, which the "
                              f"sweep's objective needs (objective.metric); it reported: {reported}")  # fmt: skip
        unread = [k for k in self._loop if k not in self._loop.read]
        if not unread:
            return None
        message = (f"{', '.join(f'loop.{k}' for k in unread)}: set but never read by {self._cfg.trainable} "
                   f"before its first trial.report (read as config.loop[{unread[0]!r}])")
        warnings.warn(message, UserWarning, stacklevel=3)
        return message


class _FollowingDDP(nn.Module):
    """DDP around a user's model that rebuilds itself when the trial's OIALR controller replaced parameters."""

    def __init__(self, model: nn.Module, trial: Trial) -> None:
        super().__init__()
        self.module = model
        # Plain attributes, not submodules: the model's state dict stays the user's model's.
        object.__setattr__(self, "_trial", trial)
        object.__setattr__(self, "_ddp", None)
        object.__setattr__(self, "_version", -1)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        c = self._trial.controller
        version = c.parameters_version if isinstance(c, OIALR) else 0
        if version != self._version or self._ddp is None:
            object.__setattr__(self, "_version", version)
            object.__setattr__(self, "_ddp", distributed.wrap(self.module, self._trial.device))
        return self._ddp(*args, **kwargs)


def run_trainable(cfg: TrainConfig, *, callbacks: Sequence[Callback] = (), checkpoint_dir: str | Path | None = None,
                  resume: bool = True, evaluate_test: bool = False,
                  checkpoint_epochs: Iterable[int] | None = None) -> run_record.TrainResult:
    """Run ``cfg.trainable`` as one training run; the trainer's `train` calls this for such configs."""
    wall_start = time.perf_counter()
    fn = plugins.resolve(cfg.trainable, "trainable")
    checkpoints = run_record.Checkpoints.of(cfg, checkpoint_dir, checkpoint_epochs)
    state = checkpoints.resume_state(resume)
    if state is not None and "user" not in state:
        raise UserError(f"{checkpoints.path}: a checkpoint of the built-in trainer, not of trainable {cfg.trainable}")
    torch.manual_seed(cfg.seed)  # and numpy's and Python's: a fresh run draws the same numbers every time
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    trial = Trial(cfg, callbacks=callbacks, checkpoints=checkpoints, state=state, evaluate_test=evaluate_test)
    with contextlib.suppress(_Stop):
        plugins.call(fn, cfg.trainable, "trainable", trial.config, trial)
    if not trial.history:
        raise LoopMistake(f"trainable: {cfg.trainable} returned without calling trial.report(...)")
    result = run_record.TrainResult.of(
        trial.history, test_metrics=trial.test_metrics, status=trial.history[-1]["status"], model=trial.model,
        controller=trial.controller if isinstance(trial.controller, OIALR) else None,
        wall_time_s=time.perf_counter() - wall_start, checkpoint_path=checkpoints.written(),
        model_shapes=trial.model_shapes,
    )  # fmt: skip
    for cb in callbacks:
        cb.on_train_end(result)
    return result
