"""Every use of a private name of Ray or Optuna, in one place.

Each function below is the only door to one private name or layout. Each says why it is used, what
public API is missing, and which test fails when an upgrade of the library changes it.

Outside Ray and Optuna, three private names are used where they are needed, because the modules
that use them must not import this Ray package (the method, the loops, the model loader):

* torch: DDP's ``_set_params_and_buffers_to_ignore_for_model``, in
  `oialr_tune.oialr.distributed.ddp_ignore_frozen_bases` (its docstring says why; pinned by
  ``tests/test_distributed.py::test_every_rank_is_bit_identical_after_each_factorization_and_cut``);
* Lightning: ``strategy._setup_model``, in `oialr_tune.lightning` (``_rewrap``): once the controller
  replaced parameters (a factorization, a rank cut), the module is wrapped in a new DDP exactly as
  Lightning's strategy wraps it; Lightning has no public call to rewrap. Pinned by
  ``tests/test_distributed.py::test_the_lightning_callback_under_lightnings_ddp_strategy``;
* NumPy: ``numpy._core.multiarray._reconstruct``, in `oialr_tune.safe_load.allowed_globals`: the
  name a pickled array is stored under, which torch's allow-listed load must be given. Pinned by
  ``tests/test_custom.py::test_a_resumed_loop_continues_the_same_random_sequence``.

Nothing else in the package touches another library's internals (`oialr_tune.trainer` uses the
public ``torch.compiler.reset``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:  # not at run time: `report` reads study.db through this module without importing Ray
    from ray.tune.search.optuna import OptunaSearch


def optuna_trial(search: OptunaSearch, trial_id: str) -> optuna.trial.Trial | None:
    """The Optuna trial Ray's OptunaSearch keeps for Ray's trial `trial_id` (None if it holds none).

    Why: the size budget (`oialr_tune.tuning.search.BudgetedOptunaSearch`) must set the trial's
    constraint before OptunaSearch tells the study. Missing public API: OptunaSearch exposes no
    map from Ray trial ids to Optuna trials (private ``_ot_trials``). Pinned by
    ``tests/test_budget_search.py::test_ray_private_map_of_optuna_trials_is_still_there``.
    """
    return search._ot_trials.get(trial_id)


def told(search: OptunaSearch, trial_id: str) -> bool:
    """Whether Ray's OptunaSearch has already told its study that Ray's trial `trial_id` is complete.

    Why: the last epoch of a trial is reported to the study as an intermediate value once, before
    the trial is told (`oialr_tune.tuning.search.BudgetedOptunaSearch`). Missing public API:
    OptunaSearch does not say which trials it has told (private ``_completed_trials``). Pinned by
    ``tests/test_search.py::test_trials_asha_stops_are_pruned_for_the_sampler_and_in_study_db``.
    """
    return trial_id in search._completed_trials


# The module whose logger warns about Ray's token authentication on every local start.
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_token_setup_warning() -> None:
    """Silence Ray's warning about its token authentication, logged on every local start.

    Why: for a private instance a command starts and stops itself, the warning is noise. Missing
    public API: ``ray.init`` has no switch for it, and the logger is a private module's. Pinned by
    ``tests/test_cluster.py::test_the_private_ray_gcs_client_the_auth_check_uses_is_still_there``
    (the module must still exist).
    """
    logging.getLogger(TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)


def ping_gcs(gcs_address: str, timeout_ms: int) -> None:
    """One call to Ray's GCS at `gcs_address` with this process's credentials; raises
    AuthenticationError when refused, RpcError when no GCS answers.

    Why: joining a cluster must fail in one line and at once when the token is refused. Missing
    public API: Ray has no call that checks credentials without ``ray.init``'s minutes-long retry
    loop (private ``ray._raylet.InnerGcsClient``). Pinned by
    ``tests/test_cluster.py::test_the_private_ray_gcs_client_the_auth_check_uses_is_still_there``.
    """
    from ray._raylet import InnerGcsClient  # imported here, so only this call breaks if it goes

    InnerGcsClient.standalone(gcs_address, None, timeout_ms)


def restored_callbacks(tuner: Any) -> list[Any]:
    """The callbacks a Tuner made by ``Tuner.restore`` will run: the list unpickled from its
    ``tuner.pkl``, which may be changed in place before ``fit``.

    Why: the sweep's journal callback (`oialr_tune.tuning.hooks.SweepCallback`) holds the driver's
    run (its open journal, stdout), which is never pickled; a restored arm must be given this
    driver's. Missing public API: ``Tuner.restore`` takes no run config or callbacks, and a Tuner
    does not show its run config (private ``Tuner._local_tuner``). Pinned by
    ``tests/test_sweep_state.py::test_a_restored_tuner_runs_the_callbacks_given_after_restore``.
    """
    return tuner._local_tuner.get_run_config().callbacks


def ended_trial_ids(experiment_state: str) -> set[str]:
    """The ids of the trials Ray's experiment state (the text of ``experiment_state-*.json``) holds as ended.

    Why: an arm's Ray state is restored only when it agrees with the journal
    (`oialr_tune.tuning.arm`). Missing public API: ``Tuner.restore`` reads the state but no public
    call lists its trials without restoring (unpickling) it. Raises ValueError, KeyError, IndexError
    or TypeError for a cut or changed file. Pinned by
    ``tests/test_sweep_state.py::test_rays_experiment_state_lists_the_ended_trials_of_the_journal``.
    """
    trials = [json.loads(t[0]) for t in json.loads(experiment_state)["trial_data"]]
    return {t["trial_id"] for t in trials if t.get("status") in ("TERMINATED", "ERROR")}


def add_finished_trials(storage: optuna.storages.RDBStorage, study: optuna.Study, trials: Sequence[Any]) -> None:
    """Store finished trials in a new `study`, as ``study.add_trials`` would, in one ORM session.

    Why: ``study.add_trials`` costs 20-30 ms per trial (a dozen ORM queries and a commit each),
    seconds on a big sweep; this about 1 ms. Missing public API: Optuna has no bulk insert. Uses
    Optuna's own table models (private ``optuna.storages._rdb.models``), its stored forms (as its
    ``RDBStorage._get_prepared_new_trial`` does for a template trial) and the study's private
    ``_study_id``. Pinned by ``tests/test_sweep.py::test_study_db_holds_what_optuna_add_trials_stores``.
    """
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from sqlalchemy.orm import Session

    with Session(storage.engine) as session:
        for number, t in enumerate(trials):
            trial = models.TrialModel(
                study_id=study._study_id, number=number, state=t.state,
                datetime_start=t.datetime_start, datetime_complete=t.datetime_complete,
            )  # fmt: skip
            for objective, value in enumerate(t.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                trial.values.append(models.TrialValueModel(objective=objective, value=stored, value_type=kind))
            for name, value in t.params.items():
                dist = t.distributions[name]
                trial.params.append(models.TrialParamModel(
                    param_name=name, param_value=dist.to_internal_repr(value),
                    distribution_json=distribution_to_json(dist),
                ))  # fmt: skip
            for key, value in t.user_attrs.items():
                trial.user_attributes.append(models.TrialUserAttributeModel(key=key, value_json=json.dumps(value)))
            for key, value in t.system_attrs.items():
                trial.system_attributes.append(models.TrialSystemAttributeModel(key=key, value_json=json.dumps(value)))
            for step, value in t.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                trial.intermediate_values.append(models.TrialIntermediateValueModel(
                    step=step, intermediate_value=stored, intermediate_value_type=kind,
                ))  # fmt: skip
            session.add(trial)
        session.commit()
