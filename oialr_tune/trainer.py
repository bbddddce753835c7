"""One training run (OIALR or full rank) from a `TrainConfig`: the loop a Ray Tune trial calls.

Read `train` top to bottom: `_start` builds data, model, optimizer and OIALR controller (and restores
a checkpoint), `_run_epochs` runs each epoch's training steps, validation, metrics, checkpoint and
callbacks, `_result` scores the test split. It imports neither Ray nor Optuna; the tuning layer
plugs in through `Callback`, a person watching through `oialr_tune.progress.TrainProgress`.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oialr_tune.config import TrainConfig, resolve_device, train_config_to_dict
from oialr_tune.data import load_data
from oialr_tune.errors import UserError
from oialr_tune.files import write_atomic
from oialr_tune.lr_schedule import lr_at
from oialr_tune.model_io import TRAINER_CHECKPOINT_FORMAT
from oialr_tune.models import build_model
from oialr_tune.oialr import OIALR, RankEvent
from oialr_tune.splits import Loader, Splits
from oialr_tune.tasks import Task, task_for
from oialr_tune.tasks import autocast as _autocast

if TYPE_CHECKING:
    from oialr_tune.progress import TrainProgress

CHECKPOINT_NAME = "checkpoint.pt"


# --- plug-in point ------------------------------------------------------------------------------


class Callback:
    """Hooks the trainer calls; subclass and override what you need (all are no-ops here).

    The tuning layer's Ray callback forwards `on_epoch_end` to ``ray.tune.report``. A callback may
    raise to stop the run (the last checkpoint stays valid).
    """

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """After each epoch's validation, with that epoch's metrics (see `train`).

        `checkpoint_dir` is the folder holding ``checkpoint.pt`` if one was written for this epoch,
        else None. The file is replaced at the next checkpoint: copy it to keep it.
        """

    def on_train_end(self, result: TrainResult) -> None:
        """Once, when the run has finished or diverged (not when it was stopped by an exception)."""


@dataclass
class TrainResult:
    """What a run returns. `final` is the last epoch's metrics; test_* only with evaluate_test.

    `test_metrics` holds every test metric of the task (test_loss, test_acc or test_mae, user
    metrics); `test_loss` and `test_acc` repeat the first two for classification.
    """

    history: list[dict[str, Any]]
    final: dict[str, Any]
    test_loss: float | None
    test_acc: float | None
    status: str
    model: nn.Module
    controller: OIALR | None
    wall_time_s: float
    checkpoint_path: Path | None = field(default=None)
    test_metrics: dict[str, float] = field(default_factory=dict)
    # What the model was built for, (in_shape, num_outputs), so it can be saved and rebuilt;
    # None when a user's training loop built its model by itself.
    model_shapes: tuple[tuple[int, ...], int] | None = None


# --- evaluation ---------------------------------------------------------------------------------


def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             precision: str = "fp32") -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy of a classifier over `loader`.

    Runs in eval mode (restoring the model's previous mode) and reads the device once at the end.
    Other tasks: `oialr_tune.tasks.Task.evaluate`.
    """
    metrics = Task().evaluate(model, loader, precision=precision)
    return metrics["val_loss"], metrics["val_acc"]


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


def oialr_delay_steps(delay: int | float, total_steps: int) -> int:
    """`oialr.delay` in optimizer steps: a float < 1 is a fraction of the run, an int a step count."""
    steps = round(delay * total_steps) if isinstance(delay, float) else delay
    return max(1, int(steps))


