"""The training loop: determinism, exact resume after an OIALR rank cut, divergence, callbacks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import evaluate

from oialr_tune.config import TrainConfig, train_config_from_dict
from oialr_tune.errors import UserError
from oialr_tune.model_io import load_model, read_model_file
from oialr_tune.run_record import Callback, TrainResult, oialr_delay_steps, read_checkpoint
from oialr_tune.sweep_state import CHECKPOINT_FILE
from oialr_tune.trainer import lr_at, train

TIMING = {"examples_per_s", "train_time_s"}


def small(**overrides: Any) -> TrainConfig:
    """Digits MLP, 4 epochs of 19 steps; OIALR factorizes at step 10 and may cut every 5 steps."""
    base: dict[str, Any] = {
        "device": "cpu",
        "model": {"name": "mlp", "args": {"hidden": [64, 64], "dropout": 0.1}},
        "schedule": {"epochs": 4, "rewarm_steps": 5},
        "oialr": {"delay": 10, "stability_frequency": 5, "stability_threshold": None, "sigma_cutoff_fraction": 0.1},
    }
    for dotted, value in overrides.items():
        node = base
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return train_config_from_dict(base)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None) -> None:
        self.epochs: list[tuple[dict, Path | None]] = []
        self.result: TrainResult | None = None
        self.stop_after = stop_after

    def on_epoch_end(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.epochs.append((metrics, checkpoint_dir))
        if metrics["epoch"] == self.stop_after:
            raise KeyboardInterrupt  # what a killed trial looks like to the loop

    def on_train_end(self, result: TrainResult) -> None:
        self.result = result


def test_lr_schedule() -> None:
    kw = {"base_lr": 1.0, "warmup_steps": 10, "min_lr_fraction": 0.1}
    assert lr_at(0, 110, **kw) == pytest.approx(0.1)
    assert lr_at(9, 110, **kw) == pytest.approx(1.0)
    assert lr_at(10, 110, **kw) == pytest.approx(1.0)
    assert lr_at(109, 110, **kw) == pytest.approx(0.1)
    assert lr_at(50, 110, **kw, decay="constant") == 1.0
    middle = lr_at(60, 110, **kw)
    assert 0.1 < middle < 1.0
    # re-warm after a rank event at step 60: 0.2 × lr, then linearly back to the schedule in 4 steps
    rewarm = {"last_event_step": 60, "rewarm_steps": 4, "rewarm_start": 0.2}
    assert lr_at(60, 110, **kw, **rewarm) == pytest.approx(0.2 * middle)
    assert lr_at(62, 110, **kw, **rewarm) == pytest.approx(0.6 * lr_at(62, 110, **kw))
    assert lr_at(64, 110, **kw, **rewarm) == lr_at(64, 110, **kw)
    assert oialr_delay_steps(0.25, 100) == 25 and oialr_delay_steps(7, 100) == 7 and oialr_delay_steps(0.0, 9) == 1


def test_metrics_callbacks_and_checkpoints(tmp_path: Path) -> None:
    recorder = Recorder()
    cfg = small(checkpoint_every=2)
    result = train(cfg, callbacks=[recorder], checkpoint_dir=tmp_path, evaluate_test=True, checkpoint_epochs=[1])
    assert result.status == "finished" and recorder.result is result
    assert [m["epoch"] for m, _ in recorder.epochs] == [1, 2, 3, 4]
    assert [d for _, d in recorder.epochs] == [tmp_path, tmp_path, None, tmp_path]
    assert [m["status"] for m, _ in recorder.epochs] == ["running"] * 3 + ["finished"]
    first, last = result.history[0], result.final
    assert set(first) == {"epoch", "train_loss", "val_loss", "val_acc", "lr", "trainable_params", "total_params",
                          "trainable_fraction", "ranks", "dense_layers", "examples_per_s", "train_time_s",
                          "oialr_events", "status"}
    assert last["val_acc"] > 0.8 and result.test_acc is not None and result.test_acc > 0.8
    assert first["total_params"] == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert last["trainable_fraction"] < 1.0 and last["trainable_params"] < last["total_params"]
    events = [e for m in result.history for e in m["oialr_events"]]
    assert {e["kind"] for e in events} == {"factorize", "cut"}
    assert last["ranks"] == result.controller.layer_ranks() and min(last["ranks"].values()) < 64
    assert first["dense_layers"] == {"7": "last layer kept dense (keep_last_layer)"}  # the classifier, and why
    assert all(m["train_time_s"] > 0 and m["examples_per_s"] > 0 for m in result.history)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temp files left behind
    # The checkpoint alone rebuilds the low-rank model, with the same predictions.
    model = load_model(tmp_path / CHECKPOINT_FILE)
    saved_cfg = train_config_from_dict(read_model_file(tmp_path / CHECKPOINT_FILE).config)
    assert saved_cfg == cfg
    x = torch.randn(5, 1, 8, 8)
    result.model.eval()
    model.eval()
    torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)


def test_same_seed_same_metrics_other_seed_differs() -> None:
    a, b = train(small()), train(small())
    assert without_timing(a.history) == without_timing(b.history)
    c = train(small(seed=1))
    assert without_timing(c.history) != without_timing(a.history)


def test_resume_after_a_rank_cut_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = small()
    full = train(cfg, checkpoint_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint_dir=tmp_path / "cut", callbacks=[Recorder(stop_after=2)])
    saved = read_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    assert saved["epoch"] == 2
    assert any(e["kind"] == "cut" for m in saved["history"] for e in m["oialr_events"])  # low-rank by then
    recorder = Recorder()
    resumed = train(cfg, checkpoint_dir=tmp_path / "cut", callbacks=[recorder])
    assert [m["epoch"] for m, _ in recorder.epochs] == [3, 4]  # only the remaining epochs ran
    assert without_timing(resumed.history) == without_timing(full.history)
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    # A finished run resumes to the same result without training again.
    again = train(cfg, checkpoint_dir=tmp_path / "cut")
    assert again.status == "finished" and without_timing(again.history) == without_timing(full.history)
    # resume=False starts over (and overwrites the checkpoint at the end).
    fresh = train(cfg, checkpoint_dir=tmp_path / "cut", resume=False)
    assert without_timing(fresh.history) == without_timing(full.history)


def test_divergence_is_reported_not_raised(tmp_path: Path) -> None:
    recorder = Recorder()
    cfg = small(**{"optimizer.name": "sgd", "optimizer.lr": 1e6, "schedule.warmup_fraction": 0.0})
    result = train(cfg, callbacks=[recorder], checkpoint_dir=tmp_path)
    assert result.status == "diverged" and len(result.history) == 1
    metrics, checkpoint_dir = recorder.epochs[-1]
    assert metrics["status"] == "diverged" and checkpoint_dir is None
    assert not math.isfinite(metrics["train_loss"]) and metrics["val_acc"] == 0.0
    assert recorder.result is result and not (tmp_path / CHECKPOINT_FILE).exists()


def test_corrupt_checkpoint_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=rf"^{path}: corrupt or unreadable checkpoint"):
        train(small(), checkpoint_dir=tmp_path)
    torch.save({"format": 1}, path)
    with pytest.raises(UserError, match=rf"^{path}: checkpoint does not match"):
        train(small(), checkpoint_dir=tmp_path)
    # another model's checkpoint: torch's multi-line state-dict error becomes one line
    path.unlink()
    train(small(**{"schedule.epochs": 1}), checkpoint_dir=tmp_path)
    with pytest.raises(UserError, match=rf"^{path}: checkpoint does not match") as info:
        train(small(**{"model.args": {"hidden": [32]}}), checkpoint_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_a_rejected_run_creates_no_checkpoint_folder(tmp_path: Path) -> None:
    cfg = small(**{"data.name": "mnist", "data.root": str(tmp_path / "no-data")})
    with pytest.raises(UserError, match=r"^data\.root: "):
        train(cfg, checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"precision": "bf16", "model.name": "cnn", "model.args": {"channels": [8], "hidden": 16},
         "optimizer.lr": 0.01, "channels_last": True, "grad_clip": 1.0},
        {"precision": "fp16", "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.nesterov": True,
         "grad_clip": 5.0, "oialr.enabled": False, "label_smoothing": 0.1},
    ],
    ids=["bf16-cnn-channels-last", "fp16-sgd-full-rank"],
)
def test_other_settings_train(overrides: dict) -> None:
    result = train(small(**{"schedule.epochs": 2, **overrides}))
    assert result.status == "finished" and result.final["val_acc"] > 0.3
    if overrides.get("oialr.enabled") is False:
        assert result.controller is None and result.final["trainable_fraction"] == 1.0
        assert result.final["ranks"] == {}


def test_tiny_cifar10_end_to_end(tiny_cifar10: Path) -> None:
    cfg = train_config_from_dict({
        "device": "cpu",
        "model": {"name": "cnn", "args": {"channels": [8, 8], "hidden": 16}},
        "data": {"name": "cifar10", "root": str(tiny_cifar10), "val_fraction": 0.2},
        "schedule": {"epochs": 2, "batch_size": 16},
        "oialr": {"delay": 3, "stability_frequency": 2},
    })
    result = train(cfg, evaluate_test=True)
    assert result.status == "finished" and result.test_acc is not None
    assert result.final["oialr_events"] or result.history[0]["oialr_events"]


def test_evaluate_restores_the_mode() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0]])
    y = torch.tensor([0, 1, 1])
    model.train()
    loss, acc = evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert model.training and acc == pytest.approx(2 / 3)
    expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert loss == pytest.approx(expected)


def test_given_splits_replace_the_configured_data() -> None:
    import dataclasses

    from oialr_tune.data import load_data

    cfg = small(**{"schedule.epochs": 1})
    splits = load_data(cfg.data, "cpu")
    no_val = dataclasses.replace(splits, val=dataclasses.replace(splits.val, x=splits.val.x[:0], y=splits.val.y[:0]))
    result = train(cfg, splits=no_val, evaluate_test=True)
    assert result.status == "finished" and math.isnan(result.final["val_acc"]) and result.test_acc > 0.2


def test_default_oialr_settings_keep_accuracy_with_half_the_parameters() -> None:
    """The config's OIALR defaults on digits (MLP, 20 epochs): ≤ 50 % trainable, within 2 points."""
    results = {}
    for enabled in (False, True):
        cfg = train_config_from_dict({"device": "cpu", "model": {"name": "mlp"}, "oialr": {"enabled": enabled}})
        results[enabled] = train(cfg, evaluate_test=True)
    full, low_rank = results[False], results[True]
    assert low_rank.final["trainable_fraction"] <= 0.5
    assert any(e["kind"] == "cut" for m in low_rank.history for e in m["oialr_events"])
    assert low_rank.test_acc >= full.test_acc - 0.02 and full.test_acc > 0.95


