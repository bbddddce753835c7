"""OIALR under data parallelism (plain ``torch.distributed``): the controller's side of DDP.

Under DDP every rank holds a copy of the model and steps the same optimizer on all-reduced
gradients, so the copies stay equal. OIALR changes the model's form at its checks; for the copies to
stay equal through a check, and for the check to cost each rank only its share, the controller
(``OIALR(..., distributed=...)``) does what the authors' ``distributed_updates`` does:

1. **Split**: a check's SVDs (one per layer) are dealt out, layer i to rank ``i % world_size``;
   each rank runs only its own (:class:`SplitSVD`), then every result is broadcast from its owner.
2. **Apply**: every rank applies every layer's rotation and cut from the same broadcast factors, so
   the new ranks are the same everywhere.
3. **Pin**: the owner then broadcasts the layer's resulting U, S, Vᵀ and S's optimizer state
   (:func:`broadcast_from_owners`), so the ranks are bit-identical by construction, even where a
   device's matmuls are not bitwise reproducible.

The backend is whatever the process group uses: gloo on CPUs, NCCL on GPUs (tensors stay on their
device). :func:`ddp_ignore_frozen_bases` keeps DDP from broadcasting the frozen U and Vᵀ buffers at
every forward; a DDP wrapper built before a factorization or cut must be rebuilt after it (the
trainer does this, see ``oialr_tune.distributed``). :func:`state_digest` hashes a rank's model,
optimizer and ranks so callers can check that all ranks agree.

Imports only torch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["SplitSVD", "active", "broadcast_from_owners", "ddp_ignore_frozen_bases", "state_digest"]

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
SVD = Callable[[torch.Tensor], "Factors | None"]


def active(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group with more than one rank is running (the default group if None)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _result_dtype(matrix: torch.Tensor) -> torch.dtype:
    # The dtype every rank expects to receive; the SVD itself may have fallen back to float64.
    return torch.float64 if matrix.dtype == torch.float64 else torch.float32


class SplitSVD:
    """Runs a batch of SVDs with item i on rank ``i % world_size`` and broadcasts each from its owner.

    Called by the OIALR controller at a factorization or check with the matrices of all the layers it
    acts on, in the same order on every rank. ``computed`` counts the SVDs this rank ran and
    ``seconds`` the time it spent in them (benchmarks and tests read both). An SVD that failed on its
    owner comes back as None on every rank, so every rank skips that layer alike.
    """

    def __init__(self, svd: SVD, group: dist.ProcessGroup | None = None) -> None:
        self.svd, self.group = svd, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.computed, self.seconds = 0, 0.0

    def owner(self, index: int) -> int:
        """The rank that computes (and broadcasts) item `index` of a batch."""
        return index % self.world_size

    def __call__(self, matrices: Sequence[torch.Tensor]) -> list[Factors | None]:
        if not matrices:
            return []
        # Phase 1: every rank runs its own share at once (in parallel across ranks).
        t0 = time.perf_counter()
        mine: dict[int, Factors | None] = {}
        for i, m in enumerate(matrices):
            if self.owner(i) == self.rank:
                f = self.svd(m)
                dtype = _result_dtype(m)
                mine[i] = None if f is None else tuple(t.to(dtype).contiguous() for t in f)  # type: ignore[assignment]
                self.computed += 1
        self.seconds += time.perf_counter() - t0
        # Which SVDs succeeded: one small all-reduce instead of a flag per item.
        device = matrices[0].device
        ok = torch.zeros(len(matrices), dtype=torch.int32, device=device)
        for i, f in mine.items():
            ok[i] = int(f is not None)
        dist.all_reduce(ok, group=self.group)
        # Phase 2: each result travels from its owner as one flat buffer.
        out: list[Factors | None] = []
        for i, m in enumerate(matrices):
            if not ok[i]:
                out.append(None)
                continue
            rows, cols = m.shape
            k = min(rows, cols)
            sizes = (rows * k, k, k * cols)
            if self.owner(i) == self.rank:
                buf = torch.cat([t.reshape(-1) for t in mine[i]])  # type: ignore[union-attr]
            else:
                buf = torch.empty(sum(sizes), dtype=_result_dtype(m), device=m.device)
            dist.broadcast(buf, src=dist.get_global_rank(self.group, self.owner(i)) if self.group else self.owner(i),
                           group=self.group)
            U, s, Vt = buf.split(sizes)
            out.append((U.view(rows, k), s, Vt.view(k, cols)))
        return out


def broadcast_from_owners(layers: Sequence[Factors], optimizers: Sequence[torch.optim.Optimizer],
                          split: SplitSVD) -> None:
    """Overwrite each rank's (U, S, Vᵀ) of layer i and S's optimizer state with rank ``split.owner(i)``'s.

    `layers` come in the same order on every rank and as in the SVD batch, so the owner of a layer's
    SVD is also its source. In place: the optimizers keep their tensors.
    """
    for i, (U, S, Vt) in enumerate(layers):
        owner = split.owner(i)
        src = dist.get_global_rank(split.group, owner) if split.group else owner
        states = [o.state[S] for o in optimizers if S in o.state]
        moments = [st[k] for st in states for k in sorted(st) if torch.is_tensor(st[k])]
        for t in [U, S, Vt, *moments]:
            dist.broadcast(t.data, src=src, group=split.group)


def ddp_ignore_frozen_bases(model: nn.Module) -> list[str]:
    """Tell DDP (before wrapping `model`) not to sync the frozen low-rank bases U and Vᵀ.

    DDP with ``broadcast_buffers=True`` re-sends every buffer from rank 0 before each forward; the
    bases are buffers as large as the dense weights they replace, and OIALR keeps them identical on
    every rank already. Returns the ignored names.

    A private name of torch: DDP's static ``_set_params_and_buffers_to_ignore_for_model`` (FSDP and
    DDP's own tests use it). Missing public API: DDP takes no list of buffers to leave alone (only
    ``broadcast_buffers`` for all of them, which a BatchNorm needs). Pinned by
    ``tests/test_distributed.py::test_every_rank_is_bit_identical_after_each_factorization_and_cut``
    (its ranks call this before wrapping).
    """
    names = [name for name, _ in model.named_buffers() if name.rpartition(".")[2] in ("U", "Vt")]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def state_digest(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ranks: dict[str, int] | None = None) -> str:
    """A SHA-256 of the model's state (parameters and buffers, by name), the optimizer's state and `ranks`.

    Equal digests on all ranks mean bit-identical copies; gather them with
    ``torch.distributed.all_gather_object`` to compare.
    """
    h = hashlib.sha256()

    def add(key: str, value: object) -> None:
        h.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())

    for key, value in model.state_dict().items():
        add(key, value)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in sorted(optimizer.state.get(p, {}).items()):
                    add(f"{names.get(id(p), '?')}.{key}", value)
    add("ranks", sorted((ranks or {}).items()))
    return h.hexdigest()
