"""Hugging Face models and data: the ``transformers.Trainer`` callback, dict examples with a collate_fn in
the built-in trainer, and a sweep of tiny BERT- and GPT-2-like classifiers built from config objects.

Everything is random-initialised and tiny (no download): examples/custom's hf_models (builders from
``BertConfig`` / ``GPT2Config``) and hf_data (random token sequences whose label is which half of the
vocabulary most of their tokens come from; chance is 50 %, counting tokens gives ~95 %).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import custom_examples
from torch import nn
from torch.utils.data import Dataset
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from oialr_tune.checks import check_run
from oialr_tune.cli import main
from oialr_tune.config import train_config_from_dict
from oialr_tune.data import load_data
from oialr_tune.errors import UserError
from oialr_tune.huggingface import OIALRTrainerCallback
from oialr_tune.oialr import OIALR, FullRank, export_dense
from oialr_tune.retrain import merge_train_val
from oialr_tune.trainer import train


@pytest.fixture
def hf_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of examples/custom as the working directory, its hf_* modules importable."""
    return custom_examples(tmp_path, monkeypatch)


def _hf_trainer(model: nn.Module, train_set: Dataset, collate: Any, callback: OIALRTrainerCallback, out: Path,
                **args: Any) -> Trainer:
    settings = {"num_train_epochs": 4, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                "logging_steps": 8, **args}  # fmt: skip
    targs = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                              seed=0, **settings)  # fmt: skip
    return Trainer(model=model, args=targs, train_dataset=train_set, data_collator=collate, callbacks=[callback])


def test_trainer_callback_factorizes_cuts_and_trains_on_a_tiny_bert(hf_examples: Path, tmp_path: Path) -> None:
    from hf_data import token_majority
    from hf_models import tiny_bert

    train_set, _, test_set, collate = token_majority(n_train=256, n_test=128)
    torch.manual_seed(0)
    model = tiny_bert((16,), 2, hidden=32, intermediate=64)
    # The sweep's oialr section as it is: delay as a fraction of the Trainer's optimizer steps.
    callback = OIALRTrainerCallback(enabled=True, delay=0.3, stability_frequency=4, stability_threshold=None,
                                    sigma_cutoff_fraction=0.3)  # fmt: skip
    trainer = _hf_trainer(model, train_set, collate, callback, tmp_path / "hf")
    trainer.train()

    controller = callback.controller
    assert isinstance(controller, OIALR)
    # Built on the torch optimizer inside accelerate's wrapper, whose moments it carries through cuts.
    assert isinstance(controller.optimizer, torch.optim.AdamW)
    kinds = [e.kind for e in controller.history]
    assert "factorize" in kinds and "cut" in kinds
    steps = trainer.state.max_steps  # 4 epochs x 16 batches
    assert controller.step_count == trainer.state.global_step == steps
    assert controller.delay == round(0.3 * steps)
    assert max(e.step for e in controller.history) > controller.delay  # it kept checking after the first cut
    assert controller.layer_ranks()["bert.encoder.layer.0.intermediate.dense"] < 32
    assert controller.dense_layers() == {"classifier": "last layer kept dense (keep_last_layer)"}
    # trainable_fraction is in each training log: full at first, cut later, the controller's at the end.
    logged = [row["trainable_fraction"] for row in trainer.state.log_history if "loss" in row]
    assert logged[0] == 1.0 and logged[-1] == pytest.approx(controller.trainable_fraction) and logged[-1] < 0.5
    # It trained on after the cuts: the low-rank model classifies held-out sequences far above chance.
    prediction = trainer.predict(test_set)
    accuracy = (prediction.predictions.argmax(-1) == prediction.label_ids).mean()
    assert accuracy > 0.8, accuracy
    # Folded back into dense layers, it is a plain BERT again: save_pretrained / from_pretrained read it.
    export_dense(model).save_pretrained(tmp_path / "dense")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "dense")
    batch = collate([test_set[i] for i in range(8)])
    del batch["labels"]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, model(**batch).logits, atol=1e-5)


def test_trainer_callback_takes_the_oialr_section(hf_examples: Path, tmp_path: Path) -> None:
    from hf_data import token_majority
    from hf_models import tiny_gpt2

    train_set, _, _, collate = token_majority(n_train=64, n_test=8)
    model = tiny_gpt2((16,), 2, hidden=32)
    before = {k: v.shape for k, v in model.state_dict().items()}
    callback = OIALRTrainerCallback(enabled=False, delay=0.25)  # the baseline arm's section: full rank
    trainer = _hf_trainer(model, train_set, collate, callback, tmp_path / "hf", num_train_epochs=1, logging_steps=2)
    trainer.train()
    assert isinstance(callback.controller, FullRank) and callback.controller.step_count == 4
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    assert trainer.state.log_history[-1]["trainable_fraction"] == 1.0

    with pytest.raises(UserError, match=r"^oialr\.sigma_cutoff: "):
        OIALRTrainerCallback(sigma_cutoff=0.2)
    with pytest.raises(UserError, match=r"^oialr\.delay: "):
        OIALRTrainerCallback(delay=-1)


