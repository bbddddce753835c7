"""The built-in trainer under data parallelism: who this process is, its share of the data, the reductions.

A run with N workers is N processes in one ``torch.distributed`` process group (gloo on CPUs, NCCL on
GPUs), each with a full copy of the model wrapped in DDP. Ray Train starts them for a sweep's trial
(``oialr_tune.tuning.worker``); :func:`launch` starts them on this machine for ``oialr-tune train
--workers N``. The trainer asks :func:`current` whether it runs as one of several workers and then:

* trains on its share of every global batch (``schedule.batch_size`` is the global batch, so one
  config is the same optimization at any number of workers; it must divide by N);
* evaluates its contiguous share of a validation or test split and sums loss, metric and count
  over all workers (:func:`sum_over_workers`), so metrics cover the whole split;
* rebuilds the DDP wrapper after every OIALR change of form (:func:`wrap`): DDP's reducer holds the
  parameters it was built with, and OIALR replaces them;
* lets rank 0 alone write checkpoints, which every rank reads when resuming.

Imports no Ray: the trainer knows nothing of how its processes were started.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from oialr_tune import plugins
from oialr_tune.config import LIGHTNING_TRAINABLE, TrainConfig, resolve_device
from oialr_tune.errors import UserError
from oialr_tune.oialr.distributed import active, ddp_ignore_frozen_bases

__all__ = ["Workers", "batch_shard", "count_allreduced_bytes", "current", "finish_on_rank_0", "launch",
           "local_device", "sum_over_workers", "wrap"]


@dataclass(frozen=True)
class Workers:
    """This process's place among the run's data-parallel workers."""

    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        """Rank 0: writes checkpoints and prints progress."""
        return self.rank == 0


def current() -> Workers | None:
    """The running process group's view of this process, or None for a run on one process."""
    return Workers(dist.get_rank(), dist.get_world_size()) if active() else None


def batch_shard(workers: Workers | None, batch_size: int) -> tuple[int, int]:
    """(rank, workers) for the loaders: this worker's share of each global batch of `batch_size`.

    Refuses a batch the workers cannot split evenly: even shares keep DDP's mean of the workers' mean
    gradients equal to the global batch's mean gradient. (0, 1) on one process.
    """
    if workers is None:
        return (0, 1)
    if batch_size % workers.world_size:
        raise UserError(f"schedule.batch_size: {batch_size} is the global batch and must be a multiple of the "
                        f"{workers.world_size} workers")
    return (workers.rank, workers.world_size)


