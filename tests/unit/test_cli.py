"""The command line as a user meets it: help, version, unbuilt commands, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hpopt import __version__


def hpopt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpopt", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def test_version() -> None:
    result = hpopt("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"hpopt {__version__}"


def test_help_lists_groups() -> None:
    result = hpopt("--help")
    assert result.returncode == 0
    for group in ("config",):
        assert group in result.stdout


def test_bad_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "hpopt.toml").write_text("[slurm]\nacount = 'x'\n")
    result = hpopt("config", "show", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "slurm.acount" in lines[0] and "hpopt.toml" in lines[0]


def test_unbuilt_commands_fail_in_one_line() -> None:
    from hpopt import cli, placeholders

    built = {c.name for c in cli.app.registered_commands if c.name not in placeholders.PENDING}
    built |= {g.name for g in cli.app.registered_groups}
    pending = [name for name in placeholders.PENDING if name not in built]
    for name in pending:
        result = hpopt(name, "anything")
        assert result.returncode == 1, name
        assert result.stderr.strip().count("\n") == 0 and "not built yet" in result.stderr
