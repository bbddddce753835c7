"""A user loop's own settings (``loop.*``), the metric check at its first report, reports by optimizer
step under ASHA, and models started from local weights (``model.weights``, cached zoo weights).

The sweeps are tiny (a few trials of an 8-step loop on a 4-feature problem) on the session's Ray.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from oialr_tune import plugins
from oialr_tune.cli import main
from oialr_tune.config import train_config_from_dict
from oialr_tune.errors import LoopMistake, UserError
from oialr_tune.models import build_model
from oialr_tune.report import write_report
from oialr_tune.results import best_trial
from oialr_tune.retrain import retrain
from oialr_tune.run_record import Callback
from oialr_tune.space import space_from_dict
from oialr_tune.trainer import train
from oialr_tune.tuning import sweep

STEPS = 8  # the step loop's whole run: one long epoch
_CRASH_AT: list[int] = []  # the step after whose report `_step_loop` dies (empty: never)


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 0.0])


def _step_loop(config: Any, trial: Any) -> None:
    """One long epoch of `schedule.steps` steps, reported every 2 steps; reads loop.lr_scale only."""
    x, y = _problem()
    model = trial.build_model(in_shape=(4,), num_outputs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optimizer.lr * config.loop["lr_scale"])
    oialr = trial.oialr(model, optimizer, total_steps=config.schedule.steps)
    if trial.checkpoint is not None:
        model.load_state_dict(trial.checkpoint["model"])
    for step in range(trial.start_step + 1, config.schedule.steps + 1):
        loss = F.mse_loss(model(x[:64]).squeeze(1), y[:64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        oialr.step()
        if step % 2 == 0:
            with torch.no_grad():
                metrics = {"val_loss": F.mse_loss(model(x[64:192]).squeeze(1), y[64:192]).item()}
                if trial.evaluate_test and step == config.schedule.steps:
                    metrics["test_loss"] = F.mse_loss(model(x[192:]).squeeze(1), y[192:]).item()
            trial.report(step=step, checkpoint={"model": model.state_dict()}, **metrics)
            if step in _CRASH_AT:
                raise RuntimeError("killed")


def _space(**changes: Any) -> dict[str, Any]:
    space: dict[str, Any] = {
        "name": "steps",
        "base": {"device": "cpu", "trainable": plugins.register(_step_loop), "task": "regression",
                 "model": {"name": "mlp", "args": {"hidden": [16]}}, "loop": {"lr_scale": 1.0, "unused": 3},
                 "oialr": {"delay": 2, "stability_frequency": 2}},
        "search": {"loop.lr_scale": {"type": "loguniform", "low": 0.001, "high": 1.0}},
        "objective": {"metric": "val_loss", "mode": "min"},
        "budget": {"num_samples": 4, "max_steps": STEPS, "grace_period": 2, "reduction_factor": 2,
                   "max_concurrent": 1},
        "baseline": "none",
        "resources": {"cpu": 1},
        "seed": 3,
    }  # fmt: skip
    space.update(changes)
    return space


def test_loop_settings_are_searched_and_rungs_count_steps() -> None:
    space = space_from_dict(_space())
    assert space.base["schedule"]["steps"] == STEPS and space.rungs() == [2, 4, STEPS]
    assert space.checkpoint_epochs() == [2, 4, STEPS]
    cfg = space.trial_config("oialr", {"loop.lr_scale": 0.5})
    assert cfg.loop == {"lr_scale": 0.5, "unused": 3}
    with pytest.raises(UserError, match=r"^search\.schedule\.steps: cannot be searched \(set budget\.max_steps"):
        space_from_dict(_space(search={"schedule.steps": {"type": "int", "low": 2, "high": 8}}))
    with pytest.raises(UserError, match=r"^budget\.grace_period: must be in \[1, max_steps=8\], got 9"):
        space_from_dict(_space(budget={"max_steps": STEPS, "grace_period": 9}))
    with pytest.raises(UserError, match=r"^base\.loop: only for a user's own training loop"):
        space_from_dict(_space(base={"model": {"name": "mlp"}, "loop": {"x": 1}}))


def test_a_step_run_resumes_after_its_last_reported_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {**_space()["base"], "loop": {"lr_scale": 0.1}, "schedule": {"steps": STEPS}}
    cfg = train_config_from_dict(base)
    whole = train(cfg, checkpoint_dir=tmp_path / "whole").history
    assert [r["step"] for r in whole] == [2, 4, 6, 8] and [r["epoch"] for r in whole] == [1, 2, 3, 4]
    assert [r["status"] for r in whole] == ["running"] * 3 + ["finished"]
    monkeypatch.setattr(sys.modules[__name__], "_CRASH_AT", [4])
    with pytest.raises(UserError, match="killed"):
        train(cfg, checkpoint_dir=tmp_path / "cut")
    monkeypatch.setattr(sys.modules[__name__], "_CRASH_AT", [])
    resumed = train(cfg, checkpoint_dir=tmp_path / "cut").history
    assert [(r["step"], r["val_loss"]) for r in resumed] == [(r["step"], r["val_loss"]) for r in whole]
    # A run counted in epochs refuses a report by step, in one line.
    with pytest.raises(LoopMistake, match=r"reports by epoch: trial\.report\(epoch=\.\.\.\); trial\.report\(step"):
        train(train_config_from_dict({**base, "trainable": plugins.register(_no_metric_loop), "loop": {},
                                      "schedule": {"epochs": 1}}))


def test_a_step_reporting_loop_under_asha_then_best_retrain_report(
    tmp_path: Path, ray_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    result = sweep(space_from_dict(_space()), results_dir=tmp_path, name="steps", verbose=1)
    out = capsys.readouterr().out
    # The setting the loop never reads is named once, in one line; the one it reads is not.
    (warning,) = [line for line in out.splitlines() if "warning" in line]
    assert "loop.unused: set but never read by" in warning and "lr_scale" not in warning, out
    df = result.trials
    last_step = df["training_iteration"] * 2  # one report every 2 steps
    stopped = df[df["trainer_status"] == "running"]
    assert len(stopped) >= 1 and set(last_step[stopped.index]) <= {2, 4}, df  # ASHA stopped them at a step rung
    assert (last_step[df["trainer_status"] == "finished"] == STEPS).all() and (df["trainer_status"] == "finished").any()
    assert best_trial(result.path).trial.config["schedule"]["steps"] == STEPS
    with pytest.warns(UserWarning, match=r"^loop\.unused: set but never read"):  # outside Ray: a Python warning
        summary = retrain(result.path, seeds=[1000], log=lambda _: None)
    test_loss = summary["arms"]["oialr"]["test_loss"]["values"][0]
    assert test_loss is not None and test_loss >= 0
    assert "Final retraining" in write_report(result.path).read_text()


def _no_metric_loop(config: Any, trial: Any) -> None:
    model = trial.build_model(in_shape=(4,), num_outputs=1)
    trial.oialr(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    trial.report(step=2, val_mse=0.5, val_r2=0.1)  # no val_loss, the sweep's objective


class _NeedsLoss(Callback):
    required_metrics = ("val_loss",)


def test_the_objective_metric_is_checked_at_the_first_report(tmp_path: Path, ray_session: Any,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    name = plugins.register(_no_metric_loop)
    cfg = train_config_from_dict({"device": "cpu", "trainable": name, "task": "regression",
                                  "schedule": {"steps": 2}})  # fmt: skip
    with pytest.raises(LoopMistake, match=r"reported no val_loss, which the sweep's objective .*: val_mse, val_r2"):
        train(cfg, callbacks=[_NeedsLoss()])
    train(cfg)  # nothing needs it outside a sweep
    # In a sweep: one line, and the sweep stops at its first trial instead of failing every one.
    space = _space(base={**_space()["base"], "trainable": name, "loop": {}},
                   search={"optimizer.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    capsys.readouterr()
    code = main(["sweep", str(tmp_path / "space.yaml"), "--results-dir", str(tmp_path / "results"), "--name", "s"])
    _, err = capsys.readouterr()
    assert code == 2
    (line,) = err.splitlines()
    assert "reported no val_loss" in line and "it reported: val_mse" in line and "first trial" in line, line


# --- model.weights and cached zoo weights ---------------------------------------------------------


def test_a_model_starts_from_a_local_state_dict(tmp_path: Path) -> None:
    source = build_model("mlp", (4,), 3, hidden=(8,))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")  # a checkpoint holding one
    for file in ("w.pt", "ckpt.pt"):
        model = build_model("mlp", (4,), 3, weights=str(tmp_path / file), hidden=(8,))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values(),
                                                     strict=True))
    with pytest.raises(UserError, match=r"^model\.weights: .*w\.pt does not fit model mlp: missing 5\.weight; "
                                        r".*3\.weight is \(3, 8\)"):
        build_model("mlp", (4,), 3, weights=str(tmp_path / "w.pt"), hidden=(8, 8))
    with pytest.raises(UserError, match=r"^model\.weights: .*nope\.pt does not exist"):
        build_model("mlp", (4,), 3, weights=str(tmp_path / "nope.pt"))


def test_a_sweep_from_missing_weights_is_refused_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    space = {"name": "ft", "base": {"device": "cpu", "model": {"name": "mlp", "weights": "missing.pt"}},
             "search": {"optimizer.lr": {"type": "loguniform", "low": 0.001, "high": 0.01}}}  # fmt: skip
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "space.yaml"), "--results-dir", str(tmp_path / "results")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "base.model.weights: " in line and "missing.pt does not exist" in line, line
    assert not (tmp_path / "results").exists()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_torchvision_pretrained_weights_come_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       no_network: None) -> None:
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"^model\.args\.pretrained: torchvision mobilenet_v3_small's weights are "
                                        r"not in the local cache .*put mobilenet_v3_small-\w+\.pth .*checkpoints"):
        build_model("torchvision:mobilenet_v3_small", (3, 32, 32), 5, pretrained=True)
    published = get_model("mobilenet_v3_small", weights=None)  # 1000 classes, as the real file
    name = Path(get_model_weights("mobilenet_v3_small").DEFAULT.url).name
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(published.state_dict(), tmp_path / "hub" / "checkpoints" / name)
    model = build_model("torchvision:mobilenet_v3_small", (3, 32, 32), 5, pretrained=True)
    assert torch.equal(model.features[0][0].weight, published.features[0][0].weight)
    assert model.classifier[3].weight.shape == (5, 1024)  # the head is new: 5 outputs, not 1000


def test_timm_pretrained_weights_come_from_the_local_hugging_face_cache(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        no_network: None) -> None:
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"^model\.args\.pretrained: timm test_vit's weights are not in the local "
                                        r"Hugging Face cache"):
        build_model("timm:test_vit", (3, 160, 160), 4, pretrained=True)
    published = timm.create_model("test_vit", pretrained=False)
    repo = tmp_path / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in published.state_dict().items()},
              str(repo / "snapshots" / ("a" * 40) / "model.safetensors"))
    model = build_model("timm:test_vit", (3, 160, 160), 4, pretrained=True)
    assert torch.equal(model.patch_embed.proj.weight, published.patch_embed.proj.weight)
    assert model.head.weight.shape[0] == 4
