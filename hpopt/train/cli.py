"""`hpopt split`, `hpopt data make-demo` and `hpopt train`: the training module's commands.

Heavy imports (torch, ASE) happen inside the commands so `hpopt --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from hpopt.errors import HpoptError
from hpopt.train.config import read_config_file

console = Console()


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise HpoptError(f"--fractions must be three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(values) != 3:
        raise HpoptError(f"--fractions must be three numbers like 0.8,0.1,0.1, got {text!r}")
    return values  # type: ignore[return-value]


def split(
    source: Path = typer.Argument(..., help="Dataset readable by ASE: .traj, .extxyz, ASE .db."),
    name: str = typer.Option(..., "--name", help="Manifest name: writes <out>/<name>.json."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random permutation."),
    fractions: str = typer.Option("0.8,0.1,0.1", "--fractions", help="train,validation,test fractions."),
    out: Path = typer.Option(Path("data/splits"), "--out", help="Folder of split manifests."),
) -> None:
    """Write a fixed train/validation/test split manifest (indices + sha256 of the data).

    Every training run verifies the sha256 and refuses if the dataset changed; the test indices
    are only read by `hpopt retrain`.
    """
    from hpopt.train.split import load_manifest, make_split

    path = make_split(source, name, out_dir=out, seed=seed, fractions=_parse_fractions(fractions))
    manifest = load_manifest(path)
    console.print(f"wrote {path}: {len(manifest.train)} train, {len(manifest.validation)} validation, "
                  f"{len(manifest.test)} test images; elements {' '.join(manifest.elements)}")


def make_demo_cmd(
    out: Path = typer.Argument(..., help="Output file; the format follows the extension (.traj, .extxyz, .db)."),
    images: int = typer.Option(2000, "--images", help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same file."),
) -> None:
    """Generate a deterministic EMT dataset: rattled Cu/Pt/Au slabs and bulk, O/H/C/N adsorbates."""
    from hpopt.train.demo import make_demo

    with console.status(f"computing {images} EMT images"):
        path = make_demo(out, n_images=images, seed=seed)
    console.print(f"wrote {images} images to {path}")


def train(
    config: Path = typer.Option(..., "--config", help="Trial config (YAML or JSON, amptorch-shaped)."),
    split_path: Path = typer.Option(..., "--split", help="Split manifest from `hpopt split`."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override optim.epochs."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: from optim.gpus)."),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Fingerprint cache folder (default: <run_dir>/cache from hpopt.toml)."),
) -> None:
    """Run one trial by hand: train on the train split, print validation metrics beside the baseline."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hpopt import context
    from hpopt.config import load_config
    from hpopt.rundir import RunDir
    from hpopt.train.api import run_trial
    from hpopt.train.config import parse_config

    raw = read_config_file(config)
    parsed = parse_config(raw)
    if epochs is not None:
        raw.setdefault("optim", {})["epochs"] = epochs
    total = epochs if epochs is not None else parsed.optim.epochs
    cache_dir = cache if cache is not None else RunDir(load_config(context.config_path()).run_path).cache_dir
    with Progress(TextColumn("[bold]epoch {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("train", total=total, metrics="fingerprints...")

        def on_epoch(epoch: int, val_mae: float, train_mae: float) -> None:
            progress.update(task, completed=epoch, metrics=f"val MAE {val_mae:.4f} eV  train MAE {train_mae:.4f} eV")

        result = run_trial(raw, split_path, on_epoch=on_epoch, cache_dir=cache_dir, device=device)
    table = Table(title=f"{result.epochs_run} epochs on {result.device} in {result.seconds:.1f} s")
    for column in ("", "MAE (eV)", "MAE (eV/atom)"):
        table.add_column(column, justify="right")
    table.add_row("validation", f"{result.val_mae:.4f}", f"{result.val_mae_per_atom:.4f}")
    table.add_row("train", f"{result.train_mae:.4f}", f"{result.train_mae_per_atom:.4f}")
    table.add_row("baseline (composition fit), validation", f"{result.baseline_val_mae:.4f}",
                  f"{result.baseline_val_mae_per_atom:.4f}")
    console.print(table)
    console.print_json(json.dumps(result.as_dict()))


def register(app: typer.Typer) -> None:
    app.command("split")(split)
    app.command("train")(train)
    data_app = typer.Typer(help="Datasets: generate the EMT demo data.", no_args_is_help=True)
    data_app.command("make-demo")(make_demo_cmd)
    app.add_typer(data_app, name="data")
