"""OIALR under DDP: time per check per rank, gradient bytes all-reduced per step, throughput at 1 vs N workers.

For each worker count, N local processes (``oialr_tune.distributed.launch``: gloo on CPUs, NCCL on
GPUs, one GPU per worker) train one model on synthetic data with the same global batch:

* ``steps`` full-rank steps (timed: throughput full rank), then OIALR factorizes at step ``delay``
  and checks (rotates and cuts) every ``frequency`` steps, ``checks`` times (each check timed on
  every rank: wall time of ``controller.step()`` and the time in this rank's own SVDs), then
  ``steps`` more steps at the cut ranks (timed: throughput low rank);
* gradient bytes that DDP all-reduces per step are counted by a communication hook
  (``oialr_tune.distributed.count_allreduced_bytes``) at full rank and after the cut: after the
  cut only the small S matrices (and the layers kept dense, and biases) are sent.

Throughput is global examples per second (global batch / step time of the slowest rank), the median
of the timed steps. With one worker there is no process group: the controller runs every SVD itself.
On a CPU every worker process uses ``--threads`` torch threads (default 1), so N workers use N cores.

    python benchmarks/ddp_oialr.py                                  # CPU, 1 and 2 workers
    python benchmarks/ddp_oialr.py --device cuda --workers 1 2 4 8  # one multi-GPU node
    python benchmarks/ddp_oialr.py --model vit_small --in-shape 3 32 32 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oialr_tune import distributed
from oialr_tune.models import build_model
from oialr_tune.oialr import OIALR


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench(args: argparse.Namespace, out_dir: str) -> None:
    """One worker's run (all workers run it together); writes its measurements to out_dir/rank<r>.json."""
    workers = distributed.current()
    rank, world = (workers.rank, workers.world_size) if workers else (0, 1)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    device = distributed.local_device(device, workers)
    torch.manual_seed(0)
    model = build_model(args.model, tuple(args.in_shape), 10, **json.loads(args.model_args)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = OIALR(model, optimizer, delay=args.steps + 1, stability_frequency=args.frequency,
                       stability_threshold=None, sigma_cutoff_fraction=args.cutoff)
    share = args.batch // world
    g = torch.Generator(device="cpu").manual_seed(1)  # one global batch; each worker takes its share
    mine = slice(rank * share, (rank + 1) * share)
    x = torch.randn(args.batch, *args.in_shape, generator=g)[mine].to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g)[mine].to(device)
    state: dict[str, Any] = {"version": -1, "forward": model, "sent": None}

    def rewrap() -> None:
        """Under DDP: a new wrapper (and byte counter) whenever OIALR replaced parameters."""
        if workers and controller.parameters_version != state["version"]:
            state["version"] = controller.parameters_version
            state["forward"] = distributed.wrap(model, device)
            state["sent"] = distributed.count_allreduced_bytes(state["forward"])

    def step() -> tuple[float, float | None, int]:
        """One training step; returns (step seconds, check seconds or None, gradient bytes sent)."""
        rewrap()
        sent = state["sent"] if state["sent"] is not None else []  # (an empty list is the live one)
        before = len(sent)
        _sync(device)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(state["forward"](x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        t1 = time.perf_counter()
        version = controller.parameters_version
        controller.step()
        _sync(device)
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) if controller.parameters_version != version else None, sum(sent[before:])

    full = [step() for _ in range(args.steps)]  # the last one precedes the factorization at delay
    factorize = step()
    svd_before = controller.split.seconds if controller.split else 0.0
    checks = []
    for _ in range(args.checks):
        for _ in range(args.frequency - 1):
            step()
        svd0 = controller.split.seconds if controller.split else 0.0
        s = step()
        checks.append({"wall_s": s[1], "svd_s": (controller.split.seconds - svd0) if controller.split else None})
    controller.stability_frequency = 10**9  # no more checks: the steps below time training at the cut ranks
    low = [step() for _ in range(args.steps)]
    result = {
        "rank": rank, "world": world,
        "full_step_s": [s[0] for s in full[args.warmup:]], "low_step_s": [s[0] for s in low[args.warmup:]],
        "full_bytes": full[-1][2], "low_bytes": low[-1][2],
        "factorize_s": factorize[1], "checks": checks,
        "svds_run": controller.split.computed if controller.split else None,
        "svd_factorize_s": svd_before,
        "ranks": controller.layer_ranks(), "trainable_fraction": controller.trainable_fraction,
        "layers": len(controller.layer_ranks()),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _run(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        if world == 1:
            _bench(args, out)
        else:
            distributed.launch(_bench, world, args, out, gpu=args.device.startswith("cuda"))
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _table(args: argparse.Namespace, runs: dict[int, list[dict[str, Any]]]) -> str:
    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    lines = [
        "# OIALR under DDP",
        "",
        f"Command: `python benchmarks/ddp_oialr.py {' '.join(sys.argv[1:])}`".rstrip() + "  ",
        f"Model `{args.model}` {json.loads(args.model_args) or ''} on synthetic {tuple(args.in_shape)} inputs, "
        f"global batch {args.batch}, device {args.device} ({args.threads} torch thread(s) per worker on a CPU), "
        f"torch {torch.__version__}, {platform.platform()}, "
        f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}.",
        f"OIALR: factorize after {args.steps} steps, then {args.checks} checks every {args.frequency} steps, "
        f"sigma cutoff {args.cutoff}, gate off; medians of {args.steps - args.warmup} timed steps.",
        "",
        "## Time per check per rank",
        "",
        "| workers | rank | SVDs run (factorization + checks) | factorize s (wall) | check s (wall, median) "
        "| check s in own SVDs (median) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for world, ranks in runs.items():
        for r in ranks:
            svds = r["svds_run"] if r["svds_run"] is not None else r["layers"] * (1 + args.checks)
            own = [c["svd_s"] for c in r["checks"] if c["svd_s"] is not None]
            lines.append(f"| {world} | {r['rank']} | {svds} | {r['factorize_s']:.3f} | "
                         f"{med([c['wall_s'] for c in r['checks']]):.3f} | "
                         f"{med(own) if own else float('nan'):.3f} |")
    lines += ["", "With one worker every SVD runs in the one process (its own-SVD time is not separated: "
              "nan). Wall time of a check includes the broadcasts of the factors and of each layer's "
              "pinned U, S, Vᵀ and optimizer state.", "",
              "## Gradient bytes all-reduced per step", "",
              "| workers | full rank | after the cut | ratio | trainable fraction after the cut |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for world, ranks in runs.items():
        if world > 1:
            r = ranks[0]
            lines.append(f"| {world} | {r['full_bytes']:,} | {r['low_bytes']:,} | "
                         f"{r['low_bytes'] / r['full_bytes']:.3f} | {r['trainable_fraction']:.3f} |")
    lines += ["", "## Throughput (global examples / s)", "",
              "| workers | full rank | after the cut | vs 1 worker (full rank) | vs 1 worker (after the cut) |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    base = None
    for world, ranks in runs.items():
        full = args.batch / max(med(r["full_step_s"]) for r in ranks)
        low = args.batch / max(med(r["low_step_s"]) for r in ranks)
        base = base or (full, low)
        lines.append(f"| {world} | {full:,.0f} | {low:,.0f} | {full / base[0]:.2f} | {low / base[1]:.2f} |")
    ranks_text = json.dumps(runs[max(runs)][0]["ranks"])
    lines += ["", f"Ranks after the checks (every worker count gave the same): `{ranks_text}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per worker)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--model-args", default='{"hidden": [1024, 1024, 1024, 1024]}', help="JSON")
    p.add_argument("--in-shape", type=int, nargs="+", default=[784])
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=20, help="timed steps at full rank and again after the cut")
    p.add_argument("--warmup", type=int, default=5, help="of those, untimed warm-up steps")
    p.add_argument("--checks", type=int, default=3)
    p.add_argument("--frequency", type=int, default=5)
    p.add_argument("--cutoff", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process on a CPU")
    p.add_argument("--out", default="results/benchmarks/ddp_oialr.md")
    args = p.parse_args()
    runs = {w: _run(args, w) for w in args.workers}
    ranks = {json.dumps(r[0]["ranks"], sort_keys=True) for r in runs.values()}
    assert len(ranks) == 1, f"the worker counts reached different ranks: {ranks}"
    text = _table(args, runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
