"""Search spaces: the packaged ones load, and every kind of mistake is caught before Ray starts.

The error cases go through the real entry points (``load_space``, ``sweep()`` and the CLI) and
check the message names the offending key, that Ray was not started and that nothing was written.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_sweep import tiny_space

from oialr_tune.checks import preflight
from oialr_tune.errors import UserError
from oialr_tune.space import load_space, packaged_spaces, space_from_dict, space_yaml

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = tiny_space(
    hidden=[16],
    batch_size=128,
    base={"oialr": None},
    search={
        "optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
        "oialr.delay": {"type": "uniform", "low": 0.1, "high": 0.5},
        "oialr.stability_frequency": {"type": "int", "low": 2, "high": 10},
        "oialr.stability_threshold": {"type": "categorical", "choices": [None, 0.9]},
    },
    budget={"num_samples": 4, "max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
    resources=None,
)


def tiny(**changes: Any) -> dict[str, Any]:
    """TINY with dotted-path changes applied, e.g. ``tiny(**{"budget.num_samples": -1})``."""
    d = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        *parents, last = dotted.split("/") if "/" in dotted else dotted.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return d


# --- valid spaces -----------------------------------------------------------------------------


def test_packaged_spaces_all_validate() -> None:
    names = packaged_spaces()
    assert {"quickstart", "cifar10_resnet18", "cifar10_vit", "imagenet_vit_b16"} <= set(names)
    for name in names:
        space = load_space(name)
        assert space.name == name
        assert space.search and space.budget.num_samples >= 1


def test_default_is_quickstart_and_repo_dir_points_at_the_packaged_files() -> None:
    assert load_space(None).name == "quickstart"
    for name in packaged_spaces():
        assert load_space(ROOT / "search_spaces" / f"{name}.yaml").to_dict() == load_space(name).to_dict()


def test_a_folder_named_like_a_packaged_space_does_not_shadow_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()  # e.g. `oialr-tune compare quickstart --out quickstart`
    assert load_space("quickstart").name == "quickstart"


def test_roundtrip_through_yaml(tmp_path: Path) -> None:
    space = load_space("cifar10_vit")
    (tmp_path / "s.yaml").write_text(space_yaml(space))
    assert load_space(tmp_path / "s.yaml") == space


def test_base_is_normalized_and_epochs_come_from_the_budget() -> None:
    space = space_from_dict(TINY)
    assert space.base["schedule"]["epochs"] == 3
    assert space.base["optimizer"]["name"] == "adamw"  # a default, filled in
    # Without budget.max_epochs the base's epochs are the budget.
    d = tiny(**{"base.schedule.epochs": 5})
    del d["budget"]["max_epochs"]
    assert space_from_dict(d).budget.max_epochs == 5


def test_arms_rungs_and_checkpoint_epochs() -> None:
    d = tiny(
        **{
            "budget.max_epochs": 20,
            "budget.grace_period": 2,
            "budget.reduction_factor": 3,
            "checkpoint.every": 5,
            "search/schedule.rewarm_steps": {"type": "int", "low": 0, "high": 9},
        }
    )
    space = space_from_dict(d)
    assert space.rungs() == [2, 6, 18]  # 2 * 3^k below 20, as Ray's ASHA places them
    assert space.checkpoint_epochs() == [2, 5, 6, 10, 15, 18, 20]
    assert space.arms() == ["oialr", "baseline"]
    # The baseline searches the same ranges minus OIALR-only keys, with OIALR off.
    assert [p.key for p in space.arm_params("baseline")] == ["optimizer.lr"]
    assert space.arm_base("baseline")["oialr"]["enabled"] is False
    assert space.arm_base("oialr")["oialr"]["enabled"] is True
    cfg = space.trial_config("oialr", {"optimizer.lr": 0.05, "oialr.stability_threshold": None})
    assert cfg.optimizer.lr == 0.05 and cfg.oialr.stability_threshold is None
    once = space_from_dict({**d, "baseline": "once"})
    assert once.arm_params("baseline") == () and once.arm_num_samples("baseline") == 1
    assert space_from_dict({**d, "baseline": "none"}).arms() == ["oialr"]


def test_multi_objective_defaults_to_fifo() -> None:
    space = space_from_dict(tiny(objective={"metric": "val_acc", "mode": "multi"}))
    assert space.scheduler() == "fifo" and space.rungs() == []
    assert space.objective.metrics("oialr") == ["val_acc", "trainable_fraction"]
    assert space.objective.modes("oialr") == ["max", "min"]
    assert space.objective.metrics("baseline") == ["val_acc"]  # full rank: the fraction is always 1
    assert space.checkpoint_epochs() == [3]


def test_preflight_makes_a_data_root_absolute(tiny_cifar10: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight also loads the data and runs one example through the model: a real (tiny) CIFAR-10."""
    monkeypatch.chdir(tiny_cifar10.parent)
    space = load_space("cifar10_resnet18")
    space = space_from_dict(
        {
            **space.to_dict(),
            "resources": {"cpu": 1, "gpu": 0},
            "base": {
                **space.base,
                "data": {**space.base["data"], "root": tiny_cifar10.name},
                "device": "cpu",
                "precision": "fp32",
            },
        }
    )
    assert preflight(space).base["data"]["root"] == str(tiny_cifar10)
    # On a cluster the path names the workers' file system: left as is.
    assert preflight(space, local=False).base["data"]["root"] == tiny_cifar10.name


