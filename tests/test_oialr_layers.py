"""Which layers OIALR takes on: include/exclude patterns, weights it must leave dense (frozen, tied, in no
optimizer), several optimizers, and GPT-2's Conv1D (a Linear stored [in, out])."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oialr_tune.config import train_config_from_dict
from oialr_tune.oialr import OIALR, apply_low_rank_structure, export_dense, low_rank_structure
from oialr_tune.run_record import make_controller


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(width, width), "k": nn.Linear(width, width)})
        self.mlp = nn.ModuleDict({"fc": nn.Linear(width, width)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp["fc"](torch.relu(self.attn["q"](x) * self.attn["k"](x)))


def _net(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.Sequential(Block(width), Block(width)), nn.Linear(width, 3))


def _factorize(model: nn.Module, optimizer: torch.optim.Optimizer | list, **knobs) -> OIALR:
    controller = OIALR(model, optimizer, delay=1, stability_frequency=1, **knobs)
    controller.step()
    return controller


def test_include_and_exclude_patterns_pick_the_layers() -> None:
    model = _net()
    c = _factorize(model, torch.optim.SGD(model.parameters(), lr=0.1), include=["*.attn.*"], exclude=["1.1.*"])
    assert set(c.layer_ranks()) == {"1.0.attn.q", "1.0.attn.k"}
    dense = c.dense_layers()
    assert dense["1.1.attn.q"] == "excluded by oialr.exclude pattern '1.1.*'"
    assert dense["1.0.mlp.fc"] == "matches no oialr.include pattern ['*.attn.*']"
    assert dense["2"].startswith("last layer kept dense")
    assert isinstance(model[1][1].attn["q"], nn.Linear) and not isinstance(model[1][0].attn["q"], nn.Linear)
    with pytest.raises(ValueError, match=r"^OIALR exclude: pattern 'head' matches no eligible layer \(layers: 0, "):
        OIALR(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), exclude=["head"])
    cfg = train_config_from_dict({"oialr": {"include": ["*.attn.*"], "exclude": ["1.1.*"]}})
    model = _net()
    assert make_controller(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg.oialr, 100).include == ["*.attn.*"]


def test_frozen_tied_and_unoptimized_weights_stay_dense_with_the_reason() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(40, 16)
            self.body = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])
            self.head = nn.Linear(16, 40, bias=False)
            self.head.weight = self.embed.weight  # tied, as in a language model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            for layer in self.body:
                h = torch.relu(layer(h))
            return self.head(h)

    torch.manual_seed(0)
    model = Tied()
    model.body[0].weight.requires_grad_(False)
    params = [p for name, p in model.named_parameters() if not name.startswith("body.1.")]
    c = _factorize(model, torch.optim.Adam(params, lr=1e-3), keep_last_layer=False)
    dense = c.dense_layers()
    assert dense["body.0"].startswith("frozen (requires_grad=False)")
    assert dense["body.1"].startswith("in no optimizer's parameters")
    assert dense["head"] == "tied: the same tensor as embed.weight, head.weight"
    assert set(c.layer_ranks()) == {"body.2", "body.3"}
    assert model.head.weight is model.embed.weight  # still tied
    assert isinstance(model.body[0], nn.Linear) and isinstance(model.body[1], nn.Linear)


def test_several_optimizers_each_get_their_layers_s_and_state() -> None:
    model = _net()
    first = torch.optim.Adam([*model[0].parameters(), *model[1][0].parameters()], lr=1e-2)
    second = torch.optim.SGD([*model[1][1].parameters(), *model[2].parameters()], lr=1e-2, momentum=0.9)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    controller = OIALR(model, [first, second], delay=3, stability_frequency=2, stability_threshold=None,
                       sigma_cutoff_fraction=0.3)
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        first.zero_grad(), second.zero_grad()
        loss.backward()
        first.step(), second.step()
        controller.step()
    assert any(e.kind == "cut" for e in controller.history)
    in_first = {id(p) for g in first.param_groups for p in g["params"]}
    in_second = {id(p) for g in second.param_groups for p in g["params"]}
    assert id(model[1][0].attn["q"].S) in in_first and id(model[1][1].attn["q"].S) in in_second
    assert "momentum_buffer" in second.state[model[1][1].attn["q"].S]  # carried through the cut
    assert torch.isfinite(F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=r"^OIALR optimizer: must be a torch.optim.Optimizer or a list of them"):
        OIALR(model, [first, "adam"])


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 uses it: a Linear whose weight is [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_gpt2_conv1d_layers_are_factorized_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 16), nn.GELU(), Conv1D(16, 48), nn.Linear(16, 4))
    x = torch.randn(2, 5, 16)
    before = model(x).detach()
    c = _factorize(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert set(c.layer_ranks()) == {"0", "2"}
    assert torch.allclose(model(x), before, atol=1e-5)
    model(x).sum().backward()
    assert model[0].parametrizations["weight"].original.grad is not None  # S trains
    ranks = low_rank_structure(model)
    assert ranks == {"0": 16, "2": 16}
    fresh = nn.Sequential(Conv1D(48, 16), nn.GELU(), Conv1D(16, 48), nn.Linear(16, 4))
    apply_low_rank_structure(fresh, ranks)
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(fresh(x), before, atol=1e-5)
    dense = export_dense(model)
    assert dense[0].weight.shape == (16, 48) and torch.allclose(dense(x), before, atol=1e-5)
