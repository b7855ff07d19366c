"""`hpopt study ...` and `hpopt worker`: the commands that act on a study.

Optuna is imported inside the commands so `hpopt --help` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from hpopt.errors import HpoptError
from hpopt.train.config import read_config_file
from hpopt.rundir import RunDir

study_app = typer.Typer(
    help=(
        "Create, list, show and delete shared Optuna studies.\n\n"
        "A study stores its search space, trainer config, split and budget, so every worker "
        "runs the same experiment: `hpopt study create NAME --space space.yaml --split data/splits/X.json`."
    ),
    no_args_is_help=True,
)
out = Console()


def _run_dir() -> RunDir:
    from hpopt.context import current_config

    return RunDir(current_config().run_path)


@study_app.command("create")
def create(
    name: str = typer.Argument(..., help="Study name (unique in this run)."),
    space: Path = typer.Option(..., "--space", help="Search-space YAML (see examples/space.yaml)."),
    split: Path = typer.Option(..., "--split", help="Split manifest from `hpopt split` (data/splits/X.json)."),
    budget: int = typer.Option(100, "--budget", help="Finished trials (complete + pruned) across all workers."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe (multivariate, constant liar), cmaes, random or grid."),
    pruner: str = typer.Option("hyperband", "--pruner", help="hyperband, median or none (on per-epoch validation MAE)."),
    direction: str = typer.Option("minimize", "--direction", help="minimize (validation MAE) or maximize."),
    overrides: List[str] = typer.Option([], "--set", help="Fix a parameter or set a trainer option: --set optim.lr=1e-3 (repeatable)."),
    config_base: Optional[Path] = typer.Option(None, "--config-base", help="Base trainer config YAML/JSON the trial values are applied to."),
) -> None:
    """Create a study once, before launching workers (workers only load it)."""
    from hpopt.space import load_space, parse_overrides
    from hpopt.storage import open_storage
    from hpopt.study import StudySpec, check_trainer_config, create_study

    parsed = load_space(space).with_overrides(parse_overrides(overrides))
    if not split.exists():
        raise HpoptError(f"split manifest not found: {split} (make one with `hpopt split SOURCE --name NAME`)")
    spec = StudySpec(name=name, space=parsed, base_config=read_config_file(config_base) if config_base else {},
                     split=str(split.resolve()), budget=budget, sampler=sampler, pruner=pruner,
                     direction=direction)
    spec.check()
    check_trainer_config(spec)
    run_dir = _run_dir().ensure()
    with out.status("creating the study…"):
        create_study(open_storage(run_dir, create_schema=True), spec)
    names = ", ".join(p.name for p in parsed.params)
    out.print(f"created study [bold]{name}[/]: {len(parsed.params)} parameters ({names}), budget {budget}, "
              f"sampler {sampler}, pruner {pruner}")
    out.print(f"next: hpopt launch --workers 8 --study {name}")


@study_app.command("list")
def list_cmd() -> None:
    """All studies in this run with their progress against the budget."""
    from hpopt.storage import open_storage
    from hpopt.study import list_studies

    rows = list_studies(open_storage(_run_dir()))
    if not rows:
        out.print("no studies yet: hpopt study create NAME --space space.yaml --split data/splits/X.json")
        return
    table = Table("study", "trials", "budget", "best", "sampler", "pruner", "created")
    for row in rows:
        best = "-" if row["best"] is None else f"{row['best']:.6g}"
        table.add_row(row["name"], str(row["trials"]), str(row["budget"]), best, row["sampler"],
                      row["pruner"], row["created_at"])
    out.print(table)


@study_app.command("show")
def show(
    name: str = typer.Argument(..., help="Study name."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON (for scripts)."),
) -> None:
    """Budget, trial counts, best trial and the stored experiment; stale trials are reaped first."""
    from hpopt.storage import open_storage
    from hpopt.study import describe_study

    info = describe_study(open_storage(_run_dir()), name)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    c = info["counts"]
    out.print(f"[bold]{name}[/] ({info['direction']}, sampler {info['sampler']}, pruner {info['pruner']}, "
              f"optuna {info['optuna_version']}, created {info['created_at']})")
    out.print(f"budget {info['budget']}: {c['finished']} finished ({c['complete']} complete, {c['pruned']} pruned), "
              f"{c['running']} running, {c['waiting']} queued, {c['failed']} failed")
    out.print(f"split: {info['split']}")
    if info["best"]:
        best = info["best"]
        out.print(f"best: trial {best['number']} value {best['value']:.6g} {best['params']}")
    table = Table("parameter", "type", "range / choices", "when")
    for p in info["space"].get("params", []):
        rng = ", ".join(map(str, p["choices"])) if p["type"] == "categorical" else (
            f"{p['low']} .. {p['high']}" + (" log" if p.get("log") else "") + (f" step {p['step']}" if p.get("step") else ""))
        table.add_row(p["name"], p["type"], rng, ", ".join(f"{k}={v}" for k, v in p.get("when", {}).items()))
    for key, value in info["space"].get("fixed", {}).items():
        table.add_row(key, "fixed", json.dumps(value), "")
    out.print(table)


@study_app.command("budget")
def budget_cmd(name: str = typer.Argument(..., help="Study name."),
               budget: int = typer.Argument(..., help="New total of finished trials.")) -> None:
    """Change a study's budget; running workers pick it up (raise it to resume a finished study)."""
    from hpopt.storage import open_storage
    from hpopt.study import set_budget

    set_budget(open_storage(_run_dir()), name, budget)
    out.print(f"study {name}: budget is now {budget}")


@study_app.command("delete")
def delete(name: str = typer.Argument(..., help="Study name."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete a study and all its trials (asks first unless --yes)."""
    from hpopt.storage import open_storage
    from hpopt.study import delete_study

    if not yes and not typer.confirm(f"Delete study {name} and all its trials?", default=False):
        raise typer.Exit(1)
    delete_study(open_storage(_run_dir()), name)
    out.print(f"deleted study {name}")


def worker(
    study: str = typer.Option(..., "--study", help="Study to work on (created with `hpopt study create`)."),
    time_left_s: Optional[float] = typer.Option(
        None, "--time-left-s", help="Seconds this worker may run (default: the Slurm job's end time, else no limit)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Name of this worker's log file (default from the Slurm ids)."),
) -> None:
    """Run trials until the study's budget is finished, the walltime is near or Slurm signals.

    What each worker job runs; `hpopt launch` submits many of these. Logs go to
    <run_dir>/logs/workers/<tag>.log.
    """
    import os

    from hpopt.worker import run_worker, slurm_deadline

    deadline = time.time() + time_left_s if time_left_s is not None else slurm_deadline(os.environ.get("SLURM_JOB_ID", ""))
    run_worker(_run_dir(), study, deadline=deadline, worker_tag=tag)


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
    app.command("worker")(worker)
