"""Where the DB server is and how to log in: the endpoint and credentials records.

The DB job writes the endpoint file (no secrets) each time a server comes up, renewals included,
so workers reconnect by reading it again. The credentials file holds the application user's
password; it is created once by `hpopt db start` and refused unless only its owner can read it.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field
from urllib.parse import quote_plus

from hpopt.errors import HpoptError
from hpopt.rundir import RunDir, read_json, write_json_atomic

SCHEMA = "hpopt"
APP_USER = "hpopt"
HIDDEN = "***"


@dataclass(frozen=True)
class Endpoint:
    """One running server as its job announced it."""

    host: str
    port: int
    job_id: str  # Slurm job id; "" in local mode
    started_at: str  # ISO 8601, UTC
    mode: str  # "slurm" | "local"
    schema: str = SCHEMA
    datadir: str = ""
    pid: int | None = None  # the job's runner process (local mode: what `db stop` signals)
    node: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    """The application user; `repr` never shows the password (it ends up in tracebacks)."""

    user: str
    password: str = field(repr=False)
    schema: str = SCHEMA


def read_endpoint(run_dir: RunDir) -> Endpoint:
    """The endpoint record; a missing file is a clear error that says how to start the DB."""
    try:
        data = read_json(run_dir.endpoint_file)
    except FileNotFoundError:
        raise HpoptError(
            f"no DB endpoint in {run_dir.db_dir}: start the server with `hpopt db start`") from None
    try:
        return Endpoint(
            host=str(data["host"]), port=int(data["port"]), job_id=str(data.get("job_id") or ""),
            started_at=str(data.get("started_at") or ""), mode=str(data.get("mode") or "slurm"),
            schema=str(data.get("schema") or SCHEMA), datadir=str(data.get("datadir") or ""),
            pid=int(data["pid"]) if data.get("pid") else None, node=str(data.get("node") or ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HpoptError(f"{run_dir.endpoint_file} is incomplete ({exc!r}); run `hpopt db start` again") from None


def check_private(path: os.PathLike[str] | str) -> None:
    """Refuse a credentials file others can read or write: the password would not be private."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode != 0o600:
        raise HpoptError(
            f"credentials file {path} has mode {mode:04o}; it must be 0600 (run `chmod 600 {path}`)")


def read_credentials(run_dir: RunDir) -> Credentials:
    """The application user's credentials (mode 0600 enforced)."""
    path = run_dir.credentials_file
    try:
        check_private(path)
        data = read_json(path)
    except FileNotFoundError:
        raise HpoptError(f"no DB credentials in {run_dir.db_dir}: run `hpopt db start` first") from None
    try:
        return Credentials(user=str(data["user"]), password=str(data["password"]),
                           schema=str(data.get("schema") or SCHEMA))
    except (KeyError, TypeError) as exc:
        raise HpoptError(f"{path} is incomplete (missing {exc}); delete it and the datadir to start over") from None


def ensure_credentials(run_dir: RunDir) -> Credentials:
    """Read the credentials, generating them (random 43-character password) on first use."""
    if run_dir.credentials_file.exists():
        return read_credentials(run_dir)
    run_dir.ensure()
    creds = Credentials(user=APP_USER, password=secrets.token_urlsafe(32), schema=SCHEMA)
    write_json_atomic(run_dir.credentials_file,
                      {"user": creds.user, "password": creds.password, "schema": creds.schema}, mode=0o600)
    return creds


def sqlalchemy_url(run_dir: RunDir, show_password: bool = True) -> str:
    """`mysql+pymysql://user:pass@host:port/hpopt` for Optuna's RDBStorage or optuna-dashboard."""
    endpoint = read_endpoint(run_dir)
    creds = read_credentials(run_dir)
    password = quote_plus(creds.password) if show_password else HIDDEN
    return f"mysql+pymysql://{quote_plus(creds.user)}:{password}@{endpoint.host}:{endpoint.port}/{creds.schema}"
