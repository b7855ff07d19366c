"""`hpopt status` against the real test cluster and a real MariaDB server.

Worker jobs here are small stand-ins for `hpopt worker`: each array task opens the study on the
MariaDB server, asks a trial, tags it with its job, array index and GPU like the worker does, then
sleeps (a live worker) or exits 3 without telling (a worker that died mid-trial, leaving a stale
RUNNING trial behind).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator

import optuna
import pymysql
import pytest

from hpopt.db.endpoint import read_credentials, read_endpoint, sqlalchemy_url
from hpopt.rundir import RunDir, write_json_atomic
from hpopt.slurm import Slurm
from hpopt.status import StatusCollector
from polling import wait_for

pytestmark = pytest.mark.cluster

FAKE_WORKER = r'''
import os, sys, time
from pathlib import Path
import optuna
from hpopt.db.endpoint import sqlalchemy_url
from hpopt.rundir import RunDir
run_dir, study_name, mode = sys.argv[1:4]
task = int(os.environ["SLURM_ARRAY_TASK_ID"])
study = optuna.load_study(study_name=study_name, storage=sqlalchemy_url(RunDir(Path(run_dir))))
trial = study.ask()
for key, value in {"worker_job_id": f"{os.environ['SLURM_ARRAY_JOB_ID']}_{task}", "array_index": task,
                   "host": os.uname().nodename, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", "")}.items():
    trial.set_user_attr(key, value)
print(f"trial {trial.number} started", flush=True)
if mode == "die" and task == 2:
    print("Traceback (most recent call last):\nRuntimeError: CUDA error: device-side assert", file=sys.stderr)
    sys.exit(3)
time.sleep(300)
'''


def hpopt(run: RunDir, env: dict[str, str], *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpopt", *args], capture_output=True, text=True,
                          env={**env, "HPOPT_RUN_DIR": str(run.root), "COLUMNS": "100", **extra_env}, timeout=120)


@pytest.fixture(scope="module")
def running_db(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    """A run directory whose DB job (`hpopt db start`) is running on the test cluster."""
    run = RunDir(tmp_path_factory.mktemp("shared") / "run")
    started = hpopt(run, cluster_env, "db", "start")
    assert started.returncode == 0, started.stderr
    yield run
    hpopt(run, cluster_env, "db", "stop")


def hpopt_status(run: RunDir, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return hpopt(run, env, "status", *args)


def test_nothing_started(cluster, tmp_path: Path) -> None:
    result = hpopt_status(RunDir(tmp_path / "run"), cluster)
    assert result.returncode == 0, result.stderr
    assert "no DB started yet" in result.stdout and "no workers launched yet" in result.stdout
    assert "nothing started yet" in result.stdout


@pytest.fixture()
def jobs(cluster) -> Iterator[list[str]]:
    """Job ids this test submitted; cancelled at the end (only ours)."""
    submitted: list[str] = []
    yield submitted
    Slurm(env=cluster).cancel(submitted)


def test_db_pending_with_its_reason(cluster, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    held = hpopt(run, cluster, "db", "start", "--no-wait", HPOPT_SLURM_EXTRA_SBATCH="--hold")
    assert held.returncode == 0, held.stderr
    try:
        result = hpopt_status(run, cluster, "--json")
        report = json.loads(result.stdout)
        assert report["db"]["state"] == "PENDING" and report["db"]["reason"] == "JobHeldUser"
        assert [w["code"] for w in report["warnings"]] == ["db_pending"]
        assert result.returncode == 0  # a queued DB is news, not a problem
        screen = hpopt_status(run, cluster)
        assert "PENDING (JobHeldUser)" in screen.stdout
    finally:
        hpopt(run, cluster, "db", "stop")


def test_workers_study_stale_trial_and_db_loss(cluster, running_db: RunDir, jobs: list[str]) -> None:
    run = running_db
    study = optuna.create_study(study_name="e2e", storage=sqlalchemy_url(run))
    study.set_user_attr("budget", 10)
    for x in (0.3, 0.1, 0.2):
        trial = study.ask()
        trial.suggest_float("lr", 0.0, 1.0)
        study.tell(trial, x)

    slurm = Slurm(env=cluster)
    script = run.root / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    log_dir = run.worker_logs_dir
    workers = slurm.submit(
        f"#!/bin/bash\n#SBATCH --job-name=hpopt-status-workers\n#SBATCH --partition=gpu\n#SBATCH --gres=gpu:1\n"
        f"#SBATCH --array=0-2\n#SBATCH --output={log_dir}/%A_%a.out\n#SBATCH --error={log_dir}/%A_%a.err\n"
        f"exec {sys.executable} {script} {run.root} e2e die\n")
    jobs.append(workers)
    held = slurm.submit("#!/bin/bash\n#SBATCH --job-name=hpopt-status-held\n#SBATCH --hold\n#SBATCH --array=0-1\n"
                        "sleep 60\n")
    jobs.append(held)
    launches = [{"job_id": workers, "n_workers": 3, "study": "e2e", "via": "sbatch", "gpu": True,
                 "submitted_at": "2024-01-01T00:00:00+00:00", "log_dir": str(log_dir)},
                {"job_id": held, "n_workers": 2, "study": "e2e", "via": "sbatch", "gpu": False,
                 "submitted_at": "2024-01-01T00:00:00+00:00", "log_dir": str(log_dir)}]
    write_json_atomic(run.workers_file, {"launches": launches})

    collector = StatusCollector(run, slurm=slurm)  # in-process while waiting: no interpreter start per poll

    def settled() -> bool:
        tasks = {t["key"]: t for t in collector.collect()["workers"]["tasks"]}
        return (tasks[f"{workers}_2"]["state"] == "FAILED"
                and all(tasks[f"{workers}_{i}"]["current_trial"] is not None for i in (0, 1)))

    wait_for(settled, timeout=90, every=0.5)
    result = hpopt_status(run, cluster, "--json")
    assert result.returncode == 2, result.stderr  # needs attention: failed worker, stale trial
    report = json.loads(result.stdout)
    tasks = {t["key"]: t for t in report["workers"]["tasks"]}

    db = report["db"]
    assert db["state"] == "RUNNING" and db["reachable"] is True and db["rtt_ms"] >= 0
    assert db["port"] and db["node"] and db["time_left"] and db["renewal_scheduled"] is True

    gpus = set()
    for i in (0, 1):
        task = tasks[f"{workers}_{i}"]
        assert task["state"] == "RUNNING" and task["node"] and task["elapsed"]
        gpus.add(task["gpu"])
    assert gpus <= {"0", "1", "2", "3"} and len(gpus) == 2  # the fake GPUs Slurm handed out
    failed = tasks[f"{workers}_2"]
    assert failed["exit_code"] == "3:0" and failed["log_tail"][-1].startswith("RuntimeError: CUDA error")
    for i in (0, 1):
        held_task = tasks[f"{held}_{i}"]
        assert held_task["state"] == "PENDING" and held_task["reason"] == "JobHeldUser"
    assert report["workers"]["summary"] == {"running": 2, "pending": 2, "completed": 0, "failed": 1,
                                            "cancelled": 0, "unknown": 0}

    assert report["study"]["counts"]["complete"] == 3 and report["study"]["counts"]["running"] == 3
    assert report["study"]["best"]["value"] == 0.1 and report["study"]["storage"] == "mariadb"
    assert report["study"]["best"]["params"] == {"lr": pytest.approx(report["study"]["best"]["params"]["lr"])}
    warnings = {w["code"]: w["message"] for w in report["warnings"]}
    stale_trial = next(r["number"] for r in report["study"]["running_trials"] if r["worker"] == f"{workers}_2")
    assert f"#{stale_trial} ({workers}_2)" in warnings["stale_trials"]
    assert set(warnings) == {"workers_failed", "stale_trials"}

    screen = hpopt_status(run, cluster)
    assert screen.returncode == 2
    assert "RuntimeError: CUDA error" in screen.stdout and "JobHeldUser" in screen.stdout
    assert "RUNNING with no live worker" in screen.stdout and "3/10 finished" in screen.stdout
    (run.root / "screen.txt").write_text(screen.stdout)  # what docs/status.md shows

    stopped = hpopt(run, cluster, "db", "stop")
    assert stopped.returncode == 0, stopped.stderr
    after = hpopt_status(run, cluster, "--json")
    codes = {w["code"] for w in json.loads(after.stdout)["warnings"]}
    assert {"db_down", "workers_without_db"} <= codes and after.returncode == 2


@contextmanager
def app_connection(run: RunDir) -> Iterator[pymysql.connections.Connection]:
    """The test's own look at the server, as the application user (who sees its own connections)."""
    endpoint, creds = read_endpoint(run), read_credentials(run)
    conn = pymysql.connect(host=endpoint.host, port=endpoint.port, user=creds.user, password=creds.password,
                           database=creds.schema, connect_timeout=5, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def server_side(conn: pymysql.connections.Connection) -> tuple[int, set[int]]:
    """(connections ever made to the server, ids of the app user's other open connections)."""
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
        made = int(cur.fetchone()[1])
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST "
                    "WHERE USER = SUBSTRING_INDEX(USER(), '@', 1) AND ID <> CONNECTION_ID()")
        return made, {int(row[0]) for row in cur.fetchall()}


