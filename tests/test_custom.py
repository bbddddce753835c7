"""Users' own code under the tuner: the examples/custom folder (model, data, regression, own loop),
callables through the Python API, zoo models' layers under OIALR, and the Lightning callback.

The sweeps are tiny (2 trials, 2 epochs) on the session's Ray; each runs from a copy of
examples/custom as the working directory, as a user would, so the import paths resolve from it.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import EXAMPLES, custom_examples
from torch import nn
from torch.utils.data import TensorDataset

from oialr_tune import plugins
from oialr_tune.cli import main
from oialr_tune.config import train_config_from_dict, train_config_to_dict
from oialr_tune.errors import UserError
from oialr_tune.model_io import load_model, read_model_file
from oialr_tune.models import build_model
from oialr_tune.oialr import OIALR, low_rank_structure
from oialr_tune.report import write_report
from oialr_tune.results import best_trial
from oialr_tune.retrain import retrain
from oialr_tune.space import space_from_dict
from oialr_tune.trainer import train
from oialr_tune.tuning import sweep

TINY = {"budget": {"num_samples": 2, "max_epochs": 2, "grace_period": 1}, "resources": {"cpu": 1}}


@pytest.fixture
def custom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of examples/custom as the working directory (`helpers.custom_examples`)."""
    return custom_examples(tmp_path, monkeypatch, on_path=False)


def _tiny_space(folder: Path, file: str, **changes: Any) -> Any:
    doc = yaml.safe_load((folder / file).read_text())
    doc.update(TINY, **changes)
    return space_from_dict(doc)


def _test_split(folder: Path, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    import my_data

    _, _, test = getattr(my_data, fn)()
    return test.tensors


@pytest.mark.parametrize(("file", "data_fn", "metric"), [
    ("classification.yaml", "breast_cancer", "test_f1"),  # a user metric, val_f1, is the objective
    ("regression.yaml", "diabetes", "test_mae"),
])
def test_own_model_and_data_sweep_best_retrain_load(custom: Path, ray_session: Any, file: str, data_fn: str,
                                                     metric: str) -> None:
    changes: dict[str, Any] = {"baseline": "once"}
    if metric == "test_f1":
        base = {**yaml.safe_load((custom / file).read_text())["base"], "metrics": {"f1": "my_metrics:f1"}}
        changes.update(base=base, objective={"metric": "val_f1", "mode": "max"})
    space = _tiny_space(custom, file, **changes)
    result = sweep(space, results_dir=custom / "results", name="s", verbose=0)
    best = best_trial(result.path)
    assert best.trial.config["model"]["name"] == "my_models:mlp"
    summary = retrain(result.path, seeds=[1000], log=lambda _: None)
    assert summary["test_metric"] == metric
    assert set(summary["arms"]) == {"oialr", "baseline"}
    # The sweep's objective on the test split is in every file retrain writes, for every arm.
    rows = list(csv.DictReader((Path(summary["out"]) / "metrics.csv").open()))
    assert {r["arm"] for r in rows if r[metric] and r[f"reloaded_{metric}"] == r[metric]} == {"oialr", "baseline"}
    on_disk = json.loads((Path(summary["out"]) / "summary.json").read_text())
    assert on_disk["arms"]["oialr"][metric]["mean"] == pytest.approx(float(rows[0][metric]))
    assert on_disk["comparison"]["metric"] == metric

    # The model file rebuilds the user's model from its import path and scores what retrain reported.
    path = Path(summary["out"]) / "oialr" / "seed_1000" / "model.pt"
    assert read_model_file(path).model_name == "my_models:mlp"
    model = load_model(path, trust_code=True)  # our own file: its import path may run
    x, y = _test_split(custom, data_fn)
    with torch.no_grad():
        out = model(x)
    reported = summary["arms"]["oialr"][metric]["mean"]
    if metric == "test_f1":
        import my_metrics

        assert my_metrics.f1(out, y) == pytest.approx(reported, abs=1e-6)
    else:
        assert (out.squeeze(1) - y).abs().mean().item() == pytest.approx(reported, rel=1e-4)

    # Where the module cannot be imported, one line names it.
    sys.modules.pop("my_models")
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != custom.resolve()]
    (custom / "my_models.py").rename(custom / "elsewhere.py")
    with pytest.raises(UserError, match=r"^model\.name: cannot import module 'my_models'") as e:
        load_model(path, trust_code=True)
    assert "\n" not in str(e.value)