def test_dict_examples_train_and_score_in_the_builtin_trainer(hf_examples: Path) -> None:
    cfg = train_config_from_dict({
        "device": "cpu", "model": {"name": "hf_models:tiny_bert", "args": {"hidden": 32, "intermediate": 64}},
        "data": {"name": "hf_data:token_majority", "args": {"n_train": 320, "n_test": 128}, "num_workers": 0},
        "schedule": {"batch_size": 16, "epochs": 3}, "optimizer": {"lr": 3e-3},
        "oialr": {"delay": 0.3, "stability_frequency": 4, "stability_threshold": None, "sigma_cutoff_fraction": 0.3},
    })  # fmt: skip
    check_run(cfg)  # the model's .logits on one collated example are (1, 2)
    result = train(cfg, evaluate_test=True)
    assert result.status == "finished"
    assert result.final["trainable_fraction"] < 0.5
    assert result.test_metrics["test_acc"] > 0.8  # chance: 0.5
    assert result.model_shapes is not None and result.model_shapes[1] == 2  # classes from the labels

    # retrain --train-on train+val: the validation examples join the training Dataset, batched alike.
    splits = load_data(cfg.data, torch.device("cpu"))
    merged = merge_train_val(splits)
    assert len(merged.train) == len(splits.train) + len(splits.val) and len(merged.val) == 0
    inputs, labels = next(iter(merged.loader("train", 16, train=True)))
    assert set(inputs) == {"input_ids", "attention_mask"} and labels.shape == (16,)


BAD_DATA = """
import torch
from torch.utils.data import Dataset

class Sequences(Dataset):
    def __init__(self, key="labels", label_shape=()):
        self.key, self.label_shape = key, label_shape
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return {"input_ids": torch.arange(5) + i, self.key: torch.full(self.label_shape, i % 2)}

def label_not_labels():
    return Sequences(key="label"), None, None

def per_token_labels():
    return Sequences(label_shape=(5,)), None, None

def collate_not_callable():
    return Sequences(), None, None, "pad"

def collate_returns_a_list():
    return Sequences(), None, None, lambda examples: [1, 2, 3]
"""


@pytest.mark.parametrize(("fn", "message"), [
    ("label_not_labels", r"'s train batches need a 'labels' entry \(the targets\), got keys \['input_ids', 'label'\]"),
    ("per_token_labels", r"'s labels have shape \(4, 5\) per batch: one class label per example is supported"),
    ("collate_not_callable", r" returned a str as collate_fn, not a function"),
    ("collate_returns_a_list", r"'s collate_fn must return a dict with 'labels' or an \(inputs, targets\) pair"),
])
def test_dict_data_mistakes_are_one_line(fn: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    module = f"bad_dict_data_{fn}"  # a fresh module per case
    (tmp_path / f"{module}.py").write_text(BAD_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = train_config_from_dict({"device": "cpu", "model": {"name": "mlp"},
                                  "data": {"name": f"{module}:{fn}", "num_workers": 0}})  # fmt: skip
    with pytest.raises(UserError, match=rf"^data\.name: {module}:{fn}{message}") as e:
        check_run(cfg)  # what a sweep's preflight and `oialr-tune train` run first
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model", ["hf_models:tiny_bert", "hf_models:tiny_gpt2"])
def test_a_transformer_sweep_cuts_and_learns(hf_examples: Path, ray_session: Any, model: str) -> None:
    """`oialr-tune sweep` of the example space, shrunk: two trials of three epochs, OIALR arm only."""
    space = yaml.safe_load((hf_examples / "hf_sequence.yaml").read_text())
    space["base"]["model"] = {"name": model, "args": {"hidden": 32}}
    space["base"]["data"]["args"] = {"n_train": 320, "n_test": 64}
    space["base"]["schedule"]["batch_size"] = 16
    space["base"]["oialr"] = {"delay": 0.4, "stability_frequency": 6}
    # The searched lr stays where both tiny models learn in 3 epochs (at 1e-3 tiny BERT was still at chance).
    space["search"] = {"optimizer.lr": {"type": "loguniform", "low": 3.0e-3, "high": 5.0e-3}}
    space.update(baseline="none", budget={"num_samples": 2, "max_epochs": 3, "grace_period": 3}, resources={"cpu": 1},
                 seed=0)  # grace_period = max_epochs: ASHA stops no trial
    (hf_examples / "space.yaml").write_text(yaml.safe_dump(space))
    assert main(["sweep", "space.yaml", "--results-dir", "results", "--name", "hf", "-q"]) == 0

    rows = list(csv.DictReader((hf_examples / "results" / "hf" / "trials.csv").open()))
    assert len(rows) == 2 and {r["trainer_status"] for r in rows} == {"finished"}
    assert min(float(r["trainable_fraction"]) for r in rows) < 0.7  # OIALR cut the transformer's layers
    assert max(float(r["val_acc"]) for r in rows) > 0.7  # learned: chance is 0.5 (48 validation sequences)
