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
    for group in ("config", "db", "data", "split", "train", "study", "launch", "worker", "status",
                  "best", "report", "retrain", "dashboard", "export", "compare"):
        assert group in result.stdout


def test_bad_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "hpopt.toml").write_text("[slurm]\nacount = 'x'\n")
    result = hpopt("config", "show", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "slurm.acount" in lines[0] and "hpopt.toml" in lines[0]

