"""The DB job on its node: start mariadbd, announce it, renew before the time limit, stop cleanly.

Run by `sbatch/mysql.sbatch` (or as a local background process) with the node's plain `python3`:
standard library only and Python >= 3.7, so the database keeps working while the user's hpopt
environment is being reinstalled. It never receives the password as an argument: it reads the
credentials file (0600) and hands the SQL to the client over the unix socket on stdin, where
only root (the OS user running the job) can log in.

Renewal: Slurm sends USR1 `--renew-before-s` before the time limit. The job submits its successor
(the same rendered script), records it in the run directory's job file, and keeps serving until
the successor is running and asks for the datadir (or the time is nearly up); then it shuts down
cleanly and releases the datadir, and the successor starts on it and rewrites the endpoint file.
The datadir's owner file (refreshed every few seconds) is what keeps two servers off one datadir.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

OWNER_FILE = "hpopt-owner.json"  # in the datadir: which job serves it, refreshed while it does
HANDOFF_FILE = "hpopt-handoff.json"  # in the datadir: a waiting successor asks for it here
HEARTBEAT_S = 5.0
OWNER_STALE_S = 60.0  # an owner file this old belongs to a job that died without releasing it
SHUTDOWN_MARGIN_S = 45.0  # of the warning time, kept back for a clean shutdown (Slurm may warn early, never late)
READY_TIMEOUT_S = 300.0
PREFIX = "hpopt-db:"
ERROR_PREFIX = "hpopt-db: error:"


def log(message: str) -> None:
    print(f"{PREFIX} {datetime.now().strftime('%H:%M:%S')} {message}", flush=True)


class JobFailure(Exception):
    """A failure to report as one `hpopt-db: error:` line (the login node quotes it)."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, data: dict) -> None:
    """Temp file + rename, so `db start`, status and workers never read half a record."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=os.path.dirname(path))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> dict | None:
    try:
        with open(path) as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def find_binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def node_address(bind: str) -> str:
    """The address workers dial: 127.0.0.1 for loopback, an explicit address, or the node's own."""
    if bind == "loopback":
        return "127.0.0.1"
    if bind != "node":
        return bind
    try:  # the source address of the default route; no packet is sent
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect(("10.254.254.254", 1))
            address = probe.getsockname()[0]
        finally:
            probe.close()
        if not address.startswith("127."):
            return address
    except OSError:
        pass
    return socket.gethostbyname(socket.getfqdn())


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def setup_sql(user: str, password: str, schema: str) -> str:
    """Idempotent on every start: schema, app user (privileges on the schema only), no test/anonymous."""
    for name in (user, schema):
        if not name.replace("_", "").isalnum():
            raise JobFailure(f"credentials name {name!r} must be letters, digits and _ only")
    account = f"'{user}'@'%'"
    return "\n".join([
        f"CREATE DATABASE IF NOT EXISTS `{schema}` CHARACTER SET utf8mb4;",
        f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {sql_string(password)};",
        f"ALTER USER {account} IDENTIFIED BY {sql_string(password)};",
        f"GRANT ALL PRIVILEGES ON `{schema}`.* TO {account};",
        "DELETE FROM mysql.global_priv WHERE User = '';",
        "DROP DATABASE IF EXISTS test;",
        "FLUSH PRIVILEGES;",
        "",
    ])


class Flags:
    """What the signal handlers saw; the main loop acts on it (handlers only set flags)."""

    def __init__(self) -> None:
        self.stop = False
        self.renew = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGUSR1, self._renew)

    def _stop(self, signum: int, frame: object) -> None:
        self.stop = True

    def _renew(self, signum: int, frame: object) -> None:
        self.renew = True


