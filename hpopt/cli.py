"""The `hpopt` command: parses arguments and hands over to one module per concept.

Each command group lives beside the code it drives (`hpopt/db/cli.py`, `hpopt/train/cli.py`, ...);
this file only wires them together and turns `HpoptError` into one line on stderr and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from hpopt import __version__
from hpopt.config import available_presets, load_config, render_toml
from hpopt.errors import HpoptError
from hpopt import context

app = typer.Typer(
    name="hpopt",
    help=(
        "Distributed hyperparameter searches for atomistic ML potentials on Slurm.\n\n"
        "Typical run on a login node: `hpopt db start`, `hpopt study create NAME --space space.yaml`, "
        "`hpopt launch --workers 8 --gpu --study NAME`, then `hpopt status --watch`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hpopt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Project file (default: $HPOPT_CONFIG, else ./hpopt.toml)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Remember which config file every sub-command should read."""
    context.set_config_path(config)


config_app = typer.Typer(help="Inspect the effective configuration (presets, file, environment).")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration as TOML."""
    typer.echo(render_toml(load_config(context.config_path())), nl=False)


@config_app.command("presets")
def config_presets() -> None:
    """List the built-in cluster presets (use `preset = "NAME"` in hpopt.toml)."""
    for name in available_presets():
        typer.echo(name)


# Each module exposes `register(app)`; one line per feature.
FEATURE_CLIS: list[str] = [
    "hpopt.db.cli",
    "hpopt.train.cli",
    "hpopt.study_cli",
    "hpopt.launch_cli",
    "hpopt.status_cli",
    "hpopt.results.cli",
]


def _register_groups() -> None:
    """Attach every feature's commands to the root app."""
    import importlib

    for module in FEATURE_CLIS:
        importlib.import_module(module).register(app)


_register_groups()


def main() -> None:
    """Console entry point: user errors become one line and exit status 1."""
    try:
        app()
    except HpoptError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
