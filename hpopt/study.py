"""Shared studies: created once from the login node, loaded (never created) by every worker.

The study carries its whole experiment in its user attributes (search space, trainer base
config, split manifest, budget, sampler, pruner, versions), so every worker of every launch runs
exactly the same thing and a resumed search needs nothing but the study name. Creating tables and
the study before any worker exists avoids the "Duplicate entry"/"Table already exists" crashes of
eight workers racing `create_study(load_if_exists=True)` on an empty MariaDB.
"""

from __future__ import annotations

import datetime as dt
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from hpopt import __version__
from hpopt.budget import Tally, tally
from hpopt.errors import HpoptError
from hpopt.space import Space
from hpopt.storage import reap_stale

SAMPLERS = ("tpe", "cmaes", "random", "grid")
PRUNERS = ("hyperband", "median", "none")


@dataclass
class StudySpec:
    """Everything `hpopt study create` stores in the study."""

    name: str
    space: Space
    base_config: dict[str, Any] = field(default_factory=dict)
    split: str = ""
    budget: int = 100
    sampler: str = "tpe"
    pruner: str = "hyperband"
    direction: str = "minimize"

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise HpoptError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.pruner not in PRUNERS:
            raise HpoptError(f"unknown pruner {self.pruner!r} (choose from {', '.join(PRUNERS)})")
        if self.direction not in ("minimize", "maximize"):
            raise HpoptError(f"direction must be minimize or maximize, got {self.direction!r}")
        if self.budget < 1:
            raise HpoptError(f"budget must be at least 1 trial, got {self.budget}")
        if self.sampler == "grid":
            self.space.grid()  # a float without `step` is an error now, not in a worker

    def attrs(self) -> dict[str, Any]:
        return {
            "space": self.space.to_dict(),
            "base_config": self.base_config,
            "split": self.split,
            "budget": self.budget,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "hpopt_version": __version__,
            "optuna_version": optuna.__version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }


def check_trainer_config(spec: StudySpec) -> None:
    """Every name the space sets must be a trainer option: a typo (`model.num_layer`) fails here,
    at create time, instead of in every worker. Raises the trainer's one-line HpoptError."""
    from hpopt.space import apply_values
    from hpopt.train.config import parse_config

    values = dict(spec.space.fixed)
    values.update({p.name: p.choices[0] if p.type == "categorical" else p.low for p in spec.space.params})
    parse_config(apply_values(spec.base_config, values))


@dataclass
class Experiment:
    """A loaded study plus its stored experiment, as a worker needs it."""

    study: optuna.Study
    space: Space
    base_config: dict[str, Any]
    split: str
    budget: int
    seed: int


def make_sampler(name: str, space: Space, seed: int) -> optuna.samplers.BaseSampler:
    """Parallel-aware samplers; each process passes its own seed so workers never sample alike."""
    if name == "tpe":
        from hpopt.sampling import WindowedTPESampler

        return WindowedTPESampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise HpoptError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Pruning acts on the per-epoch validation MAE the worker reports."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise HpoptError(f"unknown pruner {name!r} (choose from {', '.join(PRUNERS)})")


def _missing(name: str) -> HpoptError:
    return HpoptError(f"no study named {name!r} in this run; create it with `hpopt study create {name} --space space.yaml`")


def create_study(storage: BaseStorage, spec: StudySpec) -> optuna.Study:
    """Create the study and store its experiment; an existing name is an error, never a merge."""
    spec.check()
    if spec.name in {s.study_name for s in storage.get_all_studies()}:
        raise HpoptError(f"study {spec.name!r} already exists: launch more workers to resume it, "
                         f"`hpopt study budget {spec.name} N` to change its budget, or delete it first")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our CLI says what happened
    study = optuna.create_study(storage=storage, study_name=spec.name, direction=spec.direction)
    for key, value in spec.attrs().items():
        study.set_user_attr(key, value)
    return study


def load_experiment(storage: BaseStorage, name: str, *, seed: int | None = None) -> Experiment:
    """Load a study for a worker: refuse other Optuna majors (Optuna 5 stores UTC timestamps)."""
    try:
        frozen = next(s for s in storage.get_all_studies() if s.study_name == name)
    except StopIteration:
        raise _missing(name) from None
    attrs = frozen.user_attrs
    if "space" not in attrs or "budget" not in attrs:
        raise HpoptError(f"study {name!r} was not created by `hpopt study create` (no stored search space)")
    created_with = str(attrs.get("optuna_version", "?"))
    if created_with.split(".")[0] != optuna.__version__.split(".")[0]:
        raise HpoptError(
            f"study {name!r} was created with optuna {created_with} but this worker has optuna "
            f"{optuna.__version__}; mixing majors corrupts trial timestamps: install optuna=={created_with}"
        )
    space = Space.from_dict(attrs["space"])
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(attrs.get("sampler", "tpe"), space, seed),
                              pruner=make_pruner(attrs.get("pruner", "hyperband")))
    return Experiment(study, space, dict(attrs.get("base_config", {})), str(attrs.get("split", "")),
                      int(attrs["budget"]), seed)


def list_studies(storage: BaseStorage) -> list[dict[str, Any]]:
    """One row per study: trials so far against the budget, best value."""
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=True):
        attrs = summary.user_attrs
        rows.append({
            "name": summary.study_name,
            "trials": summary.n_trials,
            "budget": attrs.get("budget"),
            "best": summary.best_trial.value if summary.best_trial else None,
            "sampler": attrs.get("sampler", "?"),
            "pruner": attrs.get("pruner", "?"),
            "created_at": attrs.get("created_at", ""),
        })
    return rows


def describe_study(storage: BaseStorage, name: str) -> dict[str, Any]:
    """Everything `study show` prints; reaps stale trials first so the counts are true."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise _missing(name) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        reap_stale(study)
    trials = study.get_trials(deepcopy=False)
    counts: Tally = tally(trials)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(finished, key=lambda t: t.value) if finished and study.direction.name == "MINIMIZE" else (
        max(finished, key=lambda t: t.value) if finished else None)
    attrs = study.user_attrs
    return {
        "name": name,
        "direction": study.direction.name.lower(),
        "budget": attrs.get("budget"),
        "counts": counts.as_dict(),
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                           "user_attrs": best.user_attrs},
        "space": attrs.get("space", {}),
        "base_config": attrs.get("base_config", {}),
        "split": attrs.get("split", ""),
        "sampler": attrs.get("sampler"),
        "pruner": attrs.get("pruner"),
        "hpopt_version": attrs.get("hpopt_version"),
        "optuna_version": attrs.get("optuna_version"),
        "created_at": attrs.get("created_at"),
    }


def set_budget(storage: BaseStorage, name: str, budget: int) -> None:
    """Raise (or lower) the fleet-wide budget of an existing study; running workers pick it up."""
    if budget < 1:
        raise HpoptError(f"budget must be at least 1 trial, got {budget}")
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise _missing(name) from None
    study.set_user_attr("budget", budget)


def delete_study(storage: BaseStorage, name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        raise _missing(name) from None
