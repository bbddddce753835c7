"""OIALR fidelity: the three regression bugs, and each rule of the authors' preset against ours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oialr_tune.config import TrainConfig, train_config_from_dict
from oialr_tune.oialr import OIALR, PRESETS, export_dense
from oialr_tune.trainer import train


def _digits_mlp(epochs: int = 3, **oialr) -> TrainConfig:
    """Digits MLP, 19 steps per epoch; OIALR factorizes at step 10 and checks every 5 steps."""
    return train_config_from_dict({
        "device": "cpu",
        "model": {"name": "mlp", "args": {"hidden": [64, 64]}},
        "schedule": {"epochs": epochs},
        "grad_clip": 1.0,
        "oialr": {"delay": 10, "stability_frequency": 5, "stability_threshold": None, **oialr},
    })

# --- regressions --------------------------------------------------------------------------------


def _steps(model: nn.Module, opt: torch.optim.Optimizer, ctl: OIALR, x: torch.Tensor, y: torch.Tensor, n: int):
    for _ in range(n):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()


def _step_by_hand(model: nn.Module, opt: torch.optim.Optimizer, ctl: OIALR, x: torch.Tensor, y: torch.Tensor,
                  S: nn.Parameter) -> dict[str, torch.Tensor]:
    """One training step whose optimizer state for `S` is read between `opt.step()` and `ctl.step()`."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[S].items()}
    ctl.step()
    return before


