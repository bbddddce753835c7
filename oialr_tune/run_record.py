"""The run record: what one training run reports, whoever runs its loop.

The built-in trainer (`oialr_tune.trainer`), a user's own loop (`oialr_tune.loop`) and the Lightning
callback (`oialr_tune.lightning`) sit above this module; the tuning layer, retrain, compare and
report read the one shape it defines:

* `Callback`: the hooks a run calls after each epoch and at its end (the tuning layer's Ray
  callback and the console progress are callbacks);
* `epoch_row`: an epoch's metrics row (the keys are listed in `oialr_tune.trainer.train`);
* `TrainResult`: what a run returns;
* the checkpoint format (`checkpoint_payload`, `write_checkpoint`, `read_checkpoint`): one
  ``checkpoint.pt`` per run folder, a ``torch.save`` of plain data with the keys `format`, `config`,
  `epoch`, `history` and `controller` (the OIALR controller's state, or None), plus the loop's own
  state: the trainer's model, optimizer, scaler, step and RNGs, a user loop's ``user`` data;
* `make_controller`: the OIALR controller from its settings, with a delay given as a fraction
  of the run converted to steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oialr_tune import safe_load
from oialr_tune.config import train_config_to_dict
from oialr_tune.errors import UserError
from oialr_tune.files import write_atomic
from oialr_tune.oialr import OIALR, FullRank, RankEvent
from oialr_tune.sweep_state import CHECKPOINT_FILE

if TYPE_CHECKING:
    from oialr_tune.config import OIALRConfig, TrainConfig

# Written into every checkpoint; `read_checkpoint` and `oialr_tune.model_io` accept only this one.
CHECKPOINT_FORMAT = 1


# --- plug-in point ------------------------------------------------------------------------------


class Callback:
    """Hooks a training run calls; subclass and override what you need (all are no-ops here).

    The tuning layer's Ray callback forwards `on_epoch_end` to ``ray.tune.report``. A callback may
    raise to stop the run (the last checkpoint stays valid).

    `required_metrics` are the metric names the callback needs in every row (a sweep's objective):
    a user's loop whose first report lacks one is stopped with an error naming it (`oialr_tune.loop`).
    """

    required_metrics: tuple[str, ...] = ()

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """After each epoch's validation, with that epoch's metrics row (see `epoch_row`).

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
    model: nn.Module | None
    controller: OIALR | None
    wall_time_s: float
    checkpoint_path: Path | None = field(default=None)
    test_metrics: dict[str, float] = field(default_factory=dict)
    # What the model was built for, (in_shape, num_outputs), so it can be saved and rebuilt;
    # None when a user's training loop built its model by itself.
    model_shapes: tuple[tuple[int, ...], int] | None = None

    @classmethod
    def of(cls, history: list[dict[str, Any]], *, test_metrics: dict[str, float], **fields: Any) -> TrainResult:
        """The result of a run with this `history` and these test metrics (its status is the last epoch's)."""
        final = history[-1] if history else {}
        return cls(history=history, final=final, test_loss=test_metrics.get("test_loss"),
                   test_acc=test_metrics.get("test_acc"), test_metrics=test_metrics, **fields)


# --- an epoch's metrics row ---------------------------------------------------------------------


def epoch_row(epoch: int, *, train_loss: float, metrics: Mapping[str, Any], controller: OIALR | FullRank,
              events: Iterable[RankEvent], status: str, timing: Mapping[str, float] | None = None
              ) -> dict[str, Any]:
    """The metrics row of (1-based) `epoch`: what `Callback.on_epoch_end` gets and the history holds.

    `metrics` are the loop's own (validation metrics, lr); the parameter counts, ranks and dense
    layers are read from `controller` now; `events` are this epoch's rank events; `timing` the
    loop's examples_per_s and train_time_s when it measures them.
    """
    trainable = controller.trainable_parameters()
    return {
        "epoch": epoch, "train_loss": train_loss, **metrics,
        "trainable_params": trainable, "total_params": controller.full_rank_parameters,
        "trainable_fraction": trainable / controller.full_rank_parameters,
        "ranks": controller.layer_ranks(), "dense_layers": controller.dense_layers(), **(timing or {}),
        "oialr_events": [asdict(e) for e in events], "status": status,
    }  # fmt: skip


# --- the OIALR controller -----------------------------------------------------------------------


def oialr_delay_steps(delay: int | float, total_steps: int) -> int:
    """`oialr.delay` in optimizer steps: a float < 1 is a fraction of the run, an int a step count."""
    steps = round(delay * total_steps) if isinstance(delay, float) else delay
    return max(1, int(steps))


def make_controller(model: nn.Module, optimizer: torch.optim.Optimizer, settings: OIALRConfig | Mapping[str, Any],
                    total_steps: int) -> OIALR | None:
    """The OIALR controller `settings` describe for a run of `total_steps` optimizer steps.

    `settings` is the config's `oialr` section or the constructor's keyword arguments; its `delay`
    may be a fraction of the run. None when the settings say ``enabled: false``.
    """
    knobs = dict(dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings)
    if not knobs.pop("enabled", True):
        return None
    knobs["delay"] = oialr_delay_steps(knobs["delay"], total_steps)
    return OIALR(model, optimizer, **knobs)


# --- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoints:
    """Where and when a run of `cfg` checkpoints: ``checkpoint.pt`` in `folder` (None: never), after
    its last epoch, every ``checkpoint_every``-th and each (1-based) epoch in `epochs`."""

    cfg: TrainConfig
    folder: Path | None
    epochs: frozenset[int] = frozenset()

    @classmethod
    def of(cls, cfg: TrainConfig, folder: str | Path | None, epochs: Iterable[int] | None = None) -> Checkpoints:
        return cls(cfg, Path(folder) if folder is not None else None, frozenset(epochs or ()))

    @property
    def path(self) -> Path | None:
        """The checkpoint file (None: the run keeps none)."""
        return self.folder / CHECKPOINT_FILE if self.folder is not None else None

    def resume_state(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint the run continues from: the file's when resuming and it exists, else None."""
        path = self.path
        return read_checkpoint(path) if resume and path is not None and path.exists() else None

    def due(self, epoch: int, *, since: int | None = None) -> bool:
        """Whether a checkpoint is written after (1-based) `epoch`.

        A run that counts optimizer steps (``schedule.steps``) passes the step it reports at as
        `epoch` and the last one reported as `since`: a checkpoint is due when a due step (`epochs`, a
        multiple of ``checkpoint_every``, the last) lies in (since, epoch], as the reports need not
        land on it. By default `since` is the epoch before.
        """
        since = epoch - 1 if since is None else since
        every, last = self.cfg.checkpoint_every, self.cfg.schedule.steps or self.cfg.schedule.epochs
        crossed = any(since < e <= epoch for e in self.epochs)
        due = epoch >= last or (every and epoch // every > since // every) or crossed
        return self.folder is not None and bool(due)

    def save(self, epoch: int, payload: Callable[[], Mapping[str, Any]], *, since: int | None = None) -> Path | None:
        """After (1-based) `epoch`: write `payload()` if a checkpoint is `due`; the folder written, else None."""
        if not self.due(epoch, since=since):
            return None
        write_checkpoint(self.folder / CHECKPOINT_FILE, payload())
        return self.folder

    def written(self) -> Path | None:
        """The checkpoint file if one exists (what a `TrainResult` reports), else None."""
        path = self.path
        return path if path is not None and path.exists() else None


def checkpoint_payload(cfg: TrainConfig, *, epoch: int, history: list[dict[str, Any]],
                       controller: Mapping[str, Any] | None, **state: Any) -> dict[str, Any]:
    """A checkpoint of a run of `cfg` after (1-based) `epoch`: the keys every loop writes, then its own `state`.

    `controller` is the controller's ``state_dict()`` (a full-rank user loop's `FullRank` too; the
    built-in trainer writes None for a full-rank run).
    """
    return {"format": CHECKPOINT_FORMAT, "config": train_config_to_dict(cfg), "epoch": epoch, "history": history,
            "controller": controller, **state}


def write_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Write `payload` (from `checkpoint_payload`, or a read one) atomically: a reader sees the old or the new file."""
    write_atomic(path, lambda f: torch.save(dict(payload), f))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (tensors on the CPU; see `oialr_tune.safe_load`). Raises UserError naming the path."""
    path = Path(path)
    state = safe_load.load(path)  # tensors, plain data, numpy arrays and RNG states; nothing else
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by oialr-tune's trainer")
    return state
