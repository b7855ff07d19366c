"""Commands whose issue has not landed yet: they say so in one line and exit non-zero."""

from __future__ import annotations

import typer

from hpopt.errors import HpoptError

# command name -> help text; entries leave this table as their features land.
PENDING: dict[str, str] = {
}


def register(app: typer.Typer) -> None:
    taken = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for name, help_text in PENDING.items():
        if name not in taken:
            _add(app, name, help_text)


def _add(app: typer.Typer, name: str, help_text: str) -> None:
    @app.command(
        name,
        help=f"{help_text} (not built yet)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def _pending() -> None:
        raise HpoptError(f"`hpopt {name}` is not built yet in this version")
