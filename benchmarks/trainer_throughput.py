"""Training throughput of `oialr_tune.trainer.train` against a bare hand-written PyTorch loop.

Both train the same model (same init) on the same synthetic CIFAR-size images held on the device,
with the same optimizer (AdamW), precision and memory format; the bare loop is the shortest
correct loop a person would write (pre-normalised float tensors, randperm, forward, backward,
step). Our loop additionally sets the LR per step, keeps raw uint8 images and normalises each
batch, sums the loss on the device and checks it for NaN. Augmentation is off in both, so the
ratio measures the loop's overhead. Throughput is measured per epoch after the first (warm-up),
in runs interleaved (bare, ours, bare, ours, ...) so machine load hits both alike. On a shared
machine the *best* epoch of each loop is the least disturbed measurement, so the verdict uses it;
medians are reported beside it. Target: ours ≥ 90 % of bare. A third row shows `train()` with
OIALR on (informational: from the factorization on, the model itself is smaller).

    python benchmarks/trainer_throughput.py                     # CPU, small CNN, < 2 min
    python benchmarks/trainer_throughput.py --device cuda --precision bf16 --channels-last \\
        --model resnet18 --examples 25000 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from oialr_tune.config import TrainConfig, resolve_device, train_config_from_dict
from oialr_tune.data import load_data
from oialr_tune.models import build_model
from oialr_tune.trainer import make_optimizer, train

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks" / "trainer_throughput.md"


def make_config(args: argparse.Namespace, oialr: bool) -> TrainConfig:
    return train_config_from_dict({
        "seed": 0,
        "device": args.device,
        "model": {"name": args.model},
        "data": {"name": "synthetic", "augment": False,
                 "synthetic": {"num_examples": args.examples, "image_size": 32, "channels": 3}},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"epochs": args.epochs, "batch_size": args.batch_size},
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "oialr": {"enabled": oialr, "delay": 0.25, "stability_frequency": 20},
    })


def bare_loop(cfg: TrainConfig) -> list[float]:
    """The reference: a plain loop over pre-normalised tensors; returns examples/s per epoch."""
    device = resolve_device(cfg.device)
    splits = load_data(cfg.data, device)  # the same examples as train() uses
    data = splits.train
    x_all = (data.x.float() * data.a + data.b).contiguous()  # normalised once, up front
    y_all = data.y
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, splits.in_shape, splits.num_classes, **cfg.model.args)
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg)
    forward = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
           else contextlib.nullcontext())
    bs = cfg.schedule.batch_size
    steps = len(y_all) // bs
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    rates = []
    for _ in range(cfg.schedule.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(y_all), generator=g, device=device)
        for i in range(steps):
            idx = order[i * bs : (i + 1) * bs]
            x = x_all[idx].contiguous(memory_format=memory_format)
            with amp:
                loss = F.cross_entropy(forward(x), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()  # wait for the device, as train() does once per epoch
        rates.append(steps * bs / (time.perf_counter() - t0))
    return rates


def ours(cfg: TrainConfig) -> list[float]:
    result = train(cfg)
    return [m["examples_per_s"] for m in result.history]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU: {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="cnn")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--examples", type=int, default=1500, help="synthetic examples (train ≈ 70 %%)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5, help="per run; the first is warm-up")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    full, low_rank = make_config(args, oialr=False), make_config(args, oialr=True)
    device = resolve_device(args.device)
    rates: dict[str, list[float]] = {"bare": [], "ours": [], "ours_oialr": []}
    for _ in range(args.repeats):
        rates["bare"] += bare_loop(full)[1:]
        rates["ours"] += ours(full)[1:]
    rates["ours_oialr"] += ours(low_rank)[1:]
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}

    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")]
    if args.out != OUT:  # the output path is not part of the measurement
        shown = [a for a in shown if a != str(args.out)]
    command = "python benchmarks/trainer_throughput.py " + " ".join(shown)
    names = {"bare": "bare PyTorch loop", "ours": "`train()`, full rank",
             "ours_oialr": "`train()`, OIALR (delay 25 %, informational)"}
    ratio = best["ours"] / best["bare"]
    flags = "".join(f", {f}" for f, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on)
    title = f"## {device.type.upper()}: {args.model}, {args.precision}{flags}"
    lines = [
        title,
        "",
        f"- command: `{command.strip()}`",
        f"- device: {device_name(device)}",
        f"- model `{args.model}`, synthetic 3×32×32 images, {len(load_data(full.data, device).train)} train "
        f"examples, batch {args.batch_size}, AdamW, precision {args.precision}, channels_last "
        f"{args.channels_last}, compile {args.compile}, augmentation off",
        f"- examples/s over epochs 2..{args.epochs} of {args.repeats} interleaved run(s) per loop"
        " (OIALR: one run); best = least disturbed epoch",
        "",
        "| loop | best examples/s | vs bare (best) | median examples/s | vs bare (median) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {names[k]} | {best[k]:,.0f} | {best[k] / best['bare']:.1%} | {med[k]:,.0f} | "
          f"{med[k] / med['bare']:.1%} |" for k in names),
        "",
        f"Target: `train()` full rank ≥ 90 % of bare (best epochs): **{'met' if ratio >= 0.9 else 'NOT met'}** "
        f"({ratio:.1%}).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.out, title, section)


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section with this title in the results file (CPU and GPU runs share one file)."""
    header = "# Trainer throughput: `train()` vs a bare PyTorch loop\n\n"
    sections = {}
    if path.exists():
        body = path.read_text().removeprefix(header)
        for chunk in body.split("\n## "):
            chunk = chunk.strip("\n")
            if chunk:
                chunk = chunk if chunk.startswith("## ") else "## " + chunk
                sections[chunk.splitlines()[0]] = chunk + "\n"
    sections[title] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n".join(sections.values()))


if __name__ == "__main__":
    main()
