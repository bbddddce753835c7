"""One training run (OIALR or full rank) from a `TrainConfig`: the loop a Ray Tune trial calls.

Read `train` top to bottom: `_start` builds data, model, optimizer and OIALR controller (and restores
a checkpoint), `_run_epochs` runs each epoch's training steps, validation, metrics, checkpoint and
callbacks, `_result` scores the test split. It imports neither Ray nor Optuna; the tuning layer
plugs in through `oialr_tune.run_record.Callback` (the run record also holds the metrics row,
the checkpoint format and `TrainResult`), a person watching through `oialr_tune.progress.TrainProgress`.

Guarantees the tuning layer relies on:

* **Deterministic**: the same config and seed give the same metrics (bit-identical on CPU).
* **Resumable**: a checkpoint holds model, optimizer, OIALR controller, GradScaler, RNG states
  (including the data order generator), step, epoch and history; a run stopped after epoch k and
  resumed gives the same metrics as one that was never stopped.
* **Cheap per step**: the loss is summed on the device and read once per epoch; the learning rate
  is a pure function of the step (`oialr_tune.lr_schedule.lr_at`), so there is no scheduler state
  to save.
* **Never raises for a diverged run**: a non-finite loss ends it with ``status="diverged"``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oialr_tune import distributed
from oialr_tune.config import TrainConfig, resolve_device
from oialr_tune.data import load_data
from oialr_tune.errors import UserError, one_line
from oialr_tune.loop import run_trainable
from oialr_tune.lr_schedule import lr_at
from oialr_tune.models import build_model
from oialr_tune.oialr import OIALR, FullRank, RankEvent
from oialr_tune.precision import autocast, grad_scaler
from oialr_tune.run_record import (
    Callback,
    Checkpoints,
    TrainResult,
    checkpoint_payload,
    epoch_row,
    make_controller,
)
from oialr_tune.splits import Loader, Splits
from oialr_tune.tasks import Task, task_for

if TYPE_CHECKING:
    from oialr_tune.progress import TrainProgress



# --- building blocks ----------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on matrices and kernels only (not biases or norm scales), or with
    ``optimizer.weight_decay_on: all`` on every parameter in one group (the authors' recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer
    if o.weight_decay_on == "all":
        groups = [{"params": params, "weight_decay": o.weight_decay}]
    else:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def trained_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors being trained now: the optimizer's, which the OIALR controller keeps current.

    Read it where it is used (e.g. for gradient clipping), not once: every OIALR check replaces
    each low-rank layer's S with a new Parameter, cut or not.
    """
    return [p for group in optimizer.param_groups for p in group["params"]]


# --- one run, piece by piece ----------------------------------------------------------------------


@dataclass
class _Run:
    """A built-in training run in progress: built by `_start`, advanced epoch by epoch by `_train_epoch`."""

    cfg: TrainConfig
    device: torch.device
    task: Task
    splits: Splits
    num_outputs: int
    memory_format: torch.memory_format
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: Loader
    controller: OIALR | None
    scaler: torch.amp.GradScaler
    total_steps: int
    warmup_steps: int
    meter: OIALR | FullRank  # what the metrics rows read parameter counts and ranks from
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its torch.compile wrapper
    workers: distributed.Workers | None = None  # one of several data-parallel workers (see `distributed`)
    train_forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # under DDP: the DDP wrapper
    wrapped_version: int = -1  # the controller's parameters_version the DDP wrapper was built for
    eval_shard: tuple[int, int] = (0, 1)  # (rank, workers): this worker's share of an evaluation split
    step: int = 0  # optimizer steps done
    start_epoch: int = 0  # epochs done before this process (a resumed run)
    history: list[dict[str, Any]] = field(default_factory=list)
    last_event: int | None = None  # the step of the last OIALR change of form (for the LR re-warm)
    status: str = "running"

    def wrap(self) -> None:
        """Under DDP: (re)build the wrapper the training steps run through, if the model's parameters changed."""
        version = self.controller.parameters_version if self.controller else 0
        if self.workers is not None and version != self.wrapped_version:
            self.wrapped_version = version
            ddp = distributed.wrap(self.model, self.device)
            self.train_forward = torch.compile(ddp) if self.forward is not self.model else ddp

    def evaluate(self, split: str) -> dict[str, float]:
        """The task's metrics of the model on `split` (all of it, also when this worker scored a share)."""
        loader = self.splits.loader(split, 2 * self.cfg.schedule.batch_size, memory_format=self.memory_format,
                                    shard=self.eval_shard)
        reduce = distributed.sum_over_workers if self.eval_shard[1] > 1 else None
        return self.task.evaluate(self.forward, loader, precision=self.cfg.precision, prefix=split, reduce=reduce)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (see `lr_at`)."""
        sch = self.cfg.schedule
        timm_shape = {k: getattr(sch, k) for k in ("warmup_lr_fraction", "k_decay", "cycles", "cycle_mul",
                                                   "cycle_decay")} if sch.decay == "timm_cosine" else {}
        return lr_at(step, self.total_steps, base_lr=self.cfg.optimizer.lr, warmup_steps=self.warmup_steps,
                     decay=sch.decay, min_lr_fraction=sch.min_lr_fraction, last_event_step=self.last_event,
                     rewarm_steps=sch.rewarm_steps, rewarm_start=sch.rewarm_start, **timm_shape)


@dataclass
class _Steps:
    """What one epoch's training steps leave: mean loss, last learning rate, examples seen, OIALR events."""

    loss: float
    lr: float
    examples: int
    events: list[RankEvent]


