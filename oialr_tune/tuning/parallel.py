"""Independent training runs (retrain seeds, compare arms × seeds) as Ray tasks, so no slot idles.

Each run is a Ray task sized by the sweep's per-trial resources (``resources.cpu`` / ``.gpu``,
fractional GPUs included; times ``resources.workers`` for a run on several data-parallel workers,
which the task starts on its node), so retraining packs onto the machine (or, with ``address``,
the cluster) as the sweep's trials did. The task calls the same function the sequential path calls,
with the same config and seed and the same number of torch threads (``resources.cpu``, as Ray
gives a trial: float results depend on the thread count), so the metrics are the same; results
come back in job order whatever order the runs finish in. ``max_concurrent`` bounds how many run
at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from oialr_tune.space import Resources

__all__ = ["run_all"]

T = TypeVar("T")


def run_all(
    fn: Callable[..., T],
    jobs: Sequence[dict[str, Any]],
    *,
    resources: Resources,
    address: str | None = None,
    max_concurrent: int | None = None,
    on_done: Callable[[int, T], None] = lambda i, result: None,
) -> list[T]:
    """``[fn(**job) for job in jobs]``, run as Ray tasks; `on_done(index, result)` as each one finishes.

    With one job, or ``max_concurrent=1``, the runs stay in this process (no Ray start-up). An
    exception in a run is raised here as itself (a bad-input error stays one line).
    """
    threads = max(1, int(resources.cpu))
    if len(jobs) <= 1 or max_concurrent == 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(_run_with_threads(fn, threads, job))
            on_done(i, results[-1])
        return results

    # Ray only when runs go side by side: one run, or one at a time, never starts it.
    import ray

    from oialr_tune.tuning.cluster import check_cluster_fits, start_ray, stop_ray

    started = start_ray(address, verbose=0)
    try:
        check_cluster_fits(resources, trial=False)
        n = resources.workers  # a run on n data-parallel workers holds n workers' resources (one node's)
        task = ray.remote(num_cpus=n * resources.cpu, num_gpus=n * resources.gpu, max_retries=0)(_run_with_threads)
        limit = max_concurrent or len(jobs)
        waiting = list(enumerate(jobs))
        running: dict[Any, int] = {}
        results: list[Any] = [None] * len(jobs)
        while waiting or running:
            while waiting and len(running) < limit:
                i, job = waiting.pop(0)
                running[task.remote(fn, threads, job)] = i
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                for other in running:  # on a shared Ray (a notebook, a cluster) they would run on
                    ray.cancel(other)
                raise e.cause from None
            on_done(i, results[i])
        return results
    finally:
        if started:
            stop_ray()


def _run_with_threads(fn: Callable[..., T], threads: int, job: dict[str, Any]) -> T:
    """``fn(**job)`` with `threads` torch threads, in this process or in a Ray worker alike."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(**job)
    finally:
        torch.set_num_threads(previous)