def test_watch_keeps_its_db_connections_and_recovers_when_they_drop(cluster, shared_tmp: Path) -> None:
    """What `hpopt status --watch` does between refreshes, against the DB job on the test cluster."""
    run = RunDir(shared_tmp / "run")
    assert hpopt(run, cluster, "db", "start").returncode == 0
    try:
        storage = optuna.storages.RDBStorage(sqlalchemy_url(run))
        study = optuna.create_study(study_name="watched", storage=storage)
        storage.engine.dispose()  # only the collector's connections are left to watch

        with StatusCollector(run, slurm=Slurm(env=cluster)) as collector:
            first = collector.collect()
            assert first["db"]["reachable"] is True and first["study"]["available"] is True
            with app_connection(run) as mine:
                made, open_ids = server_side(mine)
                assert open_ids  # the probe's and the study's connections stay open between refreshes
                second = collector.collect()
                assert second["db"]["reachable"] is True and second["db"]["rtt_ms"] >= 0
                assert server_side(mine) == (made, open_ids)  # the same connections; no new one

                study.ask()  # a kept connection must still see what changed since (no old snapshot)
                storage.engine.dispose()
                third = collector.collect()
                assert third["db"]["studies"] == [{"name": "watched", "trials_by_state": {"RUNNING": 1}}]
                assert third["study"]["counts"]["running"] == 1

                with mine.cursor() as cur:  # the server drops them (as an idle timeout or a crash would)
                    for conn_id in open_ids:
                        cur.execute(f"KILL CONNECTION {conn_id}")
                dropped = collector.collect()
                assert dropped["db"]["reachable"] is True and dropped["study"]["available"] is True
                made_again, reopened = server_side(mine)
                assert made_again > made and reopened and not reopened & open_ids

            assert hpopt(run, cluster, "db", "stop").returncode == 0
            down = collector.collect()
            assert down["db"]["reachable"] is False
            assert hpopt(run, cluster, "db", "start").returncode == 0  # a new job, maybe on another port
            back = collector.collect()  # the endpoint is read again: the first refresh finds the new server
            assert back["db"]["reachable"] is True, back["db"]["error"]
            assert back["study"]["available"] is True and back["study"]["counts"]["running"] == 1
            with app_connection(run) as mine:
                assert server_side(mine)[1]
                collector.close()
                assert server_side(mine)[1] == set()  # close() hangs up all of them
    finally:
        hpopt(run, cluster, "db", "stop")