class DbJob:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = args.mode
        self.db_dir = os.path.join(args.run_dir, "db")
        self.datadir = args.datadir
        self.job_id = os.environ.get("SLURM_JOB_ID", "") if self.mode == "slurm" else ""
        self.me = self.job_id or f"local-{os.getpid()}"
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.socket = f"/tmp/hpopt-db-{self.me}.sock"  # node-local: unix socket paths max 107 chars
        self.pid_file = f"/tmp/hpopt-db-{self.me}.pid"
        self.flags = Flags()
        self.proc: subprocess.Popen | None = None
        self.owner_path = os.path.join(self.datadir, OWNER_FILE)
        self.handoff_path = os.path.join(self.datadir, HANDOFF_FILE)

    # -- binaries and records

    def binaries(self) -> dict:
        wanted = self.args.mariadbd
        server = find_binary(wanted, "mysqld") if wanted == "mariadbd" else find_binary(wanted)  # pre-10.4 name
        if server is None:
            raise JobFailure(f"{wanted} not found on PATH on node {socket.gethostname()}")
        tools = {"server": server,
                 "install": find_binary("mariadb-install-db", "mysql_install_db"),
                 "client": find_binary("mariadb", "mysql"),
                 "admin": find_binary("mariadb-admin", "mysqladmin")}
        names = {"install": "mariadb-install-db", "client": "mariadb", "admin": "mariadb-admin"}
        missing = [names[k] for k, v in tools.items() if v is None]
        if missing:
            raise JobFailure(f"{', '.join(missing)} not found on PATH on node {socket.gethostname()}")
        tools["basedir"] = os.path.dirname(os.path.dirname(os.path.realpath(server)))
        return tools

    def credentials(self) -> dict:
        path = os.path.join(self.db_dir, "credentials.json")
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            raise JobFailure(f"credentials file {path} is missing (`hpopt db start` creates it)") from None
        if mode != 0o600:
            raise JobFailure(f"credentials file {path} has mode {mode:04o}; it must be 0600")
        data = read_json(path)
        if not data or not data.get("password") or not data.get("user"):
            raise JobFailure(f"credentials file {path} is unreadable or incomplete")
        return data

    # -- the datadir

    def acquire_datadir(self) -> None:
        """Wait while another live job serves this datadir, asking it to hand over; then own it."""
        os.makedirs(self.datadir, mode=0o700, exist_ok=True)
        os.chmod(self.datadir, 0o700)
        asked = False
        while not self.flags.stop:
            owner = read_json(self.owner_path)
            if owner is None or owner.get("job") == self.me:
                break
            try:
                age = time.time() - os.stat(self.owner_path).st_mtime
            except FileNotFoundError:
                break
            if age > OWNER_STALE_S:
                log(f"taking over the datadir from {owner.get('job')} (silent for {age:.0f}s)")
                break
            if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid") or 0)):
                break
            if not asked:
                write_json(self.handoff_path, {"job": self.me, "asked_at": utcnow()})
                log(f"waiting for {owner.get('job')} on {owner.get('host')} to hand over the datadir")
                asked = True
            time.sleep(1.0)
        if self.flags.stop:
            return
        write_json(self.owner_path, {"job": self.me, "host": socket.gethostname(), "pid": os.getpid()})
        if asked and os.path.exists(self.handoff_path):
            os.unlink(self.handoff_path)

    def heartbeat(self) -> None:
        """Refresh the owner file; a successor treats an owner silent for a minute as dead."""
        try:
            os.utime(self.owner_path, None)
        except FileNotFoundError:
            write_json(self.owner_path, {"job": self.me, "host": socket.gethostname(), "pid": os.getpid()})

    def release_datadir(self) -> None:
        owner = read_json(self.owner_path)
        if owner is not None and owner.get("job") == self.me:
            os.unlink(self.owner_path)

    def initialise(self, tools: dict) -> None:
        if os.path.isdir(os.path.join(self.datadir, "mysql")):
            return
        log(f"initialising a new datadir in {self.datadir}")
        proc = subprocess.run(
            [tools["install"], "--no-defaults", f"--basedir={tools['basedir']}", f"--datadir={self.datadir}",
             f"--user={self.user}", "--auth-root-authentication-method=socket", "--skip-test-db",
             "--skip-name-resolve"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], flush=True)
            raise JobFailure(f"mariadb-install-db failed (exit {proc.returncode}) in {self.datadir}")

    # -- the server

    def start_server(self, tools: dict, host: str, port: int) -> None:
        for stale in (self.socket, self.pid_file):
            if os.path.exists(stale):
                os.unlink(stale)
        args = [tools["server"], "--no-defaults", f"--basedir={tools['basedir']}", f"--datadir={self.datadir}",
                f"--socket={self.socket}", f"--pid-file={self.pid_file}", f"--port={port}",
                f"--bind-address={host}", "--skip-name-resolve", f"--max-connections={self.args.max_connections}",
                "--max-connect-errors=1000000", f"--user={self.user}", "--character-set-server=utf8mb4"]
        log(f"starting {os.path.basename(tools['server'])} on {host}:{port} (datadir {self.datadir})")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise JobFailure(f"mariadbd exited with code {self.proc.returncode} while starting (see the lines above)")
            if self.flags.stop:
                return
            if self.socket_answers():
                return
            time.sleep(0.2)
        raise JobFailure(f"mariadbd did not open {self.socket} within {READY_TIMEOUT_S:.0f}s")

    def socket_answers(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def configure(self, tools: dict, creds: dict) -> None:
        """Create the schema and app user as root over the socket; the password goes on stdin."""
        sql = setup_sql(str(creds["user"]), str(creds["password"]), str(creds.get("schema") or "hpopt"))
        proc = subprocess.run([tools["client"], "--no-defaults", f"--socket={self.socket}", "-u", self.user,
                               "--batch"], input=sql, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        if proc.returncode != 0:
            raise JobFailure("setting up the schema and user failed: " + " ".join(proc.stdout.split())[-500:])

    def shutdown(self, tools: dict) -> None:
        """Clean shutdown over the socket, wait for it, then give the datadir back."""
        if self.proc is not None and self.proc.poll() is None:
            log("shutting down mariadbd")
            subprocess.run([tools["admin"], "--no-defaults", f"--socket={self.socket}", "-u", self.user,
                            "shutdown"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=60)
            log(f"mariadbd stopped (exit {self.proc.returncode})")
        self.release_datadir()

    # -- renewal

    def submit_successor(self) -> str:
        """sbatch the same rendered script; SLURM_* of this job must not leak into the new one."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
        proc = subprocess.run(["sbatch", "--parsable", self.args.script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job_id.isdigit():
            raise JobFailure("sbatch of the successor failed: " + " ".join(proc.stdout.split()))
        record = read_json(os.path.join(self.db_dir, "job.json")) or {}
        record.update({"job_id": job_id, "mode": "slurm", "submitted_at": utcnow(), "predecessor": self.job_id})
        write_json(os.path.join(self.db_dir, "job.json"), record)
        return job_id

    def handoff_requested(self, successor: str) -> bool:
        request = read_json(self.handoff_path)
        return request is not None and request.get("job") == successor

    def serve(self, tools: dict) -> int:
        """Watch the server and the flags until a stop, a finished renewal or a crash."""
        successor = ""
        handoff_deadline = next_heartbeat = next_submit = 0.0
        handoff_wait = max(0.0, self.args.renew_before_s - SHUTDOWN_MARGIN_S)
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.release_datadir()
                raise JobFailure(f"mariadbd exited unexpectedly with code {self.proc.returncode}")
            now = time.monotonic()
            if self.flags.stop:
                log("stop requested")
                self.shutdown(tools)
                return 0
            if self.flags.renew and not successor and self.mode == "slurm" and now >= next_submit:
                try:
                    successor = self.submit_successor()
                    handoff_deadline = now + handoff_wait
                    log(f"time limit near: submitted successor job {successor}; "
                        f"serving until it takes over (at most {handoff_wait:.0f}s)")
                except (JobFailure, OSError, subprocess.TimeoutExpired) as exc:
                    log(f"could not submit the successor, retrying in 30s: {exc}")
                    next_submit = now + 30.0
            asked = bool(successor) and self.handoff_requested(successor)
            if successor and (asked or now >= handoff_deadline):
                log(f"handing over to job {successor} ({'it asked for the datadir' if asked else 'time is up'})")
                self.shutdown(tools)
                return 0
            if now >= next_heartbeat:
                self.heartbeat()
                next_heartbeat = now + HEARTBEAT_S
            time.sleep(0.5)

    def run(self) -> int:
        self.flags.install()
        tools = self.binaries()
        creds = self.credentials()
        self.acquire_datadir()
        if self.flags.stop:
            log("stopped before the server started")
            return 0
        try:
            self.initialise(tools)
            host = node_address(self.args.bind)
            if host.startswith("127.") and self.args.bind == "node":
                log(f"warning: this node's address resolves to {host}; workers on other nodes cannot reach it")
            port = self.args.port or free_port(host)
            self.start_server(tools, host, port)
            if not self.flags.stop:
                self.configure(tools, creds)
                write_json(os.path.join(self.db_dir, "endpoint.json"), {
                    "host": host, "port": port, "job_id": self.job_id, "started_at": utcnow(), "mode": self.mode,
                    "schema": str(creds.get("schema") or "hpopt"), "datadir": self.datadir,
                    "pid": os.getpid(), "node": socket.gethostname()})
                log(f"ready on {host}:{port}")
            return self.serve(tools)
        except BaseException:
            if self.proc is not None and self.proc.poll() is None:
                self.shutdown(tools)
            else:
                self.release_datadir()
            raise


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--datadir", required=True)
    parser.add_argument("--mode", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--bind", default="node", help="node | loopback | an address")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--max-connections", type=int, default=151)
    parser.add_argument("--renew-before-s", type=float, default=300.0)
    parser.add_argument("--script", default="", help="the rendered job script (resubmitted on renewal)")
    parser.add_argument("--mariadbd", default="mariadbd")
    return parser.parse_args(argv)


def main(argv: list | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return DbJob(args).run()
    except JobFailure as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr, flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
