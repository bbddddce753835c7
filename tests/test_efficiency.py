"""What makes small trials cheap, and what packing trials onto devices relies on.

* A trial in a reused worker process gives the same metrics as in a fresh one: that is
  ``tests/test_sweep.py::test_reused_actor_gives_the_same_metrics_as_a_fresh_one`` (not repeated here).
* The trainer's dataset cache: a dataset is read once per process, in-process and in a reused Ray
  worker running the sweep's own trial function. Observed by counting the real loader's calls.
* Resources: the Ray placement a trial asks for (``tune.with_resources`` from the space's
  ``resources``), fractional GPUs included, and the refusal when a cluster lacks what a trial needs.
  The refusal of GPUs on a machine without CUDA (before Ray starts) is
  ``tests/test_space.py::test_sweep_refuses_gpus_on_a_machine_without_cuda`` and, through the CLI,
  ``tests/test_bad_input.py::test_train_cuda_on_a_machine_without_one``; the packing of two half-GPU
  trials onto one (logical) GPU at the same time is in
  ``tests/test_sweep.py::test_two_node_cluster_runs_trials_on_both_nodes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers import clear_data_cache
from tiny_sweep import tiny_space

from oialr_tune import data
from oialr_tune.config import train_config_from_dict
from oialr_tune.errors import UserError
from oialr_tune.space import space_from_dict
from oialr_tune.trainer import train
from oialr_tune.tuning import make_trainable, run_trial, sweep
from oialr_tune.tuning.cluster import slots as cluster_slots

SPACE: dict[str, Any] = tiny_space(
    "eff", hidden=[16], batch_size=128, base={"oialr": None}, budget={"num_samples": 3, "max_epochs": 1},
    baseline="none",
)


def gpu_space(cpu: float, gpu: float) -> Any:
    """SPACE with `cpu` and `gpu` per trial (and `device: auto`, which GPU trials need)."""
    base = {**SPACE["base"], "device": "auto"}
    return space_from_dict({**SPACE, "resources": {"cpu": cpu, "gpu": gpu}, "base": base})


@pytest.fixture
def counted_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Calls of the real digits loader in this process (the cache is emptied before and after)."""
    calls: list[tuple] = []
    real = data._LOADERS["digits"]

    def counting(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    clear_data_cache()
    monkeypatch.setitem(data._LOADERS, "digits", counting)
    yield calls
    clear_data_cache()


def test_a_dataset_is_loaded_once_per_process(counted_loads: list[tuple]) -> None:
    base = {"device": "cpu", "model": {"name": "mlp", "args": {"hidden": [16]}}, "schedule": {"epochs": 1}}
    first = train(train_config_from_dict(base))
    # Another run with other hyperparameters, seed and augmentation setting: the same data, not reloaded.
    other = {**base, "seed": 7, "optimizer": {"lr": 0.01}, "data": {"name": "digits", "augment": True}}
    second = train(train_config_from_dict(other))
    assert len(counted_loads) == 1
    assert first.final["val_acc"] != second.final["val_acc"]  # they did train differently
    # A different split is different data: loaded again, once.
    train(train_config_from_dict({**base, "data": {"name": "digits", "split_seed": 1}}))
    train(train_config_from_dict({**base, "data": {"name": "digits", "split_seed": 1}, "seed": 3}))
    assert len(counted_loads) == 2


def test_a_reused_ray_worker_loads_the_dataset_once(ray_session: Any, tmp_path: Path) -> None:
    """Three trials of the sweep's own trial function in one reused worker process read the data once."""
    from ray import tune

    space = space_from_dict(SPACE)
    base, log = space.arm_base("oialr"), tmp_path / "loads.txt"

    def trainable(config: dict[str, Any]) -> None:
        from oialr_tune import data as worker_data

        if not getattr(worker_data, "_loads_logged", False):  # once per worker process
            real = worker_data._LOADERS["digits"]

            def logged(*args: Any) -> Any:
                with log.open("a") as f:
                    f.write(f"{os.getpid()}\n")
                return real(*args)

            worker_data._LOADERS["digits"] = logged
            worker_data._loads_logged = True
        run_trial(config, base=base, checkpoint_epochs=[])

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"optimizer.lr": tune.grid_search([0.001, 0.003, 0.01])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="loads", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    pids = {r.metrics["pid"] for r in results}
    assert len(pids) == 1, f"the actor was not reused: {pids}"
    assert log.read_text().split() == [str(pids.pop())]


def _request(trainable: Any) -> dict[str, float]:
    """The resources Ray reserves per trial for a trainable made by `tune.with_resources`."""
    pgf = trainable.default_resource_request({}) if isinstance(trainable, type) else trainable._resources
    return pgf.required_resources


@pytest.mark.parametrize("gpu", [0.25, 0.5, 1.0])
def test_fractional_gpu_trials_ask_ray_for_their_share(ray_session: Any, gpu: float) -> None:
    request = _request(make_trainable(gpu_space(1, gpu), "oialr"))
    assert request == {"CPU": 1.0, "GPU": gpu}
    per_gpu = int(1 / request["GPU"] + 1e-9)  # how many such trials Ray packs onto one GPU
    assert per_gpu == round(1 / gpu) and per_gpu * request["GPU"] <= 1.0


def test_cpu_only_trials_ask_for_no_gpu(ray_session: Any) -> None:
    space = space_from_dict({**SPACE, "resources": {"cpu": 0.5}})
    assert _request(make_trainable(space, "oialr")) == {"CPU": 0.5}


def test_a_cluster_without_gpus_refuses_gpu_trials_before_any_trial(ray_session: Any, tmp_path: Path) -> None:
    """On a cluster (``--address``) the machine running the driver is not checked for CUDA; the
    cluster's own resources are, so a GPU trial does not wait forever for a GPU that is not there."""
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0
    space = gpu_space(1, 0.25)
    with pytest.raises(UserError, match=r"^resources\.gpu: 0\.25 per trial but the Ray cluster has 0(\.0)? GPU"):
        sweep(space, name="g", results_dir=tmp_path / "r", address="auto", verbose=0)
    assert not (tmp_path / "r" / "g").exists()


@pytest.mark.parametrize(
    ("cpu", "gpu", "have", "slots"),
    [
        (1, 0, {"CPU": 2}, 2),
        (1, 0, {"CPU": 16, "GPU": 1}, 16),
        (1, 0.25, {"CPU": 16, "GPU": 1}, 4),
        (0.5, 0.125, {"CPU": 16, "GPU": 1}, 8),
        (4, 0.5, {"CPU": 16, "GPU": 8}, 4),
        (1, 1, {"CPU": 2}, 1),  # nothing fits: at least 1 (the fit check refuses such a sweep first)
    ],
)
def test_concurrent_trials_follow_from_the_cluster_and_the_per_trial_request(
    cpu: float, gpu: float, have: dict[str, float], slots: int
) -> None:
    assert cluster_slots(gpu_space(cpu, gpu).resources, have) == slots
