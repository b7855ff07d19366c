"""`hpopt db` end to end with a real mariadbd: as a local process, and as Slurm jobs on the test cluster.

The cluster tests share their DB jobs to stay inside the time budget: the renewing job (2-minute
limit, USR1 60 s before it) is submitted first and renews itself while the lifecycle test runs.
Every test stops what it started, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pymysql
import pytest

from hpopt.db.endpoint import read_credentials, read_endpoint, sqlalchemy_url
from hpopt.db.server import local_runner_alive, read_job_record
from hpopt.rundir import RunDir
from hpopt.slurm import Slurm
from polling import wait_for

needs_mariadbd = pytest.mark.skipif(shutil.which("mariadbd") is None,
                                    reason="mariadbd not installed (apt-get install mariadb-server)")


def _env(base: dict[str, str], run_root: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any hpopt settings of its own, plus this test's."""
    env = {k: v for k, v in base.items() if not k.startswith(("HPOPT_DB_", "HPOPT_SLURM_"))
           and k not in ("HPOPT_CONFIG", "HPOPT_RUN_DIR")}
    env.update(HPOPT_RUN_DIR=str(run_root), HPOPT_DB_BIND="loopback", HPOPT_SLURM_CPU_PARTITION="cpu", **extra)
    return env


def hpopt(args: list[str], env: dict[str, str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "hpopt", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpopt {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def status_json(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    return json.loads(hpopt(["db", "status", "--json"], env, cwd).stdout)


def query(run_dir: RunDir, sql: str) -> list[tuple]:
    """One committed statement as the application user over TCP."""
    endpoint, creds = read_endpoint(run_dir), read_credentials(run_dir)
    conn = pymysql.connect(host=endpoint.host, port=endpoint.port, user=creds.user, password=creds.password,
                           database=creds.schema, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = list(cur.fetchall())
        conn.commit()
        return rows
    finally:
        conn.close()



def ready_seconds(output: str) -> float:
    found = re.search(r"ready on \S+ after ([\d.]+)s", output)
    assert found, output
    return float(found.group(1))


# -- local mode (no Slurm needed)


@needs_mariadbd
def test_local_server_lifecycle(tmp_path: Path) -> None:
    env, run_dir = _env(dict(os.environ), tmp_path / "run"), RunDir(tmp_path / "run")
    try:
        out = hpopt(["db", "start", "--local"], env, tmp_path).stdout
        print(f"local start to ready: {ready_seconds(out):.1f}s")
        first = read_job_record(run_dir)
        assert first is not None and first.mode == "local" and local_runner_alive(first.pid)
        again = hpopt(["db", "start", "--local"], env, tmp_path).stdout
        assert "already RUNNING" in again and read_job_record(run_dir) == first

        query(run_dir, "CREATE TABLE keep (x INT)")
        query(run_dir, "INSERT INTO keep VALUES (7)")
        report = status_json(env, tmp_path)
        assert report["state"] == "RUNNING" and report["reachable"] is True and report["connections"] >= 1

        assert "stopped DB local process" in hpopt(["db", "stop"], env, tmp_path).stdout
        assert not local_runner_alive(first.pid)
        report = status_json(env, tmp_path)
        assert report["state"] == "STOPPED" and report["reachable"] is False
        assert "endpoint stale" in report["error"]

        hpopt(["db", "start", "--local"], env, tmp_path)
        assert read_job_record(run_dir).pid != first.pid
        assert query(run_dir, "SELECT x FROM keep") == [(7,)]
    finally:
        hpopt(["db", "stop"], env, tmp_path, check=False)


def test_local_start_without_mariadbd_says_what_to_install(tmp_path: Path) -> None:
    env = _env(dict(os.environ), tmp_path / "run", HPOPT_DB_MARIADBD="no-such-mariadbd",
               HPOPT_DB_MODULE_HINT="load the mariadb module", PATH=str(tmp_path))
    proc = hpopt(["db", "start", "--local"], env, tmp_path, check=False)
    assert proc.returncode == 1
    assert "no-such-mariadbd not found on PATH: load the mariadb module" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- Slurm mode on the test cluster


@pytest.fixture(scope="module")
def renewing_db(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A DB job with a 2-minute limit and USR1 60 s before it; started first so it renews meanwhile.

    The 60 s warning leaves the old server 15 s to wait for its successor to ask for the datadir,
    the handoff path a real 300 s warning takes.
    """
    root = tmp_path_factory.mktemp("db-renew")
    env = _env(cluster_env, root / "run", HPOPT_DB_RENEW_BEFORE_S="60")
    run_dir = RunDir(root / "run")
    try:
        out = hpopt(["db", "start", "--time", "2"], env, root).stdout
        record = read_job_record(run_dir)
        assert record is not None
        query(run_dir, "CREATE TABLE keep (x INT)")
        query(run_dir, "INSERT INTO keep VALUES (42)")
        yield {"env": env, "root": root, "run_dir": run_dir, "job_id": record.job_id, "out": out}
    finally:
        hpopt(["db", "stop"], env, root, check=False)


@pytest.mark.cluster
def test_slurm_db_lifecycle(renewing_db: dict[str, Any], cluster_env: dict[str, str], tmp_path: Path) -> None:
    env, run_dir = _env(cluster_env, tmp_path / "run"), RunDir(tmp_path / "run")
    slurm = Slurm(env=cluster_env)
    try:
        out = hpopt(["db", "start", "--workers", "40"], env, tmp_path).stdout
        print(f"slurm start to ready (new datadir): {ready_seconds(out):.1f}s")
        job_id = read_job_record(run_dir).job_id
        assert "already RUNNING" in hpopt(["db", "start"], env, tmp_path).stdout
        assert read_job_record(run_dir).job_id == job_id

        assert query(run_dir, "SELECT @@max_connections, @@skip_name_resolve") == [(168, 1)]
        endpoint = read_endpoint(run_dir)
        with pytest.raises(pymysql.err.OperationalError):  # root: unix socket only
            pymysql.connect(host=endpoint.host, port=endpoint.port, user="root", password="", connect_timeout=5)
        assert query(run_dir, "SHOW DATABASES") == [("hpopt",), ("information_schema",)]  # schema only

        password = read_credentials(run_dir).password
        shown = subprocess.run(["scontrol", "show", "job", "-dd", job_id], env=cluster_env, capture_output=True,
                               text=True, check=True).stdout
        script = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], env=cluster_env,
                                capture_output=True, text=True, check=True).stdout
        assert f"JobId={job_id}" in shown and "job.py" in script
        assert password not in shown + script
        for path in [*run_dir.logs_dir.rglob("*"), run_dir.endpoint_file, run_dir.db_job_file]:
            assert not path.is_file() or password not in path.read_text(errors="replace"), path
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert password not in cmdline.read_bytes().decode(errors="replace"), cmdline
            except OSError:
                continue
        assert os.stat(run_dir.credentials_file).st_mode & 0o777 == 0o600
        assert os.stat(run_dir.root).st_mode & 0o777 == 0o700
        assert os.stat(run_dir.default_datadir).st_mode & 0o777 == 0o700

        study = optuna.create_study(study_name="s1", storage=sqlalchemy_url(run_dir))
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        written = [t.params["x"] for t in study.trials]
        report = status_json(env, tmp_path)
        assert (report["job_id"], report["state"], report["reachable"]) == (job_id, "RUNNING", True)
        assert report["rtt_ms"] > 0 and report["connections"] >= 1 and report["renewal_scheduled"] is True
        assert report["studies"] == [{"name": "s1", "trials_by_state": {"COMPLETE": 2}}]
        assert report["time_left"] and report["uptime_s"] >= 0
        text = hpopt(["db", "status"], env, tmp_path).stdout
        assert "RUNNING" in text and "yes" in text and "study s1" in text and "2 complete" in text

        stopped = hpopt(["db", "stop"], env, tmp_path).stdout
        assert f"stopped DB {job_id}" in stopped
        ended = wait_for(lambda: (s := slurm.states([job_id]).get(job_id)) and not s.is_active and s,
                         timeout=60, what=f"job {job_id} ending")  # sacct records the end a moment later
        assert ended.state == "COMPLETED"  # the runner exited 0 after a clean shutdown
        assert "mariadbd stopped (exit 0)" in (run_dir.logs_dir / f"db-{job_id}.log").read_text()
        report = status_json(env, tmp_path)
        assert report["state"] == "COMPLETED" and report["reachable"] is False
        assert "endpoint stale" in report["error"]
        assert "no: endpoint stale" in hpopt(["db", "status"], env, tmp_path).stdout

        out = hpopt(["db", "start"], env, tmp_path).stdout
        print(f"slurm start to ready (existing datadir): {ready_seconds(out):.1f}s")
        assert read_job_record(run_dir).job_id != job_id
        again = optuna.load_study(study_name="s1", storage=sqlalchemy_url(run_dir))
        assert [t.params["x"] for t in again.trials] == written
    finally:
        hpopt(["db", "stop"], env, tmp_path, check=False)


@pytest.mark.cluster
def test_db_job_renews_itself_before_its_time_limit(renewing_db: dict[str, Any], cluster_env: dict[str, str]) -> None:
    run_dir, original = renewing_db["run_dir"], renewing_db["job_id"]
    slurm = Slurm(env=cluster_env)
    last_ok, gap = time.monotonic(), 0.0

    def renewed() -> bool:
        nonlocal last_ok, gap
        try:
            assert query(run_dir, "SELECT x FROM keep") == [(42,)]  # the data survives every renewal
            now = time.monotonic()
            gap, last_ok = max(gap, now - last_ok), now
        except pymysql.err.MySQLError:
            pass
        return read_endpoint(run_dir).job_id != original and time.monotonic() - last_ok < 0.5

    wait_for(renewed, timeout=200, what=f"DB job {original} handing over to a successor", every=0.25)
    successor = read_endpoint(run_dir).job_id
    record = read_job_record(run_dir)  # (the successor may already be renewing: Slurm warns up to 60 s early)
    assert (record.job_id, record.predecessor) == (successor, original) or record.predecessor == successor
    final = wait_for(lambda: (s := slurm.states([original]).get(original)) and s.state not in ("RUNNING", "COMPLETING") and s,
                     timeout=60, what=f"job {original} ending")
    assert final.state == "COMPLETED"  # shut down before the limit, not killed by it (TIMEOUT)
    log = (run_dir.logs_dir / f"db-{original}.log").read_text()
    assert f"submitted successor job {successor}" in log and "mariadbd stopped (exit 0)" in log
    assert f"handing over to job {successor} (it asked for the datadir)" in log
    times = {m.group(2): m.group(1) for m in re.finditer(r"hpopt-db: (\d\d:\d\d:\d\d) (ready|time limit near)", log)}
    print(f"renewal: job {original} ready at {times.get('ready')}, USR1 handled at {times.get('time limit near')}; "
          f"longest gap between successful queries {gap:.1f}s")
    report = status_json(renewing_db["env"], renewing_db["root"])
    assert report["job_id"] == read_job_record(run_dir).job_id and report["state"] in ("RUNNING", "PENDING")
    assert report["reachable"] is True and report["host"] == "127.0.0.1"


@pytest.mark.cluster
def test_job_without_mariadbd_on_the_node_fails_in_one_line(cluster_env: dict[str, str], tmp_path: Path) -> None:
    env = _env(cluster_env, tmp_path / "run", HPOPT_DB_MARIADBD="no-such-mariadbd",
               HPOPT_DB_MODULE_HINT="run `module load mariadb` in the job prelude")
    try:
        proc = hpopt(["db", "start", "--timeout", "60"], env, tmp_path, check=False)
        job_id = read_job_record(RunDir(tmp_path / "run")).job_id
        assert proc.returncode == 1
        assert proc.stderr.strip() == (f"error: DB job {job_id}: no-such-mariadbd not found on PATH on node "
                                       f"{os.uname().nodename}: run `module load mariadb` in the job prelude")
    finally:
        hpopt(["db", "stop"], env, tmp_path, check=False)
