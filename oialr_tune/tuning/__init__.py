"""Tuning sweeps: Ray Tune runs trainer trials, Optuna proposes settings, ASHA stops weak trials.

The only package that imports Ray and Optuna. One sweep runs up to two *arms*, each a Ray Tune
experiment in ``<results>/<name>/``:

* ``oialr``: OIALR on, searching the OIALR knobs and the learning-rate ranges of the space;
* ``baseline``: the same network at full rank (``oialr.enabled: false``), searching the same
  non-OIALR ranges with the same budget (``baseline: same-budget``), or one run of the base
  settings (``once``), or nothing (``none``) -- so "tuned OIALR beats full rank" is measured.

Why it is built the way it is:

* **Nothing reported finished is lost, whatever kills the driver.** Each ended trial is written to
  the arm's journal (fsynced) before its done line is printed, and trials.csv, summary.json and
  study.db are rebuilt from the journals (`oialr_tune.sweep_state`). On resume, Ray's saved state is restored only
  when it is signed by this user's key and agrees with the journal; otherwise (a kill mid-write, a
  full disk, a state older than the journal, a moved folder) the arm is rebuilt: a new Tuner whose
  searcher is told the journal's trials, for the trials left.
* **Resumable without an Optuna database during the run.** ``OptunaSearch(storage=...)`` breaks
  ``Tuner.restore`` after a killed driver: the searcher pickled with the experiment lags the
  database, re-tells trials the database already holds as finished, and Optuna refuses
  (``UpdateFinishedTrialError``). So the searcher keeps its study in memory, Ray pickles it
  with the experiment state, and ``study.db`` is written from the journals once the arms have
  finished (on a thread, while Ray stops): the journals are the one record, and the database is a
  derived, rebuildable view for Optuna's tools.
* **Cheap trials.** Actors are reused (a fresh process per trial costs more than a small trial);
  the trainer caches datasets per process; trials report every epoch but checkpoint only at the
  ASHA rungs, every ``checkpoint.every`` epochs and at the end; TensorBoard events are written
  when a trial ends, not flushed after every epoch (`arm.TensorBoardAtTrialEnd`); the experiment
  state is snapshot every few seconds so a killed sweep loses at most that much scheduling.
* **Same config, same result, whatever ran before in the process.** A trial builds its whole
  trainer config from the stored base and its sampled values, and the trainer seeds everything
  from that config; nothing is kept between trials but the dataset cache.

Modules, in the order a sweep uses them: ``driver`` (`sweep`: checks, lock, the arms in turn),
``storage`` (the folder, local or a URI; its journals, signature and lock are
`oialr_tune.sweep_state`), ``cluster`` (the Ray session), ``arm`` (one Ray Tune experiment),
``search`` (Optuna's sampler in Ray's OptunaSearch, ASHA), ``worker`` (one trial, in a Ray worker),
``hooks`` (the driver's Ray callback), ``collect`` (trials.csv, summary.json, study.db from the
journals), ``study`` (the Optuna study, written and read); ``parallel`` runs retrain and compare
jobs as Ray tasks.
"""

from typing import Any

__all__ = ["SweepInterrupted", "make_trainable", "rebuild_results", "run_trial", "sweep"]

# name -> module that defines it, imported on first use: `sweep` checks its input before Ray is imported.
_LAZY = {
    "sweep": "driver",
    "rebuild_results": "collect",
    "make_trainable": "worker",
    "run_trial": "worker",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "SweepInterrupted":
        from oialr_tune.errors import SweepInterrupted

        return SweepInterrupted
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
