"""The OIALR controller: turns a model low-rank during training, like an LR scheduler.

Usage, in your own loop::

    controller = OIALR(model, optimizer, delay=1000, stability_frequency=100)
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        controller.step()

What happens at each ``step()`` (counted in optimizer steps):

* ``step == delay``: eligible layers (Linear, Conv1d/2d with ``groups == 1``, the projections of
  ``nn.MultiheadAttention``; under the authors' preset also grouped and depthwise convs) are
  factorized exactly, W = U Σ Vᵀ, into frozen U, Vᵀ and a trainable k × k matrix S (initially
  Σ, free to fill in). With ``layer_step_fraction < 1`` only the last fraction of layers converts
  now and the next fraction at each later check (last layers first).
* every ``stability_frequency`` steps after that, for each low-rank layer: S = Uₛ Σₛ Vₛᵀ; the
  bases rotate (U ← U Uₛ, Vᵀ ← Vₛᵀ Vᵀ, S ← Σₛ), which leaves W unchanged. **Basis stability**
  is the σ-weighted mean |cosine| between each new singular vector and the one at the same index
  before the rotation, i.e. Σᵢ σᵢ (|Uₛ[i,i]| + |Vₛ[i,i]|) / 2 / Σᵢ σᵢ, in [0, 1] (1 = the bases
  did not move since the previous check). If it is ≥ ``stability_threshold`` (or the gate is off,
  ``stability_threshold=None``) the rank is cut: singular values below
  ``sigma_cutoff_fraction × σ_max`` are dropped, never below ``min_rank``.

Optimizer state for S follows the layer (rule used for every optimizer whose state holds only
``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` or ``momentum_buffer``, i.e. SGD, Adam,
AdamW, RAdam). Two rules, picked by the preset (``Rules.optimizer_state``):

* ``"rotate"`` (ours): at factorization W's state is dropped and S starts with none (moments *and*
  ``step`` restart at zero, so Adam's bias correction restarts too). At every check, first moments
  and momentum transform like the gradient of S, ``m ← Rᵤᵀ m Rᵥ`` with Rᵤ = Uₛ[:, :k'],
  Rᵥ = Vₛ[:, :k'] (exact); second moments, which are element-wise squares, use the squared rotations
  ``v ← (Rᵤ∘Rᵤ)ᵀ v (Rᵥ∘Rᵥ)``: this holds in expectation only, for zero-mean gradient entries that
  are uncorrelated, and it keeps v non-negative. ``step`` is kept.
* ``"slice"`` (the authors' code): at factorization the moments become zeros of S's shape and
  ``step`` is kept; at a check the moments are not rotated, and at a cut they are sliced to
  ``[:k', :k']``.

Measured (``benchmarks/optimizer_state_rules.py``): the Adam step taken right after a rotation is
closer to the step the unrotated layer would take with ``"rotate"`` than with ``"slice"`` or with
the moments reset; see ``results/benchmarks/optimizer_state_rules.md``.

Any other optimizer state is reset for S, with a warning.

Presets (``preset=``) fix the rules where oialr-tune and the authors' final code (package
``madonna``, Helmholtz-AI-Energy/OIALR) differ; see :class:`Rules` and the README's table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .distributed import Factors, SplitSVD, broadcast_from_owners
from .distributed import active as distributed_active
from .lowrank import LowRankLayer, LowRankWeight, matrix_shape
from .optimizer_state import TRANSFORMABLE_STATE, StateCarry, state_at_check, state_at_factorization
from .presets import PRESETS, Rules
from .selection import check_patterns, is_gpt2_conv1d, left_dense

__all__ = ["OIALR", "PRESETS", "RankEvent", "Rules"]



@dataclass
class RankEvent:
    """One change of a layer's form: ``factorize`` (dense → U S Vᵀ) or ``cut`` (rank reduced)."""

    step: int
    layer: str
    kind: str
    old_rank: int
    new_rank: int
    stability: float | None


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
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

    def __init__(self, name: str, parent: nn.Module, attr: str, parametrized: bool, conv: bool = False) -> None:
        self.name, self.parent, self.attr, self.parametrized = name, parent, attr, parametrized
        self.conv = conv  # a conv kernel (the authors' size filter treats it differently)
        self.stability: float | None = None

    # The dense weight (before factorization) and the trainable tensor (S after it).
    @property
    def dense_module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    @property
    def low_rank(self) -> bool:
        if self.parametrized:
            return _low_rank_parametrized(self.parent, self.attr)
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

    def bias(self) -> nn.Parameter | None:
        """The bias added to this weight's output (MHA: the packed in-projection bias for q/k/v)."""
        if not self.parametrized:
            return self.dense_module.bias
        if self.attr == "weight":
            return self.parent.bias
        return self.parent.in_proj_bias

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
            shape = tuple(getattr(self.parent, self.attr).shape)
            parametrize.register_parametrization(self.parent, self.attr, LowRankWeight(U, Vt, shape), unsafe=True)
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