# --- invalid spaces: one line naming the key, before Ray starts, nothing written ---------------

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", tiny(budjet={"num_samples": 2}), "budjet: unknown key (did you mean budget?)"),
    ("unknown budget key", tiny(**{"budget.samples": 2}), "budget.samples: unknown key"),
    (
        "search key not in the trainer",
        tiny(**{"search/optimizer.lrr": {"type": "uniform", "low": 0.1, "high": 1}}),
        "search.optimizer.lrr: not a trainer config key (did you mean optimizer.lr?)",
    ),
    (
        "low > high",
        tiny(**{"search/optimizer.lr": {"type": "loguniform", "low": 0.1, "high": 0.01}}),
        "search.optimizer.lr.low: must be <= high",
    ),
    (
        "loguniform low <= 0",
        tiny(**{"search/optimizer.lr": {"type": "loguniform", "low": 0, "high": 0.01}}),
        "search.optimizer.lr.low: loguniform needs low > 0",
    ),
    (
        "negative LR endpoint",
        tiny(**{"search/optimizer.lr": {"type": "uniform", "low": -0.1, "high": 0.01}}),
        "search.optimizer.lr.low: must be > 0, got -0.1",
    ),
    ("wrong type", tiny(**{"budget.num_samples": "many"}), "budget.num_samples: expected an integer, got 'many'"),
    ("negative num_samples", tiny(**{"budget.num_samples": -3}), "budget.num_samples: must be >= 1, got -3"),
    (
        "unknown distribution",
        tiny(**{"search/optimizer.lr": {"type": "normal", "low": 0.1, "high": 1}}),
        "search.optimizer.lr.type: expected one of uniform, loguniform, int, categorical",
    ),
    (
        "float range for an int key",
        tiny(**{"search/schedule.rewarm_steps": {"type": "uniform", "low": 0, "high": 9}}),
        "search.schedule.rewarm_steps.low: expected an integer, got 0.0",
    ),
    (
        "categorical choice the trainer rejects",
        tiny(**{"search/oialr.stability_threshold": {"type": "categorical", "choices": [0.9, 1.5]}}),
        "search.oialr.stability_threshold.choices[1]: must be in (0, 1], got 1.5",
    ),
    (
        "searching a key the sweep owns",
        tiny(**{"search/schedule.epochs": {"type": "int", "low": 1, "high": 3}}),
        "search.schedule.epochs: cannot be searched (set budget.max_epochs instead)",
    ),
    ("bad base", tiny(**{"base.model.name": "resnet9000"}), "base.model.name: unknown model 'resnet9000'"),
    (
        "grace period beyond the budget",
        tiny(**{"budget.grace_period": 7}),
        "budget.grace_period: must be in [1, max_epochs=3]",
    ),
    ("bad baseline", tiny(baseline="sometimes"), "baseline: expected one of same-budget, once, none"),
    (
        "accuracy minimized",
        tiny(objective={"metric": "val_acc", "mode": "min"}),
        "objective.mode: val_acc is better when",
    ),
    ("negative gpu", tiny(resources={"cpu": 1, "gpu": -1}), "resources.gpu: must be >= 0"),
    (
        "step not dividing the range",
        tiny(**{"search/oialr.delay": {"type": "uniform", "low": 0.1, "high": 0.5, "step": 0.3}}),
        "search.oialr.delay.step: high - low",
    ),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD, ids=[b[0] for b in BAD])
