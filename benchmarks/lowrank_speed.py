"""Forward+backward time of low-rank layers: dense vs our LowRankLayer vs a rebuilt-W layer.

Two layer stacks, each at ranks 5/10/25/50/100 % of full rank:

* ``vit_mlp``: ViT-B-sized Linear 768 → 3072 → 768 on a batch of tokens (no activation between:
  its cost does not depend on the rank, and at 5 % rank a GELU alone takes longer than both layers);
* ``resnet_conv``: a ResNet-sized Conv2d 256 → 256, 3×3, on 16×16 (CPU) or 32×32 (GPU) feature maps.

"ours" is :class:`oialr_tune.oialr.LowRankLayer`, which runs factorized when that is cheaper;
"rebuilt" computes W = U S Vᵀ in every forward and runs the dense op, as the authors' code does.
Times are the fastest of interleaved rounds (dense, ours, rebuilt, dense, ...), reported as
ratios to the dense stack measured in the same rounds.
The FLOP ratio is our layer's multiply-adds (forward + backward, no gradient for the frozen bases)
over the dense layer's; the target is ours ≤ 1.2 × FLOP ratio at rank ≤ 25 %.

    python benchmarks/lowrank_speed.py                       # CPU
    python benchmarks/lowrank_speed.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from oialr_tune.oialr import LowRankLayer, factorized_is_cheaper

RANK_FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.00)


class RebuiltLayer(LowRankLayer):
    """The same factors, always computed by rebuilding the dense W (the authors' way)."""

    @property
    def factorized(self) -> bool:
        return False


def make_stack(kind: str, rank_fraction: float | None, variant: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if kind == "vit_mlp":
        layers = [nn.Linear(768, 3072), nn.Linear(3072, 768)]
    else:
        layers = [nn.Conv2d(256, 256, 3, padding=1)]
    if variant != "dense":
        cls = LowRankLayer if variant == "ours" else RebuiltLayer
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear | nn.Conv2d):
                W = layer.weight.detach().reshape(layer.weight.shape[0], -1)
                U, s, Vt = torch.linalg.svd(W, full_matrices=False)
                k = max(1, round(rank_fraction * s.shape[0]))
                layers[i] = cls.from_dense(layer, U[:, :k], torch.diag(s[:k]), Vt[:k])
    return nn.Sequential(*layers).to(device)


def stack_flops(kind: str, rank_fraction: float | None, batch: int, side: int) -> float:
    """Multiply-adds of forward + backward (input needs no grad; frozen bases get none)."""
    if kind == "vit_mlp":
        shapes = [(3072, 768, batch, True), (768, 3072, batch, False)]  # (m, n, positions, first)
    else:
        shapes = [(256, 256 * 9, batch * side * side, True)]
    total = 0.0
    for m, n, pos, first in shapes:
        dense = pos * m * n * (2 if first else 3)  # fwd + grad W (+ grad x)
        if rank_fraction is None:
            total += dense
            continue
        k = max(1, round(rank_fraction * min(m, n)))
        if factorized_is_cheaper(k, m, n):
            fwd = pos * k * (m + n) + m * k * k  # x·Vᵀ, ·(U S)ᵀ, and U S itself
            bwd = pos * m * k * 2 + m * k * k + (0 if first else pos * k * n)
            total += fwd + bwd
        else:  # rebuild W = (U S) Vᵀ, run dense, and pull grad W back to S
            total += dense + m * k * k + m * k * n + (m * n * k + m * k * k)
    return total


def time_stacks(models: list[nn.Module], x: torch.Tensor, dtype: torch.dtype | None, repeats: int) -> list[float]:
    """Fastest forward+backward time of each model, measured in interleaved rounds.

    Interleaving puts every model under the same machine load, and the fastest round is the
    least disturbed one: on a shared CPU, medians drift with other jobs, minima do not.
    """

    def once(model: nn.Module) -> float:
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        out.float().sum().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for model in models:
        for _ in range(3):
            once(model)
    best = [math.inf] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            best[i] = min(best[i], once(model))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    repeats = args.repeats or (50 if on_gpu else 7)
    tokens = 65536 if on_gpu else 1024  # on the GPU, big enough that launches do not dominate
    images = 256 if on_gpu else 8
    side = 32 if on_gpu else 16
    cpu = f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device) if on_gpu else cpu

    rows = []
    for kind in ("vit_mlp", "resnet_conv"):
        g = torch.Generator().manual_seed(1)
        shape = (tokens, 768) if kind == "vit_mlp" else (images, 256, side, side)
        x = torch.randn(*shape, generator=g).to(device)
        batch = tokens if kind == "vit_mlp" else images
        dense = make_stack(kind, None, "dense", device)
        dense_f = stack_flops(kind, None, batch, side)
        for frac in RANK_FRACTIONS:
            ours = make_stack(kind, frac, "ours", device)
            mode = "factorized" if next(m for m in ours if isinstance(m, LowRankLayer)).factorized else "rebuilt"
            rebuilt = make_stack(kind, frac, "rebuilt", device)
            dense_t, ours_t, rebuilt_t = time_stacks([dense, ours, rebuilt], x, dtype, repeats)
            flop_ratio = stack_flops(kind, frac, batch, side) / dense_f
            rows.append((kind, frac, mode, dense_t, ours_t / dense_t, rebuilt_t / dense_t, flop_ratio))
            print(f"{kind:12s} rank {frac:4.0%}: ours {ours_t / dense_t:.2f}x ({mode}), "
                  f"rebuilt {rebuilt_t / dense_t:.2f}x, FLOP ratio {flop_ratio:.2f}", flush=True)

    cmd = "python benchmarks/lowrank_speed.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"# Low-rank layer speed ({args.device}, {args.dtype})",
        "",
        f"Device: {name}. torch {torch.__version__}. Command: `{cmd}`.",
        f"Forward+backward of one stack, fastest of {repeats} interleaved rounds; inputs: {tokens} tokens (vit_mlp), "
        f"{images}×256×{side}×{side} (resnet_conv). Times are ratios to the dense stack in the same run.",
        "",
        "| stack | rank | our path | dense time (ms) | ours / dense | rebuilt-W / dense | FLOP ratio "
        "| ours / (FLOP ratio × dense) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, frac, mode, dense_t, ours_r, rebuilt_r, flop_r in rows:
        lines.append(f"| {kind} | {frac:.0%} | {mode} | {dense_t * 1e3:.1f} | {ours_r:.2f} | {rebuilt_r:.2f} | "
                     f"{flop_r:.2f} | {ours_r / flop_r:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lowrank_speed_{device.type}_{args.dtype}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
