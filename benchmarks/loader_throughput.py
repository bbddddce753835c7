"""Large data: is it the data pipeline or the model that limits training? ImageFolder on disk.

Writes an ImageFolder tree (``train/<class>/<i>.jpg``, default 2,000 JPEG images in 10 classes,
source images 1.25× the training crop) into a temporary folder, then measures, through oialr-tune's
own code (``oialr_tune.data``: a torch DataLoader with worker processes, pinned memory on CUDA, the
default prefetch of 2 batches per worker; decoding + RandomResizedCrop + flip + normalize):

1. **data pipeline**: images/s of one pass over the training split with N loader workers, batches
   moved to the device (worker start-up included: the trainer's loader workers are not persistent,
   so every epoch pays it);
2. **model**: images/s of training steps (forward, backward, AdamW) of the model on the same batches,
   already decoded and in memory: what the model could do with a free data pipeline;
3. **trainer end to end**: ``oialr_tune.trainer.train`` for one epoch on the ImageFolder config, with
   N workers; its ``examples_per_s`` (training steps only, waiting for data included).

The smaller of (1) and (2) limits; (3) shows what is achieved when both share the machine.

Usage::

    python benchmarks/loader_throughput.py [--images 2000] [--size 64] [--workers 0 1 2]
        [--model resnet18] [--device cpu] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def write_imagefolder(root: Path, images: int, classes: int, side: int, fmt: str, seed: int = 0) -> float:
    """`images` images of side × side pixels under root/train/<class>/; returns the bytes written (MB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:side, 0:side][1] / side
    total = 0
    for i in range(images):
        c = i % classes
        folder = root / "train" / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        # A class-dependent colour gradient plus noise: compresses like a photo more than pure noise does.
        base = np.stack([np.sin(2 * np.pi * (xx * (c + 1) / classes + k / 3)) for k in range(3)], axis=-1)
        img = np.clip(127 + 80 * base + rng.normal(0, 25, (side, side, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.{fmt}"
        Image.fromarray(img).save(path, quality=90) if fmt == "jpg" else Image.fromarray(img).save(path)
        total += path.stat().st_size
    return total / 1e6


def data_config(root: Path, size: int, workers: int) -> Any:
    from oialr_tune.config import DataConfig

    return DataConfig(name="imagefolder", root=str(root), image_size=size, num_workers=workers)


def loader_rate(root: Path, size: int, workers: int, batch: int, device: torch.device, epochs: int = 2) -> dict:
    """Images/s of full passes over the train split (augmented), batches on `device`."""
    from oialr_tune.data import load_data

    splits = load_data(data_config(root, size, workers), device)
    loader = splits.loader("train", batch, train=True, augment=True, seed=0)
    rates, first = [], []
    for _ in range(epochs):
        n, t0, t_first = 0, time.perf_counter(), None
        for x, _y in loader:
            if t_first is None:
                t_first = time.perf_counter() - t0
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
        first.append(t_first)
    return {"images_per_s": float(np.mean(rates)), "first_batch_s": float(np.mean(first)), "images": n}


def model_rate(root: Path, size: int, batch: int, model_name: str, model_args: dict, device: torch.device,
               steps: int = 8, warmup: int = 2) -> dict[str, float]:  # fmt: skip
    """Images/s of training steps on batches already decoded and on the device."""
    from oialr_tune.data import load_data
    from oialr_tune.models import build_model

    splits = load_data(data_config(root, size, 0), device)
    batches = []
    for x, y in splits.loader("train", batch, train=True, augment=True, seed=0):
        batches.append((x, y))
        if len(batches) == steps + warmup:
            break
    torch.manual_seed(0)
    model = build_model(model_name, splits.in_shape, splits.num_classes, **model_args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[:warmup]:
        step(x, y)
    rates = []
    for x, y in batches[warmup:]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(x) / (time.perf_counter() - t0))
    # Per step: the median is the typical rate, the best the least disturbed one (a shared machine).
    return {"median": float(np.median(rates)), "best": float(max(rates))}


def trainer_rate(root: Path, size: int, workers: int, batch: int, model_name: str, model_args: dict,
                 device: torch.device) -> dict:  # fmt: skip
    """One epoch of the real trainer on the ImageFolder config: its examples/s and epoch time."""
    from oialr_tune import data
    from oialr_tune.config import train_config_from_dict
    from oialr_tune.trainer import train

    data._CACHE.clear()  # a fresh load, as a new process would do
    cfg = train_config_from_dict({
        "device": str(device),
        "model": {"name": model_name, "args": model_args},
        "data": {"name": "imagefolder", "root": str(root), "image_size": size, "num_workers": workers},
        "schedule": {"epochs": 1, "batch_size": batch},
        "oialr": {"enabled": False},
    })  # fmt: skip
    m = train(cfg).history[0]
    return {"examples_per_s": m["examples_per_s"], "epoch_s": m["train_time_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="training crop side in pixels (files are 1.25x)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to try")
    p.add_argument("--trainer-workers", type=int, nargs="+", default=[0, 2],
                   help="worker counts for the end-to-end train() epochs (2 is the config default)")
    p.add_argument("--model-steps", type=int, default=8, help="timed training steps of the model alone")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--cifar-stem", choices=["auto", "yes", "no"], default="no",
                   help="ResNet stem: 'no' = torchvision's 7x7/2 + max-pool (the default here: cheap at 64 px)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in this process (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_args: dict[str, Any] = {}
    if args.model.startswith("resnet") and args.cifar_stem != "auto":
        model_args["cifar_stem"] = args.cifar_stem == "yes"
    load0, t_start = os.getloadavg()[0], time.time()

    with tempfile.TemporaryDirectory(prefix="imagefolder-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        mb = write_imagefolder(root, args.images, args.classes, round(args.size * 1.25), args.format)
        print(f"wrote {args.images} {args.format} files ({mb:.1f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
        loaders = {}
        for w in args.workers:
            loaders[w] = loader_rate(root, args.size, w, args.batch, device)
            print(f"loader, {w} workers: {loaders[w]['images_per_s']:.0f} images/s", flush=True)
        model_rates = model_rate(root, args.size, args.batch, args.model, model_args, device, steps=args.model_steps)
        model = model_rates["median"]
        print(f"model {args.model}: {model:.0f} images/s (best step {model_rates['best']:.0f})", flush=True)
        trainer = {}
        for w in args.trainer_workers:
            trainer[w] = trainer_rate(root, args.size, w, args.batch, args.model, model_args, device)
            print(f"trainer, {w} workers: {trainer[w]['examples_per_s']:.0f} images/s", flush=True)
        n_train = loaders[args.workers[0]]["images"]
    load1 = os.getloadavg()[0]

    best_w = max(loaders, key=lambda w: loaders[w]["images_per_s"])
    best_loader = loaders[best_w]["images_per_s"]
    limit = "the model" if model < best_loader else "the data pipeline"
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU, {torch.get_num_threads()} torch threads"
    stems = {"no": ", torchvision stem (7×7/2 conv + max-pool)", "yes": ", CIFAR stem (3×3/1 conv)"}
    stem = stems.get(args.cifar_stem, "")
    cmd = "python benchmarks/loader_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = [f"| data pipeline, {w} worker{'s' if w != 1 else ''} | {r['images_per_s']:,.0f} | "
            f"first batch after {r['first_batch_s']:.2f} s |" for w, r in loaders.items()]  # fmt: skip
    rows.append(f"| model training steps alone ({args.model}, batches in memory) | {model:,.0f} | "
                f"forward + backward + AdamW; median of {args.model_steps} steps "
                f"(best {model_rates['best']:,.0f}) |")  # fmt: skip
    rows += [f"| `train()` end to end, {w} worker{'s' if w != 1 else ''} | {r['examples_per_s']:,.0f} | "
             f"epoch {r['epoch_s']:.1f} s incl. validation |" for w, r in trainer.items()]  # fmt: skip
    text = f"""# Data pipeline vs model throughput (ImageFolder)

{args.images} {args.format.upper()} images in {args.classes} classes ({mb:.1f} MB on disk, {round(args.size * 1.25)} px
files), {args.size} px training crops (RandomResizedCrop + flip + normalize, as `oialr_tune.data` does for
ImageFolder), batch {args.batch}, {n_train} training images per pass (the rest is validation/test).
Model: {args.model}{stem}, fp32. Device: {dev_name}; machine: {os.cpu_count()} CPU cores
({platform.machine()}), torch {torch.__version__}; shared with other jobs: load average {load0:.1f} at the
start, {load1:.1f} at the end. Whole benchmark {(time.time() - t_start) / 60:.1f} min.

Command: `{cmd}`

| what | images/s | note |
|---|---:|---|
{chr(10).join(rows)}

Data pipeline: one pass over the training split through the trainer's DataLoader (worker start-up
included, as every epoch pays it: the workers are not persistent), batches moved to the device.
Model: training steps on already decoded batches. `train()`: the trainer's own `examples_per_s`
(training steps only, waiting for data included) for one epoch.

**Limit here: {limit}** — the best data pipeline ({best_w} workers) delivers {best_loader:,.0f} images/s,
the model consumes {model:,.0f} images/s ({max(best_loader, model) / min(best_loader, model):.1f}× apart).
With few cores, loader workers and the training step share the same cores, and starting worker
processes each epoch costs more than it brings while the model is this slow; on a GPU the model side
is orders of magnitude faster, and the CPU decoding the JPEGs becomes the limit unless enough workers
run (measure it there: `python benchmarks/loader_throughput.py --device cuda --size 224 --workers 0 4 8
--trainer-workers 8`).
"""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