def test_invalid_space_names_the_key(case: str, data: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as exc:
        space_from_dict(data)
    text = str(exc.value)
    assert text.startswith(message) or message in text, text
    assert "\n" not in text


def _ray_state() -> bool:
    import ray

    return ray.is_initialized()


@pytest.mark.parametrize(("case", "data", "message"), BAD[:10], ids=[b[0] for b in BAD[:10]])
def test_sweep_rejects_bad_space_before_ray_starts(tmp_path: Path, case: str, data: dict, message: str) -> None:
    from oialr_tune.tuning import sweep

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    before = _ray_state()
    with pytest.raises(UserError, match=message.split(":")[0].replace(".", r"\.").replace("[", r"\[")):
        sweep(path, results_dir=results, verbose=0)
    assert _ray_state() == before
    assert not results.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_sweep_refuses_gpus_on_a_machine_without_cuda(tmp_path: Path) -> None:
    from oialr_tune.tuning import sweep

    data = tiny(resources={"cpu": 1, "gpu": 0.25}, **{"base.device": "auto"})
    before = _ray_state()
    with pytest.raises(UserError, match=r"^resources\.gpu: 0\.25 GPU per trial requested but this machine has no CUDA"):
        sweep(space_from_dict(data), results_dir=tmp_path / "r", verbose=0)
    assert _ray_state() == before and not (tmp_path / "r").exists()


def test_sweep_refuses_missing_dataset_root_and_bad_results_dirs(tmp_path: Path) -> None:
    from oialr_tune.tuning import sweep

    space = load_space("cifar10_resnet18")
    space = space_from_dict(
        {
            **space.to_dict(),
            "resources": {"cpu": 1, "gpu": 0},
            "base": {**space.base, "data": {**space.base["data"], "root": str(tmp_path / "nope")}, "device": "cpu"},
        }
    )
    with pytest.raises(UserError, match=r"^base\.data\.root: .*nope does not exist"):
        sweep(space, results_dir=tmp_path / "r", verbose=0)
    with pytest.raises(UserError, match="holds no sweep"):
        sweep(resume=tmp_path, verbose=0)
    (tmp_path / "r" / "taken").mkdir(parents=True)
    (tmp_path / "r" / "taken" / "x").write_text("")
    with pytest.raises(UserError, match="already exists; resume it with --resume"):
        sweep(space_from_dict(TINY), name="taken", results_dir=tmp_path / "r", verbose=0)
    with pytest.raises(UserError, match=r"--address: no Ray cluster reachable at 127\.0\.0\.1:1"):
        sweep(space_from_dict(TINY), results_dir=tmp_path / "r", address="127.0.0.1:1", verbose=0)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["taken"]


def test_cli_bad_space_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(BAD[3][1]))
    proc = subprocess.run(
        [sys.executable, "-m", "oialr_tune.cli", "sweep", str(path), "--results-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"oialr-tune: error: {BAD[3][2]}, got low=0.1 > high=0.01"]
    assert not (tmp_path / "r").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "oialr_tune.cli", "sweep", str(tmp_path / "nope.yaml")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "nope.yaml: cannot read search space" in missing.stderr


def test_import_stays_light_and_the_api_loads_lazily() -> None:
    code = (
        "import sys, oialr_tune\n"
        "assert 'ray' not in sys.modules and 'optuna' not in sys.modules\n"
        "from oialr_tune.tuning import sweep\n"
        "assert oialr_tune.sweep is sweep and 'ray' not in sys.modules\n"
        # The sweep driver validates every packaged space (model arguments included) without torch:
        # only trial workers pay for it.
        "from oialr_tune.space import load_space, packaged_spaces\n"
        "for name in packaged_spaces(): load_space(name)\n"
        "assert 'torch' not in sys.modules, 'validating a space imported torch'\n"
        "assert oialr_tune.OIALR.__name__ == 'OIALR' and 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_documented_submodules_are_reachable_from_a_bare_import() -> None:
    code = (
        "import sys, oialr_tune\n"
        "assert callable(oialr_tune.results.best_trial) and callable(oialr_tune.retrain.retrain)\n"
        "assert callable(oialr_tune.report.write_report) and callable(oialr_tune.trainer.train)\n"
        "assert 'ray' not in sys.modules, 'reading the API imported ray'\n"
        "try:\n    oialr_tune.no_such_module\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_version_and_plain_top_level_help() -> None:
    from oialr_tune import __version__

    version = subprocess.run([sys.executable, "-m", "oialr_tune.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"oialr-tune {__version__}"
    helps = subprocess.run([sys.executable, "-m", "oialr_tune.cli", "--help"], capture_output=True, text=True)
    assert helps.returncode == 0 and "``" not in helps.stdout and "--version" in helps.stdout


def test_only_the_tuning_package_imports_ray_or_optuna() -> None:
    """The README's boundary: the method, the trainer, results, report and retrain import neither."""
    import re

    package = Path(__file__).resolve().parents[1] / "oialr_tune"
    pattern = re.compile(r"^\s*(import (ray|optuna)\b|from (ray|optuna)\b)", re.MULTILINE)
    outside = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "tuning" not in path.relative_to(package).parts and pattern.search(path.read_text())
    ]
    assert outside == []
    assert any(pattern.search(p.read_text()) for p in (package / "tuning").glob("*.py"))  # the scan finds imports
