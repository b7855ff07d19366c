"""`hpopt retrain`: train the chosen configuration once more and touch the test split exactly once.

The search only ever saw the training and validation splits. Here the selected trial's config
(the study's base config + its fixed values + the trial's parameters, assembled exactly like a
worker does) is retrained on the training split (optionally train+validation), evaluated on the
held-out test split of the study's manifest, saved with its config and scalers by the trainer,
and the test MAE is written back onto the study ("test_result") so reports show it.
`--submit` runs the same command as a Slurm GPU job instead.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hpopt.config import Config
from hpopt.errors import HpoptError
from hpopt.results.best import select_from_study
from hpopt.rundir import RunDir, write_json_atomic
from hpopt.space import Space, apply_values

TEST_RESULT_ATTR = "test_result"


@dataclass(frozen=True)
class RetrainPlan:
    """Everything one retrain needs, fixed before any training starts."""

    study: str
    trial: int
    config: dict[str, Any]
    manifest: Path
    out_path: Path
    include_val: bool
    epochs: int | None
    val_mae: float  # what the search measured, to compare with the test MAE


def default_model_path(study: str, trial: int) -> Path:
    """models/<study>-trial<N>.pt under the current directory (not the private run dir)."""
    return Path("models") / f"{study}-trial{trial}.pt"


def plan_retrain(
    study: optuna.Study,
    *,
    trial: int | None = None,
    out_path: Path | None = None,
    include_val: bool = False,
    epochs: int | None = None,
    tolerance: float | None = None,
    max_gap_ratio: float | None = None,
) -> RetrainPlan:
    """Pick the trial (the selection rule's best unless `trial` is given) and build its config."""
    attrs = study.user_attrs
    for key in ("space", "split"):
        if not attrs.get(key):
            raise HpoptError(f"study '{study.study_name}' has no '{key}' attribute: it was not "
                             "created by `hpopt study create`, so its config cannot be rebuilt")
    if epochs is not None and epochs < 1:
        raise HpoptError("--epochs must be at least 1")
    if trial is None:
        kwargs = {k: v for k, v in (("tolerance", tolerance), ("max_gap_ratio", max_gap_ratio))
                  if v is not None}
        chosen = select_from_study(study, **kwargs).best.number
    else:
        chosen = trial
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == chosen), None)
    if frozen is None or frozen.state != TrialState.COMPLETE or frozen.value is None:
        state = "does not exist" if frozen is None else f"is {frozen.state.name.lower()}"
        raise HpoptError(f"trial {chosen} of study '{study.study_name}' {state}; retrain needs a "
                         "complete trial (see `hpopt best`)")
    space = Space.from_dict(attrs["space"])
    config = apply_values(attrs.get("base_config", {}), {**space.fixed, **frozen.params})
    manifest = Path(attrs["split"]).expanduser()
    if not manifest.exists():
        raise HpoptError(f"split manifest {manifest} (from study attribute 'split') not found")
    out = (out_path or default_model_path(study.study_name, chosen)).expanduser().resolve()
    return RetrainPlan(study.study_name, chosen, config, manifest, out, include_val, epochs,
                       float(frozen.value))


def _json_safe(result: dict[str, Any]) -> dict[str, Any]:
    """Keep what a study attribute can hold (JSON scalars; NaN/inf become None)."""
    safe: dict[str, Any] = {}
    for key, value in result.items():
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()  # numpy / torch scalars
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        if value is None or isinstance(value, (str, int, float, bool)):
            safe[key] = value
    return safe


def run_retrain(study: optuna.Study, plan: RetrainPlan) -> dict[str, Any]:
    """Retrain, test once, save the model, record the test result on the study and beside the model."""
    from hpopt.train.api import retrain_and_test

    plan.out_path.parent.mkdir(parents=True, exist_ok=True)
    result = retrain_and_test(plan.config, plan.manifest, plan.out_path,
                              include_val=plan.include_val, epochs=plan.epochs)
    if "test_mae" not in result:
        raise HpoptError("the trainer returned no test_mae; cannot record a test result")
    record = {
        "trial": plan.trial,
        "search_val_mae": plan.val_mae,
        "model_path": str(plan.out_path),
        "include_val": plan.include_val,
        "epochs_requested": plan.epochs,
        "split": str(plan.manifest),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **_json_safe(result),  # the trainer's own numbers (and where it really saved) win
    }
    write_json_atomic(plan.out_path.with_name(plan.out_path.name + ".test.json"),
                      {**record, "config": plan.config}, mode=0o644)
    study.set_user_attr(TEST_RESULT_ATTR, record)
    return record


def retrain_command(plan: RetrainPlan, config_file: str | None) -> list[str]:
    """The `hpopt retrain` command line a batch job runs (trial pinned to what the user saw)."""
    cmd = [sys.executable, "-m", "hpopt"]
    if config_file:
        cmd += ["--config", config_file]
    cmd += ["retrain", "--study", plan.study, "--trial", str(plan.trial), "--out", str(plan.out_path)]
    if plan.epochs is not None:
        cmd += ["--epochs", str(plan.epochs)]
    if plan.include_val:
        cmd.append("--include-val")
    return cmd


def render_sbatch(plan: RetrainPlan, config: Config, run_dir: RunDir, *, gpu: bool = True,
                  workdir: Path | None = None) -> str:
    """A small batch script that runs the retrain on one GPU of the configured partition."""
    slurm = config.slurm
    options = [f"--job-name=hpopt-retrain-{plan.study}",
               f"--output={run_dir.logs_dir / f'retrain-{plan.study}-%j.log'}",
               f"--time={slurm.worker_time}", f"--cpus-per-task={slurm.cpus_per_task}",
               f"--mem={slurm.mem}", "--nodes=1", "--ntasks=1"]
    partition = slurm.gpu_partition if gpu else slurm.cpu_partition
    if partition:
        options.append(f"--partition={partition}")
    if gpu:
        options.append(f"--gres={slurm.gpu_gres}")
    if slurm.account:
        options.append(f"--account={slurm.account}")
    if slurm.qos:
        options.append(f"--qos={slurm.qos}")
    options += slurm.extra_sbatch
    lines = ["#!/bin/bash"]
    lines += [o if o.startswith("#SBATCH") else f"#SBATCH {o}" for o in options]
    lines += ["", "# written by `hpopt retrain --submit`", "set -euo pipefail", *slurm.prelude]
    config_file = config.source if Path(config.source).is_file() else None
    lines += [
        f"cd {shlex.quote(str(workdir or Path.cwd()))}",
        f"export HPOPT_RUN_DIR={shlex.quote(str(run_dir.root))}",
        "exec " + shlex.join(retrain_command(plan, str(Path(config_file).resolve()) if config_file else None)),
    ]
    return "\n".join(lines) + "\n"
