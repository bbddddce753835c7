"""The two-rank OIALR run of tests/test_distributed.py, in a module of its own.

torch.multiprocessing's spawned processes import the module of the function they run: this one
imports only torch and the OIALR method. (Run from the test module, the children also imported
Ray Tune and the test helpers, and after tests/test_data.py in the same session one of them ended
in SIGABRT, "terminate called without an active exception", at exit.)
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from oialr_tune.oialr import OIALR
from oialr_tune.oialr.distributed import ddp_ignore_frozen_bases, state_digest

STEPS, BATCH = 12, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Five layers OIALR acts on (the head stays dense): each check splits 5 SVDs over the ranks.
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def _train(rank: int, world: int) -> dict[str, Any]:
    """STEPS AdamW steps of global batch BATCH, this rank's share of each batch; OIALR at 4, 7, 10.

    Under DDP the wrapper is rebuilt after each change of form (the reducer holds the old tensors).
    """
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    controller = OIALR(model, optimizer, delay=4, stability_frequency=3, stability_threshold=None,
                       sigma_cutoff_fraction=0.3)
    wrap = (lambda m: (ddp_ignore_frozen_bases(m), DDP(m))[1]) if world > 1 else (lambda m: m)
    forward = wrap(model)
    x, y = _data()
    digests, events, version = [], [], 0
    for step in range(STEPS):
        share = slice(step * BATCH + rank * BATCH // world, step * BATCH + (rank + 1) * BATCH // world)
        loss = nn.functional.cross_entropy(forward(x[share]), y[share])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        events += [(e.step, e.layer, e.kind, e.new_rank) for e in controller.step()]
        if controller.parameters_version != version:  # a factorization or check replaced tensors
            version = controller.parameters_version
            digests.append(state_digest(model, optimizer, controller.layer_ranks()))
            forward = wrap(model)
    out = {"events": events, "ranks": controller.layer_ranks(), "digests": digests,
           "weights": [p.detach().flatten().tolist() for p in model.parameters()]}
    if controller.split is not None:
        out["computed"], out["split_rank"] = controller.split.computed, controller.split.rank
    return out


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _train(rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def refuse_on_every_rank(message: str) -> None:
    """A worker that finds bad input while training (as a loop that never reports does)."""
    from oialr_tune.errors import LoopMistake

    raise LoopMistake(f"{message} (rank {dist.get_rank()})")
