"""One consistent in-memory copy of a study, so every table and figure of a report agrees.

Workers keep writing while a report runs. Reading the trials once and copying them into an
in-memory study freezes what the report shows and keeps each Optuna plot from going back to the
database (a report draws ten figures; on a remote MariaDB each re-read costs seconds).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial
from rich.progress import Progress

from hpopt.errors import HpoptError
from hpopt.rundir import RunDir


def resolve_study_name(storage: optuna.storages.BaseStorage, name: str | None) -> str:
    """The study to read: the one named, or the only one there is."""
    names = optuna.get_all_study_names(storage)
    if name is not None:
        if name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise HpoptError(f"no study named '{name}' in the study DB (studies: {known})")
        return name
    if not names:
        raise HpoptError("the study DB has no study yet: create one with `hpopt study create NAME`")
    if len(names) > 1:
        raise HpoptError(f"several studies exist ({', '.join(sorted(names))}): pass --study NAME")
    return names[0]


def open_study(run_dir: RunDir, name: str | None) -> optuna.Study:
    """Load a study from the run directory's storage (MariaDB endpoint, else the local journal)."""
    from hpopt.storage import open_storage  # the storage module decides which backend

    storage = open_storage(run_dir)
    return optuna.load_study(study_name=resolve_study_name(storage, name), storage=storage)


def snapshot(study: optuna.Study, progress: Progress | None = None) -> optuna.Study:
    """Copy a study's trials and attributes into memory (with a progress bar when given one)."""
    task = progress.add_task("reading trials", total=None) if progress else None
    trials = study.get_trials(deepcopy=False)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        copy = optuna.create_study(
            study_name=study.study_name, directions=study.directions,
            storage=optuna.storages.InMemoryStorage(),
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    if progress is not None and task is not None:
        progress.update(task, total=len(trials), description=f"reading {len(trials)} trials")
    for trial in trials:
        copy.add_trial(trial)
        if progress is not None and task is not None:
            progress.advance(task)
    return copy


def worker_label(trial: FrozenTrial) -> str:
    """Which worker ran a trial: its Slurm job id ("123_4"), else its host, else "unknown"."""
    attrs = trial.user_attrs
    return str(attrs.get("worker_job_id") or attrs.get("host") or "unknown")


def duration_s(trial: FrozenTrial) -> float | None:
    """Wall-clock seconds from start to finish as Optuna recorded them (None while running)."""
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def gpu_seconds(trial: FrozenTrial) -> float:
    """Device time a trial cost: the worker's own "wall_s" measure, else Optuna's duration."""
    wall = trial.user_attrs.get("wall_s")
    if isinstance(wall, (int, float)):
        return float(wall)
    return duration_s(trial) or 0.0


def as_float(value: Any) -> float | None:
    """A user attribute as a float, or None when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
