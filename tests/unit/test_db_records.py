"""Endpoint and credentials records, the job script, and status without a server (no cluster needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpopt.config import load_config
from hpopt.db import server
from hpopt.db.endpoint import ensure_credentials, read_credentials, read_endpoint, sqlalchemy_url
from hpopt.errors import HpoptError
from hpopt.rundir import RunDir, write_json_atomic
from hpopt.slurm import JobInfo


@pytest.fixture()
def run_dir(tmp_path: Path) -> RunDir:
    return RunDir(tmp_path / "run").ensure()


def _endpoint(run_dir: RunDir, **extra: object) -> None:
    data = {"host": "10.0.0.5", "port": 40001, "job_id": "77", "started_at": "2026-01-01T00:00:00+00:00",
            "mode": "slurm", "schema": "hpopt", "datadir": "/d"}
    write_json_atomic(run_dir.endpoint_file, {**data, **extra})


def test_credentials_are_generated_once_private_and_long(run_dir: RunDir) -> None:
    first = ensure_credentials(run_dir)
    assert len(first.password) >= 32 and first.user == "hpopt" and first.schema == "hpopt"
    assert os.stat(run_dir.credentials_file).st_mode & 0o777 == 0o600
    assert ensure_credentials(run_dir) == first  # never regenerated: the datadir knows this password
    assert first.password not in repr(first)


def test_credentials_with_loose_mode_are_refused(run_dir: RunDir) -> None:
    ensure_credentials(run_dir)
    os.chmod(run_dir.credentials_file, 0o644)
    with pytest.raises(HpoptError, match="mode 0644; it must be 0600"):
        read_credentials(run_dir)


def test_url_hides_the_password_unless_asked(run_dir: RunDir) -> None:
    creds = ensure_credentials(run_dir)
    _endpoint(run_dir)
    assert sqlalchemy_url(run_dir, show_password=False) == "mysql+pymysql://hpopt:***@10.0.0.5:40001/hpopt"
    assert sqlalchemy_url(run_dir) == f"mysql+pymysql://hpopt:{creds.password}@10.0.0.5:40001/hpopt"


def test_missing_records_say_what_to_run(run_dir: RunDir) -> None:
    with pytest.raises(HpoptError, match="hpopt db start"):
        read_endpoint(run_dir)
    with pytest.raises(HpoptError, match="hpopt db start"):
        read_credentials(run_dir)
    _endpoint(run_dir, pid=12)
    assert read_endpoint(run_dir).address == "10.0.0.5:40001" and read_endpoint(run_dir).pid == 12


def test_max_connections_grow_with_workers() -> None:
    assert server.max_connections_for(0) == 151
    assert server.max_connections_for(100) == 408
    assert server.max_connections_for(100, configured=50) == 50


def _config(tmp_path: Path, text: str = "") -> object:
    path = tmp_path / "hpopt.toml"
    path.write_text(text)
    return load_config(path, env={})


def test_job_script_has_renewal_partition_and_no_secret(tmp_path: Path, run_dir: RunDir) -> None:
    creds = ensure_credentials(run_dir)
    config = _config(tmp_path, '[slurm]\ncpu_partition = "cpu-small"\naccount = "gts-x"\n'
                               'prelude = ["module load mariadb"]\nextra_sbatch = ["--exclusive"]\n'
                               '[db]\nrenew_before_s = 90\n')
    script = server.render_job_script(config, run_dir, workers=40, time_limit="1:00:00")
    assert "#SBATCH --signal=B:USR1@90" in script
    assert "#SBATCH --time=1:00:00" in script
    assert "#SBATCH --partition=cpu-small\n#SBATCH --account=gts-x\n#SBATCH --exclusive" in script
    assert "\nmodule load mariadb\n" in script
    assert "--max-connections 168" in script and f"--run-dir {run_dir.root}" in script
    assert "--qos" not in script and creds.password not in script
    assert "$" not in script.split("#SBATCH --job-name")[1]  # every placeholder was filled


def test_job_script_quotes_paths_and_prefers_the_users_template(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "my run").ensure()
    config = _config(tmp_path)
    assert "--run-dir '" + str(run_dir.root) + "'" in server.render_job_script(config, run_dir)
    (tmp_path / "sbatch").mkdir()
    (tmp_path / "sbatch" / "mysql.sbatch").write_text("#!/bin/bash\n#SBATCH --time=$time\n$runner\n")
    assert server.template_path(tmp_path) == tmp_path / "sbatch" / "mysql.sbatch"
    (tmp_path / "sbatch" / "mysql.sbatch").write_text("#SBATCH --mem=$memory\n")
    with pytest.raises(HpoptError, match="unknown or malformed placeholder 'memory'"):
        server.render_job_script(config, run_dir, template=tmp_path / "sbatch" / "mysql.sbatch")


def test_too_short_renewal_warning_is_refused(tmp_path: Path, run_dir: RunDir) -> None:
    with pytest.raises(HpoptError, match="renew_before_s"):
        server.render_job_script(_config(tmp_path, "[db]\nrenew_before_s = 0\n"), run_dir)


class StubSlurm:
    """Answers `states` from a table (what squeue/sacct would say); the real one is tested on the cluster."""

    def __init__(self, states: dict[str, JobInfo]) -> None:
        self.answers = states
        self.asked: list[list[str]] = []

    def states(self, job_ids: list[str]) -> dict[str, JobInfo]:
        self.asked.append(sorted(job_ids))
        return {k: v for k, v in self.answers.items() if k in job_ids}


def test_status_before_anything_started(run_dir: RunDir) -> None:
    report = server.collect_db_status(run_dir, StubSlurm({}))  # type: ignore[arg-type]
    assert report["state"] == "NOT STARTED" and report["reachable"] is False


def test_status_reports_a_stale_endpoint_and_a_pending_reason(run_dir: RunDir) -> None:
    ensure_credentials(run_dir)
    _endpoint(run_dir)
    write_json_atomic(run_dir.db_job_file, {"mode": "slurm", "job_id": "77", "renew_before_s": 300})
    slurm = StubSlurm({"77": JobInfo(job_id="77", state="CANCELLED", source="sacct")})
    report = server.collect_db_status(run_dir, slurm)  # type: ignore[arg-type]
    assert report["state"] == "CANCELLED" and report["reachable"] is False
    assert "endpoint stale: job 77 is not running (CANCELLED)" in report["error"]
    assert set(report) == {"job_id", "state", "reason", "node", "host", "port", "uptime_s", "time_left",
                           "renewal_scheduled", "reachable", "rtt_ms", "connections", "studies", "error"}

    # renewal in progress: the successor waits in the queue while job 77's endpoint is still on record
    write_json_atomic(run_dir.db_job_file, {"mode": "slurm", "job_id": "78", "predecessor": "77",
                                            "renew_before_s": 300})
    slurm = StubSlurm({"78": JobInfo(job_id="78", state="PENDING", reason="Priority"),
                       "77": JobInfo(job_id="77", state="COMPLETED", source="sacct")})
    report = server.collect_db_status(run_dir, slurm)  # type: ignore[arg-type]
    assert (report["job_id"], report["state"], report["reason"]) == ("78", "PENDING", "Priority")
    assert report["renewal_scheduled"] is True and slurm.asked == [["77", "78"]]


def test_job_failure_names_the_missing_server_and_the_hint(run_dir: RunDir) -> None:
    record = server.JobRecord(mode="slurm", job_id="91")
    log = server.log_file_for(run_dir, record)
    log.write_text("some module output\nhpopt-db: error: mariadbd not found on PATH on node atl1-1\n")
    error = server.job_failure(run_dir, record, "FAILED", module_hint="run `module load mariadb`")
    assert str(error) == "DB job 91: mariadbd not found on PATH on node atl1-1: run `module load mariadb`"
    log.write_text("line\n" * 30 + "Traceback (most recent call last):\nboom\n")
    text = str(server.job_failure(run_dir, record, "FAILED"))
    assert text.startswith("DB job 91 ended (FAILED) before the server was ready; last lines of")
    assert text.rstrip().endswith("boom") and text.count("\n") == server.LOG_TAIL_LINES


def test_job_record_round_trip(run_dir: RunDir) -> None:
    record = server.JobRecord(mode="local", pid=4242, submitted_at="t")
    server._write_job_record(run_dir, record)
    assert server.read_job_record(run_dir) == record
    assert json.loads(run_dir.db_job_file.read_text())["pid"] == 4242
    assert not server.local_runner_alive(os.getpid())  # alive, but not our runner: never signalled
