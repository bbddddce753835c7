"""Pretrain once, save a local state dict: what `finetune.yaml`'s ``model.weights`` names.

``python pretrain.py`` (from this folder) trains ``my_models:mlp`` at full rank on scikit-learn's
digits for 20 epochs with oialr-tune's own trainer and writes ``pretrained.pt``, a plain
``torch.save(model.state_dict(), ...)``. Any state dict of the same architecture will do: yours,
from your own training code, or one converted from a published checkpoint.
"""

from __future__ import annotations

import torch

from oialr_tune.config import train_config_from_dict
from oialr_tune.trainer import train

CONFIG = {
    "device": "cpu",
    "seed": 0,
    "model": {"name": "my_models:mlp", "args": {"hidden": 256, "depth": 2}},
    "data": {"name": "digits"},
    "schedule": {"epochs": 20, "batch_size": 64},
    "oialr": {"enabled": False},  # a plain full-rank network, as pretrained networks are
}

if __name__ == "__main__":
    result = train(train_config_from_dict(CONFIG), evaluate_test=True)
    torch.save(result.model.state_dict(), "pretrained.pt")
    print(f"pretrained.pt: val_acc {result.final['val_acc']:.4f}, test_acc {result.test_acc:.4f}, "
          f"{result.final['trainable_params']} parameters, {result.wall_time_s:.1f} s")
