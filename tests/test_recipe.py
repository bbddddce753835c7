"""The authors' training recipe (`recipe: authors`) and its pieces, each a plain config key."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from oialr_tune.config import train_config_from_dict, train_config_to_dict, with_overrides
from oialr_tune.errors import UserError
from oialr_tune.models import build_model
from oialr_tune.precision import autocast, grad_scaler
from oialr_tune.tasks import task_for
from oialr_tune.trainer import lr_at, make_optimizer, train


@pytest.mark.parametrize("shape", [
    {"warmup_lr_fraction": 1 / 30, "min_lr_fraction": 1 / 30, "k_decay": 0.34, "cycles": 1, "cycle_decay": 0.4},
    {"warmup_lr_fraction": 0.1, "min_lr_fraction": 0.01, "k_decay": 2.0, "cycles": 3, "cycle_decay": 0.5},
    {"warmup_lr_fraction": 0.0, "min_lr_fraction": 0.05, "k_decay": 1.0, "cycles": 4, "cycle_mul": 1.5,
     "cycle_decay": 0.4},
])
@pytest.mark.parametrize("warmup_steps", [0, 17])
def test_timm_cosine_is_timms_cosine_scheduler_stepped_per_update(shape: dict[str, Any], warmup_steps: int) -> None:
    """Built with the arguments our keys map to, timm's scheduler gives the same LR at every update."""
    total, base = 301, 3e-4
    timm_args = {
        "t_initial": None, "lr_min": shape["min_lr_fraction"] * base, "cycle_mul": shape.get("cycle_mul", 1.0),
        "cycle_decay": shape["cycle_decay"], "cycle_limit": shape["cycles"], "warmup_t": warmup_steps,
        "warmup_lr_init": shape["warmup_lr_fraction"] * base, "warmup_prefix": True, "k_decay": shape["k_decay"],
        "t_in_epochs": False,
    }
    # The first cycle's length in updates: the cycles fill the run after the warm-up.
    mul, cycles, rest = timm_args["cycle_mul"], shape["cycles"], total - warmup_steps
    timm_args["t_initial"] = int(rest / cycles if mul == 1.0 else rest * (mul - 1) / (mul**cycles - 1))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = CosineLRScheduler(optimizer, **timm_args)
    ours_kw = {k: v for k, v in shape.items() if k != "min_lr_fraction"}
    for t in range(total):
        scheduler.step_update(t)  # the authors call it after each update with the count of updates
        ours = lr_at(t, total, base_lr=base, warmup_steps=warmup_steps, decay="timm_cosine",
                     min_lr_fraction=shape["min_lr_fraction"], **ours_kw)
        assert ours == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15), t
    assert optimizer.param_groups[0]["lr"] < base * 0.2  # the run ends low (not a flat schedule)


def test_recipe_authors_fills_in_only_the_keys_a_config_leaves_out() -> None:
    cfg = train_config_from_dict({"recipe": "authors", "schedule": {"epochs": 3, "k_decay": 1.0}})
    assert (cfg.schedule.decay, cfg.schedule.k_decay, cfg.schedule.cycle_decay) == ("timm_cosine", 1.0, 0.4)
    assert cfg.schedule.epochs == 3 and cfg.schedule.warmup_lr_fraction == pytest.approx(1 / 30)
    assert (cfg.optimizer.weight_decay_on, cfg.label_smoothing, cfg.precision) == ("all", 0.1, "bf16_on_gpu")
    assert not cfg.mixup.enabled  # their ViT runs have no mixup
    assert train_config_from_dict(train_config_to_dict(cfg)) == cfg
    plain = train_config_from_dict({})
    assert (plain.recipe, plain.schedule.decay, plain.optimizer.weight_decay_on) == ("default", "cosine", "matrices")
    assert with_overrides(cfg, {"schedule.k_decay": 0.5}).schedule.k_decay == 0.5  # each piece is searchable
    with pytest.raises(UserError, match=r"^recipe: set it in the base config"):
        with_overrides(cfg, {"recipe": "default"})
    with pytest.raises(UserError, match=r"^recipe: must be one of"):
        train_config_from_dict({"recipe": "theirs"})
    with pytest.raises(UserError, match=r"^mixup: needs an even schedule.batch_size"):
        train_config_from_dict({"mixup": {"mixup_alpha": 0.2}, "schedule": {"batch_size": 63}})


@pytest.mark.parametrize("where", ["matrices", "all"])
def test_weight_decay_on(where: str) -> None:
    """Ours: no decay on biases and norm scales; the authors': one group, every parameter decayed."""
    cfg = train_config_from_dict({"optimizer": {"weight_decay": 0.05, "weight_decay_on": where}})
    model = build_model("mlp", (64,), 10)
    groups = make_optimizer(model, cfg).param_groups
    decayed = sum(p.numel() for g in groups if g["weight_decay"] > 0 for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    if where == "all":
        assert len(groups) == 1 and decayed == total
    else:
        assert decayed == sum(p.numel() for p in model.parameters() if p.ndim >= 2) < total


def test_bf16_on_gpu_is_fp32_on_the_cpu() -> None:
    assert isinstance(autocast(torch.device("cpu"), "bf16_on_gpu"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), "bf16"), torch.autocast)


def test_only_fp16_scales_the_loss() -> None:
    cpu = torch.device("cpu")
    assert [grad_scaler(cpu, p).is_enabled() for p in ("fp32", "bf16", "bf16_on_gpu", "fp16")] == [False] * 3 + [True]


def _digits(**extra: Any) -> dict[str, Any]:
    return {"device": "cpu", "model": {"name": "mlp", "args": {"hidden": [32]}}, "schedule": {"epochs": 1},
            "oialr": {"enabled": False}, **extra}


def test_mixup_gives_soft_targets_and_stays_deterministic() -> None:
    """timm's Mixup mixes the batch and smooths the targets; the same seed mixes the same way."""
    cfg = train_config_from_dict(_digits(mixup={"mixup_alpha": 0.4}, label_smoothing=0.1))
    task = task_for(cfg)
    x, y = torch.randn(8, 64), torch.arange(8) % 4
    mixed_x, soft = task.mix(x.clone(), y, step=3, num_classes=4)
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    assert soft.min() > 0  # smoothing folded in: no exact zeros
    again_x, again = task_for(cfg).mix(x.clone(), y, step=3, num_classes=4)
    assert torch.equal(mixed_x, again_x) and torch.equal(soft, again)
    assert not torch.equal(task.mix(x.clone(), y, step=4, num_classes=4)[0], mixed_x)
    runs = [train(cfg).history[0]["train_loss"] for _ in range(2)]
    assert runs[0] == runs[1] != train(train_config_from_dict(_digits(label_smoothing=0.1))).history[0]["train_loss"]