def local_device(device: torch.device, workers: Workers | None) -> torch.device:
    """The device of this worker: on GPUs, one of several workers uses ``cuda:LOCAL_RANK`` (Ray Train
    and :func:`launch` set it; Ray Train shows each node's workers that node's GPUs)."""
    if workers is None or device.type != "cuda":
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def wrap(model: nn.Module, device: torch.device) -> DDP:
    """`model` in DDP, ready for its current parameters. Call again after OIALR changed its form.

    Only trainable parameters are all-reduced (DDP skips tensors without ``requires_grad``); the frozen
    bases U and Vᵀ are not broadcast with the other buffers at each forward (OIALR keeps them equal).
    """
    ddp_ignore_frozen_bases(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_workers(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every worker (a new tensor; every worker gets the sum); `values` on one process."""
    if not active():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def count_allreduced_bytes(ddp: DDP) -> list[int]:
    """Record the gradient bytes `ddp` all-reduces: returns a list that grows by one entry per bucket sent.

    Installs a communication hook that does what DDP does by default (all-reduce, then divide by the
    world size) and notes each bucket's size first. For measurements (benchmarks/ddp_oialr.py).
    """
    sent: list[int] = []

    # No annotations: DDP compares them with its own types, and this module's are strings (__future__).
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        buf = bucket.buffer()
        sent.append(buf.numel() * buf.element_size())
        buf.div_(dist.get_world_size())
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, hook)
    return sent


def check_workers(cfg: TrainConfig, workers: int, *, key: str = "--workers") -> bool:
    """Refuse, in one line naming `key`, a run this machine cannot give `workers` data-parallel workers.

    The global batch must split evenly, a GPU run needs a GPU per worker and a CPU run a core per
    worker, and a user's own loop (``trainable``) runs on one process. Returns whether the run uses GPUs.
    """
    if workers < 1:
        raise UserError(f"{key}: must be >= 1, got {workers}")
    if cfg.trainable is not None:
        check_loop_runs_distributed(cfg.trainable, workers, key)
    gpu = resolve_device(cfg.device).type == "cuda"
    have = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    if workers > have:
        raise UserError(f"{key}: {workers} workers need {workers} {'GPUs' if gpu else 'CPU cores'}, "
                        f"this machine has {have}")
    batch_shard(Workers(0, workers), cfg.schedule.batch_size)
    return gpu


def check_loop_runs_distributed(trainable: str, workers: int, key: str) -> None:
    """Refuse a user's loop on several workers when it never calls ``trial.wrap``: its model would not be
    wrapped in DDP, and each worker would train its own unsynchronized copy.

    Read from the function's code (the attribute names it uses), before anything starts. A
    ``lightning`` section's trainable runs on one process: Lightning's own strategies are not set up
    inside a trial.
    """
    if trainable == LIGHTNING_TRAINABLE:
        raise UserError(f"{key}: {workers} workers, but a lightning.module trial trains on one process")
    fn = plugins.resolve(trainable, "trainable")
    code = getattr(fn, "__code__", None)
    if code is not None and "wrap" not in code.co_names:
        raise UserError(f"{key}: {workers} workers, but trainable {trainable} never calls trial.wrap(model), "
                        "so its workers would train unsynchronized copies")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish_on_rank_0() -> bool:
    """End the data-parallel part of a run: whether this process goes on, alone (rank 0 or a single process).

    Every worker waits for the others (their collectives are done), then leaves the process group;
    what follows (saving a model, scoring the saved file) is one process's work, and rank 0 does it
    as a run on one process would, with no collective left for the others to join.
    """
    if not active():
        return True
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank == 0


def _worker(rank: int, world_size: int, port: int, backend: str, threads: int, fn: Callable[..., Any],
            args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(result, f)
    except UserError as e:  # bad input found while training: the parent raises it as one line
        with open(f"{out}.{rank}.error", "wb") as f:
            pickle.dump(e, f)
        raise
    finally:
        if dist.is_initialized():  # `fn` may have left it already (`finish_on_rank_0`)
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, gpu: bool = False, threads: int | None = None
           ) -> Any:
    """Run ``fn(*args)`` in `world_size` new local processes joined in one process group (gloo, NCCL on
    GPUs); returns rank 0's return value (which must pickle).

    `fn` must be picklable (a module-level function, or a partial of one); it reads its rank from
    :func:`current`. Each process uses `threads` torch threads; by default CPU workers share the
    cores (cores / workers each) rather than each taking all of them. A `UserError` in a worker (bad
    input that shows only while training) is raised here as it is, so the CLI prints it as one line.
    """
    backend = "nccl" if gpu else "gloo"
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size) if backend == "gloo" else torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="oialr-workers-") as tmp:
        out = os.path.join(tmp, "rank0.pkl")
        try:
            mp.spawn(_worker, args=(world_size, _free_port(), backend, threads, fn, args, out), nprocs=world_size,
                     join=True)
        except mp.ProcessRaisedException:  # spawn's message is the worker's whole traceback
            errors = [os.path.join(tmp, name) for name in sorted(os.listdir(tmp)) if name.endswith(".error")]
            if not errors:
                raise
            with open(errors[0], "rb") as f:  # written by this call's own worker, into its private folder
                raise pickle.load(f) from None
        with open(out, "rb") as f:  # written by this call's own rank 0, into this call's private folder
            return pickle.load(f)
