"""Final retraining: the best configuration of each arm, with fresh seeds, scored once on the test split.

``retrain(results_dir)`` picks the best OIALR trial (and the best full-rank baseline trial, when the
sweep has a baseline arm), trains each again with new seeds, evaluates every final model on the
held-out test split (the only place the test split is used), and writes::

    OUT/                                  (default RESULTS_DIR/retrain/)
      summary.json                        mean ± std per arm, seeds, settings, OIALR - baseline
      metrics.csv                         one row per arm and seed
      <arm>/config.yaml                   the trainer config used (seed aside)
      <arm>/seed_<S>/config.yaml          ... with this run's seed
      <arm>/seed_<S>/model.pt             the model as trained (low-rank layers as U, S, Vᵀ)
      <arm>/seed_<S>/model_dense.pt       the same folded to dense layers (OIALR arm only)

Model files are written by :func:`oialr_tune.model_io.save_model` and reloaded once right away;
``metrics.csv`` records the reloaded model's test accuracy (on the CPU identical to the reported
one) and the dense export's, so the numbers describe the files users get.

Seeds are fresh (``first_seed``, ``first_seed + 1``, ...; 1000 by default, away from the sweep's
small trial seeds) so the final numbers do not inherit a lucky seed the search may have found.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import yaml
from torch.utils.data import ConcatDataset, Subset

from oialr_tune import distributed, plugins
from oialr_tune.checks import check_user_code
from oialr_tune.config import TrainConfig, check_seed, resolve_device, train_config_from_dict, train_config_to_dict
from oialr_tune.data import load_data
from oialr_tune.errors import UserError, one_line
from oialr_tune.files import writable_folder
from oialr_tune.metrics import RETRAIN_COLUMNS, RETRAIN_SUMMARY_COLUMNS, SIZE_COLUMNS, retrain_columns
from oialr_tune.model_io import load_model, read_model_file, save_model
from oialr_tune.oialr import low_rank_structure
from oialr_tune.plugins import uses_user_code
from oialr_tune.results import BestTrial, SweepResults, TrialInfo, best_trial, open_results
from oialr_tune.run_record import TrainResult, checkpoint_payload, read_checkpoint, write_checkpoint
from oialr_tune.space import Resources
from oialr_tune.splits import Splits, TensorData
from oialr_tune.stats import difference, mean_std
from oialr_tune.sweep_state import CHECKPOINT_FILE, RETRAIN_DIR, SUMMARY_FILE
from oialr_tune.tasks import task_for
from oialr_tune.trainer import train
from oialr_tune.trust import check_folder
from oialr_tune.tuning.parallel import run_all

__all__ = ["retrain"]

TrainOn = Literal["train", "train+val"]


def _log(message: str) -> None:
    """Progress goes to stderr so stdout stays clean for anything piped."""
    print(f"[retrain] {message}", file=sys.stderr, flush=True)


# --- data: optionally train on train + val -----------------------------------------------------


def merge_train_val(splits: Splits) -> Splits:
    """A copy of `splits` whose training set also holds the validation examples; val is empty.

    For tensor datasets the examples are concatenated; for folder datasets the two index lists are
    joined; a user's data read through a loader has its two Datasets concatenated. The test split is
    untouched. With an empty val split the trainer reports NaN val metrics, which is the honest
    value: there is nothing left to validate on.
    """
    train, val = splits.train, splits.val
    if isinstance(train, TensorData) and isinstance(val, TensorData):
        merged = dataclasses.replace(train, x=torch.cat([train.x, val.x]), y=torch.cat([train.y, val.y]))
        empty = dataclasses.replace(val, x=val.x[:0], y=val.y[:0])
        return dataclasses.replace(splits, train=merged, val=empty)
    # ImageFolder: train is a two-view dataset (eval / augmented) over a Subset; val a Subset.
    eval_view, train_view = getattr(train, "eval_view", None), getattr(train, "train_view", None)
    if isinstance(eval_view, Subset) and isinstance(train_view, Subset) and isinstance(val, Subset):
        merged = type(train)(
            ConcatDataset([eval_view, val]), ConcatDataset([train_view, Subset(train_view.dataset, val.indices)])
        )
        return dataclasses.replace(splits, train=merged, val=Subset(val.dataset, []))
    if plugins.is_import_path(splits.name) and not isinstance(train, TensorData):
        # A user's data read through a loader (large, or dict examples): one Dataset, no augmented view.
        return dataclasses.replace(splits, train=ConcatDataset([train, val]), val=Subset(val, []))
    raise UserError(f"--train-on: train+val is not supported for data.name {splits.name!r}")


# --- fine-tuning from a trial's checkpoint -------------------------------------------------------


def _checkpoint_file(trial: TrialInfo, cfg: TrainConfig) -> Path:
    """The trainer checkpoint file of a trial (its folder holds ``checkpoint.pt``), proven to load.

    Loaded once here, while the retrain is still being planned, so a corrupt file or weights that do
    not fit their config are refused before any output (a ``config.yaml``) is written. The
    checkpoint is data: it must name the model of `cfg` (the trial's config, from a folder already
    found trusted), and only then is that model built from it.
    """
    if not trial.checkpoint:
        raise UserError(f"--from-checkpoint: trial {trial.trial_id} has no checkpoint")
    path = Path(trial.checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"--from-checkpoint: {path} does not exist")
    read_checkpoint(path)  # a corrupt or foreign file: UserError naming it
    try:
        named = read_model_file(path).model_name  # every value type-checked, nothing built yet
        if named != cfg.model.name:
            raise UserError(f"{path}: checkpoint names model {named!r:.80}, its trial's config {cfg.model.name!r}")
        load_model(path, trust_code=True)  # its weights must fit the model its config describes
    except ValueError as e:  # a user loop's checkpoint: no model to rebuild; a value of the wrong type
        raise UserError(f"--from-checkpoint: {e}") from None
    except RuntimeError as e:
        raise UserError(f"{path}: checkpoint does not match its model config ({one_line(e)})") from None
    return path


def _write_start_checkpoint(source: Path, cfg: TrainConfig, work_dir: Path) -> None:
    """Write a trainer checkpoint in `work_dir` that starts a new run of `cfg` from `source`'s weights.

    The trainer resumes a checkpoint exactly; to fine-tune instead, the copy keeps the trial's
    model, optimizer moments and low-rank structure but restarts the run: epoch and step 0 (a new
    LR schedule over `cfg`'s epochs), empty history, RNG states from `cfg.seed`, and the OIALR
    controller's step and event history reset, so it applies `cfg`'s schedule afresh to the
    already low-rank model (ranks can still shrink, never grow).
    """
    state = read_checkpoint(source)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data_gen = torch.Generator(device=device)
    data_gen.manual_seed(cfg.seed)
    controller = state.get("controller")
    if controller is not None:
        controller = {**controller, "step": 0, "history": []}
    elif cfg.oialr.enabled:
        raise UserError(f"--from-checkpoint: {source} is a full-rank checkpoint but the config enables OIALR")
    state.update(checkpoint_payload(
        cfg, epoch=0, history=[], controller=controller, step=0,
        rng={"torch": torch.get_rng_state(), "cuda": None, "data": data_gen.get_state()},
    ))  # fmt: skip
    work_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(work_dir / CHECKPOINT_FILE, state)


# --- one run --------------------------------------------------------------------------------------


def seed_jobs(arm: str, cfg: TrainConfig, seeds: Sequence[int], out_dir: Path, *, metric: str,
              train_on: TrainOn = "train", start_from: Path | None = None, workers: int = 1) -> list[dict[str, Any]]:
    """One `run_seed_anywhere` job per seed: what retrain and compare hand to `oialr_tune.parallel.run_all`.

    `metric` is the sweep's objective on the test split (`Objective.test_metric`): the saved model
    files are scored again by it. Each seed trains on `workers` data-parallel workers.

    The user functions `cfg` names travel pickled with each job, so a Ray worker (whose working
    directory is not the user's) can resolve them.
    """
    config = train_config_to_dict(cfg)
    user_code = plugins.pickled(config) if plugins.names_in(config) else None
    return [{"arm": arm, "cfg": dataclasses.replace(cfg, seed=seed), "out_dir": out_dir, "metric": metric,
             "train_on": train_on, "start_from": start_from, "user_code": user_code, "workers": workers}
            for seed in seeds]  # fmt: skip


def run_seed_anywhere(user_code: bytes | None, workers: int = 1, **job: Any) -> dict[str, Any]:
    """`run_seed` in any process (a Ray worker too): first make the driver's user functions resolvable.

    With `workers` > 1, on that many new local processes (DDP, with this process's torch threads
    each, as a Ray Train worker gets its ``resources.cpu``); rank 0's row comes back.
    """
    if user_code is not None:
        plugins.install(user_code)
    if workers > 1:  # each new process installs the user code itself
        gpu = distributed.check_workers(job["cfg"], workers, key="resources.workers")
        return distributed.launch(functools.partial(run_seed_anywhere, user_code, **job), workers, gpu=gpu,
                                  threads=torch.get_num_threads())
    return run_seed(**job)


def run_seed(
    arm: str, cfg: TrainConfig, out_dir: Path, *, metric: str, train_on: TrainOn, start_from: Path | None
) -> dict[str, Any]:
    """Train, test, save and verify one seed; returns its metrics row (file paths relative to `out_dir`)."""
    seed_dir = out_dir / arm / f"seed_{cfg.seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = train_config_to_dict(cfg)
    (seed_dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))  # the same on every worker
    result = _train_seed(cfg, train_on=train_on, start_from=start_from)
    if not distributed.finish_on_rank_0():  # of several workers, rank 0 alone saves and scores the model
        return {}
    row = _metrics_row(arm, cfg, result)
    if result.status == "diverged":
        _log(f"{arm} seed {cfg.seed}: diverged; no model saved")
        return row
    if result.model_shapes is None:
        _log(f"{arm} seed {cfg.seed}: trainable {cfg.trainable} built its model without trial.build_model; "
             f"no model file saved")  # fmt: skip
        return row
    meta = {"arm": arm, "seed": cfg.seed, **result.test_metrics,
            "trainable_fraction": result.final.get("trainable_fraction"), "train_on": train_on}  # fmt: skip
    if cfg.trainable is not None:  # its data is its own: save the files, the loop scored them
        _save_models(result, cfg_dict, meta, seed_dir, out_dir, row)
        return row
    meta.update(_input_normalisation(cfg))
    model_path, dense_path = _save_models(result, cfg_dict, meta, seed_dir, out_dir, row)
    _score_files(cfg, metric, model_path, dense_path, row)
    return row


def _train_seed(cfg: TrainConfig, *, train_on: TrainOn, start_from: Path | None) -> TrainResult:
    """Train and test one seed: from scratch or fine-tuning `start_from`, on train or train+val."""
    # train+val: the trainer gets the merged splits instead of loading the configured ones.
    splits = merge_train_val(load_data(cfg.data, resolve_device(cfg.device))) if train_on == "train+val" else None
    with tempfile.TemporaryDirectory(prefix="oialr-retrain-") as work:
        ckpt_dir = None
        if start_from is not None:
            ckpt_dir = Path(work)
            _write_start_checkpoint(start_from, cfg, ckpt_dir)
        return train(cfg, checkpoint_dir=ckpt_dir, resume=True, evaluate_test=True, splits=splits)


def _metrics_row(arm: str, cfg: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """The seed's ``metrics.csv`` row as training left it (the model files and their scores come later)."""
    final = result.final
    row: dict[str, Any] = dict.fromkeys(RETRAIN_COLUMNS)
    # Every metric the run reported on the test and validation splits: a user metric's test_f1 and val_f1 too.
    row.update(result.test_metrics)
    row.update({k: v for k, v in final.items() if k.startswith("val_")})
    row.update({"arm": arm, "seed": cfg.seed, "status": result.status, **{k: final.get(k) for k in SIZE_COLUMNS},
                "epochs": final.get("epoch"), "wall_time_s": result.wall_time_s})
    return row


def _input_normalisation(cfg: TrainConfig) -> dict[str, Any]:
    """What the model expects: raw pixels x -> x * scale + shift per channel (see splits.TensorData)."""
    splits = load_data(cfg.data, resolve_device(cfg.device))  # cached: the same tensors the trainer used
    return {"input_scale": getattr(splits.test, "a", None), "input_shift": getattr(splits.test, "b", None)}


def _save_models(result: TrainResult, cfg_dict: dict[str, Any], meta: dict[str, Any], seed_dir: Path,
                 out_dir: Path, row: dict[str, Any]) -> tuple[Path, Path | None]:
    """Write ``model.pt`` and, for a low-rank model, its dense export ``model_dense.pt``; note them in `row`."""
    assert result.model_shapes is not None
    in_shape, num_outputs = result.model_shapes
    shapes = {"in_shape": in_shape, "num_classes": num_outputs}
    model_path = save_model(seed_dir / "model.pt", result.model, cfg_dict, meta=meta, **shapes)
    row["model"] = str(model_path.relative_to(out_dir))
    dense_path = None
    if low_rank_structure(result.model):
        dense_path = save_model(seed_dir / "model_dense.pt", result.model, cfg_dict, dense=True, meta=meta, **shapes)
        row["model_dense"] = str(dense_path.relative_to(out_dir))
    return model_path, dense_path


def _score_files(cfg: TrainConfig, main: str, model_path: Path, dense_path: Path | None, row: dict[str, Any]) -> None:
    """Reload the saved models and score them on the test split, into `row` (reloaded_*, dense_*).

    The files, not the in-memory model, are what users get. On the CPU the reloaded score matches
    exactly; a GPU (cuDNN algorithm choice, torch.compile) may differ in the last bits, which can
    flip an argmax: recorded and warned about, not fatal after training.
    """
    device = resolve_device(cfg.device)
    splits = load_data(cfg.data, device)  # cached: the same tensors the trainer used
    channels_last = cfg.channels_last and len(splits.in_shape) == 3
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    test_loader = splits.loader("test", 2 * cfg.schedule.batch_size, memory_format=memory_format)
    task = task_for(cfg)

    def score(path: Path) -> float:
        # trust_code: this run wrote the file from `cfg`, whose code is already running here.
        model = load_model(path, device, trust_code=True).to(memory_format=memory_format)
        return task.evaluate(model, test_loader, precision=cfg.precision, prefix="test")[main]

    row[f"reloaded_{main}"] = score(model_path)
    if row[f"reloaded_{main}"] != row.get(main) and len(splits.test):  # type: ignore[arg-type]
        _log(f"warning: {model_path} scores {main}={row[f'reloaded_{main}']} after reloading, "
             f"training reported {row.get(main)}")  # fmt: skip
    row[f"dense_{main}"] = score(dense_path) if dense_path is not None else row[f"reloaded_{main}"]


# --- the whole retrain -----------------------------------------------------------------------------


def _choose(res: SweepResults, arm: str, from_trial: str | None) -> tuple[TrialInfo, str]:
    """The trial to retrain for `arm`: the one named by `from_trial` if it is of this arm, else the best."""
    if from_trial is not None:
        trial = res.find_trial(from_trial)
        if trial.arm == arm:
            return trial, f"trial {trial.trial_id} (--from-trial)"
    best: BestTrial = best_trial(res, arm=arm)
    return best.trial, f"best trial {best.trial.trial_id} by {best.objective}"


def retrain(
    results_dir: str | Path,
    *,
    seeds: int | Sequence[int] = 3,
    first_seed: int = 1000,
    epochs: int | None = None,
    train_on: TrainOn = "train",
    out: str | Path | None = None,
    from_trial: str | None = None,
    from_checkpoint: bool = False,
    arms: Sequence[str] | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
    workers: int | None = None,
    trust_code: bool = False,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Retrain the best configuration(s) of a sweep with fresh seeds and test them; returns the summary.

    The (arm, seed) runs are independent: they run in parallel as Ray tasks with the sweep's
    per-trial resources (see `oialr_tune.parallel`), at most `max_concurrent` at once (1: one after
    another in this process), locally or on the Ray cluster at `address`. Same seeds, same metrics.

    Args:
        results_dir: the sweep's results directory.
        seeds: how many seeds (``first_seed``, ``first_seed + 1``, ...), or the seed values.
        epochs: epochs per run; default: the config's (the sweep's ``budget.max_epochs``).
        train_on: ``train``, or ``train+val`` to also train on the validation examples (then
            there are no val metrics: they are reported as NaN).
        out: output folder; default ``RESULTS_DIR/retrain``.
        from_trial: retrain this trial (of its arm) instead of that arm's best.
        from_checkpoint: fine-tune from the chosen trial's checkpoint instead of training from
            scratch (see :func:`_write_start_checkpoint` for what carries over).
        arms: which arms; default every arm the sweep ran (``oialr`` and, if present, ``baseline``).
        address: a Ray cluster to run on (default: a local Ray, started for this call).
        max_concurrent: at most this many runs at once (default: as many as the resources allow).
        workers: data-parallel workers per run (default: the sweep's ``resources.workers``), each with
            the sweep's per-worker ``resources.cpu`` / ``.gpu``, on one machine.
        trust_code: run the user code the folder names even when this user's key did not sign it
            (see `oialr_tune.trust`); without it such a folder is refused before anything runs.

    Everything is validated (results dir, trials, checkpoints, arguments) before anything is
    written. Raises UserError for bad input.
    """
    res = open_results(results_dir)
    check_folder(res.path, trust_code, "retrain")  # before any config it names is resolved or run
    seed_list = _seed_list(seeds, first_seed)
    arm_list = _checked_options(res, epochs=epochs, train_on=train_on, arms=arms)
    # Choose and validate everything first: nothing is written if any arm cannot be retrained.
    plans = _plan(res, arm_list, epochs=epochs, train_on=train_on, from_trial=from_trial,
                  from_checkpoint=from_checkpoint, log=log)
    main, mode = res.space.objective.test_metric, res.space.objective.direction
    no_test = _no_test_split(plans, log)
    resources = res.space.resources if workers is None else dataclasses.replace(res.space.resources, workers=workers)
    if address is not None:  # as `sweep` does: one line at once, not Ray's minutes of retries after configs are written
        from oialr_tune.tuning.cluster import check_address

        check_address(address)
    for p in plans if resources.workers != 1 and address is None else ():  # a local run: this machine's workers
        distributed.check_workers(p.cfg, resources.workers, key="--workers" if workers else "resources.workers")
    out_dir = Path(out) if out is not None else res.path / RETRAIN_DIR
    writable_folder(out_dir, "--out folder")
    if train_on == "train+val":
        log("training on train+val: the validation examples are part of training, so there are no val metrics")
    jobs = _write_arm_configs(plans, seed_list, out_dir, metric=main, train_on=train_on, workers=resources.workers,
                              log=log)
    rows = _run_jobs(jobs, resources, main, address=address, max_concurrent=max_concurrent, log=log)
    summary = _summary(res, out_dir, plans, rows, seed_list, train_on=train_on, from_checkpoint=from_checkpoint,
                       main=main, mode=mode, no_test=no_test)
    _write_outputs(out_dir, rows, summary)
    _log_summary(summary, log)
    return summary


class _Plan(NamedTuple):
    """One arm to retrain: the trial chosen (and why), its config, and the checkpoint to fine-tune from."""

    arm: str
    trial: TrialInfo
    why: str
    cfg: TrainConfig
    start_from: Path | None


def _seed_list(seeds: int | Sequence[int], first_seed: int) -> list[int]:
    """The seeds to run: `seeds` of them from `first_seed`, or the values given; distinct and valid."""
    seed_list = list(range(first_seed, first_seed + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise UserError("--seeds: need at least one seed")
    if len(set(seed_list)) != len(seed_list):
        raise UserError(f"--seeds: seeds must be distinct, got {seed_list}")
    for seed in seed_list:
        check_seed(seed, "--first-seed")
    return seed_list


def _checked_options(res: SweepResults, *, epochs: int | None, train_on: str, arms: Sequence[str] | None
                     ) -> list[str]:
    """Check --epochs, --train-on and --arm against the sweep; returns the arms to retrain."""
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs: must be >= 1, got {epochs}")
    if train_on not in ("train", "train+val"):
        raise UserError(f"--train-on: expected train or train+val, got {train_on!r}")
    arm_list = list(arms) if arms is not None else res.space.arms()
    for arm in arm_list:
        if arm not in res.space.arms():
            raise UserError(f"--arm: sweep {res.name!r} has no {arm!r} arm")
    return arm_list


def _plan(res: SweepResults, arm_list: Sequence[str], *, epochs: int | None, train_on: TrainOn,
          from_trial: str | None, from_checkpoint: bool, log: Callable[[str], None]) -> list[_Plan]:
    """Choose each arm's trial and prove it can be retrained (config, user code, data, checkpoint)."""
    plans: list[_Plan] = []
    for arm in arm_list:
        if arm == "baseline" and res.usable(arm).empty:
            log("baseline: no finished trial in the sweep; skipped")
            continue
        trial, why = _choose(res, arm, from_trial)
        data = dict(trial.config)
        if epochs is not None:
            data["schedule"] = {**data["schedule"], "epochs": epochs}
        cfg = train_config_from_dict(data)
        if uses_user_code(data):  # the user's module may have changed or gone since the sweep
            check_user_code(cfg)
        if train_on == "train+val" and cfg.trainable is not None:
            raise UserError(f"--train-on: train+val needs the built-in trainer; trainable {cfg.trainable} loads "
                            f"its own data (merge val into train inside the loop instead)")
        if train_on == "train+val":
            merge_train_val(load_data(cfg.data, resolve_device(cfg.device)))  # unsupported data fails here
        plans.append(_Plan(arm, trial, why, cfg, _checkpoint_file(trial, cfg) if from_checkpoint else None))
    if from_trial is not None and not any(p.trial.trial_id == str(from_trial) for p in plans):
        arms_text = ", ".join(arm_list)
        raise UserError(f"--from-trial: trial {from_trial!r} is not in the arms being retrained ({arms_text})")
    return plans


def _no_test_split(plans: Sequence[_Plan], log: Callable[[str], None]) -> str | None:
    """Why there are no test metrics, when the (built-in trainer's) data has no test split; else None."""
    if not plans or plans[0].cfg.trainable is not None or len(load_data(plans[0].cfg.data, "cpu").test):
        return None
    no_test = f"data.name {plans[0].cfg.data.name} returned test=None, so test metrics are n/a"
    log(f"no test split: {no_test}")
    return no_test


def _write_arm_configs(plans: Sequence[_Plan], seed_list: list[int], out_dir: Path, *, metric: str,
                       train_on: TrainOn, workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Write each arm's ``config.yaml`` and say what it will run; returns the (arm, seed) jobs."""
    jobs = []
    for p in plans:
        arm_dir = out_dir / p.arm
        arm_dir.mkdir(parents=True, exist_ok=True)
        (arm_dir / "config.yaml").write_text(yaml.safe_dump(train_config_to_dict(p.cfg), sort_keys=False))
        start = f"from model.weights {p.cfg.model.weights}" if p.cfg.model.weights else "from scratch"
        how = f"fine-tuning from {p.start_from}" if p.start_from else f"training {start}"
        on = f" on {workers} workers each" if workers > 1 else ""
        log(f"{p.arm}: {p.why}; {len(seed_list)} seed(s) {seed_list}{on}, {p.cfg.schedule.epochs} epochs, {how}")
        jobs += seed_jobs(p.arm, p.cfg, seed_list, out_dir, metric=metric, train_on=train_on,
                          start_from=p.start_from, workers=workers)
    return jobs


def _run_jobs(jobs: list[dict[str, Any]], resources: Resources, main: str, *, address: str | None,
              max_concurrent: int | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run every (arm, seed) job (in parallel where resources allow), logging each as it finishes."""
    finished = 0

    def done(i: int, row: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        log(f"{row['arm']} seed {row['seed']} ({finished}/{len(jobs)} done): status={row['status']} "
            f"{main}={_num(row.get(main))} test_loss={_num(row['test_loss'])} "
            f"trainable_fraction={_num(row['trainable_fraction'])} ({row['wall_time_s']:.1f}s)")  # fmt: skip

    return run_all(run_seed_anywhere, jobs, resources=resources, address=address,
                   max_concurrent=max_concurrent, on_done=done)  # fmt: skip


def _arms_summary(plans: Sequence[_Plan], rows: list[dict[str, Any]], seed_list: list[int], main: str
                  ) -> dict[str, Any]:
    """Per arm: the trial retrained and why, and mean ± std over its seeds of each `RETRAIN_SUMMARY_COLUMNS` column
    and of the sweep's test metric `main` (e.g. test_f1) and its dense export's."""
    stats = dict.fromkeys((*RETRAIN_SUMMARY_COLUMNS, main, f"dense_{main}"))
    arms_summary: dict[str, Any] = {}
    for p in plans:
        arm_rows = [r for r in rows if r["arm"] == p.arm]
        arms_summary[p.arm] = {
            "trial_id": p.trial.trial_id,
            "chosen": p.why,
            "tuning_metrics": p.trial.metrics,
            "config": f"{p.arm}/config.yaml",
            "seeds": seed_list,
            "diverged": sum(r["status"] == "diverged" for r in arm_rows),
            **{k: mean_std([r.get(k) for r in arm_rows]) for k in stats},
        }
    return arms_summary


def _summary(res: SweepResults, out_dir: Path, plans: Sequence[_Plan], rows: list[dict[str, Any]],
             seed_list: list[int], *, train_on: TrainOn, from_checkpoint: bool, main: str, mode: str,
             no_test: str | None) -> dict[str, Any]:
    """What ``summary.json`` holds (and `retrain` returns): settings, per-arm statistics, the comparison."""
    summary: dict[str, Any] = {
        "results_dir": str(res.path),
        "out": str(out_dir),
        "train_on": train_on,
        "val_metrics": "none (val merged into train)" if train_on == "train+val" else "final epoch",
        "from_checkpoint": from_checkpoint,
        "epochs": {p.arm: p.cfg.schedule.epochs for p in plans},
        "seeds": seed_list,
        "std": "sample standard deviation (n - 1)",
        "arms": _arms_summary(plans, rows, seed_list, main),
    }
    summary["test_metric"] = main
    summary["no_test_split"] = no_test
    summary["comparison"] = _compare(summary["arms"], main, mode)
    return summary


def _write_outputs(out_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``metrics.csv`` (one row per arm and seed) and ``summary.json``."""
    columns = retrain_columns(k for r in rows for k in r)
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))


def _log_summary(summary: dict[str, Any], log: Callable[[str], None]) -> None:
    """Per arm the test metric and trainable fraction (mean ± std); the OIALR - baseline difference."""
    main = summary["test_metric"]
    for arm, s in summary["arms"].items():
        acc = s[main]
        log(f"{arm}: {main} {_pm(acc)} over {acc['n']} seed(s), trainable_fraction {_pm(s['trainable_fraction'])}")
    if summary["comparison"]:
        c = summary["comparison"]
        log(f"OIALR - baseline {main}: {c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] -> {c['verdict']}"
            if c.get("low") is not None else f"OIALR - baseline {main}: {c['difference']:+.4f}")  # fmt: skip
    log(f"wrote {summary['out']}")


def _compare(arms: dict[str, Any], metric: str = "test_acc", mode: str = "max") -> dict[str, Any] | None:
    """OIALR minus baseline mean `metric`, with a Welch 95 % interval when both have ≥ 2 seeds; the
    verdict (better/worse) follows `mode`, the direction that makes `metric` better."""
    if "oialr" not in arms or "baseline" not in arms:
        return None
    return difference(arms["oialr"][metric]["values"], arms["baseline"][metric]["values"], metric, mode)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for people: per arm, test accuracy mean ± std and trainable fraction; the comparison."""
    lines = [f"retrain of {summary['results_dir']} (train on {summary['train_on']}, seeds {summary['seeds']})"]
    m = summary.get("test_metric", "test_acc")
    for arm, s in summary["arms"].items():
        lines.append(
            f"  {arm:<9} trial {s['trial_id']}: {m} {_pm(s[m])}  "
            f"dense export {_pm(s['dense_' + m])}  trainable_fraction {_pm(s['trainable_fraction'])}  "
            f"({s[m]['n']} seeds, {s['diverged']} diverged)"
        )
    c = summary.get("comparison")
    if c:
        interval = f" [{c['low']:+.4f}, {c['high']:+.4f}] 95% Welch: {c['verdict']}" if c.get("low") is not None else ""
        lines.append(f"  OIALR - full rank {m} {c['difference']:+.4f}{interval}")
    if summary.get("no_test_split"):
        lines.append(f"  no test split: {summary['no_test_split']}")
    lines.append(f"  models, metrics.csv and summary.json in {summary['out']}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def _pm(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")
