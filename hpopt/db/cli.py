"""`hpopt db start | stop | status | url`: the study database as its own Slurm job."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from hpopt import context
from hpopt.db import server
from hpopt.db.endpoint import sqlalchemy_url
from hpopt.rundir import RunDir
from hpopt.slurm import Slurm

HELP = (
    "Run the MariaDB server that holds the studies as its own Slurm job.\n\n"
    "Workers on many nodes share one Optuna study through it. The job keeps its data under the run "
    "directory (or db.datadir), renews itself before its time limit (it submits its successor and "
    "shuts down cleanly; workers reconnect through the endpoint file), and never shows the password: "
    "that lives in <run dir>/db/credentials.json (0600). Without Slurm (or with --local) the same "
    "server runs as a local background process."
)

db_app = typer.Typer(help=HELP, no_args_is_help=True)
console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")


def _run_dir() -> tuple[Any, RunDir]:
    config = context.current_config()
    return config, RunDir(config.run_path)


@db_app.command("start")
def start(
    workers: int = typer.Option(
        0, "--workers", "-n", min=0,
        help="How many workers will connect: sizes max_connections (8 + 4 per worker, at least 151)."),
    local: bool = typer.Option(
        False, "--local", help="Run the server as a local background process (the default without Slurm)."),
    time_limit: Optional[str] = typer.Option(
        None, "--time", "-t", help="Slurm time limit of each DB job (default: slurm.db_time); it renews itself."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", help="Seconds to wait for the server to answer (default: db.start_timeout_s)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the server answers a query."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the job script instead of submitting it."),
) -> None:
    """Start the DB server (or report the one already running for this run directory)."""
    config, run_dir = _run_dir()
    local = local or not Slurm.available()
    if dry_run:
        typer.echo(server.render_job_script(config, run_dir, mode="local" if local else "slurm",
                                            workers=workers, time_limit=time_limit), nl=False)
        return
    with console.status("starting the DB server") as spinner:
        result = server.start(config, run_dir, workers=workers, local=local, time_limit=time_limit, wait=wait,
                              timeout_s=timeout, progress=lambda text: spinner.update(text))
    label = result.record.label
    if result.reused:
        console.print(f"DB {label} is already {result.state} for {run_dir.root}; not starting another")
    elif not wait:
        console.print(f"submitted DB {label} (log: {result.log_file}); `hpopt db status` shows when it is up")
        return
    if result.endpoint is not None:
        took = f" after {result.seconds_to_ready:.1f}s" if result.seconds_to_ready is not None else ""
        console.print(f"DB {label} ready on [bold]{result.endpoint.address}[/]{took}")
        console.print(f"  url: {sqlalchemy_url(run_dir, show_password=False)}  (`hpopt db url --show-password`)")
        console.print(f"  log: {result.log_file}")


@db_app.command("stop")
def stop(
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for a clean shutdown."),
) -> None:
    """Shut the DB server down cleanly (its data stays; `db start` brings it back)."""
    _, run_dir = _run_dir()
    with console.status("stopping the DB server") as spinner:
        stopped = server.stop(run_dir, timeout_s=timeout, progress=lambda text: spinner.update(text))
    if stopped:
        console.print(f"stopped DB {', '.join(stopped)}; the data stays in place for the next `hpopt db start`")
    else:
        console.print("no DB server was running for this run directory")


@db_app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """Job state, where it listens, uptime, time left, reachability, connections, studies."""
    _, run_dir = _run_dir()
    report = server.collect_db_status(run_dir, Slurm() if Slurm.available() else None)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    console.print(render_status(report))


def render_status(report: dict[str, Any]) -> Table:
    """Two-column table; studies follow as one row each."""
    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    state = report.get("state") or "UNKNOWN"
    if report.get("reason"):
        state += f" ({report['reason']})"
    table.add_row("job", f"{report.get('job_id') or '-'}  {state}")
    if report.get("host"):
        table.add_row("listens on", f"{report['host']}:{report['port']}" + (
            f" (node {report['node']})" if report.get("node") else ""))
    if report.get("uptime_s") is not None:
        table.add_row("uptime", time.strftime("%H:%M:%S", time.gmtime(report["uptime_s"])))
    if report.get("time_left"):
        renew = {True: ", renews itself before the limit", False: ", no renewal"}.get(report.get("renewal_scheduled"), "")
        table.add_row("time left", f"{report['time_left']}{renew}")
    if report.get("reachable"):
        table.add_row("reachable", f"[green]yes[/] ({report['rtt_ms']:.1f} ms round trip, "
                                   f"{report.get('connections')} connections)")
    else:
        table.add_row("reachable", "[red]no[/]" + (f": {report['error']}" if report.get("error") else ""))
    for study in report.get("studies") or []:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(study["trials_by_state"].items())) or "no trials"
        table.add_row(f"study {study['name']}", counts)
    return table


@db_app.command("url")
def url(
    show_password: bool = typer.Option(
        False, "--show-password", help="Include the password (for optuna-dashboard; keep it out of shell history)."),
) -> None:
    """Print the SQLAlchemy URL of the DB (e.g. `optuna-dashboard "$(hpopt db url --show-password)"`)."""
    _, run_dir = _run_dir()
    typer.echo(sqlalchemy_url(run_dir, show_password=show_password))
