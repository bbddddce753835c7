"""The OIALR controller: turns a model low-rank during training, like an LR scheduler.

Usage, in your own loop::

    controller = OIALR(model, optimizer, delay=1000, stability_frequency=100)
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        controller.step()

What happens at each ``step()`` (counted in optimizer steps):

* ``step == delay``: eligible layers (Linear, Conv1d/2d with ``groups == 1``, the projections of
  ``nn.MultiheadAttention``) are factorized exactly, W = U Σ Vᵀ, into frozen U, Vᵀ and a trainable
  k × k matrix S (initially Σ, free to fill in). With ``layer_step_fraction < 1`` only the last
  fraction of layers converts now and the next fraction at each later check (last layers first).
* every ``stability_frequency`` steps after that, for each low-rank layer: S = Uₛ Σₛ Vₛᵀ; the
  bases rotate (U ← U Uₛ, Vᵀ ← Vₛᵀ Vᵀ, S ← Σₛ), which leaves W unchanged. **Basis stability**
  is the σ-weighted mean |cosine| between each new singular vector and the one at the same index
  before the rotation, i.e. Σᵢ σᵢ (|Uₛ[i,i]| + |Vₛ[i,i]|) / 2 / Σᵢ σᵢ, in [0, 1] (1 = the bases
  did not move since the previous check). If it is ≥ ``stability_threshold`` (or the gate is off,
  ``stability_threshold=None``) the rank is cut: singular values below
  ``sigma_cutoff_fraction × σ_max`` are dropped, never below ``min_rank``.

Optimizer state for S follows the layer (rule used for every optimizer whose state holds only
``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` or ``momentum_buffer``, i.e. SGD, Adam,
AdamW, RAdam):

* at factorization the state of W is dropped and S starts with none (Adam moments and step
  restart at zero, as in the authors' code);
* at a rotation and cut, first moments and momentum transform like the gradient of S,
  ``m ← Rᵤᵀ m Rᵥ`` with Rᵤ = Uₛ[:, :k'], Rᵥ = Vₛ[:, :k'] (exact); second moments, which are
  element-wise squares, use the squared rotations ``v ← (Rᵤ∘Rᵤ)ᵀ v (Rᵥ∘Rᵥ)`` (exact when the
  gradient's entries are uncorrelated, and it keeps them non-negative); ``step`` is kept.
* any other optimizer state is reset for S, with a warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .lowrank import LowRankLayer, LowRankWeight, matrix_shape

__all__ = ["OIALR", "LayerStats", "RankEvent"]

_TRANSFORMABLE_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"}
_SECOND_MOMENTS = {"exp_avg_sq", "max_exp_avg_sq"}


@dataclass
class RankEvent:
    """One change of a layer's form: ``factorize`` (dense → U S Vᵀ) or ``cut`` (rank reduced)."""

    step: int
    layer: str
    kind: str
    old_rank: int
    new_rank: int
    stability: float | None


