"""OIALR fidelity: the three regression bugs, and each rule of the authors' preset against ours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oialr_tune.config import TrainConfig, train_config_from_dict
from oialr_tune.oialr import OIALR, PRESETS, apply_low_rank_structure, export_dense, low_rank_structure
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
    assert (authors.dense_first, authors.conv_filter, authors.grouped_convs, authors.freeze_factorized_bias) == (
        "first_replaced", "one_sided", True, True)
    assert (ours.dense_first, ours.conv_filter, ours.grouped_convs, ours.freeze_factorized_bias) == (
        "input", "two_sided", False, False)
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


def _low_rank_conv(out_ch: int, in_ch: int, k: int) -> nn.Conv2d:
    """A k×k Conv2d whose kernel, viewed as out × in·k², has rank 1 (a rank cut goes to the floor)."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, k)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(out_ch, 1, generator=g) @ torch.randn(1, in_ch * k * k, generator=g))
                          .view_as(conv.weight))
    return conv


@pytest.mark.parametrize(("kind", "floor"), [("wide linear", 2), ("tall linear", 2), ("3x3 conv", 1)])
def test_authors_rank_floor_is_one_percent_of_the_smaller_dimension(kind: str, floor: int) -> None:
    """int(0.01 · min(m, n)): 200 × 800 → 2 (1 % of the input dimension would be 8), 800 × 200 → 2,
    a 3×3 conv 128 × 1152 → 1 (not 11). Every check halves the rank until the floor stops it."""
    if kind == "3x3 conv":
        layer: nn.Module = _low_rank_conv(128, 128, 3)
        model = nn.Sequential(layer, nn.Conv2d(128, 128, 3), nn.Linear(128, 2))
    else:
        m, n = (200, 800) if kind == "wide linear" else (800, 200)
        model = _with_head(_low_rank_target(m, n, 1))
    ctl, _ = _controller(model, "authors")
    for _ in range(1 + 2 * 9):
        ctl.step()
    assert ctl.layer_ranks()["0"] == floor


def test_authors_freeze_the_biases_of_factorized_layers() -> None:
    """Their layer builds a new bias that the optimizer never sees: it keeps its value from `delay` on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, delay=2, stability_frequency=5, sigma_cutoff_fraction=0.0, preset="authors")
    x, y = torch.randn(64, 16), torch.randint(0, 2, (64,))
    _steps(model, opt, ctl, x, y, 2)
    assert list(ctl.layer_ranks()) == ["0", "2"]  # "4" is the last replaced layer, kept dense
    frozen = {name: model[int(name)].bias.detach().clone() for name in ("0", "2")}
    dense_bias = model[4].bias.detach().clone()
    _steps(model, opt, ctl, x, y, 10)
    for name, before in frozen.items():
        assert torch.equal(model[int(name)].bias, before) and not model[int(name)].bias.requires_grad
    assert (model[4].bias - dense_bias).abs().max() > 0  # a dense layer's bias trains on
    assert {id(p) for p in model.parameters() if p.requires_grad} == _optimizer_params(opt)
    # A checkpoint restores into a fresh model and optimizer (same parameter groups, biases frozen again).
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_ctl = OIALR(fresh, fresh_opt, delay=2, stability_frequency=5, sigma_cutoff_fraction=0.0, preset="authors")
    fresh_ctl.load_state_dict(ctl.state_dict())
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(opt.state_dict())
    assert not fresh[0].bias.requires_grad and fresh_ctl.trainable_parameters() == ctl.trainable_parameters()


@pytest.mark.parametrize("preset", ["oialr-tune", "authors"])
def test_keep_first_layer_keeps_the_first_layer_that_passes_the_size_filter(preset: str) -> None:
    """A thin input layer (256 → 16) is skipped by the size filter anyway; the authors then keep the
    next one (16 → 64) dense. Ours keeps the input layer, whatever its shape."""
    model = nn.Sequential(nn.Linear(256, 16), nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64),
                          nn.Linear(64, 2))
    ctl, _ = _controller(model, preset, keep_first_layer=True)
    expected = ["2"] if preset == "authors" else ["1", "2", "3"]
    assert list(ctl.layer_ranks()) == expected
    if preset == "authors":
        assert "keep_first_layer" in ctl.dense_layers()["1"] and "keep_last_layer" in ctl.dense_layers()["3"]
        assert "too thin" in ctl.dense_layers()["0"]


def _conv_net() -> nn.Sequential:
    """Convs of four kinds on 8×8 inputs: plain 3 → 32, depthwise 32 (32 × 9), grouped 32 → 64 in 4
    groups (64 × 72), wide 64 → 8 (8 × 576: few filters, many inputs); then Linear 512 → 64 → 2."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.Conv2d(32, 64, 3, padding=1, groups=4), nn.Conv2d(64, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 2),
    )


@pytest.mark.parametrize("preset", ["oialr-tune", "authors"])
def test_which_convs_are_factorized(preset: str) -> None:
    """Authors: a one-sided conv filter (only in·k² < out/10 is skipped, so the wide conv is taken) and
    grouped/depthwise kernels factorized as a parametrized U S Vᵀ, rebuilt every forward, exact.
    Ours: the two-sided filter skips the wide conv; grouped convs stay dense."""
    torch.manual_seed(0)
    model = _conv_net()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    before = model(x).detach()
    ctl, opt = _controller(model, preset, delay=2, sigma_cutoff_fraction=0.0)  # no cut at delay: exact
    ctl.step()
    assert ctl.step()  # factorized at step 2
    if preset == "oialr-tune":
        assert list(ctl.layer_ranks()) == ["0", "6"]
        assert "grouped" in ctl.dense_layers()["2"] and "too thin" in ctl.dense_layers()["3"]
        return
    assert list(ctl.layer_ranks()) == ["0", "1", "2", "3"]  # "6" is the last replaced layer, kept dense
    assert ctl.layer_ranks()["1"] <= 9 and ctl.layer_ranks()["2"] <= 64
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    ctl.sigma_cutoff_fraction = 0.3
    _steps(model, opt, ctl, x, y, 4)  # trains the S of the grouped kernels; the checks cut them
    assert "2" in {e.layer for e in ctl.history if e.kind == "cut"}
    F.cross_entropy(model(x), y).backward()
    assert model[2].parametrizations.weight.original.grad.abs().sum() > 0  # S of a grouped kernel trains
    assert {id(p) for p in model.parameters() if p.requires_grad} == _optimizer_params(opt)
    dense = export_dense(model)
    assert type(dense[1]) is nn.Conv2d and dense[1].groups == 32 and dense[2].groups == 4
    torch.testing.assert_close(dense(x), model(x))
    # A checkpoint's low-rank structure (grouped kernels included) rebuilds in a fresh model.
    fresh = _conv_net()
    apply_low_rank_structure(fresh, low_rank_structure(model))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


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
