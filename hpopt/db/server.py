"""The DB job seen from the login node: render and submit it, wait until it serves, stop it, report it.

One DB job per run directory. `db/job.json` names the job in charge (renewals rewrite it), so
`start` is idempotent and `stop` cancels the right job; `db/endpoint.json` is written by the job
itself once the server answers. In local mode the same rendered script runs as a detached
background process and `db/job.json` holds its pid instead of a job id.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import hpopt
from hpopt.config import Config
from hpopt.db import job as job_module
from hpopt.db import probe
from hpopt.db.endpoint import Endpoint, ensure_credentials, read_credentials, read_endpoint
from hpopt.errors import HpoptError
from hpopt.procs import process_alive
from hpopt.rundir import RunDir, read_json, write_json_atomic
from hpopt.slurm import ACTIVE_STATES, DONE_STATES, Slurm

TEMPLATE_NAME = "mysql.sbatch"
MIN_CONNECTIONS = 151  # MariaDB's default
LOG_TAIL_LINES = 15
Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# -- the job script


def template_path(cwd: Path | None = None) -> Path:
    """./sbatch/mysql.sbatch when the user has their own copy, else the one in the hpopt checkout."""
    for candidate in ((cwd or Path.cwd()) / "sbatch" / TEMPLATE_NAME,
                      Path(hpopt.__file__).resolve().parents[1] / "sbatch" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise HpoptError(f"job template sbatch/{TEMPLATE_NAME} not found in {cwd or Path.cwd()} "
                     "nor in the hpopt source checkout")


def max_connections_for(workers: int, configured: int = 0) -> int:
    """Each worker holds a small pool (a few connections); status and dashboards need some too."""
    if configured > 0:
        return configured
    return max(MIN_CONNECTIONS, 8 + 4 * workers)


def datadir_for(config: Config, run_dir: RunDir) -> Path:
    """Persistent storage only: a node's /tmp vanishes with the job, and the study with it."""
    if not config.db.datadir:
        return run_dir.default_datadir
    return Path(config.db.datadir).expanduser().resolve()