def test_own_training_loop_end_to_end(custom: Path, ray_session: Any) -> None:
    space = _tiny_space(custom, "own_loop.yaml", baseline="same-budget")
    assert space.scheduler() == "asha"
    result = sweep(space, results_dir=custom / "results", name="loop", verbose=0)
    df = result.trials
    assert set(df["arm"]) == {"oialr", "baseline"}
    assert (df["trainer_status"].isin(["finished", "running"])).all(), df[["trainer_status", "error"]]
    assert df.loc[df["arm"] == "baseline", "trainable_fraction"].eq(1.0).all()  # trial.oialr: a no-op there
    # The loop loads its own data: train+val cannot be merged for it, so it is refused while planning.
    with pytest.raises(UserError, match=r"^--train-on: train\+val needs the built-in trainer"):
        retrain(result.path, seeds=[1000], train_on="train+val", out=custom / "tv", log=lambda _: None)
    assert not (custom / "tv").exists()
    summary = retrain(result.path, seeds=[1000], log=lambda _: None)
    for arm in ("oialr", "baseline"):
        mae = summary["arms"][arm]["test_mae"]["values"][0]
        assert mae is not None and 0 < mae < 2  # the loop scored the test split when asked
    model = load_model(Path(summary["out"]) / "oialr" / "seed_1000" / "model.pt", trust_code=True)
    assert model(torch.zeros(3, 10)).shape == (3, 1)
    report = write_report(result.path).read_text()
    assert "Final retraining" in report and "test_mae" in report


def test_a_loop_that_never_reports_stops_the_sweep_at_its_first_trial(
    custom: Path, ray_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    (custom / "silent_loop.py").write_text("def train(config, trial):\n    pass  # forgot trial.report\n")
    doc = yaml.safe_load((custom / "own_loop.yaml").read_text())
    doc["base"]["trainable"] = "silent_loop:train"
    doc.update(TINY, budget={**TINY["budget"], "num_samples": 3, "max_concurrent": 1})
    (custom / "space.yaml").write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert main(["sweep", "space.yaml", "--results-dir", "results", "--name", "s"]) == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert "silent_loop:train returned without calling trial.report" in line and "first trial" in line, line
    assert "traceback: " in line and len([x for x in out.splitlines() if " ERROR " in x]) == 1, out
    ends = [x for x in (custom / "results" / "s" / "journal-oialr.jsonl").read_text().splitlines() if '"end"' in x]
    assert len(ends) == 1 and not (custom / "results" / "s" / "baseline").exists()


# --- the Python API: callables defined here, shipped to Ray's workers ------------------------------------


def _blobs() -> tuple[TensorDataset, None, TensorDataset]:
    """Three Gaussian blobs in 6-D: easy, so two epochs learn them."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 6, generator=g) + 3 * nn.functional.one_hot(y, 6).float()
    return TensorDataset(x[:240], y[:240]), None, TensorDataset(x[240:], y[240:])


def _net(in_shape: tuple[int, ...], num_outputs: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(in_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_outputs))


def test_python_api_takes_callables(tmp_path: Path, ray_session: Any) -> None:
    space = space_from_dict({
        "name": "api", "base": {"device": "cpu", "schedule": {"batch_size": 32},
                                "oialr": {"delay": 0.3, "stability_frequency": 5}},
        "search": {"optimizer.lr": {"type": "loguniform", "low": 3e-3, "high": 1e-2}},
        "baseline": "none", **TINY,
    })  # fmt: skip
    result = sweep(space, results_dir=tmp_path, name="api", verbose=0, model=_net, data=_blobs)
    assert result.space.base["model"]["name"] == "test_custom:_net"
    assert result.space.base["data"]["name"] == "test_custom:_blobs"
    assert (result.trials["status"] == "TERMINATED").all(), result.trials.get("error")  # ran on the workers
    assert result.trials["trainer_status"].isin(["finished", "running"]).all()  # running: stopped by ASHA
    assert result.summary["best"]["oialr"]["val_acc"] > 0.8


# --- zoo models: which layers OIALR takes, and why the others stay dense ----------------------------------


def _controller(model: nn.Module) -> OIALR:
    return OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), delay=1, stability_frequency=1)


def test_torchvision_models_mha_and_depthwise_convs() -> None:
    vit = build_model("torchvision:vit_b_16", (1, 16, 16), 10)  # one 16x16 patch, grayscale adapted
    assert vit(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    ranks = _controller(vit).layer_ranks()
    assert "1.encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in ranks
    assert "1.encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in ranks

    mobilenet = build_model("torchvision:mobilenet_v3_small", (3, 32, 32), 4)
    controller = _controller(mobilenet)
    dense = controller.dense_layers()
    depthwise = {k: v for k, v in dense.items() if "depthwise conv" in v}
    assert "features.1.block.0.0" in depthwise, dense
    assert not set(depthwise) & set(controller.layer_ranks())
    with pytest.raises(UserError, match="torchvision has no model 'resnet7'"):
        build_model("torchvision:resnet7", (3, 32, 32), 4)


def test_timm_vit_example_trains_and_factorizes_its_qkv() -> None:
    pytest.importorskip("timm", reason="timm is an optional extra: pip install 'oialr-tune[timm]'")
    doc = yaml.safe_load((EXAMPLES / "timm_vit.yaml").read_text())
    cfg = train_config_from_dict({**doc["base"], "schedule": {"batch_size": 64, "epochs": 1},
                                  "oialr": {"delay": 5, "stability_frequency": 5, "stability_threshold": None,
                                            "sigma_cutoff_fraction": 0.3}})
    result = train(cfg)
    assert result.status == "finished"
    assert "blocks.0.attn.qkv" in low_rank_structure(result.model)  # timm's fused q/k/v Linear
    assert result.final["ranks"]["blocks.0.attn.qkv"] < 64
    assert result.final["trainable_fraction"] < 1.0


# --- Lightning --------------------------------------------------------------------------------------------


class _AttentionNet(nn.Module):
    """`_blobs` through an `nn.MultiheadAttention`, whose packed projection OIALR parametrizes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(6, 32), nn.Linear(32, 3)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).unsqueeze(1)
        return self.head(self.attn(h, h, h)[0][:, 0])


