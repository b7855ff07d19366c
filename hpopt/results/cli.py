"""Commands for after (and during) a search: best, report, retrain, dashboard, export, compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hpopt import context
from hpopt.errors import HpoptError
from hpopt.rundir import RunDir

out = Console()
err = Console(stderr=True)

STUDY = typer.Option(None, "--study", "-s", help="Study name (default: the only study in the run).")
TOLERANCE = typer.Option(
    None, "--tolerance", min=0.0,
    help="Trials within this fraction of the lowest validation MAE are near-ties (default 0.05); "
         "among them the one with the smallest val/train ratio is selected. 0 = plain lowest.")
MAX_GAP = typer.Option(
    None, "--max-gap-ratio", min=0.0,
    help="Flag trials whose val MAE exceeds this multiple of their train MAE as overfit "
         "(default 2.0); flagged near-ties are passed over.")


def _run_dir() -> RunDir:
    return RunDir(context.current_config().run_path)


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _load(study: Optional[str]):  # -> optuna.Study (a snapshot; import kept lazy for --help)
    from hpopt.results.snapshot import open_study, snapshot

    with _progress() as progress:
        return snapshot(open_study(_run_dir(), study), progress)


def best(
    study: Optional[str] = STUDY,
    top: int = typer.Option(5, "--top", "-k", min=1, help="How many trials to list."),
    tolerance: Optional[float] = TOLERANCE,
    max_gap_ratio: Optional[float] = MAX_GAP,
    as_json: bool = typer.Option(False, "--json", help="Print the selection as JSON."),
) -> None:
    """The selected trial (validation MAE weighed against the train/validation gap) and the top-k."""
    from hpopt.results.best import select_from_study

    snap = _load(study)
    kwargs = {k: v for k, v in (("tolerance", tolerance), ("max_gap_ratio", max_gap_ratio)) if v is not None}
    sel = select_from_study(snap, **kwargs)
    if as_json:
        typer.echo(json.dumps({"study": snap.study_name, "selected": sel.best.as_dict(),
                               "lowest_val_mae_trial": sel.lowest.number, "rule": sel.rule,
                               "top": [r.as_dict() for r in sel.top(top)]}, indent=2))
        return
    b = sel.best
    out.print(f"[bold]Study {snap.study_name}[/]: selected trial [bold]{b.number}[/] "
              f"(worker {b.worker}, {_fmt(b.epochs)} epochs)")
    out.print(f"  validation MAE {_fmt(b.val_mae)} eV, training MAE {_fmt(b.train_mae)} eV, "
              f"gap {_fmt(b.gap)} eV (val/train {_fmt(b.gap_ratio)})")
    for name, value in sorted(b.params.items()):
        out.print(f"  {name} = {value!r}", highlight=False)
    if sel.lowest.number != b.number:
        out.print(f"  [yellow]lowest validation MAE is trial {sel.lowest.number} "
                  f"({_fmt(sel.lowest.val_mae)} eV, val/train {_fmt(sel.lowest.gap_ratio)}); "
                  f"trial {b.number} generalises better within {sel.tolerance:.0%}[/]")
    table = Table(title=f"top {top} by validation MAE")
    for col in ("rank", "trial", "val MAE", "train MAE", "gap", "val/train", "flag", "worker", "epochs"):
        table.add_column(col, justify="right")
    for rank, r in enumerate(sel.top(top), 1):
        flag = ("selected " if r.number == b.number else "") + ("overfit" if r.overfit else "")
        table.add_row(str(rank), str(r.number), _fmt(r.val_mae), _fmt(r.train_mae), _fmt(r.gap),
                      _fmt(r.gap_ratio), flag.strip(), r.worker, _fmt(r.epochs))
    out.print(table)
    out.print(f"[dim]rule: {sel.rule}[/]")


def report(
    study: Optional[str] = STUDY,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory (default: reports/<study>)."),
    top: int = typer.Option(10, "--top", min=1, help="Rows in top_N.csv and the index table."),
    tolerance: Optional[float] = TOLERANCE,
    max_gap_ratio: Optional[float] = MAX_GAP,
) -> None:
    """Write best_params.json, all_trials.csv, top_N.csv, figures (HTML + PNG) and index.html."""
    from hpopt.results.figures import require_plotting
    from hpopt.results.report import write_report
    from hpopt.results.snapshot import open_study, snapshot

    require_plotting()
    with _progress() as progress:
        snap = snapshot(open_study(_run_dir(), study), progress)
        target = out_dir or Path("reports") / snap.study_name
        result = write_report(snap, target, top_n=top, tolerance=tolerance,
                              max_gap_ratio=max_gap_ratio, progress=progress)
    out.print(f"wrote {len(result.files)} files to {target}/ — open {target / 'index.html'}")
    for name, reason in result.skipped.items():
        out.print(f"  [yellow]skipped {name}[/]: {reason}")


def retrain(
    best_flag: bool = typer.Option(False, "--best", help="Retrain the selected trial (see `hpopt best`)."),
    trial: Optional[int] = typer.Option(None, "--trial", help="Retrain this trial number instead."),
    study: Optional[str] = STUDY,
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs (default: the config's)."),
    include_val: bool = typer.Option(False, "--include-val", help="Train on train+validation."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Model file (default: models/<study>-trial<N>.pt)."),
    submit: bool = typer.Option(False, "--submit", help="Run as a Slurm GPU job instead of here."),
    cpu: bool = typer.Option(False, "--cpu", help="With --submit: use the CPU partition, no GPU."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --submit: print the sbatch script only."),
    tolerance: Optional[float] = TOLERANCE,
    max_gap_ratio: Optional[float] = MAX_GAP,
) -> None:
    """Retrain the best configuration, test it once on the held-out split, save it, record the MAE."""
    from hpopt.results.retrain import TEST_RESULT_ATTR, plan_retrain, render_sbatch, run_retrain
    from hpopt.results.snapshot import open_study

    if best_flag == (trial is not None):
        raise HpoptError("pass either --best or --trial N")
    if dry_run and not submit:
        raise HpoptError("--dry-run only applies with --submit (it prints the batch script)")
    run_dir = _run_dir()
    live = open_study(run_dir, study)
    plan = plan_retrain(live, trial=trial, out_path=out_path, include_val=include_val, epochs=epochs,
                        tolerance=tolerance, max_gap_ratio=max_gap_ratio)
    previous = live.user_attrs.get(TEST_RESULT_ATTR)
    if isinstance(previous, dict):
        err.print(f"[yellow]note:[/] the test split was already used for trial {previous.get('trial')} "
                  f"(test MAE {_fmt(previous.get('test_mae'))}); choosing models by test MAE biases it")
    if submit:
        from hpopt.slurm import Slurm

        config = context.current_config()
        script = render_sbatch(plan, config, run_dir, gpu=not cpu)
        if dry_run:
            typer.echo(script, nl=False)
            return
        run_dir.ensure()
        job_id = Slurm().submit(script)
        out.print(f"submitted retrain of trial {plan.trial} as job {job_id}; log: "
                  f"{run_dir.logs_dir / f'retrain-{plan.study}-{job_id}.log'}")
        return
    where = "train+validation" if include_val else "train"
    with err.status(f"retraining trial {plan.trial} of {plan.study} on {where}…"):
        record = run_retrain(live, plan)
    out.print(f"trial {plan.trial}: test MAE [bold]{_fmt(record['test_mae'])}[/] eV "
              f"(search validation MAE {_fmt(plan.val_mae)} eV); model saved to {plan.out_path}")


def dashboard(
    port: Optional[int] = typer.Option(None, "--port", "-p", help="Port (default: 8080, else a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address; 0.0.0.0 when running inside a job."),
    login: Optional[str] = typer.Option(None, "--login", help="Login host for the ssh line "
                                        "(default: $HPOPT_LOGIN_HOST, else this machine)."),
    print_only: bool = typer.Option(False, "--print-only", help="Print the command and ssh line; start nothing."),
) -> None:
    """Run optuna-dashboard on the study DB and print the ssh port-forward line for your laptop."""
    from hpopt.results.dashboard import plan_dashboard, require_dashboard, run_dashboard

    run_dir = _run_dir()
    if not print_only:
        require_dashboard()
    plan = plan_dashboard(run_dir, host=host, port=port, login=login)
    out.print(f"dashboard: {plan.command_line()}", highlight=False, soft_wrap=True)
    out.print(f"on your laptop run:  {plan.tunnel_line()}", highlight=False, soft_wrap=True)
    out.print(f"then open:           http://localhost:{plan.port}/", highlight=False)
    if print_only:
        return
    out.print("[dim]serving; Ctrl-C stops it[/]")
    try:
        run_dashboard(run_dir, plan)
    except KeyboardInterrupt:
        out.print("dashboard stopped")


export_app = typer.Typer(help="Export finished trials to experiment trackers (optional extras).",
                         no_args_is_help=True)


@export_app.command("mlflow")
def export_mlflow_cmd(
    study: Optional[str] = STUDY,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI "
                                               "(default: $MLFLOW_TRACKING_URI, else MLflow's own default)."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="Experiment (default: hpopt-<study>)."),
) -> None:
    """One MLflow run per complete trial; re-running adds only trials finished since."""
    from hpopt.results.export import export_mlflow, mlflow_available

    if not mlflow_available():
        out.print("mlflow is not installed; nothing exported (pip install mlflow to use this)")
        return
    snap = _load(study)
    with err.status("exporting to MLflow…"):
        result = export_mlflow(snap, tracking_uri=tracking_uri, experiment=experiment)
    out.print(f"exported {result.exported} trials to MLflow experiment '{result.experiment}' "
              f"({result.already} were already there)")


def compare(
    studies: list[str] = typer.Argument(..., help="Two or more study names in this run."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory (default: reports/compare-A-vs-B)."),
) -> None:
    """Best-so-far validation MAE vs GPU time for studies run under different samplers/pruners."""
    from hpopt.results.compare import write_comparison
    from hpopt.results.figures import require_plotting
    from hpopt.results.snapshot import open_study, snapshot

    require_plotting()
    if len(studies) < 2:
        raise HpoptError("compare needs at least two study names")
    run_dir = _run_dir()
    with _progress() as progress:
        snaps = [snapshot(open_study(run_dir, name), progress) for name in studies]
    target = out_dir or Path("reports") / ("compare-" + "-vs-".join(studies))
    files, rows = write_comparison(snaps, target)
    table = Table(title="same budget, different search strategies")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    out.print(table)
    out.print(f"wrote {len(files)} files to {target}/ — open {target / 'compare.html'}")


def register(app: typer.Typer) -> None:
    """Attach the results commands to the main CLI."""
    app.command("best")(best)
    app.command("report")(report)
    app.command("retrain")(retrain)
    app.command("dashboard")(dashboard)
    app.add_typer(export_app, name="export")
    app.command("compare")(compare)
