"""`hpopt dashboard`: optuna-dashboard on the run's study DB, reachable from a laptop over ssh.

The dashboard is started in-process with the storage object `hpopt.storage.open_storage` builds
from the endpoint + credentials files, so the DB password never appears on a command line (where
every user of a shared login node could read it in `ps`). It binds to 127.0.0.1 by default: the
dashboard has no login of its own, and the ssh tunnel is the access control.
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
from dataclasses import dataclass
from typing import Callable

from hpopt.errors import HpoptError
from hpopt.rundir import RunDir

DEFAULT_PORT = 8080
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
INSTALL_HINT = "optuna-dashboard is not installed: pip install optuna-dashboard"


@dataclass(frozen=True)
class DashboardPlan:
    """Where the dashboard listens and how a user on a laptop reaches it."""

    host: str  # bind address
    port: int
    node: str  # this machine's name
    login: str  # the machine the user sshs into
    user: str
    storage_label: str  # DB URL with the password masked, or the journal file

    @property
    def tunnel_target(self) -> str:
        """The address the ssh server on the login node forwards to."""
        return "localhost" if self.host in LOOPBACK else self.node

    def tunnel_line(self) -> str:
        return f"ssh -N -L {self.port}:{self.tunnel_target}:{self.port} {self.user}@{self.login}"

    def command_line(self) -> str:
        """The equivalent optuna-dashboard command (password masked; hpopt never passes it)."""
        return (f"optuna-dashboard {shlex.quote(self.storage_label)} "
                f"--host {self.host} --port {self.port}")


def _bind_address(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_bind_address(host), port))
        except OSError:
            return False
    return True


def pick_port(host: str, wanted: int | None) -> int:
    """The port asked for (must be free), else 8080 when free, else one the OS picks."""
    if wanted:
        if not _port_free(host, wanted):
            raise HpoptError(f"port {wanted} on {host} is in use; pick another with --port")
        return wanted
    if _port_free(host, DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_bind_address(host), 0))
        return int(sock.getsockname()[1])


def storage_label(run_dir: RunDir) -> str:
    """What the dashboard reads, safe to print: the masked DB URL or the journal file."""
    if run_dir.endpoint_file.exists():
        from hpopt.db.endpoint import sqlalchemy_url

        return sqlalchemy_url(run_dir, show_password=False)
    if run_dir.journal_file.exists():
        return str(run_dir.journal_file)
    raise HpoptError(f"no study DB in {run_dir.root}: start one with `hpopt db start` "
                     "(or create a local study with `hpopt study create`)")


def plan_dashboard(run_dir: RunDir, *, host: str = "127.0.0.1", port: int | None = None,
                   login: str | None = None) -> DashboardPlan:
    """Resolve bind address, port and the ssh line before anything starts."""
    label = storage_label(run_dir)
    node = socket.gethostname()
    return DashboardPlan(
        host=host, port=pick_port(host, port), node=node,
        login=login or os.environ.get("HPOPT_LOGIN_HOST") or socket.getfqdn(),
        user=getpass.getuser(), storage_label=label,
    )


def require_dashboard() -> Callable[..., None]:
    """optuna-dashboard's server entry point, or one line saying how to install it."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise HpoptError(INSTALL_HINT) from None
    return run_server


def run_dashboard(run_dir: RunDir, plan: DashboardPlan) -> None:
    """Serve until Ctrl-C (blocks)."""
    from hpopt.storage import open_storage

    require_dashboard()(open_storage(run_dir), host=plan.host, port=plan.port)