def _lightning_module(attention: bool = False) -> Any:
    """A tiny LightningModule (the `_net` MLP or `_AttentionNet` on `_blobs`, AdamW) that knows nothing of OIALR."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _AttentionNet() if attention else _net((6,), 3, hidden=48)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    return Module()


def _lightning_trainer(max_epochs: int, callbacks: list[Any], **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", **kwargs)


def test_lightning_callback_cuts_a_lightning_module() -> None:
    pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra")
    from oialr_tune.lightning import OIALRCallback

    train_set, _, _ = _blobs()
    loader = torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True)
    callback = OIALRCallback(delay=0.3, stability_frequency=5, stability_threshold=None, sigma_cutoff_fraction=0.3)
    trainer = _lightning_trainer(3, [callback])
    module = _lightning_module()
    trainer.fit(module, loader)
    controller = callback.controller
    assert controller is not None and controller.history, "no factorization or cut happened"
    assert controller.step_count == trainer.global_step == 3 * len(loader)
    assert controller.trainable_fraction < 1.0
    assert trainer.callback_metrics["trainable_fraction"] == pytest.approx(controller.trainable_fraction)
    x, y = train_set.tensors
    assert (module.net(x).argmax(1) == y).float().mean() > 0.8  # it still learns through the low-rank layers


def test_lightning_callback_takes_the_sweeps_oialr_section() -> None:
    """``OIALRCallback(**best["oialr"])``: the config's keys and checks; ``enabled: false`` is full rank."""
    pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra")
    from oialr_tune.lightning import OIALRCallback

    section = train_config_to_dict(train_config_from_dict({"oialr": {"delay": 0.3, "stability_frequency": 5,
                                                                       "exclude": ["net.2"]}}))["oialr"]
    loader = torch.utils.data.DataLoader(_blobs()[0], batch_size=16)
    callback = OIALRCallback(**section)
    _lightning_trainer(2, [callback]).fit(_lightning_module(), loader)
    assert "net.0" in callback.controller.layer_ranks() and "net.2" not in callback.controller.layer_ranks()

    off = OIALRCallback(**{**section, "enabled": False})
    trainer = _lightning_trainer(1, [off])
    module = _lightning_module()
    before = [p.shape for p in module.parameters()]
    trainer.fit(module, loader)
    assert trainer.callback_metrics["trainable_fraction"] == 1.0
    assert off.controller.step_count == len(loader) and [p.shape for p in module.parameters()] == before

    with pytest.raises(UserError, match=r"^oialr\.bogus"):
        OIALRCallback(bogus=1)
    with pytest.raises(UserError, match=r"^oialr\.delay"):
        OIALRCallback(delay=1.5)


