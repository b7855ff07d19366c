"""`hpopt launch`: submit N workers of a study (submitit array, sbatch template, or local processes)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from hpopt import context
from hpopt.errors import HpoptError
from hpopt.rundir import RunDir
from hpopt.slurm import Slurm, SlurmError

HELP = (
    "Submit N workers that pull trials from one study until its budget is finished.\n\n"
    "On Slurm the workers are one job array submitted through submitit (one task per worker); "
    "`--via sbatch` renders sbatch/worker.sbatch instead (copy it to ./sbatch/ to edit it). Without "
    "Slurm on PATH, or with --local, the workers are local processes.\n\n"
    "Before submitting, launch makes sure the workers will find the study: on Slurm it starts the DB "
    "job if none is running (like `hpopt db start`; --no-start-db to refuse); in local mode with no DB "
    "the study lives in the run directory's journal file. Every launch is recorded in the run "
    "directory (workers.json), so `hpopt status` shows its jobs.\n\n"
    "\b\nExamples:\n"
    "  hpopt launch --workers 8 --gpu --study painn     # 8 workers, one GPU each\n"
    "  hpopt launch -n 8 --gpu -s painn --dry-run       # print the batch script only\n"
    "  hpopt launch -n 4 --via sbatch --time 1:00:00 -p gpu-a100\n"
    "  hpopt launch -n 2 --local --time 10 --wait       # 2 local workers, 10 minutes"
)

out = Console(soft_wrap=True)  # long lines stay whole: scripts grep them
err = Console(stderr=True, soft_wrap=True)


def launch(
    workers: int = typer.Option(8, "--workers", "-n", min=1, help="How many workers (array tasks) to start."),
    study: Optional[str] = typer.Option(
        None, "--study", "-s", help="Study the workers run (default: the only study in this run)."),
    gpu: bool = typer.Option(
        False, "--gpu", help="One GPU per worker: the profile's gpu_partition and gpu_gres."),
    time: Optional[str] = typer.Option(
        None, "--time", "-t",
        help="Walltime per worker, Slurm format (4:00:00, 90, 1-00:00:00; default: the profile's worker_time). "
             "Local workers stop after it too."),
    partition: Optional[str] = typer.Option(
        None, "--partition", "-p", help="Partition (default: the profile's gpu_partition or cpu_partition)."),
    via: Optional[str] = typer.Option(
        None, "--via",
        help="submitit (default on Slurm), sbatch (the sbatch/worker.sbatch template) or local (= --local)."),
    local: bool = typer.Option(
        False, "--local", help="Run the workers as local processes, even where Slurm is available."),
    dry_run: bool = typer.Option(
        False, "--dry-run",
        help="Print the batch script (or local commands) and submit nothing; on Slurm, `sbatch --test-only` checks it."),
    start_db: Optional[bool] = typer.Option(
        None, "--start-db/--no-start-db",
        help="Start the DB job if it is not running (default: yes on Slurm, unless the run uses its journal file)."),
    unless_active: bool = typer.Option(
        False, "--unless-active",
        help="Launch nothing if workers of this study are still queued or running (safe to repeat)."),
    wait: bool = typer.Option(
        False, "--wait", help="Stay until these workers have exited, showing the study's progress."),
) -> None:
    from hpopt.launch import (active_launches, check_study, ensure_db, make_plan, render, study_progress, submit,
                              wait_for)

    config = context.current_config()
    run_dir = RunDir(config.run_path)
    slurm = Slurm() if Slurm.available() else None
    say = lambda text: err.print(text, highlight=False)  # noqa: E731 - notes go to stderr

    if dry_run:  # starts no DB; reads the study only when it has to name it
        plan = make_plan(config, study=study or check_study(run_dir, None), workers=workers, gpu=gpu,
                         time=time, partition=partition, via=via, local=local)
        script = render(plan)
        typer.echo(script, nl=False)
        if plan.via != "local" and slurm is not None:  # let Slurm judge it too, still submitting nothing
            try:
                say(f"sbatch --test-only accepts it ({slurm.test_only(script)})")
            except SlurmError as exc:
                raise HpoptError(f"Slurm would refuse this script: {exc}") from None
        return

    # options are checked before the DB job is started for nothing
    plan = make_plan(config, study=study or "", workers=workers, gpu=gpu, time=time, partition=partition,
                     via=via, local=local)
    storage = ensure_db(config, run_dir, slurm_mode=plan.via != "local", start=start_db, workers=workers,
                        slurm=slurm, say=say)
    with err.status("checking the study…"):
        plan = dataclasses.replace(plan, study=check_study(run_dir, study))
        finished, budget, _ = study_progress(run_dir, plan.study)
    name = escape(plan.study)
    if budget is not None and finished >= budget:  # its workers would only start and exit
        out.print(f"study [bold]{name}[/] has finished its budget ({finished}/{budget} trials): no workers launched; "
                  f"raise it to go on: hpopt study budget {name} N")
        return
    if unless_active:
        active = active_launches(run_dir, plan.study, slurm)
        if active:
            out.print(f"study [bold]{name}[/] already has live workers, launching none "
                      f"(drop --unless-active to add more):")
            for launch_ in active:
                out.print(f"  {launch_.describe()}")
            out.print(f"watch them: hpopt status --study {name} --watch")
            return
    with err.status(f"submitting {plan.n_workers} workers ({plan.via})…"):
        record = submit(plan, slurm)
    where = f"Slurm array job {record['job_id']}" if record["job_id"] else \
        "local pids " + " ".join(map(str, record["pids"]))
    gpus = ", one GPU each" if plan.gpu else ""
    hours, rest = divmod(plan.time_s, 3600)
    out.print(f"launched {plan.n_workers} workers for study [bold]{name}[/] as {where} "
              f"(via {plan.via}{gpus}, storage: {storage}, walltime {hours}:{rest // 60:02d}:{rest % 60:02d})")
    logs = dict.fromkeys([plan.log_dir, run_dir.worker_logs_dir])
    out.print("logs: " + "  and  ".join(map(str, logs)))
    out.print(f"watch: hpopt status --study {name} --watch")
    if wait:
        with err.status("waiting for the workers…") as spinner:
            last = wait_for(record, run_dir, slurm, poll_s=1.0 if plan.via == "local" else 5.0,
                            on_progress=lambda p: spinner.update(p.line()))
        out.print(f"workers done: {last.line()}")
        if last.error:
            raise HpoptError(f"could not read the study at the end: {last.error}")


def register(app: typer.Typer) -> None:
    app.command("launch", help=HELP)(launch)