def render_job_script(config: Config, run_dir: RunDir, *, mode: str = "slurm", workers: int = 0,
                      time_limit: str | None = None, template: Path | None = None) -> str:
    """The job script with every placeholder filled in; it contains no secret."""
    if config.db.renew_before_s < 10:
        raise HpoptError(f"db.renew_before_s must be at least 10 seconds, got {config.db.renew_before_s}")
    slurm = config.slurm
    optional = [f"#SBATCH --{key}={value}" for key, value in
                (("partition", slurm.cpu_partition), ("account", slurm.account), ("qos", slurm.qos)) if value]
    optional += [line if line.startswith("#SBATCH") else f"#SBATCH {line}" for line in slurm.extra_sbatch]
    python = sys.executable if mode == "local" else "python3"  # a node has python3; local mode has us
    runner = [python, str(Path(job_module.__file__).resolve()),
              "--run-dir", str(run_dir.root), "--datadir", str(datadir_for(config, run_dir)),
              "--mode", mode, "--bind", config.db.bind, "--port", str(config.db.port),
              "--max-connections", str(max_connections_for(workers, config.db.max_connections)),
              "--renew-before-s", str(config.db.renew_before_s),
              "--script", str(run_dir.db_dir / TEMPLATE_NAME), "--mariadbd", config.db.mariadbd]
    values = {
        "job_name": f"hpopt-db-{run_dir.root.name.lstrip('.') or 'run'}",
        "time": time_limit or slurm.db_time,
        "renew_before_s": str(config.db.renew_before_s),
        "log": str(run_dir.logs_dir / "db-%j.log"),
        "optional_sbatch": "\n".join(optional),
        "prelude": "\n".join(slurm.prelude),
        "runner": " ".join(shlex.quote(part) for part in runner),
    }
    path = template or template_path()
    try:
        return string.Template(path.read_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise HpoptError(f"{path}: unknown or malformed placeholder {exc} "
                         f"(known: {', '.join('$' + k for k in values)}; write $$ for a dollar sign)") from None


# -- records


@dataclass
class JobRecord:
    """db/job.json: the DB job (or local process) in charge of this run directory."""

    mode: str  # "slurm" | "local"
    job_id: str = ""
    pid: int | None = None
    predecessor: str = ""
    submitted_at: str = ""
    renew_before_s: int = 0

    @property
    def label(self) -> str:
        return f"job {self.job_id}" if self.mode == "slurm" else f"local process {self.pid}"


def read_job_record(run_dir: RunDir) -> JobRecord | None:
    try:
        data = read_json(run_dir.db_job_file)
    except FileNotFoundError:
        return None
    return JobRecord(mode=str(data.get("mode") or "slurm"), job_id=str(data.get("job_id") or ""),
                     pid=int(data["pid"]) if data.get("pid") else None,
                     predecessor=str(data.get("predecessor") or ""),
                     submitted_at=str(data.get("submitted_at") or ""),
                     renew_before_s=int(data.get("renew_before_s") or 0))


def _write_job_record(run_dir: RunDir, record: JobRecord) -> None:
    write_json_atomic(run_dir.db_job_file, {
        "mode": record.mode, "job_id": record.job_id, "pid": record.pid, "predecessor": record.predecessor,
        "submitted_at": record.submitted_at, "renew_before_s": record.renew_before_s})


def log_file_for(run_dir: RunDir, record: JobRecord) -> Path:
    name = f"db-{record.job_id}.log" if record.mode == "slurm" else "db-local.log"
    return run_dir.logs_dir / name


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def local_runner_alive(pid: int | None) -> bool:
    """True while our runner process lives (not a zombie, not a stranger that reused the pid)."""
    job_script = os.path.join("db", "job.py")
    return process_alive(pid, lambda argv: "--run-dir" in argv and any(a.endswith(job_script) for a in argv))


def _active_slurm_ids(record: JobRecord, slurm: Slurm, endpoint: Endpoint | None = None) -> dict[str, str]:
    """job id -> state for the record's job, its predecessor and the endpoint's job, if still queued."""
    ids = [i for i in {record.job_id, record.predecessor, endpoint.job_id if endpoint else ""} if i]
    if not ids:
        return {}
    return {k: v.state for k, v in slurm.states(ids).items() if v.state in ACTIVE_STATES}


def _try_endpoint(run_dir: RunDir) -> Endpoint | None:
    try:
        return read_endpoint(run_dir)
    except HpoptError:
        return None


# -- start


@dataclass
class StartResult:
    record: JobRecord
    endpoint: Endpoint | None
    reused: bool
    state: str
    seconds_to_ready: float | None = None
    log_file: Path | None = None


def start(config: Config, run_dir: RunDir, *, workers: int = 0, local: bool | None = None,
          time_limit: str | None = None, wait: bool = True, timeout_s: float | None = None,
          slurm: Slurm | None = None, progress: Progress = _quiet) -> StartResult:
    """Start the DB job for this run directory, or find the one already there; wait until it serves."""
    if local is None:
        local = not Slurm.available()
    run_dir.ensure()
    ensure_credentials(run_dir)
    timeout_s = float(timeout_s if timeout_s is not None else config.db.start_timeout_s)
    slurm = slurm or Slurm()
    record = read_job_record(run_dir)
    if record is not None and record.mode == "slurm" and record.job_id and not Slurm.available():
        raise HpoptError(f"the DB of {run_dir.root} is Slurm job {record.job_id}, but Slurm is not available "
                         f"here; run this on the cluster (or delete {run_dir.db_job_file} to start locally)")
    if record is not None:
        state = _live_state(record, slurm)
        if state is not None:
            result = StartResult(record, None, True, state, log_file=log_file_for(run_dir, record))
            if wait:
                result.endpoint = wait_ready(run_dir, record, slurm=slurm, timeout_s=timeout_s, progress=progress,
                                             module_hint=config.db.module_hint)
                result.state = "RUNNING"
            return result
    if local and shutil.which(config.db.mariadbd) is None and shutil.which("mysqld") is None:
        raise HpoptError(f"{config.db.mariadbd} not found on PATH: {config.db.module_hint}")
    t0 = time.monotonic()
    mode = "local" if local else "slurm"
    script = render_job_script(config, run_dir, mode=mode, workers=workers, time_limit=time_limit)
    script_path = run_dir.db_dir / TEMPLATE_NAME
    _write_text_atomic(script_path, script)
    child: subprocess.Popen[bytes] | None = None
    if local:
        record = JobRecord(mode="local", submitted_at=_utcnow())
        log = log_file_for(run_dir, record)
        with open(log, "ab") as out:
            child = subprocess.Popen(["bash", str(script_path)], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, cwd=run_dir.root, start_new_session=True)
        record.pid = child.pid
        progress(f"started local server process {child.pid}")
    else:
        job_id = slurm.submit(script)
        record = JobRecord(mode="slurm", job_id=job_id, submitted_at=_utcnow(),
                           renew_before_s=config.db.renew_before_s)
        progress(f"submitted DB job {job_id}")
    _write_job_record(run_dir, record)
    result = StartResult(record, None, False, "PENDING" if not local else "RUNNING",
                         log_file=log_file_for(run_dir, record))
    if wait:
        alive = (lambda: child.poll() is None) if child is not None else None
        result.endpoint = wait_ready(run_dir, record, slurm=slurm, timeout_s=timeout_s, progress=progress,
                                     alive=alive, module_hint=config.db.module_hint)
        result.state = "RUNNING"
        result.seconds_to_ready = time.monotonic() - t0
    return result


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _live_state(record: JobRecord, slurm: Slurm) -> str | None:
    """The record's job state if it is still pending or running, else None."""
    if record.mode == "local":
        return "RUNNING" if local_runner_alive(record.pid) else None
    if not record.job_id:
        return None
    info = slurm.states([record.job_id]).get(record.job_id)
    return info.state if info is not None and info.state in ACTIVE_STATES else None


def wait_ready(run_dir: RunDir, record: JobRecord, *, slurm: Slurm, timeout_s: float,
               progress: Progress = _quiet, alive: Callable[[], bool] | None = None,
               module_hint: str = "") -> Endpoint:
    """Poll until the record's server answers `SELECT 1` as the app user; fail fast if the job died."""
    creds = read_credentials(run_dir)
    deadline = time.monotonic() + timeout_s
    last_error = ""
    next_state_check = 0.0
    state = "PENDING"
    while True:
        endpoint = _try_endpoint(run_dir)
        if endpoint is not None and _belongs_to(endpoint, record):
            try:
                probe.ping(endpoint, creds, timeout_s=5.0)
                return endpoint
            except probe.ProbeError as exc:
                last_error = str(exc)
        now = time.monotonic()
        if now >= next_state_check:
            next_state_check = now + 2.0
            if record.mode == "local":
                running = alive() if alive is not None else local_runner_alive(record.pid)
                state = "RUNNING" if running else "EXITED"
            else:
                info = slurm.states([record.job_id]).get(record.job_id)
                state = info.state if info is not None else "UNKNOWN"
                if info is not None and info.reason and info.is_pending:
                    state = f"{state} ({info.reason})"
            if state.split()[0] in DONE_STATES or state == "EXITED":
                raise job_failure(run_dir, record, state, module_hint)
            progress(f"waiting for {record.label}: {state}"
                     + (f", {last_error}" if last_error and state == "RUNNING" else ""))
        if now >= deadline:
            raise HpoptError(
                f"DB {record.label} not ready after {timeout_s:.0f}s (state {state}"
                + (f"; last error: {last_error}" if last_error else "")
                + f"); it was left running: see `hpopt db status` and {log_file_for(run_dir, record)}")
        time.sleep(0.5)


def _belongs_to(endpoint: Endpoint, record: JobRecord) -> bool:
    if record.mode == "local":
        return endpoint.mode == "local" and endpoint.pid == record.pid
    return endpoint.job_id == record.job_id


def job_failure(run_dir: RunDir, record: JobRecord, state: str, module_hint: str = "") -> HpoptError:
    """One line saying why the job died (the runner's own error line if any), then its log tail."""
    log = log_file_for(run_dir, record)
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    errors = [line[len(job_module.ERROR_PREFIX):].strip() for line in lines
              if line.startswith(job_module.ERROR_PREFIX)]
    if errors and "not found on PATH" in errors[-1] and module_hint:
        return HpoptError(f"DB {record.label}: {errors[-1]}: {module_hint}")
    head = f"DB {record.label} ended ({state}) before the server was ready"
    if errors:
        head += f": {errors[-1]}"
    tail = "\n".join("  " + line for line in lines[-LOG_TAIL_LINES:]) or "  (the log is empty or missing)"
    return HpoptError(f"{head}; last lines of {log}:\n{tail}")


# -- stop


def stop(run_dir: RunDir, *, slurm: Slurm | None = None, timeout_s: float = 120.0,
         progress: Progress = _quiet) -> list[str]:
    """Ask the server to shut down cleanly and wait until it has; returns what was stopped."""
    record = read_job_record(run_dir)
    if record is None:
        raise HpoptError(f"no DB was started from {run_dir.root} (no {run_dir.db_job_file})")
    if record.mode == "local":
        return _stop_local(record, timeout_s, progress)
    slurm = slurm or Slurm()
    active = _active_slurm_ids(record, slurm, _try_endpoint(run_dir))
    if not active:
        return []
    pending = [i for i, s in active.items() if s != "RUNNING"]
    running = [i for i, s in active.items() if s == "RUNNING"]
    if pending:
        slurm.cancel(pending)
    if running:  # SIGTERM to the runner only: it shuts mariadbd down at its own pace, not KillWait's
        slurm.cancel(running, signal="TERM", batch_only=True)
    deadline = time.monotonic() + timeout_s
    while True:
        left = [k for k, v in slurm.states(list(active)).items() if v.state in ACTIVE_STATES]
        if not left:
            return sorted(active)
        if time.monotonic() >= deadline:
            slurm.cancel(left)
            raise HpoptError(f"DB job(s) {', '.join(left)} did not stop within {timeout_s:.0f}s; cancelled "
                             "them outright (the next start recovers the datadir)")
        progress(f"waiting for DB job(s) {', '.join(left)} to shut down")
        time.sleep(1.0)


def _stop_local(record: JobRecord, timeout_s: float, progress: Progress) -> list[str]:
    if not local_runner_alive(record.pid):
        return []
    assert record.pid is not None
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while local_runner_alive(record.pid):
        if time.monotonic() >= deadline:
            raise HpoptError(f"local DB process {record.pid} did not stop within {timeout_s:.0f}s")
        progress(f"waiting for local DB process {record.pid} to shut down")
        time.sleep(0.3)
    return [f"local process {record.pid}"]


# -- status


def _uptime_s(started_at: str) -> float | None:
    try:
        started = datetime.fromisoformat(started_at)
    except ValueError:
        return None
    if started.tzinfo is None:
        started = started.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - started).total_seconds())


