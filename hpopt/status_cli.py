"""`hpopt status`: one view of the DB job, the workers and the study, once, live, or as JSON."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live

from hpopt import context
from hpopt.rundir import RunDir

ATTENTION_EXIT = 2  # distinct from 1 (the command itself failed), for scripts and cron


HELP = (
    "The DB job, the workers and the study in one view.\n\n"
    "Reads the run directory's records, asks Slurm once per refresh (squeue for queued jobs, sacct only "
    "for jobs that left the queue) and summarises the study with a few aggregate queries, so it is safe "
    "to leave `--watch` running on a login node.\n\n"
    "Exit status: 0 when all is well; 2 when something needs attention (DB down, stale RUNNING trials, "
    "failed workers, workers without a DB, all recent trials failing); 1 when the command itself failed."
)


def register(app: typer.Typer) -> None:
    app.command("status", help=HELP)(status)


def status(
    study: Optional[str] = typer.Option(
        None, "--study", "-s", help="Study to show (default: the only one, else the one launched last)."),
    watch: bool = typer.Option(
        False, "--watch", "-w", help="Refresh in place until Ctrl-C."),
    interval: float = typer.Option(
        10.0, "--interval", "-n", min=2.0,
        help="Seconds between refreshes with --watch (each costs one squeue call and a few SQL queries)."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the report as one JSON document (one per line with --watch)."),
) -> None:
    """The DB job, the workers and the study in one view."""
    from hpopt.status import StatusCollector  # here, not at import: every `hpopt` command loads this module
    from hpopt.status_view import render

    # one collector for the whole watch: it keeps its DB connections open between refreshes
    with StatusCollector(RunDir(context.current_config().run_path), study=study) as collector:
        if not watch:
            report = collector.collect()
            if as_json:
                typer.echo(json.dumps(report, indent=2, sort_keys=True))
            else:
                Console().print(render(report))
            raise typer.Exit(ATTENTION_EXIT if report["attention"] else 0)

        report = None
        try:
            if as_json:
                while True:
                    report = collector.collect()
                    typer.echo(json.dumps(report, sort_keys=True))
                    time.sleep(interval)
            report = collector.collect()
            # full screen like top(1): a view taller than the terminal cannot be redrawn in place otherwise
            with Live(render(report), auto_refresh=False, screen=True) as live:
                while True:
                    time.sleep(interval)
                    report = collector.collect()
                    live.update(render(report), refresh=True)
        except KeyboardInterrupt:
            if report is not None and not as_json:
                Console().print(render(report))  # the last view stays in the scrollback
    raise typer.Exit(ATTENTION_EXIT if report and report["attention"] else 0)