def make_controller(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> OIALR | None:
    """The OIALR controller `cfg.oialr` describes for a run of `total_steps` steps; None when disabled."""
    o = cfg.oialr
    if not o.enabled:
        return None
    return OIALR(
        model, optimizer, delay=oialr_delay_steps(o.delay, total_steps),
        stability_frequency=o.stability_frequency, stability_threshold=o.stability_threshold,
        sigma_cutoff_fraction=o.sigma_cutoff_fraction, min_rank=o.min_rank,
        keep_first_layer=o.keep_first_layer, keep_last_layer=o.keep_last_layer,
        layer_step_fraction=o.layer_step_fraction, skip_ratio=o.skip_ratio, preset=o.preset,
    )


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` so that a reader (or a resume after a crash) sees the old or the new file, never half."""
    write_atomic(path, lambda f: torch.save(obj, f))


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (torch's state-dict errors span many lines)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `train` (tensors on the CPU). Raises UserError naming the path."""
    path = Path(path)
    try:
        # weights_only: our checkpoints hold only tensors and plain data, so refuse anything else.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise UserError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINER_CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by oialr-tune's trainer")
    return state


# --- checkpoints -------------------------------------------------------------------------------


def checkpoint_file(checkpoint_dir: str | Path | None) -> Path | None:
    """Where a run checkpointing into `checkpoint_dir` keeps its checkpoint (None: no checkpoints)."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None


def resume_state(path: Path | None, resume: bool) -> dict[str, Any] | None:
    """The checkpoint a run continues from: `path`'s when resuming and it exists, else None."""
    return read_checkpoint(path) if resume and path is not None and path.exists() else None


def checkpoint_due(cfg: TrainConfig, epoch: int, checkpoint_epochs: set[int]) -> bool:
    """Whether (1-based) `epoch` ends with a checkpoint: the last, every `checkpoint_every`-th, or a listed one."""
    every = cfg.checkpoint_every
    return bool(epoch >= cfg.schedule.epochs or (every and epoch % every == 0) or epoch in checkpoint_epochs)


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as a checkpoint `read_checkpoint` accepts (it adds the format), atomically."""
    _save_atomic({"format": TRAINER_CHECKPOINT_FORMAT, **payload}, path)


def existing(path: Path | None) -> Path | None:
    """`path` if that file exists (what a `TrainResult` reports as its checkpoint), else None."""
    return path if path is not None and path.exists() else None


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
    val_loader: Loader
    controller: OIALR | None
    scaler: torch.amp.GradScaler
    total_steps: int
    warmup_steps: int
    full_rank_params: int
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its torch.compile wrapper
    step: int = 0  # optimizer steps done
    start_epoch: int = 0  # epochs done before this process (a resumed run)
    history: list[dict[str, Any]] = field(default_factory=list)
    last_event: int | None = None  # the step of the last OIALR change of form (for the LR re-warm)
    status: str = "running"

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
           ckpt_path: Path | None) -> _Run:
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
    model = build_model(cfg.model.name, splits.in_shape, num_outputs, **cfg.model.args)
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg)
    batch_size = cfg.schedule.batch_size
    train_loader = splits.loader("train", batch_size, train=True, augment=cfg.data.augment, seed=cfg.seed,
                                 memory_format=memory_format)
    total_steps = cfg.schedule.epochs * len(train_loader)
    controller = make_controller(model, optimizer, cfg, total_steps)
    run = _Run(
        cfg=cfg, device=device, task=task_for(cfg), splits=splits, num_outputs=num_outputs,
        memory_format=memory_format, model=model, optimizer=optimizer, train_loader=train_loader,
        val_loader=splits.loader("val", 2 * batch_size, memory_format=memory_format), controller=controller,
        # One backward path for every precision: a disabled scaler passes the loss and step through.
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"), total_steps=total_steps,
        warmup_steps=round(cfg.schedule.warmup_fraction * total_steps),
        full_rank_params=controller.full_rank_parameters if controller else _count_trainable(model), forward=model,
    )  # fmt: skip
    if state is not None:
        _restore(run, state, ckpt_path)
    # torch.compile (GPU only) wraps the forward lazily; the controller keeps editing `model` itself.
    if cfg.compile and device.type == "cuda":
        run.forward = torch.compile(model)
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
        raise UserError(f"{ckpt_path}: checkpoint does not match this config ({_one_line(e)})") from None
    if run.history:
        run.status = run.history[-1]["status"]


def _checkpoint_payload(run: _Run, epoch: int) -> dict[str, Any]:
    """Everything `_restore` needs to continue `run` after (1-based) `epoch`, for `write_checkpoint`."""
    cuda = run.device.type == "cuda"
    return {
        "config": train_config_to_dict(run.cfg),
        "in_shape": list(run.splits.in_shape),
        "num_classes": run.num_outputs,  # the model's outputs (the key predates regression)
        "epoch": epoch,
        "step": run.step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "controller": run.controller.state_dict() if run.controller else None,
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(run.device) if cuda else None,
            "data": run.train_loader.generator.get_state(),
        },
        "history": run.history,
    }


def _optimizer_step(run: _Run, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One training step on the batch (x, y) at learning rate `lr`; returns the (undetached) loss."""
    cfg, optimizer, scaler = run.cfg, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = run.task.mix(x, y, run.step, run.num_outputs)  # mixup/cutmix when configured
    with _autocast(run.device, cfg.precision):
        loss = run.task.train_loss(run.forward(x), y)
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
    if events:
        run.last_event = run.controller.step_count
        if run.forward is not run.model:
            torch._dynamo.reset()  # recompile once for the new shapes, not per guard miss
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
        if run.step % nan_check_every == 0 and not torch.isfinite(loss_sum):
            run.status = "diverged"
            break
        events += _oialr_step(run)
    return _Steps((loss_sum / max(1, batches)).item(), lr, examples, events)


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
        val_metrics = run.task.evaluate(run.forward, run.val_loader, precision=run.cfg.precision)
        run.status = "finished" if epoch + 1 == run.cfg.schedule.epochs else "running"
    t_epoch = time.perf_counter() - t0
    c = run.controller
    trainable_now = c.trainable_parameters() if c else _count_trainable(run.model)
    return {
        "epoch": epoch + 1,
        "train_loss": steps.loss,
        **val_metrics,
        "lr": steps.lr,
        "trainable_params": trainable_now,
        "total_params": run.full_rank_params,
        "trainable_fraction": trainable_now / run.full_rank_params,
        "ranks": c.layer_ranks() if c else {},
        "dense_layers": c.dense_layers() if c else {},
        "examples_per_s": steps.examples / t_train if t_train > 0 else float("nan"),
        "train_time_s": t_epoch,
        "oialr_events": [asdict(e) for e in steps.events],
        "status": run.status,
    }


def _run_epochs(run: _Run, *, callbacks: Sequence[Callback], ckpt_path: Path | None, checkpoint_epochs: set[int],
                progress: TrainProgress | None) -> None:
    """The remaining epochs of `run`, each followed by its checkpoint (when due) and the callbacks."""
    for epoch in range(run.start_epoch, run.cfg.schedule.epochs):
        metrics = _train_epoch(run, epoch, progress)
        run.history.append(metrics)
        if progress is not None:
            progress.on_epoch_end(metrics, None)
        written = None
        if ckpt_path is not None and checkpoint_due(run.cfg, epoch + 1, checkpoint_epochs) \
                and run.status != "diverged":
            write_checkpoint(ckpt_path, _checkpoint_payload(run, epoch + 1))
            written = ckpt_path.parent
        for cb in callbacks:
            cb.on_epoch_end(metrics, written)
        if run.status == "diverged":
            break


def _result(run: _Run, *, evaluate_test: bool, ckpt_path: Path | None, wall_start: float) -> TrainResult:
    """The `TrainResult` of a run whose epochs are done; scores the test split if asked (and not diverged)."""
    test_metrics: dict[str, float] = {}
    if evaluate_test and run.status != "diverged":
        test_loader = run.splits.loader("test", 2 * run.cfg.schedule.batch_size, memory_format=run.memory_format)
        test_metrics = run.task.evaluate(run.forward, test_loader, precision=run.cfg.precision, prefix="test")
    return TrainResult(
        history=run.history, final=run.history[-1] if run.history else {}, test_loss=test_metrics.get("test_loss"),
        test_acc=test_metrics.get("test_acc"), test_metrics=test_metrics,
        model_shapes=(tuple(run.splits.in_shape), run.num_outputs), status=run.status, model=run.model,
        controller=run.controller, wall_time_s=time.perf_counter() - wall_start, checkpoint_path=existing(ckpt_path),
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
    device = resolve_device(cfg.device)
    ckpt_path = checkpoint_file(checkpoint_dir)
    state = resume_state(ckpt_path, resume)
    run = _start(cfg, device, splits, state, ckpt_path)
    try:
        if progress is not None:  # only now: bad input (data, checkpoint) stays a one-line error
            progress.start(cfg, device, done_epochs=state["epoch"] if state else 0)
            progress.begin_steps(run.total_steps, run.step)
        _run_epochs(run, callbacks=callbacks, ckpt_path=ckpt_path, checkpoint_epochs=set(checkpoint_epochs or ()),
                    progress=progress)
    finally:
        if progress is not None:
            progress.close()
    result = _result(run, evaluate_test=evaluate_test, ckpt_path=ckpt_path, wall_start=wall_start)
    for cb in callbacks:
        cb.on_train_end(result)
    return result


def _train_user_loop(cfg: TrainConfig, *, callbacks: Sequence[Callback], splits: Splits | None,
                     progress: TrainProgress | None, **kwargs: Any) -> TrainResult:
    """`train` for ``cfg.trainable``: the user's loop (see `oialr_tune.loop`), progress as one more callback."""
    from oialr_tune.loop import run_trainable

    if splits is not None:
        raise UserError("trainable: a user's training loop loads its own data; it cannot be given splits")
    if progress is None:
        return run_trainable(cfg, callbacks=callbacks, **kwargs)
    progress.start(cfg, resolve_device(cfg.device))
    try:
        return run_trainable(cfg, callbacks=[progress, *callbacks], **kwargs)
    finally:
        progress.close()
