"""The run directory: every record hpopt keeps on the shared filesystem, in one place.

Login node, DB job and workers all find each other through these files, so their names are
defined here only. The directory is private (0700) because it holds the DB credentials.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpopt.errors import HpoptError


@dataclass(frozen=True)
class RunDir:
    """Paths under one run directory (default ./.hpopt, set by `run_dir` in hpopt.toml)."""

    root: Path

    def ensure(self) -> "RunDir":
        """Create the directory tree with private permissions (idempotent)."""
        for path in (self.root, self.db_dir, self.logs_dir, self.worker_logs_dir, self.cache_dir):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        os.chmod(self.db_dir, 0o700)
        return self

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def endpoint_file(self) -> Path:
        """Where the running DB server is: host, port, job id, started-at (no secrets)."""
        return self.db_dir / "endpoint.json"

    @property
    def credentials_file(self) -> Path:
        """The application user's password (0600); never on a command line or in a log."""
        return self.db_dir / "credentials.json"

    @property
    def db_job_file(self) -> Path:
        """The DB job id currently in charge (rewritten by each renewal)."""
        return self.db_dir / "job.json"

    @property
    def default_datadir(self) -> Path:
        return self.root / "mariadb"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def worker_logs_dir(self) -> Path:
        return self.logs_dir / "workers"

    @property
    def workers_file(self) -> Path:
        """Every launch: job ids, study, worker count, how it was submitted."""
        return self.root / "workers.json"

    @property
    def journal_file(self) -> Path:
        """Optuna journal storage used when no DB server is configured (local mode)."""
        return self.root / "journal.log"

    @property
    def cache_dir(self) -> Path:
        """Fingerprint cache shared by all workers."""
        return self.root / "cache"


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    """Write JSON so readers never see half a file (temp file + rename), with the given mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """Read a record; a corrupt file is a clear error, a missing one is FileNotFoundError."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HpoptError(f"{path} is not valid JSON ({exc}); remove it or restore it") from None