def test_cli_train_shows_a_start_line_then_one_line_per_epoch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`oialr-tune train`: what trains, where and how long once the data is loaded; a line per epoch off a terminal."""
    import yaml

    from oialr_tune.cli import main
    from oialr_tune.config import train_config_to_dict

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config_to_dict(small(**{"schedule.epochs": 2}))))
    assert main(["train", str(config)]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0] == "[train] mlp on digits (OIALR) on cpu: 2 epochs"
    assert [line.split(":")[0] for line in lines[1:]] == ["[train] epoch 1/2", "[train] epoch 2/2"]
    assert "val_acc" in lines[2] and "trainable" in lines[2]
    assert out.startswith("status=finished")  # the result alone on stdout


def test_progress_is_opt_in_and_a_bar_on_a_terminal(capsys: pytest.CaptureFixture) -> None:
    """Quiet without `progress` (Ray trials, retrain); with it on a terminal, one in-place bar."""
    import io

    from oialr_tune.progress import TrainProgress

    cfg = small(**{"schedule.epochs": 1})
    train(cfg)
    assert capsys.readouterr() == ("", "")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    train(cfg, progress=TrainProgress(terminal))
    text = terminal.getvalue()
    assert text.startswith("[train] mlp on digits (OIALR) on cpu: 1 epoch\n")
    assert "\r" in text and "19/19" in text and "epoch 1/1" in text  # redrawn in place, step by step
    assert "\n[train] epoch" not in text  # no per-epoch lines on a terminal
    assert capsys.readouterr() == ("", "")