@pytest.mark.parametrize("attention", [False, True], ids=["linear", "parametrized_mha"])
def test_lightning_resume_restores_the_low_rank_layers(tmp_path: Path, attention: bool) -> None:
    """A fit resumed (``ckpt_path=``) after the first factorization ends where an uninterrupted one does.

    Low-rank Linear layers replace the module; MultiheadAttention's weight is parametrized, so the
    rebuilt module lists its factor elsewhere and the optimizer's state must follow it by name.
    """
    pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from oialr_tune.lightning import OIALRCallback

    # Step counts, not fractions: the 2-epoch and 4-epoch fits then share one schedule. 15 steps an
    # epoch: factorized at step 10, checked every 5 steps, so the checkpoint (step 30) is low rank
    # and the resumed epochs cut ranks again. No shuffling: both runs see the same batches.
    knobs = {"delay": 10, "stability_frequency": 5, "stability_threshold": None, "sigma_cutoff_fraction": 0.3}
    loader = torch.utils.data.DataLoader(_blobs()[0], batch_size=16)

    def fit(max_epochs: int, ckpt_path: Path | None = None, save: bool = False) -> tuple[Any, Any]:
        torch.manual_seed(0)
        module, callback = _lightning_module(attention), OIALRCallback(**knobs)
        callbacks = [callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)] if save else [callback]
        _lightning_trainer(max_epochs, callbacks, enable_checkpointing=save).fit(module, loader, ckpt_path=ckpt_path)
        return module, callback.controller

    _, first = fit(2, save=True)
    assert low_rank_structure(first.model), "the checkpoint must be taken after the first factorization"
    resumed, resumed_controller = fit(4, ckpt_path=tmp_path / "last.ckpt")
    straight, straight_controller = fit(4)
    assert resumed_controller.step_count == straight_controller.step_count == 4 * len(loader)
    assert resumed_controller.history == straight_controller.history
    assert low_rank_structure(resumed) == low_rank_structure(straight)
    if not attention:  # the MLP's ranks are cut again after the resume (the attention net's stay)
        assert low_rank_structure(resumed) != low_rank_structure(first.model)
    # Same batches, same restored optimizer state: only float rounding may differ.
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_registered_callables_resolve_by_name() -> None:
    name = plugins.register(_net)
    assert name == "test_custom:_net" and plugins.resolve(name, "model.name") is _net
    assert json.dumps(name)  # a plain string in every config


# --- the README's own-loop snippet, in both arms --------------------------------------------------------------


def _readme_loop() -> str:
    """The README's `train(config, trial)` snippet (section "Your own model and data"), as written there."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\ndef train(config, trial):")
    return readme[start + len("```python\n"): readme.index("```", start + 10)]


@pytest.mark.parametrize("oialr_on", [True, False])
def test_the_readme_loop_runs_in_both_arms(tmp_path: Path, oialr_on: bool, caplog: pytest.LogCaptureFixture) -> None:
    """It logs and saves what the OIALR controller offers; the full-rank arm's FullRank offers it all too."""
    import logging

    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 10, generator=g)
    y = x @ torch.randn(10, generator=g)
    parts = {"train": (x[:96], y[:96]), "val": (x[96:128], y[96:128]), "test": (x[128:], y[128:])}

    def score(model: nn.Module, split: str) -> dict[str, float]:
        xs, ys = parts[split]
        with torch.no_grad():
            out = model(xs).squeeze(1)
        return {f"{split}_loss": F.mse_loss(out, ys).item(), f"{split}_mae": (out - ys).abs().mean().item()}

    namespace = {"__name__": "readme_loop", "torch": torch, "F": F, "score": score,
                 "loader": DataLoader(TensorDataset(*parts["train"]), batch_size=16), "log": logging.getLogger("loop")}
    exec(_readme_loop(), namespace)  # the README's code, run as written
    cfg = {"device": "cpu", "trainable": plugins.register(namespace["train"]), "task": "regression",
           "model": {"name": "mlp", "args": {"hidden": [32, 32]}}, "schedule": {"epochs": 2},
           "oialr": {"enabled": oialr_on, "delay": 4, "stability_frequency": 2}}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="loop"):
        result = train(train_config_from_dict(cfg), checkpoint_dir=tmp_path, evaluate_test=True)
        assert result.status == "finished" and result.test_metrics["test_mae"] > 0
        cfg["schedule"]["epochs"] = 3  # resume: the controller's state comes back, steps go on counting
        train(train_config_from_dict(cfg), checkpoint_dir=tmp_path, evaluate_test=True)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    assert lines[-1].endswith("step 18")  # 6 batches per epoch, counted across the resume
    fractions = [float(line.split(": ")[1].split("%")[0]) for line in lines]
    assert (fractions[-1] < 100.0) if oialr_on else fractions == [100.0] * 3
    assert ("ranks {}" in lines[-1]) != oialr_on


