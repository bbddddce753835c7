"""Lightning under the tuner: a LightningModule + DataModule as a sweep's trainable (the ``lightning``
section, `oialr_tune.lightning_trainable`), the `OIALRCallback(trial=trial)` reporting path in a loop
of one's own, the resume of a Lightning trial, and bad Lightning input.

Everything runs from a copy of examples/custom as the working directory (its `my_lightning.py`), as
a user would; the sweep shares the session's Ray.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra: pip install 'oialr-tune[lightning]'")

from helpers import custom_examples
from test_bad_input import rejected, sweep_args, write_space  # noqa: F401 (rejected: fixture)

from oialr_tune.config import LIGHTNING_TRAINABLE, train_config_from_dict
from oialr_tune.errors import UserError
from oialr_tune.lightning import OIALRCallback
from oialr_tune.results import best_trial
from oialr_tune.retrain import retrain
from oialr_tune.run_record import Callback
from oialr_tune.space import space_from_dict
from oialr_tune.trainer import train
from oialr_tune.tuning import sweep

# Cuts every 5 steps once factorized (13 steps an epoch), whatever the basis stability: a cut is certain.
OIALR = {"delay": 0.2, "stability_frequency": 5, "stability_threshold": None, "sigma_cutoff_fraction": 0.3}


@pytest.fixture
def custom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of examples/custom as the working directory (`helpers.custom_examples`)."""
    return custom_examples(tmp_path, monkeypatch, written=("my_lightning_loop",))


def _base(folder: Path, **changes: Any) -> dict[str, Any]:
    base = yaml.safe_load((folder / "lightning.yaml").read_text())["base"]
    return {**base, "oialr": OIALR, **changes}


def test_a_lightning_module_sweep_reports_each_epoch_cuts_and_retrains(custom: Path, ray_session: Any) -> None:
    """lightning.yaml, shrunk: 2 OIALR trials and one full-rank baseline of 3 epochs each.

    One trial at a time: the second reuses the first's worker, which has imported Lightning already
    (seconds per process); retrain runs in this process for the same reason.
    """
    doc = yaml.safe_load((custom / "lightning.yaml").read_text())
    doc.update(base=_base(custom), baseline="once", resources={"cpu": 1},
               budget={"num_samples": 2, "max_epochs": 3, "grace_period": 3, "max_concurrent": 1})
    result = sweep(space_from_dict(doc), results_dir=custom / "results", name="pl", verbose=0)
    rows = list(csv.DictReader((result.path / "trials.csv").open()))
    assert {r["arm"] for r in rows} == {"oialr", "baseline"} and len(rows) == 3
    for r in rows:
        assert r["trainer_status"] == "finished", r  # every epoch reported, the last one ends the trial
        assert int(r["training_iteration"]) == 3 and 0.5 < float(r["val_acc"]) <= 1.0
    assert all(float(r["trainable_fraction"]) < 0.7 for r in rows if r["arm"] == "oialr"), rows  # cut
    assert [float(r["trainable_fraction"]) for r in rows if r["arm"] == "baseline"] == [1.0]

    best = best_trial(result.path)
    assert best.trial.config["lightning"]["module"] == "my_lightning:Classifier"
    summary = retrain(result.path, seeds=[1000], max_concurrent=1, log=lambda _: None)
    for arm in ("oialr", "baseline"):
        acc = summary["arms"][arm]["test_acc"]["values"][0]
        assert acc is not None and 0.5 < acc <= 1.0  # trainer.test scored the test split


def test_a_resumed_lightning_trial_continues_as_if_never_stopped(custom: Path) -> None:
    """Killed after epoch 2 of 4 (its checkpoint: Lightning's, with the RNG states), then resumed: every
    epoch's metrics, the ranks and the rank events equal those of an uninterrupted run, bit for bit."""
    cfg = train_config_from_dict({**_base(custom), "schedule": {"batch_size": 32, "epochs": 4}})

    class Kill(Callback):
        def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            if metrics["epoch"] == 2:
                assert checkpoint_dir is not None
                raise RuntimeError("killed")

    folder = custom / "run"
    with pytest.raises(UserError, match="killed"):
        train(cfg, callbacks=[Kill()], checkpoint_dir=folder)
    resumed = train(cfg, checkpoint_dir=folder, resume=True)
    straight = train(cfg)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    keys = ("val_loss", "val_acc", "train_loss", "trainable_fraction", "ranks", "oialr_events", "status")
    assert [{k: r[k] for k in keys} for r in resumed.history] == [{k: r[k] for k in keys} for r in straight.history]
    assert resumed.final["trainable_fraction"] < 0.7


