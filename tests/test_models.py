"""Every registered model builds, trains one step on the CPU, and exposes layers OIALR can factorize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oialr_tune.errors import UserError
from oialr_tune.models import MODELS, build_model, check_model_args
from oialr_tune.oialr import OIALR

# (name, in_shape, args): small enough that the whole file runs in seconds on two cores.
CASES = [
    ("mlp", (1, 8, 8), {"hidden": [32, 16], "dropout": 0.1}),
    ("cnn", (3, 32, 32), {"channels": [8, 16], "hidden": 32}),
    ("cnn", (1, 8, 8), {}),
    ("resnet18", (3, 32, 32), {}),
    ("resnet18", (1, 28, 28), {}),  # one-channel input, CIFAR stem chosen for small images
    ("resnet50", (3, 16, 16), {"cifar_stem": True}),
    ("vit_small", (3, 32, 32), {"patch_size": 8, "dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.0}),
    ("vit_b16", (3, 32, 32), {}),  # the real ViT-B/16 at 32 px: 4 patches + class token
]


def test_every_model_has_a_case() -> None:
    assert {name for name, _, _ in CASES} == set(MODELS)


@pytest.mark.parametrize(("name", "in_shape", "args"), CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES])
def test_builds_and_trains(name: str, in_shape: tuple[int, int, int], args: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_shape, 10, **args)
    x, y = torch.randn(2, *in_shape), torch.tensor([1, 7])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    for _ in range(2):  # two steps: ViT-B/16's head starts at zero, so only it moves in the first
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert changed >= 0.9 * len(before)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_vit_small_attention_is_factorizable() -> None:
    model = build_model("vit_small", (3, 16, 16), 10, patch_size=4, dim=32, depth=1, heads=2)
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear) and isinstance(model.blocks[0].attn.proj, nn.Linear)
    controller = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), delay=1, stability_frequency=1)
    names = set(controller.layer_ranks())
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.3"} <= names
    assert "head" not in names  # the classifier stays full rank by default


def test_resnet_stems() -> None:
    small = build_model("resnet18", (1, 32, 32), 10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    big = build_model("resnet18", (1, 96, 96), 10)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1


def test_bad_model_args() -> None:
    with pytest.raises(UserError, match=r"^model\.args\.depth: unknown argument for model 'mlp'"):
        check_model_args("mlp", {"depth": 3})
    with pytest.raises(UserError, match=r"^model\.args\.hidden: sizes must be >= 1"):
        check_model_args("mlp", {"hidden": [0]})
    with pytest.raises(UserError, match=r"^model\.args\.cifar_stem"):
        check_model_args("resnet18", {"cifar_stem": "yes"})
    with pytest.raises(UserError, match=r"^model\.args\.patch_size"):
        build_model("vit_small", (3, 10, 10), 10, patch_size=4)
    with pytest.raises(UserError, match=r"^model\.name: vit_b16"):
        build_model("vit_b16", (3, 24, 24), 10)
    with pytest.raises(UserError, match=r"^model\.name: unknown model"):
        build_model("lenet", (1, 8, 8), 10)
