"""The OIALR method on its own: exact factorized forwards, rank cuts, optimizer state, state dicts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from oialr_tune.oialr import OIALR, LowRankLayer, export_dense
from oialr_tune.oialr import controller as controller_module


def _rand_factors(m: int, n: int, k: int, generator: torch.Generator):
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    S = torch.randn(k, k, generator=generator, dtype=torch.float64)
    return U, S, V.T


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("rank", [2, 12])
def test_factorized_and_rebuilt_forward_match_dense(kind: str, rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        dense, x = nn.Linear(24, 16), torch.randn(5, 24, generator=g)
    elif kind == "conv1d":
        dense, x = nn.Conv1d(6, 16, 3, padding=1, stride=2), torch.randn(2, 6, 11, generator=g)
    else:
        dense, x = nn.Conv2d(4, 16, 3, padding=1, dilation=2), torch.randn(2, 4, 9, 9, generator=g)
    dense = dense.double()
    x = x.double().requires_grad_()
    m, n = dense.weight.shape[0], dense.weight[0].numel()
    U, S, Vt = _rand_factors(m, n, rank, g)
    layer = LowRankLayer.from_dense(dense, U, S, Vt)
    with torch.no_grad():
        dense.weight.copy_((U @ S @ Vt).view_as(dense.weight))
    # rank 2 of 16x24 runs factorized, rank 12 rebuilds W: both must equal the dense layer.
    assert layer.factorized == (rank == 2)
    expected = dense(x)
    out = layer(x)
    torch.testing.assert_close(out, expected)
    # Gradients w.r.t. the input and S agree with the dense layer's (dL/dS = Uᵀ dL/dW V).
    grad_out = torch.randn_like(out)
    (gx,) = torch.autograd.grad(expected, x, grad_out, retain_graph=True)
    gx2, gS = torch.autograd.grad(out, (x, layer.S), grad_out)
    torch.testing.assert_close(gx2, gx)
    (gW,) = torch.autograd.grad(expected, dense.weight, grad_out)
    torch.testing.assert_close(gS, U.T @ gW.reshape(m, n) @ Vt.T)


def test_conversion_keeps_outputs_and_last_layer_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 32)
    before = model(x)
    ctl = OIALR(model, opt, delay=1, stability_frequency=5)
    events = ctl.step()
    assert [e.kind for e in events] == ["factorize", "factorize"]
    assert isinstance(model[0], LowRankLayer) and isinstance(model[2], LowRankLayer)
    assert isinstance(model[4], nn.Linear)  # the classifier stays dense by default
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    # The optimizer now trains S, not the old dense weights.
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].S) in params and id(model[2].S) in params


def test_multihead_attention_projections_are_parametrized_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(16, 4, batch_first=True)
    model.head = nn.Linear(16, 3)
    x = torch.randn(2, 5, 16)
    before = model.attn(x, x, x)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, delay=1, stability_frequency=1, stability_threshold=None, sigma_cutoff_fraction=0.9)
    ctl.step()
    assert set(ctl.layer_ranks()) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    torch.testing.assert_close(model.attn(x, x, x)[0], before, atol=1e-5, rtol=1e-4)
    # A cut then a dense export: the exported plain MHA computes what the low-rank one does.
    ctl.step()
    assert ctl.layer_ranks()["attn.in_proj_weight"] < 16
    low = model.attn(x, x, x)[0]
    dense = export_dense(model)
    assert not hasattr(dense.attn, "parametrizations")
    torch.testing.assert_close(dense.attn(x, x, x)[0], low, atol=1e-5, rtol=1e-4)


def test_cut_drops_exactly_the_small_singular_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.2, 0.9, 0.5] + [0.01] * 14)
    U, _ = torch.linalg.qr(torch.randn(20, 20))
    V, _ = torch.linalg.qr(torch.randn(20, 20))
    with torch.no_grad():
        model[0].weight.copy_(U @ torch.diag(sigmas) @ V.T)
    ctl = OIALR(model, opt, delay=1, stability_frequency=1, stability_threshold=0.99, sigma_cutoff_fraction=0.1)
    ctl.step()  # factorize
    events = ctl.step()  # lr 0: S is still diagonal, the bases are perfectly stable
    assert len(events) == 1 and events[0].kind == "cut"
    assert events[0].stability == pytest.approx(1.0, abs=1e-5)
    assert (events[0].old_rank, events[0].new_rank) == (20, 4)  # σ ≥ 1.0 = 0.1 × 10 kept
    torch.testing.assert_close(torch.linalg.svdvals(model[0].S), sigmas[:4], atol=1e-4, rtol=1e-4)


def test_unstable_basis_blocks_the_cut() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctl = OIALR(model, opt, delay=1, stability_frequency=1, stability_threshold=0.95, sigma_cutoff_fraction=0.5)
    ctl.step()
    with torch.no_grad():  # a strong off-diagonal S: its singular vectors are far from the old basis
        model[0].S.copy_(torch.randn(16, 16))
    assert ctl.step() == []
    assert ctl.layer_ranks()["0"] == 16
    assert ctl.state_dict()["stability"]["0"] < 0.95


def _digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(model, opt, ctl, x, y, steps: int, start: int = 0, batch: int = 64):
    losses = []
    for step in range(start, start + steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ctl is not None:
            ctl.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=2e-3),
        lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_training_continues_and_trainable_fraction_falls(make_opt) -> None:
    torch.manual_seed(0)
    x, y = _digits()
    model = _mlp()
    opt = make_opt(model.parameters())
    ctl = OIALR(model, opt, delay=60, stability_frequency=20, stability_threshold=0.5, sigma_cutoff_fraction=0.2)
    losses = _train(model, opt, ctl, x, y, steps=240)
    kinds = {e.kind for e in ctl.history}
    assert kinds == {"factorize", "cut"}
    assert ctl.trainable_fraction < 0.5
    # The loss keeps falling after the layers went low-rank and were cut.
    assert sum(losses[-30:]) / 30 < sum(losses[60:90]) / 30
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizer_state_follows_the_rotation_and_cut(name: str) -> None:
    torch.manual_seed(0)
    x, y = _digits()
    model = _mlp()
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if name == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    ctl = OIALR(model, opt, delay=5, stability_frequency=5, stability_threshold=None, sigma_cutoff_fraction=0.5)
    _train(model, opt, ctl, x, y, steps=9)
    _train(model, opt, None, x, y, steps=1, start=9)  # optimizer step 10, before the controller's check
    S_before, U_before, Vt_before = model[0].S, model[0].U.clone(), model[0].Vt.clone()
    state_before = {k: v.clone() for k, v in opt.state[S_before].items()}
    events = ctl.step()
    S_after = model[0].S
    assert any(e.layer == "0" and e.kind == "cut" for e in events)
    # The bases moved by Rᵤ = Uₛ[:, :k'], Rᵥ = Vₛ[:, :k'], recoverable from the old and new bases.
    Ru, Rv = U_before.T @ model[0].U, Vt_before @ model[0].Vt.T
    state = opt.state[S_after]
    if name == "adam":
        torch.testing.assert_close(state["exp_avg"], Ru.T @ state_before["exp_avg"] @ Rv)
        torch.testing.assert_close(state["exp_avg_sq"], ((Ru * Ru).T @ state_before["exp_avg_sq"] @ (Rv * Rv)))
        assert state["step"] == state_before["step"]
    else:
        torch.testing.assert_close(state["momentum_buffer"], Ru.T @ state_before["momentum_buffer"] @ Rv)
    assert state[next(iter(state.keys() - {"step"}))].shape == S_after.shape
    # W is unchanged by the rotation except for the dropped singular directions.
    W_before = U_before @ S_before.detach() @ Vt_before
    W_after = model[0].dense_matrix().detach()
    sv = torch.linalg.svdvals(W_before)
    assert torch.linalg.matrix_norm(W_before - W_after, ord=2) <= sv[S_after.shape[0]] * 1.001


def test_unknown_optimizer_state_is_reset_with_a_warning() -> None:
    torch.manual_seed(0)
    x, y = _digits()
    model = _mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    ctl = OIALR(model, opt, delay=3, stability_frequency=3, stability_threshold=None, sigma_cutoff_fraction=0.3)
    with pytest.warns(UserWarning, match="cannot follow a rank cut"):
        _train(model, opt, ctl, x, y, steps=6)


def test_checkpoint_round_trip_continues_identically() -> None:
    x, y = _digits()

    def fresh():
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        ctl = OIALR(model, opt, delay=20, stability_frequency=10, stability_threshold=0.3, sigma_cutoff_fraction=0.2)
        return model, opt, ctl

    model, opt, ctl = fresh()
    _train(model, opt, ctl, x, y, steps=45)
    assert any(e.kind == "cut" for e in ctl.history)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ctl": ctl.state_dict()})
    reference = _train(model, opt, ctl, x, y, steps=30, start=45)

    model2, opt2, ctl2 = fresh()
    ctl2.load_state_dict(ckpt["ctl"])
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert ctl2.layer_ranks() == {k: v for k, v in ckpt["ctl"]["ranks"].items()} | {
        k: v for k, v in ctl2.layer_ranks().items() if k not in ckpt["ctl"]["ranks"]
    }
    resumed = _train(model2, opt2, ctl2, x, y, steps=30, start=45)
    assert resumed == reference
    assert ctl2.layer_ranks() == ctl.layer_ranks()
    assert [e.kind for e in ctl2.history] == [e.kind for e in ctl.history]


def test_progressive_conversion_goes_from_the_last_layer_back() -> None:
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)], nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctl = OIALR(model, opt, delay=1, stability_frequency=1, layer_step_fraction=0.25, stability_threshold=None)
    order = []
    for _ in range(4):
        order += [e.layer for e in ctl.step() if e.kind == "factorize"]
    assert order == ["3", "2", "1", "0"]


def test_skip_ratio_and_keep_first_layer() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 2), nn.Linear(2, 32), nn.Linear(32, 10))
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), keep_first_layer=True)
    # "0" kept dense (first), "3" kept dense (last), "1" and "2" skipped: min 2 ≤ 0.1 × 32.
    assert list(ctl.layer_ranks()) == []
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_ratio=0.05)
    assert list(ctl.layer_ranks()) == ["0", "1", "2"]


def test_failed_svd_falls_back_and_training_continues(monkeypatch) -> None:
    torch.manual_seed(0)
    x, y = _digits()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ctl = OIALR(model, opt, delay=5, stability_frequency=5, stability_threshold=None, sigma_cutoff_fraction=0.2)
    real_svd = torch.linalg.svd
    calls = {"n": 0}

    def flaky_svd(a, *args, **kwargs):
        calls["n"] += 1
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected failure")
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model, opt, ctl, x, y, steps=20)
    assert any("injected failure" in str(w.message) for w in caught)
    assert any(e.kind == "cut" for e in ctl.history)  # the float64 fallback did the work
    assert all(torch.isfinite(torch.tensor(losses)))

    def nan_svd(a, *args, **kwargs):
        U, s, Vt = real_svd(a, *args, **kwargs)
        return U, s * float("nan"), Vt

    monkeypatch.setattr(torch.linalg, "svd", nan_svd)
    ranks = ctl.layer_ranks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model, opt, ctl, x, y, steps=10, start=20)
    assert any("skipped the check" in str(w.message) for w in caught)
    assert ctl.layer_ranks() == ranks
    assert all(torch.isfinite(torch.tensor(losses)))
    with pytest.warns(UserWarning, match="non-finite"):
        assert controller_module._svd(torch.eye(3)) is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"delay": 0}, "delay"),
        ({"stability_frequency": 0}, "stability_frequency"),
        ({"stability_threshold": 0.0}, "stability_threshold"),
        ({"stability_threshold": 1.5}, "stability_threshold"),
        ({"sigma_cutoff_fraction": 1.0}, "sigma_cutoff_fraction"),
        ({"min_rank": 0}, "min_rank"),
        ({"layer_step_fraction": 0.0}, "layer_step_fraction"),
        ({"skip_ratio": -0.1}, "skip_ratio"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_parameter(kwargs, name) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=name):
        OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