def test_full_rank_has_every_attribute_and_method_of_the_oialr_controller() -> None:
    from oialr_tune.oialr import FullRank

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr, full = OIALR(model, optimizer, delay=5), FullRank(model, optimizer, delay=5)
    public = {n for n in dir(oialr) if not n.startswith("_")}
    assert public <= set(dir(full)), public - set(dir(full))
    for name in public:  # the same kind of thing: a method where OIALR has one, a value where it has one
        assert callable(getattr(full, name)) == callable(getattr(oialr, name)), name
    assert (full.delay, full.preset, full.trainable_fraction, full.history) == (5, "oialr-tune", 1.0, [])
    full.step()
    again = FullRank(model, optimizer)
    again.load_state_dict(full.state_dict())
    assert again.step_count == 1 and set(full.state_dict()) == set(oialr.state_dict())


# --- a user loop's checkpoint: numpy arrays and RNG states, read back safely --------------------------------------

_CRASH_AFTER: list[int] = []  # the epoch after whose report `_random_loop` dies (empty: never)


def _random_loop(config: Any, trial: Any) -> None:
    """Draws from every RNG (torch, numpy, Python, a DataLoader's shuffle) and reports what it drew."""
    import random

    import numpy as np
    from torch.utils.data import DataLoader

    model = trial.build_model(in_shape=(4,), num_outputs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trial.oialr(model, optimizer)
    order = torch.Generator().manual_seed(trial.seed)
    loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=8, shuffle=True, generator=order)
    if trial.checkpoint is not None:
        assert trial.checkpoint["seen"].dtype == np.int64  # a numpy array came back as one
        trial.restore_rng_state(trial.checkpoint["rng"], order)
    for epoch in range(trial.start_epoch + 1, config.schedule.epochs + 1):
        (batch,) = next(iter(loader))
        drawn = {"val_loss": float(torch.rand(())), "val_numpy": float(np.random.rand()),
                 "val_python": random.random(), "val_order": float(batch[:4] @ torch.arange(4.0))}  # fmt: skip
        trial.report(epoch=epoch, checkpoint={"rng": trial.rng_state(order), "seen": np.arange(epoch)}, **drawn)
        if epoch in _CRASH_AFTER:
            raise RuntimeError("killed")


def test_a_resumed_loop_continues_the_same_random_sequence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = train_config_from_dict({"device": "cpu", "trainable": plugins.register(_random_loop), "task": "regression",
                                  "model": {"name": "mlp", "args": {"hidden": [4]}}, "schedule": {"epochs": 3},
                                  "oialr": {"enabled": False}})  # fmt: skip
    whole = train(cfg, checkpoint_dir=tmp_path / "whole").history
    monkeypatch.setattr(sys.modules[__name__], "_CRASH_AFTER", [2])
    with pytest.raises(UserError, match="killed"):
        train(cfg, checkpoint_dir=tmp_path / "cut")
    monkeypatch.setattr(sys.modules[__name__], "_CRASH_AFTER", [])
    resumed = train(cfg, checkpoint_dir=tmp_path / "cut").history
    keys = ("val_loss", "val_numpy", "val_python", "val_order")
    assert [{k: e[k] for k in keys} for e in resumed] == [{k: e[k] for k in keys} for e in whole]
    assert len({e["val_order"] for e in whole}) > 1  # the data order does change from epoch to epoch


def test_a_checkpoint_holding_an_arbitrary_object_is_refused_by_name(tmp_path: Path) -> None:
    from oialr_tune.run_record import read_checkpoint

    torch.save({"format": "x", "user": {"obj": _Opaque()}}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"holds test_custom\._Opaque, not on the allow-list") as e:
        read_checkpoint(tmp_path / "c.pt")
    assert "\n" not in str(e.value)


class _Opaque:
    """A class nothing allows a checkpoint to unpickle."""