def _set_backends(device: torch.device) -> None:
    """On a GPU: cuDNN autotuning and TF32 matmuls."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def _start(cfg: TrainConfig, device: torch.device, splits: Splits | None, state: dict[str, Any] | None,
           checkpoints: Checkpoints, workers: distributed.Workers | None = None) -> _Run:
    """Data, model, optimizer, loaders, OIALR controller and GradScaler; continued from `state` if given.

    The model is initialised from the seed right before it is built, so a cached dataset (or none)
    leaves the initial weights the same.
    """
    _set_backends(device)
    if splits is None:
        splits = load_data(cfg.data, device)
    channels_last = cfg.channels_last and len(splits.in_shape) == 3
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)
    num_outputs = splits.num_outputs(cfg.task)
    model = build_model(cfg.model.name, splits.in_shape, num_outputs, weights=cfg.model.weights, **cfg.model.args)
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg)
    batch_size = cfg.schedule.batch_size
    shard = distributed.batch_shard(workers, batch_size)
    train_loader = splits.loader("train", batch_size, train=True, augment=cfg.data.augment, seed=cfg.seed,
                                 memory_format=memory_format, shard=shard)
    total_steps = cfg.schedule.epochs * len(train_loader)
    controller = make_controller(model, optimizer, cfg.oialr, total_steps)
    task = task_for(cfg)
    run = _Run(
        cfg=cfg, device=device, task=task, splits=splits, num_outputs=num_outputs, workers=workers,
        eval_shard=(0, 1) if task.metric_fns else shard,  # user metrics: every output on every worker
        memory_format=memory_format, model=model, optimizer=optimizer, train_loader=train_loader, controller=controller,
        scaler=grad_scaler(device, cfg.precision), total_steps=total_steps,
        warmup_steps=round(cfg.schedule.warmup_fraction * total_steps),
        meter=controller or FullRank(model), forward=model,
    )  # fmt: skip
    if state is not None:
        _restore(run, state, checkpoints.path)
    # torch.compile (GPU only) wraps the forward lazily; the controller keeps editing `model` itself.
    if cfg.compile and device.type == "cuda":
        run.forward = torch.compile(model)
    run.wrap()
    return run


def _restore(run: _Run, state: dict[str, Any], ckpt_path: Path | None) -> None:
    """Continue `run` exactly where the checkpoint `state` left it (weights, optimizer, OIALR, RNGs, history)."""
    try:
        # Order matters: the controller rebuilds low-rank layers (shapes) and swaps them into the
        # optimizer; then weights and optimizer state fill them in.
        if run.controller is not None:
            run.controller.load_state_dict(state["controller"])
            run.last_event = max((e.step for e in run.controller.history), default=None)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scaler.is_enabled() and state["scaler"] is not None:
            run.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if run.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
        run.train_loader.generator.set_state(state["rng"]["data"])
        run.step, run.start_epoch, run.history = state["step"], state["epoch"], state["history"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{ckpt_path}: checkpoint does not match this config ({one_line(e)})") from None
    if run.history:
        run.status = run.history[-1]["status"]


def _checkpoint_payload(run: _Run, epoch: int) -> dict[str, Any]:
    """Everything `_restore` needs to continue `run` after (1-based) `epoch`, for `write_checkpoint`."""
    cuda = run.device.type == "cuda"
    return checkpoint_payload(
        run.cfg, epoch=epoch, history=run.history,
        controller=run.controller.state_dict() if run.controller else None,
        in_shape=list(run.splits.in_shape),
        num_classes=run.num_outputs,  # the model's outputs (the key predates regression)
        step=run.step,
        model=run.model.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        rng={
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(run.device) if cuda else None,
            "data": run.train_loader.generator.get_state(),
        },
    )  # fmt: skip


def _optimizer_step(run: _Run, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One training step on the batch (x, y) at learning rate `lr`; returns the (undetached) loss."""
    cfg, optimizer, scaler = run.cfg, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = run.task.mix(x, y, run.step, run.num_outputs)  # mixup/cutmix when configured
    with autocast(run.device, cfg.precision):
        loss = run.task.train_loss((run.train_forward or run.forward)(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(trained_parameters(optimizer), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss


def _oialr_step(run: _Run) -> list[RankEvent]:
    """Let the OIALR controller act after a step; returns its rank events (factorizations, cuts)."""
    if run.controller is None:
        return []
    events = run.controller.step()
    run.wrap()  # DDP's reducer holds the parameters it was built with; a check replaces them
    if events:
        run.last_event = run.controller.step_count
        if run.forward is not run.model:
            torch.compiler.reset()  # recompile once for the new shapes, not per guard miss
    return events


def _train_steps(run: _Run, progress: TrainProgress | None) -> _Steps:
    """One pass over the training data; stops early (status "diverged") at a non-finite loss.

    The loss is summed on the device; a non-finite check reads it: free on the CPU, so every step
    there, every 32 steps on a GPU.
    """
    nan_check_every = 1 if run.device.type == "cpu" else 32
    loss_sum = torch.zeros((), device=run.device)
    batches, examples, events, lr = 0, 0, [], run.lr(run.step)
    for x, y in run.train_loader:
        lr = run.lr(run.step)
        loss = _optimizer_step(run, x, y, lr)
        run.step += 1
        loss_sum += loss.detach()
        batches += 1
        examples += len(y)
        if progress is not None:
            progress.step()
        if run.step % nan_check_every == 0 and not torch.isfinite(distributed.sum_over_workers(loss_sum)):
            run.status = "diverged"  # on every worker at the same step: they stop together
            break
        events += _oialr_step(run)
    world = run.workers.world_size if run.workers else 1
    mean_loss = distributed.sum_over_workers(loss_sum) / (world * max(1, batches))
    return _Steps(mean_loss.item(), lr, examples * world, events)


def _train_epoch(run: _Run, epoch: int, progress: TrainProgress | None) -> dict[str, Any]:
    """Epoch `epoch` (0-based): training steps, then validation; returns its metrics row (see `train`)."""
    run.model.train()
    t0 = time.perf_counter()
    steps = _train_steps(run, progress)
    t_train = time.perf_counter() - t0
    if run.status != "diverged" and not math.isfinite(steps.loss):
        run.status = "diverged"
    if run.status == "diverged":
        # No validation of a broken model: report the worst values so searchers rank it last.
        val_metrics = run.task.worst()
    else:
        val_metrics = run.evaluate("val")
        run.status = "finished" if epoch + 1 == run.cfg.schedule.epochs else "running"
    t_epoch = time.perf_counter() - t0
    return epoch_row(
        epoch + 1, train_loss=steps.loss, metrics={**val_metrics, "lr": steps.lr}, controller=run.meter,
        events=steps.events, status=run.status,
        timing={"examples_per_s": steps.examples / t_train if t_train > 0 else float("nan"), "train_time_s": t_epoch},
    )  # fmt: skip


def _run_epochs(run: _Run, *, callbacks: Sequence[Callback], checkpoints: Checkpoints,
                progress: TrainProgress | None) -> None:
    """The remaining epochs of `run`, each followed by its checkpoint (when due) and the callbacks."""
    for epoch in range(run.start_epoch, run.cfg.schedule.epochs):
        metrics = _train_epoch(run, epoch, progress)
        run.history.append(metrics)
        if progress is not None:
            progress.on_epoch_end(metrics, None)
        # A diverged run keeps its last good checkpoint; of several workers, rank 0 writes.
        skip = run.status == "diverged" or (run.workers is not None and not run.workers.main)
        written = None if skip else checkpoints.save(epoch + 1, partial(_checkpoint_payload, run, epoch + 1))
        for cb in callbacks:
            cb.on_epoch_end(metrics, written)
        if run.status == "diverged":
            break


def _result(run: _Run, *, evaluate_test: bool, checkpoints: Checkpoints, wall_start: float) -> TrainResult:
    """The `TrainResult` of a run whose epochs are done; scores the test split if asked (and not diverged)."""
    test_metrics: dict[str, float] = {}
    if evaluate_test and run.status != "diverged":
        test_metrics = run.evaluate("test")
    return TrainResult.of(
        run.history, test_metrics=test_metrics, model_shapes=(tuple(run.splits.in_shape), run.num_outputs),
        status=run.status, model=run.model, controller=run.controller,
        wall_time_s=time.perf_counter() - wall_start, checkpoint_path=checkpoints.written(),
    )  # fmt: skip


# --- the loop -----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    evaluate_test: bool = False,
    checkpoint_epochs: Iterable[int] | None = None,
    splits: Splits | None = None,
    progress: TrainProgress | None = None,
) -> TrainResult:
    """Train one model as `cfg` says; report each epoch to `callbacks`; return a `TrainResult`.

    Per-epoch metrics: epoch (1-based), train_loss, the task's validation metrics (val_loss and
    val_acc for classification, val_mae for regression, val_<name> for user metrics), lr (last step's),
    trainable_params, total_params (trainable parameters at full rank), trainable_fraction,
    ranks (OIALR layer → rank; {} for full rank), dense_layers (weight layers OIALR leaves dense → why),
    examples_per_s (training steps only),
    train_time_s (training steps + validation of this epoch, excluding checkpoint and callbacks),
    oialr_events (this epoch's rank events as dicts), status ("running", "finished", "diverged").

    With `checkpoint_dir`, ``checkpoint.pt`` is written atomically every `checkpoint_every` epochs,
    at the (1-based) epochs in `checkpoint_epochs` and after the last epoch; with `resume` an
    existing one is continued exactly. `evaluate_test` scores the final model on the test split
    (never used for tuning). `splits` replaces the data `cfg.data` describes (e.g. train + val merged
    for a final retrain); it must be on the run's device. `progress` (opt-in; the CLI's ``train``
    passes one) shows a person the run on the console; without it the run prints nothing.
    """
    if cfg.trainable is not None:  # the user's own loop, with the same callbacks and checkpoints
        return _train_user_loop(cfg, callbacks=callbacks, checkpoint_dir=checkpoint_dir, resume=resume,
                                evaluate_test=evaluate_test, checkpoint_epochs=checkpoint_epochs, splits=splits,
                                progress=progress)  # fmt: skip
    wall_start = time.perf_counter()
    workers = distributed.current()
    device = distributed.local_device(resolve_device(cfg.device), workers)
    checkpoints = Checkpoints.of(cfg, checkpoint_dir, checkpoint_epochs)
    state = checkpoints.resume_state(resume)
    run = _start(cfg, device, splits, state, checkpoints, workers)
    try:
        if progress is not None:  # only now: bad input (data, checkpoint) stays a one-line error
            progress.start(cfg, device, done_epochs=state["epoch"] if state else 0,
                           workers=workers.world_size if workers else 1)
            progress.begin_steps(run.total_steps, run.step)
        _run_epochs(run, callbacks=callbacks, checkpoints=checkpoints, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    result = _result(run, evaluate_test=evaluate_test, checkpoints=checkpoints, wall_start=wall_start)
    for cb in callbacks:
        cb.on_train_end(result)
    return result


def _train_user_loop(cfg: TrainConfig, *, callbacks: Sequence[Callback], splits: Splits | None,
                     progress: TrainProgress | None, **kwargs: Any) -> TrainResult:
    """`train` for ``cfg.trainable``: the user's loop (see `oialr_tune.loop`), progress as one more callback."""
    if splits is not None:
        raise UserError("trainable: a user's training loop loads its own data; it cannot be given splits")
    if progress is None:
        return run_trainable(cfg, callbacks=callbacks, **kwargs)
    progress.start(cfg, resolve_device(cfg.device))
    try:
        return run_trainable(cfg, callbacks=[progress, *callbacks], **kwargs)
    finally:
        progress.close()