def collect_db_status(run_dir: RunDir, slurm: Slurm | None, kept: probe.KeptProbe | None = None) -> dict[str, Any]:
    """Everything `db status` and `hpopt status` show about the DB, as plain data.

    One `slurm.states` call for the job in charge and the endpoint's job (they differ during a
    renewal); one connection to the server when its job is alive, or `kept`'s (`status --watch`).
    """
    out: dict[str, Any] = {"job_id": None, "state": None, "reason": None, "node": None, "host": None,
                           "port": None, "uptime_s": None, "time_left": None, "renewal_scheduled": None,
                           "reachable": False, "rtt_ms": None, "connections": None, "studies": [], "error": None}
    record = read_job_record(run_dir)
    endpoint = _try_endpoint(run_dir)
    if record is None and endpoint is None:
        out["state"] = "NOT STARTED"
        out["error"] = "no DB started for this run directory (`hpopt db start`)"
        return out
    if record is None:
        assert endpoint is not None
        record = JobRecord(mode=endpoint.mode, job_id=endpoint.job_id, pid=endpoint.pid)
    out["job_id"] = record.job_id or None
    server_alive = False
    gone_state = "stopped"
    if record.mode == "local":
        running = local_runner_alive(record.pid)
        out.update(state="RUNNING" if running else "STOPPED", node=socket.gethostname())  # no time limit to renew
        server_alive = running and endpoint is not None and endpoint.pid == record.pid
    elif slurm is not None:
        ids = [i for i in {record.job_id, endpoint.job_id if endpoint else ""} if i]
        infos = slurm.states(ids)
        info = infos.get(record.job_id)
        if info is None:
            out["state"] = "UNKNOWN"
        else:
            out.update(state=info.state, reason=info.reason or None, node=info.node or None,
                       time_left=info.time_left or None,
                       renewal_scheduled=info.is_active and record.renew_before_s > 0)
        serving = infos.get(endpoint.job_id) if endpoint else None
        server_alive = serving is not None and serving.state == "RUNNING"
        gone_state = serving.state if serving is not None else "no longer known to Slurm"
        if serving is not None and serving is not info and not out["node"]:
            out["node"] = serving.node or None
    else:
        out["state"] = "UNKNOWN"
        server_alive = endpoint is not None
    if endpoint is not None:
        out.update(host=endpoint.host, port=endpoint.port, node=out["node"] or endpoint.node or None)
        if server_alive:
            out["uptime_s"] = _uptime_s(endpoint.started_at)
    if endpoint is None:
        out["error"] = "the server has not announced an endpoint yet"
    elif not server_alive:
        who = f"job {endpoint.job_id}" if endpoint.mode == "slurm" else f"local process {endpoint.pid}"
        out["error"] = (f"endpoint stale: {who} is not running ({gone_state}); "
                        "`hpopt db start` starts a server on the same data")
    else:
        try:
            creds = read_credentials(run_dir)
            found = kept.facts(endpoint, creds) if kept is not None else probe.facts(endpoint, creds, timeout_s=5.0)
            out.update(reachable=True, rtt_ms=round(found.rtt_ms, 2), connections=found.connections,
                       studies=found.studies)
        except probe.ProbeError as exc:
            out["error"] = str(exc)
    return out
