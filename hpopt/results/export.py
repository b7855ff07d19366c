"""`hpopt export mlflow`: finished trials as MLflow runs, for teams that track experiments there.

One MLflow run per COMPLETE trial in experiment "hpopt-<study>" (or --experiment): parameters,
final metrics (val_mae, train_mae, gap, wall_s, epochs), the per-epoch validation MAE as a metric
history, and tags naming the study, trial and worker. Runs are tagged with the trial number, so
exporting again only adds trials finished since. mlflow is optional: without it the command says
so in one line and exits 0, because a missing exporter is not a failed search.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpopt.results.snapshot import as_float, gpu_seconds, worker_label

STUDY_TAG = "hpopt.study"
TRIAL_TAG = "hpopt.trial"
BATCH = 1000  # MLflow's limit on metrics per log_batch call


def mlflow_available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


@dataclass(frozen=True)
class ExportResult:
    experiment: str
    exported: int
    already: int  # complete trials exported by an earlier run


def _ms(trial: FrozenTrial, which: str) -> int | None:
    stamp = getattr(trial, which)
    return int(stamp.timestamp() * 1000) if stamp is not None else None


def _metrics(trial: FrozenTrial) -> list[tuple[str, float, int]]:
    """(key, value, step) for the final numbers and the per-epoch validation curve."""
    attrs = trial.user_attrs
    train = as_float(attrs.get("train_mae"))
    final: dict[str, float | None] = {
        "val_mae": trial.value, "train_mae": train,
        "gap": (trial.value - train) if trial.value is not None and train is not None else None,
        "wall_s": gpu_seconds(trial), "epochs": as_float(attrs.get("epochs")),
        "val_mae_per_atom": as_float(attrs.get("val_mae_per_atom")),
        "train_mae_per_atom": as_float(attrs.get("train_mae_per_atom")),
    }
    rows = [(k, float(v), 0) for k, v in final.items() if v is not None]
    rows += [("val_mae_epoch", float(v), int(step)) for step, v in sorted(trial.intermediate_values.items())]
    return rows


def _exported_trials(client: Any, experiment_id: str, study: str) -> set[int]:
    done: set[int] = set()
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}'",
                                  max_results=1000, page_token=token)
        done |= {int(r.data.tags[TRIAL_TAG]) for r in page if TRIAL_TAG in r.data.tags}
        token = page.token
        if not token:
            return done


def export_mlflow(study: optuna.Study, *, tracking_uri: str | None = None,
                  experiment: str | None = None) -> ExportResult:
    """Log every complete trial not yet in MLflow; needs mlflow installed (check mlflow_available)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    name = experiment or f"hpopt-{study.study_name}"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
    already = _exported_trials(client, experiment_id, study.study_name)
    exported = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.number in already:
            continue
        tags = {STUDY_TAG: study.study_name, TRIAL_TAG: str(trial.number),
                "hpopt.worker": worker_label(trial)}
        run = client.create_run(experiment_id, start_time=_ms(trial, "datetime_start"), tags=tags,
                                run_name=f"{study.study_name}-trial{trial.number}")
        run_id = run.info.run_id
        stamp = _ms(trial, "datetime_complete") or 0
        metrics = [Metric(k, v, stamp, step) for k, v, step in _metrics(trial)]
        params = [Param(k, str(v)) for k, v in sorted(trial.params.items())]
        for i in range(0, max(len(metrics), 1), BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + BATCH], params=params if i == 0 else [])
        client.set_terminated(run_id, status="FINISHED", end_time=_ms(trial, "datetime_complete"))
        exported += 1
    return ExportResult(name, exported, len(already))