def _readme_lightning_loop() -> str:
    """The README's Lightning `train(config, trial)` snippet, as written there, on the example's classes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\ndef train(config, trial):\n    module, data = MyModule(config)")
    snippet = readme[start + len("```python\n"): readme.index("```", start + 10)]
    return ("import lightning.pytorch as pl\nfrom my_lightning import BreastCancer as MyData, Classifier as MyModule\n"
            "from oialr_tune.lightning import OIALRCallback\n\n" + snippet)


def test_the_callback_in_a_loop_of_ones_own_reports_through_the_trial(custom: Path) -> None:
    """The README's loop (``trainable: "module:function"``, its own Trainer with `OIALRCallback(trial=trial)`):
    each epoch reaches the run's callbacks (the sweep's Ray reporter is one) with its val metrics and the
    controller's numbers, checkpoints are written when due, and ``trainer.test`` gives retrain's test metrics."""
    loop = _readme_lightning_loop()
    (custom / "my_lightning_loop.py").write_text(loop)
    base = {k: v for k, v in _base(custom).items() if k != "lightning"}
    cfg = train_config_from_dict({**base, "trainable": "my_lightning_loop:train", "checkpoint_every": 2,
                                  "schedule": {"batch_size": 32, "epochs": 3}})

    class Record(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[dict[str, Any], bool]] = []

        def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            self.rows.append((metrics, checkpoint_dir is not None))

    record = Record()
    result = train(cfg, callbacks=[record], checkpoint_dir=custom / "run", evaluate_test=True)
    assert [(m["epoch"], m["status"], saved) for m, saved in record.rows] == [
        (1, "running", False), (2, "running", True), (3, "finished", True)]
    assert all({"val_loss", "val_acc", "train_loss"} <= set(m) for m, _ in record.rows)
    assert record.rows[-1][0]["trainable_fraction"] < 0.7 and record.rows[-1][0]["ranks"]
    assert 0.5 < result.test_metrics["test_acc"] <= 1.0 and "test_loss" in result.test_metrics

    # A Trainer whose max_epochs is not the trial's schedule would misreport when the trial ends.
    (custom / "my_lightning_loop.py").write_text(loop.replace("max_epochs=config.schedule.epochs", "max_epochs=5"))
    sys.modules.pop("my_lightning_loop", None)
    with pytest.raises(UserError, match=r"Trainer\(max_epochs=5\) but the trial's schedule.epochs is 3"):
        train(cfg)

    # A checkpoint a resume could not load safely is refused when it is written, not when the trial resumes.
    saving = "class Saving(MyModule):\n    def __init__(self, config):\n        super().__init__(config)\n" \
             "        self.save_hyperparameters()\n\n"
    (custom / "my_lightning_loop.py").write_text(loop.replace("\n\ndef train", "\n\n" + saving + "def train")
                                                 .replace("MyModule(config), MyData", "Saving(config), MyData"))
    sys.modules.pop("my_lightning_loop", None)
    with pytest.raises(UserError, match=r"holds oialr_tune\.config\..*save_hyperparameters\(ignore=\['config'\]\)"):
        train(cfg, checkpoint_dir=custom / "run2")

    with pytest.raises(UserError, match="with trial= the settings are the trial's oialr section; got delay"):
        OIALRCallback(trial=object(), delay=3)


@pytest.mark.parametrize(("edits", "names"), [
    pytest.param({"lightning": {"module": "my_models:mlp"}},
                 ["base.lightning.module", "my_models:mlp is not a LightningModule subclass"], id="not-a-module"),
    pytest.param({"lightning": {"module": "my_lightning:Missing"}},
                 ["base.lightning.module", "has no attribute 'Missing'"], id="missing-class"),
    pytest.param({"lightning": {"module": "my_lightning:Classifier", "datamodule": "my_lightning:Classifier"}},
                 ["base.lightning.datamodule", "not a LightningDataModule subclass"], id="datamodule-wrong-class"),
    pytest.param({"lightning": {"module": "my_lightning:Classifier"}},
                 ["base.lightning.datamodule: not set", "defines no train_dataloader"], id="no-data"),
    pytest.param({"trainable": "my_loop:train"}, ["lightning.module", "my_loop:train"], id="with-a-trainable"),
    pytest.param({"resources": {"workers": 2}}, ["resources.workers", "one process"], id="several-workers"),
])  # fmt: skip
def test_bad_lightning_input_is_one_line_before_ray(custom: Path, rejected: Any, edits: dict[str, Any],  # noqa: F811
                                                    names: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing the user's modules writes nothing
    doc = yaml.safe_load((custom / "lightning.yaml").read_text())
    doc["base"].update({k: v for k, v in edits.items() if k != "resources"})
    doc.update({k: v for k, v in edits.items() if k == "resources"})
    rejected(sweep_args(write_space(custom, doc), custom), *names)


def test_a_lightning_section_names_its_trainable() -> None:
    cfg = train_config_from_dict({"lightning": {"module": "pkg.mod:Module"}})
    assert cfg.trainable == LIGHTNING_TRAINABLE
    with pytest.raises(UserError, match=r"^lightning\.datamodule: needs lightning\.module"):
        train_config_from_dict({"lightning": {"datamodule": "pkg.mod:Data"}})
    with pytest.raises(UserError, match=r"^lightning\.module: expected an import path"):
        train_config_from_dict({"lightning": {"module": "Module"}})