def _low_rank_parametrized(module: nn.Module, attr: str) -> bool:
    """Whether `module.attr` is parametrized as U S Vᵀ (by this package, not e.g. weight norm)."""
    return parametrize.is_parametrized(module, attr) and isinstance(module.parametrizations[attr][0], LowRankWeight)


def _find_slots(model: nn.Module, grouped_convs: bool = True) -> list[_Slot]:
    """Eligible weights in module order (so the first slot is the input layer, the last the head).

    `grouped_convs` adds the convs a `LowRankLayer` cannot express (grouped, depthwise, non-zero
    padding mode) as parametrized kernels (`Rules.grouped_convs`); one already parametrized is
    always found, so a checkpoint's structure can be read and rebuilt without knowing the preset.
    """
    slots: list[_Slot] = []
    handled: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in handled:
            continue
        if isinstance(module, nn.MultiheadAttention):
            # MHA reads its weights directly in a fused kernel: parametrize them instead of swapping.
            # Packed (one in_proj_weight) or separate q/k/v weights (kdim/vdim != embed_dim): MHA
            # registers the ones it does not use as None.
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attr) is not None:
                    slots.append(_Slot(f"{name}.{attr}", module, attr, True))
            slots.append(_Slot(f"{name}.out_proj.weight", module.out_proj, "weight", True))
            handled.add(id(module.out_proj))
            continue
        if name and is_gpt2_conv1d(module):  # its weight is [in, out]: parametrized, like MHA's
            slots.append(_Slot(name, module, "weight", True))
            continue
        conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        plain_conv = conv and module.groups == 1 and module.padding_mode == "zeros"
        if conv and not plain_conv and name and (grouped_convs or _low_rank_parametrized(module, "weight")):
            slots.append(_Slot(name, module, "weight", True, conv=True))
        elif (isinstance(module, nn.Linear | LowRankLayer) or plain_conv) and name:
            parent_name, _, attr = name.rpartition(".")
            is_conv = conv or (isinstance(module, LowRankLayer) and module.conv is not None)
            slots.append(_Slot(name, model.get_submodule(parent_name), attr, False, conv=is_conv))
    return slots


def _dense_reasons(model: nn.Module, slots: list[_Slot], chosen: list[_Slot], thin: Callable[[_Slot], str],
                   kept_first: str | None, kept_last: str | None) -> dict[str, str]:
    """Why each weight layer outside `chosen` stays dense (see `OIALR.dense_layers`)."""
    chosen_names = {s.name for s in chosen}
    out: dict[str, str] = {}
    for s in slots:
        if s.name in chosen_names:
            continue
        if s.name == kept_first:
            out[s.name] = "first layer kept dense (keep_first_layer)"
        elif s.name == kept_last:
            out[s.name] = "last layer kept dense (keep_last_layer)"
        else:
            out[s.name] = thin(s)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and name not in out and name not in chosen_names:
            if module.groups > 1:
                kind = "depthwise" if module.groups == module.in_channels else "grouped"
                out[name] = f"{kind} conv (groups={module.groups}): not a single matrix, stays dense"
            elif module.padding_mode != "zeros":
                out[name] = f"conv with padding_mode={module.padding_mode!r}: stays dense"
            elif not isinstance(module, nn.Conv1d | nn.Conv2d):
                out[name] = f"{type(module).__name__}: not supported, stays dense"
    return out