def _optimizer_params(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def test_biases_of_factorized_layers_keep_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, delay=2, stability_frequency=5, stability_threshold=None, sigma_cutoff_fraction=0.0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    _steps(model, opt, ctl, x, y, 2)
    first = model[0]
    bias_before, S_before = first.bias.detach().clone(), first.S.detach().clone()
    _steps(model, opt, ctl, x, y, 10)
    assert (model[0].bias - bias_before).abs().max() > 0
    assert (model[0].S - S_before).abs().max() > 0
    # Every tensor that requires a gradient is one the optimizer updates (so trainable_fraction is honest).
    assert {id(p) for p in model.parameters() if p.requires_grad} == _optimizer_params(opt)


def test_export_dense_leaves_a_parametrized_attention_model_working() -> None:
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attend()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = OIALR(model, opt, delay=1, stability_frequency=1, stability_threshold=None)
    x, y = torch.randn(4, 5, 32), torch.randint(0, 3, (4,))
    _steps(model, opt, ctl, x, y, 3)
    dense = export_dense(model)
    torch.testing.assert_close(dense(x), model(x))
    _steps(model, opt, ctl, x, y, 2)  # the README's in-loop use: export, then keep training
    assert type(dense.attn) is nn.MultiheadAttention


def test_gradient_clipping_sees_the_live_parameters(monkeypatch) -> None:
    """Clipping must cover exactly the tensors being trained, also after a rotation without a cut."""
    import oialr_tune.trainer as trainer_module

    built: list[nn.Module] = []
    real_build, real_clip = trainer_module.build_model, torch.nn.utils.clip_grad_norm_

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    mismatches: list[int] = []

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        live = {id(p) for p in built[0].parameters() if p.requires_grad}
        if {id(p) for p in params} != live:
            mismatches.append(1)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_model", build)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    # σ cutoff 0: every check rotates the bases without a cut (no rank event).
    result = train(_digits_mlp(epochs=2, sigma_cutoff_fraction=0.0))
    assert result.controller.history and all(e.kind == "factorize" for e in result.controller.history)
    assert result.controller.step_count > 10 + 5  # at least one rotation happened after factorizing
    assert not mismatches


# --- the authors' preset, rule by rule ------------------------------------------------------------


def _low_rank_target(m: int, n: int, k: int) -> nn.Linear:
    """A Linear whose weight has k large singular values and the rest tiny."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.full((min(m, n),), 1e-3)
    s[:k] = torch.linspace(10, 5, k)
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_(U[:, : len(s)] @ torch.diag(s) @ V[:, : len(s)].T)
    return layer


def _with_head(layer: nn.Linear) -> nn.Sequential:
    """`layer`, then a same-size layer (the one the authors keep dense), then a 2-way classifier."""
    width = layer.out_features
    return nn.Sequential(layer, nn.Linear(width, width), nn.Linear(width, 2))


def _controller(model: nn.Module, preset: str, **kw) -> tuple[OIALR, torch.optim.Optimizer]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    args = {"delay": 1, "stability_frequency": 2, "stability_threshold": None, "sigma_cutoff_fraction": 0.1}
    return OIALR(model, opt, preset=preset, **{**args, **kw}), opt


def test_presets_differ_in_every_documented_rule() -> None:
    ours, authors = PRESETS["oialr-tune"], PRESETS["authors"]
    assert (authors.check_at_factorization, authors.max_cut_fraction, authors.min_rank_fraction) == (True, 0.5, 0.01)
    assert (authors.layer_schedule, authors.optimizer_state, authors.dense_last) == ("check", "slice", "last_replaced")
    assert (authors.stability_gate, authors.layer_step_fraction) == (False, 0.1)
    assert (ours.check_at_factorization, ours.max_cut_fraction, ours.min_rank_fraction) == (False, 1.0, 0.0)
    assert (ours.layer_schedule, ours.optimizer_state, ours.dense_last) == ("factorize", "rotate", "classifier")
    assert (ours.stability_gate, ours.layer_step_fraction) == (True, 1.0)


@pytest.mark.parametrize("preset", ["oialr-tune", "authors"])
def test_first_check_and_cut_size(preset: str) -> None:
    """Authors: cut at `delay` itself, at most half the rank per check. Ours: one interval later, 256 → 2."""
    model = _with_head(_low_rank_target(256, 256, 2))
    ctl, _ = _controller(model, preset)
    events = ctl.step()  # step 1 == delay
    cuts = [e for e in events if e.kind == "cut"]
    if preset == "authors":
        assert [(e.old_rank, e.new_rank) for e in cuts] == [(256, 128)]
        ctl.step(), ctl.step()  # the next check, at step 3: halves again
        assert ctl.layer_ranks()["0"] == 64
    else:
        assert cuts == []
        ctl.step()
        assert [(e.old_rank, e.new_rank) for e in ctl.step() if e.kind == "cut" and e.layer == "0"] == [(256, 2)]


def test_authors_rank_floor_is_one_percent_of_the_input_dimension() -> None:
    model = _with_head(_low_rank_target(400, 400, 1))
    ctl, _ = _controller(model, "authors")
    for _ in range(1 + 2 * 10):
        ctl.step()
    assert ctl.layer_ranks()["0"] == 4  # int(0.01 * 400); ours would stop at 1


def test_authors_factorize_everything_then_grow_the_checked_set() -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 2))  # 12 hidden layers + a skipped classifier
    ctl, _ = _controller(model, "authors", sigma_cutoff_fraction=0.5)
    n = len(ctl.layer_ranks())
    assert n == 11  # the last replaced (12th) layer stays dense
    events = ctl.step()
    assert sum(e.kind == "factorize" for e in events) == n
    # int((n - 1) * 0.1) = 1 layer checked at the first check, 2 at the second, ...: last layers first.
    assert {e.layer for e in events if e.kind == "cut"} <= {list(ctl.layer_ranks())[-1]}
    ctl.step(), ctl.step()
    names = list(ctl.layer_ranks())
    cut_layers = {e.layer for e in ctl.history if e.kind == "cut"}
    assert cut_layers <= set(names[-2:])
    assert ctl.layer_ranks()[names[0]] == 32  # the first layer is not checked yet


def test_ours_schedules_the_factorization_itself() -> None:
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)], nn.Linear(32, 2))
    ctl, _ = _controller(model, "oialr-tune", layer_step_fraction=0.25)
    assert [e.kind for e in ctl.step()] == ["factorize"]


@pytest.mark.parametrize("preset", ["oialr-tune", "authors"])
def test_stability_gate(preset: str) -> None:
    """A threshold of 1.0 blocks our cuts once the bases move; the authors' preset has no gate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    ctl, opt = _controller(model, preset, stability_threshold=1.0, sigma_cutoff_fraction=0.9)
    x, y = torch.randn(64, 32), torch.randint(0, 2, (64,))
    _steps(model, opt, ctl, x, y, 7)
    cuts = [e for e in ctl.history if e.kind == "cut" and e.step > 1]
    assert (len(cuts) > 0) == (preset == "authors")


@pytest.mark.parametrize("preset", ["oialr-tune", "authors"])
def test_optimizer_state_rule(preset: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, delay=3, stability_frequency=3, stability_threshold=None, sigma_cutoff_fraction=0.0,
                preset=preset, layer_step_fraction=1.0)
    x, y = torch.randn(64, 32), torch.randint(0, 2, (64,))
    _steps(model, opt, ctl, x, y, 2)
    _steps(model, opt, ctl, x, y, 1)  # step 3: factorize (and, for the authors, check without a cut)
    S = model[2].S
    state = opt.state.get(S, {})
    if preset == "authors":
        assert float(state["step"]) == 3 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    else:
        assert state == {}
    _steps(model, opt, ctl, x, y, 2)
    before = _step_by_hand(model, opt, ctl, x, y, model[2].S)  # step 6: the check rotates, no cut
    after = opt.state[model[2].S]
    assert torch.equal(after["exp_avg"], before["exp_avg"]) == (preset == "authors")
    assert float(after["step"]) == float(before["step"])  # both rules keep `step` at a check


def test_authors_slice_the_moments_at_a_cut() -> None:
    model = _with_head(_low_rank_target(64, 64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, delay=1, stability_frequency=2, sigma_cutoff_fraction=0.1, preset="authors")
    x, y = torch.randn(16, 64), torch.randint(0, 2, (16,))
    ctl.step()  # factorize + cut 64 -> 32 at step 1
    _steps(model, opt, ctl, x, y, 1)
    moment = _step_by_hand(model, opt, ctl, x, y, model[0].S)["exp_avg"]  # the check at step 3 cuts 32 -> 16
    assert ctl.history[-1].kind == "cut" and ctl.history[-1].new_rank == 16
    # Sliced, not rotated: the kept moment is the top-left block of the one before the cut.
    assert torch.equal(opt.state[model[0].S]["exp_avg"], moment[:16, :16])


@pytest.mark.parametrize("preset", ["oialr-tune", "authors"])
def test_which_layer_stays_dense(preset: str) -> None:
    """The size filter skips the 2-way classifier; ours then factorizes the penultimate layer, theirs not."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    ctl, _ = _controller(model, preset)
    expected = ["0"] if preset == "authors" else ["0", "2"]
    assert list(ctl.layer_ranks()) == expected


def test_attention_with_separate_qkv_weights_is_factorized_exactly() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True)
    model = nn.ModuleDict({"attn": attn})
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    before = attn(q, kv, kv, need_weights=False)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = OIALR(model, opt, delay=1, stability_frequency=1, keep_last_layer=False)
    events = ctl.step()
    assert {e.layer for e in events} == {f"attn.{w}_proj_weight" for w in "qkv"} | {"attn.out_proj.weight"}
    torch.testing.assert_close(attn(q, kv, kv, need_weights=False)[0], before)
    assert {id(p) for p in model.parameters() if p.requires_grad} == _optimizer_params(opt)


def test_authors_preset_trains_through_the_trainer() -> None:
    result = train(_digits_mlp(preset="authors", sigma_cutoff_fraction=0.2))
    assert result.status == "finished"
    assert result.controller.preset == "authors"
    assert result.final["trainable_fraction"] < 1.0
