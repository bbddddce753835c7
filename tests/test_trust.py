"""Files are data: a model file, a trainer checkpoint or a results folder runs no code it names unless trusted.

Each case crafts what a hostile file would hold (a command to run) and checks that nothing ran (no
marker file), that the refusal is one line, and that nothing was written. The opt-ins
(``trust_code=True``, ``--trust-code``, a builder the caller passes) are checked to work.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_sweep import tiny_sweep_dir
from torch import nn

from oialr_tune.cli import main
from oialr_tune.errors import UserError
from oialr_tune.model_io import FORMAT, load_model, read_model_file, save_model
from oialr_tune.models import build_model

IN_SHAPE = (1, 8, 8)


def _model_file(path: Path, name: str, in_shape: Any, args: dict[str, Any] | None = None) -> Path:
    """A model file as a crafted one would be: a real MLP's weights under another name and shape."""
    model = build_model("mlp", IN_SHAPE, 10, hidden=[8])
    save_model(path, model, {"model": {"name": "mlp", "args": {"hidden": [8]}}}, in_shape=IN_SHAPE, num_classes=10)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT
    payload["spec"].update(model_name=name, in_shape=in_shape, model_args=args or {})
    torch.save(payload, path)
    return path


@pytest.fixture
def builder_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module ``trust_builder`` whose ``build`` leaves a marker file when it is called."""
    marker = tmp_path / "builder-ran"
    (tmp_path / "trust_builder.py").write_text(
        "from pathlib import Path\n"
        "from oialr_tune.models import mlp\n"
        f"def build(in_shape, num_classes, **args):\n    Path({str(marker)!r}).touch()\n"
        "    return mlp(in_shape, num_classes, **args)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def test_a_model_file_naming_subprocess_run_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _model_file(tmp_path / "m.pt", "subprocess:run", ["touch", str(marker)])
    for load in (load_model, read_model_file):
        with pytest.raises(ValueError, match=r"spec\.in_shape must be a list of positive ints") as e:
            load(path)
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_a_model_file_naming_user_code_needs_trust_or_a_builder(tmp_path: Path, builder_module: Path) -> None:
    path = _model_file(tmp_path / "m.pt", "trust_builder:build", list(IN_SHAPE), {"hidden": [8]})
    with pytest.raises(UserError, match=r"trust_builder:build.*trust_code=True") as e:
        load_model(path)
    assert "\n" not in str(e.value) and not builder_module.exists()
    from oialr_tune.models import mlp

    assert isinstance(load_model(path, builder=mlp), nn.Module) and not builder_module.exists()
    assert isinstance(load_model(path, trust_code=True), nn.Module) and builder_module.exists()


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"num_classes": "10"}, "spec.num_classes"), ({"num_classes": True}, "spec.num_classes"),
     ({"model_args": {"hidden": object}}, "not an oialr-tune model file"), ({"ranks": {"0": "all"}}, "spec.ranks.0"),
     ({"model_name": ["mlp"]}, "spec.model_name"), ({"dense": "no"}, "spec.dense")],
)  # fmt: skip
def test_every_value_of_a_model_file_is_type_checked(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    path = _model_file(tmp_path / "m.pt", "mlp", list(IN_SHAPE), {"hidden": [8]})
    payload = torch.load(path, weights_only=True)
    payload["spec"].update(bad)
    torch.save(payload, path)  # a class object is pickled by reference: weights_only refuses it on load
    with pytest.raises(ValueError, match=message) as e:
        load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- results folders -----------------------------------------------------------------------------------


@pytest.fixture
def sweep_copy(ray_session: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A copy of the session's finished tiny sweep (signed with the tests' key), to change freely."""
    return Path(shutil.copytree(tiny_sweep_dir(tmp_path_factory), tmp_path / "copy"))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], folder: Path, *names: str) -> str:
    """`main(argv)` exits 2 with one line naming `names`, and writes nothing into `folder`."""
    before = sorted(str(p) for p in folder.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("oialr-tune: error: "), err
    for name in names:
        assert name in err[0], err[0]
    assert sorted(str(p) for p in folder.rglob("*")) == before
    return err[0]


def _craft_checkpoints(folder: Path, name: str, in_shape: Any) -> list[Path]:
    """Every trial checkpoint of `folder` rewritten to name model `name` with input shape `in_shape`."""
    paths = sorted(folder.glob("*/trial_*/checkpoint_*/checkpoint.pt"))
    for path in paths:
        state = torch.load(path, weights_only=True)
        state["config"]["model"]["name"] = name
        state["in_shape"] = in_shape
        torch.save(state, path)
    return paths


def test_a_checkpoint_naming_subprocess_popen_runs_nothing(
    sweep_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    paths = _craft_checkpoints(sweep_copy, "subprocess:Popen", ["touch", str(marker)])
    _refused(["retrain", str(sweep_copy), "--from-checkpoint", "--seeds", "1"], capsys, sweep_copy, "in_shape")
    with pytest.raises(ValueError, match="in_shape"):
        load_model(paths[0])
    # A well-formed shape: the name alone is refused, by retrain (not its trial's model) and by load_model.
    _craft_checkpoints(sweep_copy, "subprocess:Popen", [64])
    _refused(["retrain", str(sweep_copy), "--from-checkpoint", "--seeds", "1"], capsys, sweep_copy,
             "subprocess:Popen")  # fmt: skip
    with pytest.raises(UserError, match="subprocess:Popen"):
        load_model(paths[0])
    assert not marker.exists()


def _name_os_system(folder: Path, marker: Path) -> None:
    """Edit the folder's sweep.yaml as an attacker would: its data function runs a command."""
    path = folder / "sweep.yaml"
    data = yaml.safe_load(path.read_text())
    data["base"]["data"] = {"name": "os:system", "args": {"command": f"touch {marker}"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("command", [["retrain", "--seeds", "1"], ["report"]], ids=["retrain", "report"])
def test_a_folder_naming_os_system_is_refused_unless_trusted(
    command: list[str], sweep_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    _name_os_system(sweep_copy, marker)
    line = _refused([command[0], str(sweep_copy), *command[1:]], capsys, sweep_copy, "os:system", "--trust-code",
                    "base.data.name")  # fmt: skip
    assert "edited since the sweep started" in line
    assert not marker.exists()
    if command[0] == "retrain":  # the opt-in: the folder's code runs (and its data function is wrong)
        assert main(["retrain", str(sweep_copy), "--seeds", "1", "--trust-code"]) == 2
        assert marker.exists() and "must return" in capsys.readouterr().err


def test_compare_refuses_a_reused_sweep_naming_os_system(
    sweep_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    out = tmp_path / "out"
    out.mkdir()
    tuned = Path(shutil.copytree(sweep_copy, out / "tuned"))
    _name_os_system(tuned, marker)
    space = tmp_path / "space.yaml"
    shutil.copy(sweep_copy / "sweep.yaml", space)
    _refused(["compare", str(space), "--out", str(out), "--resume", "--seeds", "2"], capsys, out, "os:system")
    assert not marker.exists()