class OIALR:
    """Orthogonality-informed adaptive low-rank training for any model and torch optimizer.

    The defaults are the trainer config's (`oialr_tune.config.OIALRConfig`, where they were measured;
    tests/test_config.py pins the two together), except `delay`: the config's is a fraction of the
    run (0.25), which the controller, knowing no run length, takes in steps.

    Args:
        model: the network; eligible layers are replaced inside it in place.
        optimizer: its parameter lists are updated in place when weights become U S Vᵀ; a list of
            optimizers (e.g. one per parameter group of a GAN or of an encoder and a head) works too:
            each weight's S goes to the optimizer that held the weight, with its state.
        delay: optimizer steps of full-rank warm-up before the first factorization (≥ 1).
        stability_frequency: optimizer steps between stability checks (≥ 1).
        stability_threshold: basis stability in (0, 1] a layer needs before its rank is cut;
            ``None`` turns the gate off (every check cuts, as in the authors' final code).
            Ignored by a preset without a stability gate.
        sigma_cutoff_fraction: at a cut, drop σ < this × σ_max (in [0, 1)).
        min_rank: a layer's rank never goes below this (≥ 1).
        keep_first_layer / keep_last_layer: keep the input layer / the last layer dense (which
            layer: ``Rules.dense_first`` / ``Rules.dense_last``).
        layer_step_fraction: fraction of eligible layers taken on per check, last layers first
            (what it schedules: ``Rules.layer_schedule``); ``None`` takes the preset's.
        skip_ratio: skip layers with min(m, n) ≤ skip_ratio × max(m, n): they gain nothing (convs
            under the authors' preset: only in·k² < skip_ratio × out, ``Rules.conv_filter``).
        preset: ``"oialr-tune"`` (default) or ``"authors"``: the :class:`Rules` to follow.
        distributed: under DDP, split each check's SVDs across the ranks and keep them bit-identical
            (:mod:`oialr_tune.oialr.distributed`); ``None``: on when a process group of > 1 rank runs.
        include / exclude: glob patterns (``fnmatch``) on layer names, e.g. ``["*.attn.*"]``,
            ``["head"]``: only layers matching an `include` pattern (default: all) and none of the
            `exclude` patterns are factorized. A pattern matching no eligible layer is refused.

    Eligible weights that stay dense whatever the knobs, with the reason in `dense_layers`: frozen
    ones (``requires_grad=False``) and ones in no optimizer (their S would never train and would
    only inflate the trainable fraction), and tied ones (one tensor used by two modules, e.g. an
    embedding and a language-model head: factorizing one would untie them).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        delay: int = 1000,
        stability_frequency: int = 20,
        stability_threshold: float | None = 0.9,
        sigma_cutoff_fraction: float = 0.2,
        min_rank: int = 1,
        keep_first_layer: bool = False,
        keep_last_layer: bool = True,
        layer_step_fraction: float | None = None,
        skip_ratio: float = 0.1,
        preset: str = "oialr-tune",
        distributed: bool | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        _check(preset in PRESETS, "preset", f"one of {sorted(PRESETS)}", preset)
        rules = PRESETS[preset]
        if layer_step_fraction is None:
            layer_step_fraction = rules.layer_step_fraction
        _check(isinstance(delay, int) and delay >= 1, "delay", "an int >= 1", delay)
        _check(isinstance(stability_frequency, int) and stability_frequency >= 1,
               "stability_frequency", "an int >= 1", stability_frequency)
        _check(stability_threshold is None or 0.0 < stability_threshold <= 1.0,
               "stability_threshold", "in (0, 1] or None", stability_threshold)
        _check(0.0 <= sigma_cutoff_fraction < 1.0, "sigma_cutoff_fraction", "in [0, 1)", sigma_cutoff_fraction)
        _check(isinstance(min_rank, int) and min_rank >= 1, "min_rank", "an int >= 1", min_rank)
        _check(0.0 < layer_step_fraction <= 1.0, "layer_step_fraction", "in (0, 1]", layer_step_fraction)
        _check(0.0 <= skip_ratio < 1.0, "skip_ratio", "in [0, 1)", skip_ratio)
        optimizers = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
        _check(bool(optimizers) and all(isinstance(o, torch.optim.Optimizer) for o in optimizers),
               "optimizer", "a torch.optim.Optimizer or a list of them", optimizer)
        for key, patterns in (("include", include or []), ("exclude", exclude)):
            _check(isinstance(patterns, list | tuple) and all(isinstance(p, str) for p in patterns),
                   key, "a list of glob patterns", patterns)
        self.model, self.optimizer, self.preset, self.rules = model, optimizer, preset, rules
        self.optimizers = optimizers
        self.include, self.exclude = (None if include is None else list(include)), list(exclude)
        self.delay, self.stability_frequency = delay, stability_frequency
        self.stability_threshold = stability_threshold if rules.stability_gate else None
        self.sigma_cutoff_fraction = sigma_cutoff_fraction
        self.min_rank, self.layer_step_fraction, self.skip_ratio = min_rank, layer_step_fraction, skip_ratio

        slots = _find_slots(model, rules.grouped_convs)
        if not slots:
            raise ValueError("OIALR: the model has no Linear, Conv1d/Conv2d or MultiheadAttention layer")
        big_enough = [s for s in slots if self._too_thin(s) is None]
        first = (slots if rules.dense_first == "input" else big_enough or slots)[0].name
        check_patterns(slots, self.include, self.exclude)
        # The authors' "last replaced" layer is the last one they replace: the kept first one is not.
        replaced = [s for s in big_enough if not (keep_first_layer and s.name == first)]
        last = (slots if rules.dense_last == "classifier" else replaced or big_enough or slots)[-1].name
        self._slots = [s for s in replaced if not (keep_last_layer and s.name == last)]
        left_out = left_dense(model, self._slots, optimizers, self.include, self.exclude)
        self._slots = [s for s in self._slots if s.name not in left_out]
        self._dense = _dense_reasons(model, slots, self._slots, lambda s: self._too_thin(s) or "",
                                     first if keep_first_layer else None, last if keep_last_layer else None)
        self._dense.update(left_out)
        self.full_rank_parameters = count_trainable(model)
        self.history: list[RankEvent] = []
        self._step = 0
        self.parameters_version = 0  # +1 per replaced tensor: a DDP wrapper of another version is stale
        self._converted = 0  # how many slots (counted from the last) are low-rank
        self._checked = 0  # "check" schedule: how many slots (from the last) are checked; 0 = all
        use_split = distributed_active() if distributed is None else distributed  # who runs which SVD
        self.split: SplitSVD | None = SplitSVD(_svd) if use_split else None  # None: this process, all

    def _too_thin(self, slot: _Slot) -> str | None:
        """Why the size filter skips `slot` (it gains nothing from U S Vᵀ), or None if it passes."""
        m, n = slot.shape
        if slot.conv and self.rules.conv_filter == "one_sided":
            if n < self.skip_ratio * m:
                return f"too few inputs to gain: in·k² {n} < skip_ratio {self.skip_ratio} x out {m}"
            return None
        if min(m, n) <= self.skip_ratio * max(m, n):
            return f"too thin to gain: min({m}, {n}) <= skip_ratio {self.skip_ratio} x max"
        return None

    # --- public read-outs ----------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        return self._step

    def layer_ranks(self) -> dict[str, int]:
        """Current rank of each eligible layer (min(m, n) while dense)."""
        return {s.name: s.rank for s in self._slots}

    def dense_layers(self) -> dict[str, str]:
        """Layers with a weight matrix or kernel that this controller leaves dense, and why.

        E.g. a grouped or depthwise conv (its kernel is a block-diagonal matrix: U S Vᵀ of it
        would not be a grouped conv), a layer too thin to gain, or the kept first/last layer.
        Users read it to see why `layer_ranks` lacks a layer.
        """
        return dict(self._dense)

    def trainable_parameters(self) -> int:
        return count_trainable(self.model)

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
        if self.rules.check_at_factorization:
            events = self._convert_next_layers()
            events += self._check_layers()
        else:
            events = self._check_layers() if since > 0 else []
            events += self._convert_next_layers()
        self.history += events
        return events

    def _check_layers(self) -> list[RankEvent]:
        low_rank = [s for s in self._slots if s.low_rank]
        if self.rules.layer_schedule == "check":
            # The authors' slice `layer_names[-checked:]`: 0 (a step that rounds to 0) means all.
            self._checked += int((len(self._slots) - 1) * self.layer_step_fraction)
            low_rank = low_rank[-self._checked:] if self._checked else low_rank
        events: list[RankEvent] = []
        for slot, factors in zip(low_rank, self._svds([s.factors()[1] for s in low_rank]), strict=True):
            events += self._check_and_cut(slot, factors)
        self._pin(low_rank)
        return events

    def _convert_next_layers(self) -> list[RankEvent]:
        n = len(self._slots)
        step = 1.0 if self.rules.layer_schedule == "check" else self.layer_step_fraction
        target = min(n, self._converted + max(1, math.ceil(step * n)))
        events = []
        due = list(reversed(self._slots[n - target : n - self._converted]))
        for slot, factors in zip(due, self._svds([s.dense_weight().reshape(s.shape[0], -1) for s in due]), strict=True):
            W = slot.dense_weight()
            if factors is None:
                warnings.warn(f"OIALR: could not factorize {slot.name}; it stays dense for now", stacklevel=3)
                break  # retry this layer (and the ones before it) at the next check
            U, s, Vt = factors
            k = s.shape[0]
            dtype = W.dtype
            S = slot.factorize(U.to(dtype), torch.diag(s).to(dtype), Vt.to(dtype))
            self._swap_param(W, S, state_at_factorization(self.rules.optimizer_state, S))
            self._freeze_bias(slot)
            self._converted += 1
            events.append(RankEvent(self._step, slot.name, "factorize", k, k, None))
        self._pin(due[: len(events)])  # the ones factorized (a failed SVD stops the list)
        return events

    def _svds(self, matrices: list[torch.Tensor]) -> list[Factors | None]:
        """SVDs of `matrices`: all here, or under DDP each on its owner rank and broadcast."""
        matrices = [m.detach() for m in matrices]
        return self.split(matrices) if self.split is not None else [_svd(m) for m in matrices]

    def _pin(self, slots: list[_Slot]) -> None:
        """Under DDP: copy each slot's U, S, Vᵀ and S's optimizer state from the rank that ran its SVD."""
        if self.split is not None:
            broadcast_from_owners([s.factors() for s in slots], self.optimizers, self.split)

    def _new_rank(self, s: torch.Tensor, old: int, dim: int) -> int:
        """The rank after a cut: σ ≥ cutoff·σ_max kept, bounded below by the preset's floors.

        `dim` is min(m, n) of the layer's weight matrix (what the rank floor is a share of).
        """
        keep = int((s >= self.sigma_cutoff_fraction * s[0]).sum())
        halving_floor = int(old * (1.0 - self.rules.max_cut_fraction))
        size_floor = int(self.rules.min_rank_fraction * dim)
        return min(old, max(keep, halving_floor, size_floor, self.min_rank))

    def _check_and_cut(self, slot: _Slot, factors: Factors | None) -> list[RankEvent]:
        U, S, Vt = slot.factors()
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
            new = self._new_rank(s, old, min(U.shape[0], Vt.shape[1]))
        dtype = S.dtype
        Ru, Rv = Us[:, :new].to(dtype), Vs[:, :new].to(dtype)
        new_S = slot.set_factors(U @ Ru, torch.diag(s[:new]).to(dtype), Rv.T @ Vt)
        self._swap_param(S, new_S, state_at_check(self.rules.optimizer_state, Ru, Rv, new))
        if new < old:
            return [RankEvent(self._step, slot.name, "cut", old, new, stability)]
        return []

    # --- optimizer bookkeeping -----------------------------------------------------------------

    def _freeze_bias(self, slot: _Slot) -> None:
        """``Rules.freeze_factorized_bias``: the factorized layer's bias leaves the optimizer for good."""
        bias = slot.bias()
        if not self.rules.freeze_factorized_bias or bias is None or not bias.requires_grad:
            return
        bias.requires_grad_(False)
        bias.grad = None
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p is not bias]
        self.optimizer.state.pop(bias, None)

    def _swap_param(self, old: nn.Parameter, new: nn.Parameter, carry: StateCarry | None) -> None:
        """Put ``new`` where ``old`` was in the optimizer; `carry` maps old's matrix state to new's.

        ``step`` and other non-matrix state are kept as they are; ``carry=None`` drops all state.
        Every optimizer that holds `old` gets `new` (normally one of `optimizers`).
        """
        self.parameters_version += 1
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old:
                        group["params"][i] = new
            state = optimizer.state.pop(old, None)
            if not state or carry is None:
                continue
            if not set(state) <= TRANSFORMABLE_STATE:
                warnings.warn(
                    f"OIALR: {type(optimizer).__name__} state {sorted(state)} cannot follow a rank cut; "
                    "it is reset for the cut layer", stacklevel=4,
                )
                continue
            optimizer.state[new] = {
                key: carry(key, value) if torch.is_tensor(value) and value.dim() >= 2 else value
                for key, value in state.items()
            }

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and each layer's form; weights live in ``model.state_dict()``."""
        return {
            "step": self._step,
            "converted": self._converted,
            "checked": self._checked,
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
            self._swap_param(old, new, carry=None)
        by_name = {s.name: s for s in self._slots}
        for name in state["ranks"]:
            if name in by_name:
                self._freeze_bias(by_name[name])
        for name, value in state["stability"].items():
            if name in by_name:
                by_name[name].stability = value
        self._step = state["step"]
        self._converted = state["converted"]
        self._checked = state.get("checked", 0)  # absent in checkpoints written before presets
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


def count_trainable(model: nn.Module) -> int:
    """How many parameters of `model` are trained now (`requires_grad`): the parameter counts every run reports."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"OIALR {name}: must be {expected}, got {value!r}")
