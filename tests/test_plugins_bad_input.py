"""Bad user code named in a space (model, data, loss, trainable by import path): one line, exit 2, before Ray.

Each case writes a small user module into the test's folder (the working directory, so importable
from it), then runs `oialr-tune sweep` in-process through `test_bad_input`'s `rejected` contract:
exit status 2, exactly one ``oialr-tune: error: ...`` line naming the key and the cause, no
traceback, nothing written, Ray never reached. Python's bytecode cache is switched off so that
importing the module writes nothing either.
"""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_bad_input import SPACE, rejected, sweep_args, write_space  # noqa: F401 (rejected: fixture)

MODELS = '''
from torch import nn

def good(in_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_outputs))

def raises(in_shape, num_outputs):
    raise ValueError("hidden must be positive")

def not_a_module(in_shape, num_outputs):
    return "a string"

def wrong_width(in_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_outputs + 2))

NOT_CALLABLE = 3
'''

DATA = '''
import torch
from torch.utils.data import TensorDataset

def two():
    ds = TensorDataset(torch.randn(20, 4), torch.arange(20) % 2)
    return ds, ds

def float_targets():
    ds = TensorDataset(torch.randn(20, 4), torch.randn(20))
    return ds, None, ds

def good():
    ds = TensorDataset(torch.randn(40, 4), torch.arange(40) % 3)
    return ds, None, ds

def raises(size=3):
    raise FileNotFoundError(f"no file data_{size}.npz")
'''


# Each case: base keys to set (model and data are names; the model defaults to a good user builder on
# digits), and what the one error line must name.
CASES = [
    pytest.param({"model": "no_such_module:build"}, ["base.model.name", "no_such_module"], id="model-module-not-found"),
    pytest.param({"model": "{m}:missing"}, ["base.model.name", "has no attribute 'missing'"],
                 id="model-attribute-missing"),
    pytest.param({"model": "{m}:NOT_CALLABLE"}, ["base.model.name", "not a function"], id="model-not-callable"),
    pytest.param({"model": "{m}:raises"}, ["base.model.name", "ValueError: hidden must be positive"],
                 id="model-builder-raises"),
    pytest.param({"model": "{m}:not_a_module"}, ["base.model.name", "not a torch.nn.Module"],
                 id="model-returns-non-module"),
    pytest.param({"model": "{m}:wrong_width"}, ["base.model.name", "(1, 12)", "10 classes"],
                 id="model-output-shape-mismatch"),
    pytest.param({"model": "mlp", "data": "{d}:two"}, ["base.data.name", "(train, val, test)"], id="data-wrong-tuple"),
    pytest.param({"model": "mlp", "data": "{d}:float_targets"}, ["base.task", "class labels"],
                 id="data-targets-do-not-fit-classification"),
    pytest.param({"model": "mlp", "data": "{d}:raises", "data_args": {"size": 7}},
                 ["base.data.name", "no file data_7.npz"], id="data-function-raises"),
    pytest.param({"model": "mlp", "task": "regression"}, ["base.task", "numeric targets"],
                 id="regression-on-class-labels"),
    pytest.param({"loss": "{d}:nope"}, ["base.loss", "has no attribute 'nope'"], id="loss-missing"),
    pytest.param({"trainable": "{d}:two"}, ["base.trainable", "(config, trial)"], id="trainable-wrong-signature"),
    pytest.param({"model": "mlp", "data": "{d}:good", "task": "regression",
                  "objective": {"metric": "val_acc", "mode": "max"}},
                 ["objective.metric", "val_acc", "regression"], id="regression-with-val-acc-objective"),
]


@pytest.mark.parametrize(("edits", "names"), CASES)
def test_bad_user_code(edits: dict[str, Any], names: list[str], tmp_path: Path, rejected,  # noqa: F811
                       monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    tag = request.node.callspec.id.replace("-", "_")
    m, d = f"models_{tag}", f"data_{tag}"  # fresh module names: nothing cached from another case
    (tmp_path / f"{m}.py").write_text(textwrap.dedent(MODELS))
    (tmp_path / f"{d}.py").write_text(textwrap.dedent(DATA))

    doc = copy.deepcopy(SPACE)
    base = doc["base"]
    base["model"] = {"name": edits.get("model", "{m}:good").format(m=m)}
    if "data" in edits:
        base["data"] = {"name": edits["data"].format(d=d), "args": edits.get("data_args", {})}
    for key in ("task", "loss", "trainable"):
        if key in edits:
            base[key] = edits[key].format(m=m, d=d)
    if "objective" in edits:
        doc["objective"] = edits["objective"]
    space = write_space(tmp_path, doc)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = rejected(sweep_args(space, tmp_path), *names)
    assert len(line) < 400