@dataclass
class LayerStats:
    """The current state of one eligible layer."""

    name: str
    shape: tuple[int, int]
    low_rank: bool
    rank: int
    stability: float | None
    trainable_params: int


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Thin SVD in float32 or better; falls back to float64 on the CPU; ``None`` if both fail.

    Low-precision training (bf16/fp16) never reaches the SVD: it always runs in float32+.
    """
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    attempts = [(matrix.device, dtype), (torch.device("cpu"), torch.float64)]
    for device, dt in attempts:
        try:
            U, s, Vt = torch.linalg.svd(matrix.detach().to(device, dt), full_matrices=False)
        except (RuntimeError, torch.linalg.LinAlgError) as exc:
            warnings.warn(f"OIALR: SVD failed on {device}/{dt} ({exc}); trying a fallback", stacklevel=3)
            continue
        if torch.isfinite(U).all() and torch.isfinite(s).all() and torch.isfinite(Vt).all():
            return U.to(matrix.device), s.to(matrix.device), Vt.to(matrix.device)
        warnings.warn(f"OIALR: SVD on {device}/{dt} returned non-finite values; trying a fallback", stacklevel=3)
    return None


class _Slot:
    """One eligible weight and how to swap it: replace the module, or parametrize the tensor."""

    def __init__(self, name: str, parent: nn.Module, attr: str, parametrized: bool) -> None:
        self.name, self.parent, self.attr, self.parametrized = name, parent, attr, parametrized
        self.stability: float | None = None

    # The dense weight (before factorization) and the trainable tensor (S after it).
    @property
    def dense_module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    @property
    def low_rank(self) -> bool:
        if self.parametrized:
            return parametrize.is_parametrized(self.parent, self.attr)
        return isinstance(self.dense_module, LowRankLayer)

    @property
    def shape(self) -> tuple[int, int]:
        if self.low_rank:
            U, _, Vt = self.factors()
            return U.shape[0], Vt.shape[1]
        if self.parametrized:
            w = getattr(self.parent, self.attr)
            return w.shape[0], math.prod(w.shape[1:])
        return matrix_shape(self.dense_module)

    def dense_weight(self) -> nn.Parameter:
        return getattr(self.parent, self.attr) if self.parametrized else self.dense_module.weight

    def factors(self) -> tuple[torch.Tensor, nn.Parameter, torch.Tensor]:
        if self.parametrized:
            plist = self.parent.parametrizations[self.attr]
            return plist[0].U, plist.original, plist[0].Vt
        layer = self.dense_module
        return layer.U, layer.S, layer.Vt

    @property
    def rank(self) -> int:
        return self.factors()[1].shape[0] if self.low_rank else min(self.shape)

    def factorize(self, U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> nn.Parameter:
        """Swap the dense weight for factors; returns the new trainable S."""
        if self.parametrized:
            parametrize.register_parametrization(self.parent, self.attr, LowRankWeight(U, Vt), unsafe=True)
            plist = self.parent.parametrizations[self.attr]
            plist.original = nn.Parameter(S.detach().clone())
            return plist.original
        layer = LowRankLayer.from_dense(self.dense_module, U, S, Vt)
        setattr(self.parent, self.attr, layer)
        return layer.S

    def set_factors(self, U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> nn.Parameter:
        if self.parametrized:
            plist = self.parent.parametrizations[self.attr]
            plist[0].U, plist[0].Vt = U.detach().contiguous(), Vt.detach().contiguous()
            plist.original = nn.Parameter(S.detach().contiguous())
            return plist.original
        return self.dense_module.set_factors(U, S, Vt)


def _find_slots(model: nn.Module) -> list[_Slot]:
    """Eligible weights in module order (so the first slot is the input layer, the last the head)."""
    slots: list[_Slot] = []
    handled: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in handled:
            continue
        if isinstance(module, nn.MultiheadAttention):
            # MHA reads its weights directly in a fused kernel: parametrize them instead of swapping.
            if module._qkv_same_embed_dim and module.in_proj_weight is not None:
                slots.append(_Slot(f"{name}.in_proj_weight", module, "in_proj_weight", True))
            slots.append(_Slot(f"{name}.out_proj.weight", module.out_proj, "weight", True))
            handled.add(id(module.out_proj))
            continue
        eligible = isinstance(module, nn.Linear | LowRankLayer) or (
            isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
        )
        if eligible and name:
            parent_name, _, attr = name.rpartition(".")
            slots.append(_Slot(name, model.get_submodule(parent_name), attr, False))
    return slots


class OIALR:
    """Orthogonality-informed adaptive low-rank training for any model and torch optimizer.

    Args:
        model: the network; eligible layers are replaced inside it in place.
        optimizer: its parameter lists are updated in place when weights become U S Vᵀ.
        delay: optimizer steps of full-rank warm-up before the first factorization (≥ 1).
        stability_frequency: optimizer steps between stability checks (≥ 1).
        stability_threshold: basis stability in (0, 1] a layer needs before its rank is cut;
            ``None`` turns the gate off (every check cuts, as in the authors' final code).
        sigma_cutoff_fraction: at a cut, drop σ < this × σ_max (in [0, 1)).
        min_rank: a layer's rank never goes below this (≥ 1).
        keep_first_layer / keep_last_layer: keep the input layer / classifier dense.
        layer_step_fraction: fraction of eligible layers converted per check, last layers
            first; 1.0 converts all at ``delay``.
        skip_ratio: skip layers with min(m, n) ≤ skip_ratio × max(m, n): they gain nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        delay: int = 1000,
        stability_frequency: int = 100,
        stability_threshold: float | None = 0.9,
        sigma_cutoff_fraction: float = 0.1,
        min_rank: int = 1,
        keep_first_layer: bool = False,
        keep_last_layer: bool = True,
        layer_step_fraction: float = 1.0,
        skip_ratio: float = 0.1,
    ) -> None:
        _check(isinstance(delay, int) and delay >= 1, "delay", "an int >= 1", delay)
        _check(isinstance(stability_frequency, int) and stability_frequency >= 1,
               "stability_frequency", "an int >= 1", stability_frequency)
        _check(stability_threshold is None or 0.0 < stability_threshold <= 1.0,
               "stability_threshold", "in (0, 1] or None", stability_threshold)
        _check(0.0 <= sigma_cutoff_fraction < 1.0, "sigma_cutoff_fraction", "in [0, 1)", sigma_cutoff_fraction)
        _check(isinstance(min_rank, int) and min_rank >= 1, "min_rank", "an int >= 1", min_rank)
        _check(0.0 < layer_step_fraction <= 1.0, "layer_step_fraction", "in (0, 1]", layer_step_fraction)
        _check(0.0 <= skip_ratio < 1.0, "skip_ratio", "in [0, 1)", skip_ratio)
        self.model, self.optimizer = model, optimizer
        self.delay, self.stability_frequency = delay, stability_frequency
        self.stability_threshold, self.sigma_cutoff_fraction = stability_threshold, sigma_cutoff_fraction
        self.min_rank, self.layer_step_fraction, self.skip_ratio = min_rank, layer_step_fraction, skip_ratio

        slots = _find_slots(model)
        if not slots:
            raise ValueError("OIALR: the model has no Linear, Conv1d/Conv2d or MultiheadAttention layer")
        first, last = slots[0].name, slots[-1].name
        self._slots = [
            s for s in slots
            if not (keep_first_layer and s.name == first)
            and not (keep_last_layer and s.name == last)
            and min(s.shape) > skip_ratio * max(s.shape)
        ]
        self.full_rank_parameters = _count_trainable(model)
        self.history: list[RankEvent] = []
        self._step = 0
        self._converted = 0  # how many slots (counted from the last) are low-rank

    # --- public read-outs ----------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        return self._step

    def layer_ranks(self) -> dict[str, int]:
        """Current rank of each eligible layer (min(m, n) while dense)."""
        return {s.name: s.rank for s in self._slots}

    def layer_stats(self) -> list[LayerStats]:
        stats = []
        for s in self._slots:
            m, n = s.shape
            params = s.rank**2 if s.low_rank else m * n
            stats.append(LayerStats(s.name, (m, n), s.low_rank, s.rank, s.stability, params))
        return stats

    def trainable_parameters(self) -> int:
        return _count_trainable(self.model)

    @property
    def trainable_fraction(self) -> float:
        """Trainable parameters now over the model's trainable parameters at full rank."""
        return self.trainable_parameters() / self.full_rank_parameters

    # --- the schedule --------------------------------------------------------------------------

    def step(self) -> list[RankEvent]:
        """Advance one optimizer step; factorize / check / cut when due. Returns this step's events."""
        self._step += 1
        since = self._step - self.delay
        if since < 0 or since % self.stability_frequency:
            return []
        events: list[RankEvent] = []
        if since > 0:
            for slot in self._slots:
                if slot.low_rank:
                    events += self._check_and_cut(slot)
        events += self._convert_next_layers()
        self.history += events
        return events

    def _convert_next_layers(self) -> list[RankEvent]:
        n = len(self._slots)
        chunk = max(1, math.ceil(self.layer_step_fraction * n))
        target = min(n, self._converted + chunk)
        events = []
        for slot in reversed(self._slots[n - target : n - self._converted]):
            W = slot.dense_weight()
            m, _ = slot.shape
            factors = svd(W.detach().reshape(m, -1))
            if factors is None:
                warnings.warn(f"OIALR: could not factorize {slot.name}; it stays dense for now", stacklevel=3)
                return events  # retry this layer (and the ones before it) at the next check
            U, s, Vt = factors
            k = s.shape[0]
            dtype = W.dtype
            S = slot.factorize(U.to(dtype), torch.diag(s).to(dtype), Vt.to(dtype))
            self._swap_param(W, S, transform=None)
            self._converted += 1
            events.append(RankEvent(self._step, slot.name, "factorize", k, k, None))
        return events

    def _check_and_cut(self, slot: _Slot) -> list[RankEvent]:
        U, S, Vt = slot.factors()
        factors = svd(S.detach())
        if factors is None:
            warnings.warn(f"OIALR: skipped the check of {slot.name} at step {self._step}", stacklevel=3)
            return []
        Us, s, Vst = factors
        Vs = Vst.T
        weights = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
        stability = float((weights * (Us.diagonal().abs() + Vs.diagonal().abs()) / 2).sum())
        slot.stability = stability
        old = S.shape[0]
        new = old
        if self.stability_threshold is None or stability >= self.stability_threshold:
            keep = int((s >= self.sigma_cutoff_fraction * s[0]).sum())
            new = min(old, max(keep, self.min_rank))
        dtype = S.dtype
        Ru, Rv = Us[:, :new].to(dtype), Vs[:, :new].to(dtype)
        new_S = slot.set_factors(U @ Ru, torch.diag(s[:new]).to(dtype), Rv.T @ Vt)
        self._swap_param(S, new_S, transform=(Ru, Rv))
        if new < old:
            return [RankEvent(self._step, slot.name, "cut", old, new, stability)]
        return []

    # --- optimizer bookkeeping -----------------------------------------------------------------

    def _swap_param(self, old: nn.Parameter, new: nn.Parameter, transform) -> None:
        """Put ``new`` where ``old`` was in the optimizer and carry (or drop) its state."""
        for group in self.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
        state = self.optimizer.state.pop(old, None)
        if not state or transform is None:
            return
        if not set(state) <= _TRANSFORMABLE_STATE:
            warnings.warn(
                f"OIALR: {type(self.optimizer).__name__} state {sorted(state)} cannot follow a rank cut; "
                "it is reset for the cut layer", stacklevel=4,
            )
            return
        Ru, Rv = transform
        carried = {}
        for key, value in state.items():
            if key == "step" or not torch.is_tensor(value) or value.dim() != 2:
                carried[key] = value
            elif key in _SECOND_MOMENTS:
                carried[key] = ((Ru * Ru).T @ value @ (Rv * Rv)).clamp_min(0)
            else:
                carried[key] = Ru.T @ value @ Rv
        self.optimizer.state[new] = carried

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and each layer's form; weights live in ``model.state_dict()``."""
        return {
            "step": self._step,
            "converted": self._converted,
            "ranks": low_rank_structure(self.model),
            "stability": {s.name: s.stability for s in self._slots},
            "history": [asdict(e) for e in self.history],
            "full_rank_parameters": self.full_rank_parameters,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule and rebuild low-rank layers with the saved ranks (placeholder values).

        Call it on a freshly built model and optimizer, *before* ``model.load_state_dict`` and
        ``optimizer.load_state_dict``, which then fill in the weights and the optimizer state.
        """
        for old, new in apply_low_rank_structure(self.model, state["ranks"]):
            self._swap_param(old, new, transform=None)
        by_name = {s.name: s for s in self._slots}
        for name, value in state["stability"].items():
            if name in by_name:
                by_name[name].stability = value
        self._step = state["step"]
        self._converted = state["converted"]
        self.history = [RankEvent(**e) for e in state["history"]]
        self.full_rank_parameters = state["full_rank_parameters"]


def low_rank_structure(model: nn.Module) -> dict[str, int]:
    """The rank of every low-rank layer in ``model``, by name: what a checkpoint needs to rebuild it."""
    return {s.name: s.rank for s in _find_slots(model) if s.low_rank}


def apply_low_rank_structure(model: nn.Module, ranks: dict[str, int]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Give the named layers of a freshly built ``model`` low-rank form with the given ranks.

    The factors are zero placeholders for ``model.load_state_dict`` to fill. Returns the
    (replaced, new) trainable tensors so an optimizer can be updated.
    """
    by_name = {s.name: s for s in _find_slots(model)}
    unknown = set(ranks) - set(by_name)
    if unknown:
        raise ValueError(f"OIALR: low-rank layers {sorted(unknown)} are not in this model")
    swapped = []
    for name, rank in ranks.items():
        slot = by_name[name]
        old = slot.factors()[1] if slot.low_rank else slot.dense_weight()
        m, n = slot.shape
        z = lambda *shape: torch.zeros(*shape, device=old.device, dtype=old.dtype)  # noqa: E731, B023
        new = (slot.set_factors if slot.low_rank else slot.factorize)(z(m, rank), z(rank, rank), z(rank, n))
        swapped.append((old, new))
    return swapped


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"OIALR {name}: must be {expected}, got {value!r}")
