"""A training that is one trial of a search (`dlpipe sweep --search`): after every epoch it
reports its monitored validation value to its Optuna trial, and stops when the study's pruner
says the trial is not worth finishing.

The trial is named by the environment that the search worker gives the stage (the storage URL
may hold a password, so it is never a param): with no such variables a training is no trial and
nothing here runs. The pruner is built in this process from the study's settings (a pruner is not
kept in the storage), so every worker's trainings judge alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlpipe.errors import DlpipeError, first_line

if TYPE_CHECKING:
    import optuna

STORAGE_ENV = "DLPIPE_SEARCH_STORAGE"  # the study's storage URL (RDB: sqlite, PostgreSQL, ...)
STUDY_ENV = "DLPIPE_SEARCH_STUDY"  # the study's name
TRIAL_ENV = "DLPIPE_SEARCH_TRIAL"  # the trial's number in that study
PRUNED_AT = "pruned_at_epoch"  # the trial's user attribute, and its MLflow run's tag


def make_pruner(settings: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The study's pruner from its `pruner` settings. Epochs 1 to `warmup_epochs` always run.
    median: a trial stops when its best value so far is worse than the median of the completed
    trials' at the same epoch (once `startup_trials` have completed); halving: successive halving,
    rungs at (warmup_epochs + 1) x 3^k epochs, the best third of each rung going on."""
    import optuna

    first = settings["warmup_epochs"] + 1  # the first epoch that may be pruned
    if settings["kind"] == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings["startup_trials"], n_warmup_steps=first
    )


@dataclass
class TrialReport:
    """The training's side of one trial: `report(epoch, value)` -> True when it should stop."""

    trial: optuna.Trial
    pruned_at: int = 0

    @property
    def tags(self) -> dict[str, str]:
        return {"optuna_study": self.trial.study.study_name, "optuna_trial": str(self.trial.number)}

    def __call__(self, epoch: int, value: float) -> bool:
        import optuna

        try:
            self.trial.report(value, epoch)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Ended elsewhere: its worker stopped beating and another marked it failed.
            print(f"search: trial {self.trial.number} was ended by another worker; stopping")
            return True
        if not self.trial.should_prune():
            return False
        self.pruned_at = epoch
        self.trial.set_user_attr(PRUNED_AT, epoch)
        print(f"search: trial {self.trial.number} pruned after epoch {epoch}")
        return True


def in_search(env: Mapping[str, str] | None = None) -> bool:
    """Whether a search worker started this training as one of its trials."""
    return bool((os.environ if env is None else env).get(TRIAL_ENV))


def trial_from_env(env: Mapping[str, str] | None = None) -> TrialReport | None:
    """This training's trial, when a search worker started it; None otherwise. An unreachable
    study is one line (naming the study, never the URL: it may hold a password)."""
    env = os.environ if env is None else env
    if not in_search(env):
        return None
    import optuna

    name, number = env.get(STUDY_ENV, ""), env[TRIAL_ENV]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(env[STORAGE_ENV])
        study_id = storage.get_study_id_from_name(name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
        settings = storage.get_study_user_attrs(study_id)["pruner"]
        study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(settings))
        return TrialReport(optuna.trial.Trial(study, trial_id))
    except Exception as err:  # sqlalchemy's, optuna's, a bad number: stopped before training
        raise DlpipeError(f"search trial {number} of study {name!r}: {first_line(err)}") from None
