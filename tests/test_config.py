"""Config loading: defaults, YAML round trip, and one-line errors that name the bad key or file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from oialr_tune.config import (
    TrainConfig,
    load_train_config,
    resolve_device,
    train_config_from_dict,
    train_config_to_dict,
    with_overrides,
)
from oialr_tune.errors import UserError

FULL = {
    "seed": 3,
    "device": "cpu",
    "model": {"name": "cnn", "args": {"channels": [8, 16], "hidden": 32, "dropout": 0.1}},
    "data": {"name": "cifar10", "root": "/data", "val_fraction": 0.1, "augment": False, "num_workers": 0},
    "optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.8, "nesterov": True},
    "schedule": {"epochs": 3, "batch_size": 32, "warmup_fraction": 0.1, "decay": "constant",
                 "rewarm_steps": 10, "rewarm_start": 0.2},
    "label_smoothing": 0.1,
    "precision": "bf16",
    "checkpoint_every": 0,
    "grad_clip": 1.0,
    "oialr": {"delay": 100, "stability_frequency": 5, "stability_threshold": None, "min_rank": 2},
}


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = train_config_from_dict({})
    assert cfg == TrainConfig()
    assert cfg.optimizer.lr == 1e-3 and cfg.schedule.epochs == 20 and cfg.oialr.enabled
    data = train_config_to_dict(cfg)
    assert train_config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(FULL))
    cfg = load_train_config(path)
    assert cfg.model.args == {"channels": (8, 16), "hidden": 32, "dropout": 0.1}
    assert cfg.oialr.delay == 100 and isinstance(cfg.oialr.delay, int)
    assert cfg.oialr.stability_threshold is None
    assert cfg.optimizer.betas == (0.9, 0.999)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(train_config_to_dict(cfg)))
    assert load_train_config(again) == cfg


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 as a string; a user writing it means a number.
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\noialr:\n  delay: 0.5\n")
    cfg = load_train_config(path)
    assert cfg.optimizer.lr == 1e-3 and cfg.oialr.delay == 0.5


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"optimizer": {"lr": -1}}, "optimizer.lr: must be > 0, got -1"),
        ({"optimzer": {"lr": 0.1}}, "optimzer: unknown key"),
        ({"schedule": {"epochs": 0}}, "schedule.epochs"),
        ({"schedule": {"epochs": "ten"}}, "schedule.epochs: expected an integer"),
        ({"schedule": {"batch_size": 1.5}}, "schedule.batch_size"),
        ({"schedule": {"warmup_fraction": 1.0}}, "schedule.warmup_fraction"),
        ({"model": {"name": "resnet9"}}, "model.name"),
        ({"model": "mlp"}, "model: expected a mapping"),
        ({"model": {"name": "mlp", "args": {"width": 3}}}, "model.args.width: unknown argument"),
        ({"model": {"args": {"hidden": [64, "x"]}}}, "model.args.hidden[1]"),
        ({"model": {"args": {"dropout": 1.0}}}, "model.args.dropout"),
        ({"oialr": {"stability_threshold": 1.5}}, "oialr.stability_threshold"),
        ({"oialr": {"stability_threshold": 0}}, "oialr.stability_threshold"),
        ({"oialr": {"sigma_cutoff_fraction": 1.0}}, "oialr.sigma_cutoff_fraction"),
        ({"oialr": {"delay": 1.5}}, "oialr.delay"),
        ({"oialr": {"delay": 0}}, "oialr.delay"),
        ({"oialr": {"layer_step_fraction": 0}}, "oialr.layer_step_fraction"),
        ({"oialr": {"preset": "madonna"}}, "oialr.preset"),
        ({"oialr": {"enabled": "yes"}}, "oialr.enabled: expected true or false"),
        ({"oialr": {"min_rank": True}}, "oialr.min_rank"),
        ({"data": {"name": "cifar10"}}, "data.root"),
        ({"data": {"name": "svhn"}}, "data.name"),
        ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "data.val_fraction"),
        ({"data": {"synthetic": {"num_classes": 1}}}, "data.synthetic.num_classes"),
        ({"device": "tpu"}, "device"),
        ({"precision": "fp8"}, "precision"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas[1]"),
        ({"optimizer": {"name": "sgd", "momentum": 0.0, "nesterov": True}}, "optimizer.nesterov"),
        ({"optimizer": {"lr": float("nan")}}, "optimizer.lr"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
    ],
)
def test_bad_config_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(UserError) as info:
        train_config_from_dict(data)
    message = str(info.value)
    assert message.startswith(key.split(":")[0] + ":") or message.startswith(key.split("[")[0])
    assert key in message
    assert "\n" not in message


def test_bad_files_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optimizer: {lr: [1,\n")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    for path in (empty, broken, scalar, tmp_path / "missing.yaml"):
        with pytest.raises(UserError, match=str(path)) as info:
            load_train_config(path)
        assert "\n" not in str(info.value)


def test_overrides_take_dotted_keys() -> None:
    cfg = with_overrides(TrainConfig(), {"optimizer.lr": 0.01, "oialr.delay": 50, "model.args.hidden": [32]})
    assert cfg.optimizer.lr == 0.01 and cfg.oialr.delay == 50 and cfg.model.args["hidden"] == (32,)
    with pytest.raises(UserError, match=r"^optimizer\.lrr: unknown key"):
        with_overrides(cfg, {"optimizer.lrr": 0.1})
    with pytest.raises(UserError, match=r"^optimizer\.lr: must be > 0"):
        with_overrides(cfg, {"optimizer.lr": 0})


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match=r"^device: "):
                resolve_device(device)


def test_the_oialr_controller_and_the_config_share_their_defaults() -> None:
    """One set of OIALR defaults: every setting of the config's ``oialr`` section is an argument of the
    controller with the same default, except `delay` (a fraction of the run in the config, steps in
    the controller, which knows no run length), `enabled` (the config's switch) and the controller's
    `distributed` (the running process group, not a setting: the trainer decides it)."""
    import dataclasses
    import inspect

    from oialr_tune.config import OIALRConfig
    from oialr_tune.oialr import OIALR

    controller = {k: p.default for k, p in inspect.signature(OIALR).parameters.items()
                  if p.default is not inspect.Parameter.empty and k != "distributed"}
    config = {f.name: getattr(OIALRConfig(), f.name) for f in dataclasses.fields(OIALRConfig)}
    assert set(controller) == set(config) - {"enabled"}
    # A pattern list is a tuple in the signature (no mutable default) and a list in the config.
    as_data = {k: list(v) if isinstance(v, tuple) else v for k, v in controller.items() if k != "delay"}
    assert as_data == {k: config[k] for k in controller if k != "delay"}
