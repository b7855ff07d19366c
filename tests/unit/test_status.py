"""The status collector without a cluster: SQL summary vs the storage API, Slurm call budget, warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

import optuna
import pytest
from rich.console import Console

from hpopt.rundir import RunDir, write_json_atomic
from hpopt.slurm import JobInfo, Slurm
from hpopt.status import StatusCollector, claim_from_log, find_log, summarize_rdb, summarize_trials, tail, worker_key
from hpopt.status_view import duration, render

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_study(storage: optuna.storages.BaseStorage, name: str = "s1") -> optuna.Study:
    """12 finished trials from two workers of array job 100, a failure, a surplus FAIL, two RUNNING trials."""
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.set_user_attr("budget", 20)
    for i in range(12):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("act", ["tanh", "relu"])
        trial.set_user_attr("worker_job_id", "100")
        trial.set_user_attr("array_index", i % 2)
        state = optuna.trial.TrialState.PRUNED if i % 4 == 3 else optuna.trial.TrialState.COMPLETE
        study.tell(trial, abs(lr - 0.01) if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    failed = study.ask()
    failed.set_user_attr("worker_job_id", "100_1")  # the other spelling of the same worker
    failed.set_user_attr("error", "RuntimeError: CUDA out of memory")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    surplus = study.ask()  # bookkeeping, not a failure: must not count as a failing trial
    surplus.set_user_attr("surplus", True)
    study.tell(surplus, state=optuna.trial.TrialState.FAIL)
    for job, index in (("100", 0), ("101", 0)):
        running = study.ask()
        running.set_user_attr("worker_job_id", job)
        running.set_user_attr("array_index", index)
        running.set_user_attr("gpu", "2")
    return study


def test_worker_key_accepts_both_spellings() -> None:
    assert worker_key("123", 4) == worker_key("123_4", None) == "123_4"
    assert worker_key("", 3) == "" and worker_key(None) == ""


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> optuna.storages.RDBStorage:
    """One SQLite study shared by the tests that only read it (creating it is most of their time)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path_factory.mktemp('db') / 'o.db'}")
    make_study(storage)
    return storage


def test_sql_summary_matches_the_storage_api(storage: optuna.storages.RDBStorage) -> None:
    study = optuna.load_study(study_name="s1", storage=storage)
    now = datetime.now()
    from_sql = summarize_rdb(storage.engine, "s1", datetime.now(timezone.utc).replace(tzinfo=None),
                             workers_since=datetime(2000, 1, 1))
    from_api = summarize_trials("s1", "sqlite", study.get_trials(), "minimize", 20, now)
    assert from_sql == from_api
    assert from_sql.counts == {"complete": 9, "pruned": 3, "fail": 2, "running": 2, "waiting": 0}
    assert from_sql.best["number"] == study.best_trial.number
    assert from_sql.best["params"] == study.best_trial.params  # categorical back to "tanh"/"relu"
    assert from_sql.finished_by_worker == {"100_0": 6, "100_1": 6}
    assert from_sql.finished_last_hour == 12 and from_sql.budget == 20
    assert [r["worker"] for r in from_sql.running] == ["100_0", "101_0"]
    assert from_sql.recent_states[:2] == ["FAIL", "PRUNED"] and from_sql.recent_errors == ["RuntimeError: CUDA out of memory"]
    later = summarize_rdb(storage.engine, "s1", datetime.now(timezone.utc).replace(tzinfo=None),
                          workers_since=datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(hours=1))
    assert later.finished_by_worker == {}  # trials started before the first launch are not its workers'
    with pytest.raises(KeyError):
        summarize_rdb(storage.engine, "nope", datetime.now(timezone.utc).replace(tzinfo=None))


class RecordingSlurm(Slurm):
    """Answers squeue/sacct from tables and counts the calls, like a cluster that only sees these jobs."""

    def __init__(self, live: dict[str, JobInfo], done: dict[str, JobInfo]) -> None:
        super().__init__(env={})
        self.live, self.done, self.calls = live, done, []

    def queue(self, job_ids: Iterable[str] = (), name: str | None = None) -> dict[str, JobInfo]:
        parents = {j.split("_")[0] for j in job_ids}
        self.calls.append(("squeue", sorted(parents)))
        return {k: v for k, v in self.live.items() if v.array_job_id in parents}

    def accounting(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        parents = {j.split("_")[0] for j in job_ids}
        self.calls.append(("sacct", sorted(parents)))
        return {k: v for k, v in self.done.items() if v.array_job_id in parents}


def db_reachable(run_dir: RunDir, slurm: Slurm | None) -> dict[str, Any]:
    """Stands in for hpopt.db.server.collect_db_status; asks Slurm for the DB job like it would."""
    info = slurm.states(["90"]).get("90") if slurm else None
    return {"job_id": "90", "state": info.state if info else "UNKNOWN", "host": "n1", "port": 3306,
            "reachable": True, "rtt_ms": 0.4, "connections": 3, "uptime_s": 3600.0, "time_left": "7:00:00",
            "renewal_scheduled": True}


@pytest.fixture()
def run_dir(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run").ensure()
    write_json_atomic(run.endpoint_file, {"host": "n1", "port": 3306, "job_id": "90", "mode": "slurm"})
    write_json_atomic(run.workers_file, {"launches": [
        {"job_id": "100", "n_workers": 3, "study": "s1", "via": "submitit", "gpu": True,
         "submitted_at": "2024-01-01T00:00:00+00:00", "log_dir": str(run.logs_dir / "submitit")}]})
    log_dir = run.logs_dir / "submitit"
    log_dir.mkdir()
    (log_dir / "100_2_0_log.out").write_text("starting\n")
    (log_dir / "100_2_0_log.err").write_text("Traceback (most recent call last):\nValueError: bad split\n")
    (log_dir / "1100_2_0_log.err").write_text("another job's log\n")
    return run


def cluster_tables() -> tuple[dict[str, JobInfo], dict[str, JobInfo]]:
    live = {
        "90": JobInfo("90", "RUNNING", node="n1", elapsed="1:00:00", time_left="7:00:00"),
        "100_0": JobInfo("100_0", "RUNNING", node="n2", elapsed="10:00", time_left="3:50:00", gres="gres:gpu:1"),
    }
    done = {
        "100_1": JobInfo("100_1", "COMPLETED", exit_code="0:0", source="sacct"),
        "100_2": JobInfo("100_2", "FAILED", exit_code="1:0", source="sacct"),
    }
    return live, done


def collector(run_dir: RunDir, storage: Any, slurm: Slurm | None) -> StatusCollector:
    return StatusCollector(run_dir, slurm=slurm, use_slurm=slurm is not None,
                           open_source=lambda _: storage.engine, db_status=db_reachable)


def test_one_squeue_and_batched_sacct_per_refresh(run_dir: RunDir, storage: optuna.storages.RDBStorage) -> None:
    slurm = RecordingSlurm(*cluster_tables())
    status = collector(run_dir, storage, slurm)

    report = status.collect()
    assert slurm.calls == [("squeue", ["100", "90"]), ("sacct", ["100"])]  # DB collector asked nothing more
    tasks = {t["key"]: t for t in report["workers"]["tasks"]}
    assert tasks["100_0"]["state"] == "RUNNING" and tasks["100_0"]["current_trial"] == 14
    assert tasks["100_0"]["gpu"] == "2" and tasks["100_0"]["trials_finished"] == 6
    assert tasks["100_1"]["bucket"] == "completed" and tasks["100_1"]["current_trial"] is None
    assert tasks["100_2"]["exit_code"] == "1:0"
    assert tasks["100_2"]["log_tail"][-1] == "ValueError: bad split"
    assert tasks["100_2"]["log_file"].endswith("100_2_0_log.err")
    assert report["workers"]["summary"] == {"running": 1, "pending": 0, "completed": 1, "failed": 1,
                                            "cancelled": 0, "unknown": 0}
    codes = {w["code"]: w for w in report["warnings"]}
    assert set(codes) == {"workers_failed", "stale_trials"}
    assert "#15 (101_0)" in codes["stale_trials"]["message"]  # job 101 is in no squeue answer
    assert report["attention"] is True
    # 12 trials finished within the last minute: 720/hour over a 1-minute window (not 12/hour)
    assert report["study"]["trials_per_hour"] == pytest.approx(720.0)
    assert report["study"]["eta_s"] == pytest.approx((20 - 12) / 720 * 3600)

    slurm.calls.clear()
    status.collect()
    assert slurm.calls == [("squeue", ["100", "90"])]  # finished tasks are remembered, sacct not asked again


def test_db_down_and_workers_without_db(run_dir: RunDir) -> None:
    slurm = RecordingSlurm(*cluster_tables())
    status = StatusCollector(run_dir, slurm=slurm, open_source=lambda _: pytest.fail("DB is down"),
                             db_status=lambda *_: {"job_id": "90", "state": "TIMEOUT", "reachable": False,
                                                   "error": "connection refused"})
    report = status.collect()
    codes = {w["code"]: w["severity"] for w in report["warnings"]}
    assert codes["db_down"] == "error" and codes["workers_without_db"] == "error"
    assert report["study"]["available"] is False and "not reachable" in report["study"]["error"]
    assert report["attention"] is True


def test_pending_db_is_information_not_an_alarm(run_dir: RunDir) -> None:
    write_json_atomic(run_dir.workers_file, {"launches": []})
    status = StatusCollector(run_dir, slurm=RecordingSlurm({}, {}),
                             db_status=lambda *_: {"job_id": "90", "state": "PENDING", "reason": "Priority",
                                                   "reachable": False})
    report = status.collect()
    assert [w["code"] for w in report["warnings"]] == ["db_pending"]
    assert "Priority" in report["warnings"][0]["message"] and report["attention"] is False


def test_nothing_started_says_so_without_calling_anything(tmp_path: Path) -> None:
    status = StatusCollector(RunDir(tmp_path / "empty"), use_slurm=False,
                             open_source=lambda _: pytest.fail("no storage to open"),
                             db_status=lambda *_: pytest.fail("no DB on record"))
    report = status.collect()
    assert [w["code"] for w in report["warnings"]] == ["nothing_started"]
    assert report["attention"] is False and report["db"]["started"] is False
    assert report["workers"]["tasks"] == [] and report["study"]["available"] is False
    text = screen(report)
    assert "no DB started yet" in text and "no workers launched yet" in text


def test_journal_mode_with_local_workers(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run").ensure()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run.journal_file)))
    study = make_study(storage)
    study.set_user_attr("budget", 12)  # the 12 finished trials fill it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hpopt-worker-stand-in"])
    dead = subprocess.Popen([sys.executable, "-c", "pass", "hpopt-worker-stand-in"])
    dead.wait()
    write_json_atomic(run.workers_file, {"launches": [
        {"job_id": "", "n_workers": 2, "study": "s1", "via": "local", "gpu": False,
         "submitted_at": "2024-01-01T00:00:00+00:00", "log_dir": str(run.worker_logs_dir),
         "pids": [live.pid, dead.pid]}]})
    try:
        report = StatusCollector(run, use_slurm=False, open_source=lambda _: storage,
                                 db_status=lambda *_: pytest.fail("no DB in local mode")).collect()
    finally:
        live.kill()
        live.wait()
    assert report["storage"] == "journal" and report["study"]["storage"] == "journal"
    assert [t["state"] for t in report["workers"]["tasks"]] == ["RUNNING", "EXITED"]
    assert report["study"]["best"]["number"] == study.best_trial.number
    codes = [w["code"] for w in report["warnings"]]
    assert "no_db" not in codes and "nothing_started" not in codes
    assert "budget_reached" in codes and report["study"]["eta_s"] == 0.0


def test_all_recent_trials_failing_names_the_most_common_error(run_dir: RunDir, tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="s1", storage=storage)
    for error in ("KeyError: 'lr'", "ValueError: nan loss", "ValueError: nan loss"):
        trial = study.ask()
        trial.set_user_attr("error", error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    slurm = RecordingSlurm(*cluster_tables())
    report = collector(run_dir, storage, slurm).collect()
    failing = [w for w in report["warnings"] if w["code"] == "trials_failing"]
    assert failing and failing[0]["message"].endswith("ValueError: nan loss")


SCHEMA: dict[str, Any] = {
    "generated_at": str, "run_dir": str, "storage": str, "refresh_s": float, "attention": bool,
    "slurm": {"available": bool, "error": (str, type(None))},
    "db": {"started": bool, "job_id": (str, type(None)), "state": (str, type(None)), "reachable": bool},
    "workers": {"launches": int, "tasks": list, "summary": dict},
    "study": {"available": bool, "name": str, "storage": str, "direction": str, "budget": (int, type(None)),
              "counts": dict, "finished": int, "remaining": (int, type(None)), "trials_per_hour": float,
              "eta_s": (float, type(None)), "best": (dict, type(None)), "running_trials": list,
              "finished_by_worker": dict},
    "warnings": list,
}
TASK_SCHEMA = {"key": str, "launch_job_id": str, "array_index": int, "study": str, "state": str, "bucket": str,
               "node": str, "gpu": str, "elapsed": str, "time_left": str, "exit_code": str,
               "current_trial": (int, type(None)), "trials_finished": int, "log_file": (str, type(None)),
               "log_tail": list}


def check_schema(data: dict[str, Any], schema: dict[str, Any], where: str = "") -> None:
    for key, expected in schema.items():
        assert key in data, f"missing {where}{key}"
        if isinstance(expected, dict):
            check_schema(data[key], expected, f"{where}{key}.")
        else:
            assert isinstance(data[key], expected), f"{where}{key} is {type(data[key]).__name__}"


def test_json_schema(run_dir: RunDir, storage: optuna.storages.RDBStorage) -> None:
    report = json.loads(json.dumps(collector(run_dir, storage, RecordingSlurm(*cluster_tables())).collect()))
    check_schema(report, SCHEMA)
    for task in report["workers"]["tasks"]:
        check_schema(task, TASK_SCHEMA, "task.")
    for warning in report["warnings"]:
        assert set(warning) == {"severity", "code", "message"} and warning["severity"] in ("error", "warning", "info")
    assert set(report["study"]["counts"]) == {"complete", "pruned", "fail", "running", "waiting"}


def screen(report: dict[str, Any]) -> str:
    console = Console(record=True, width=120, file=open(os.devnull, "w"))
    console.print(render(report))
    return console.export_text()


def test_view_shows_what_needs_attention(run_dir: RunDir, storage: optuna.storages.RDBStorage) -> None:
    text = screen(collector(run_dir, storage, RecordingSlurm(*cluster_tables())).collect())
    assert "ValueError: bad split" in text  # log tail of the failed task
    assert "#14" in text and "12/20 finished" in text and "720.0 trials/hour over the last 1m00s" in text and "ETA to budget 40s" in text
    assert "RUNNING with no live worker" in text and "round trip 0.4 ms" in text
    assert "1 running · 0 pending · 1 completed · 1 failed · 0 cancelled" in text


def test_helpers(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == ["line 97", "line 98", "line 99"] and tail(tmp_path / "none") == []
    (tmp_path / "12_3.log").write_text("x")
    (tmp_path / "12_34.log").write_text("x")
    assert find_log("12_3", [tmp_path]).name == "12_3.log" and find_log("2_3", [tmp_path]) is None
    (tmp_path / "12_3.log").unlink()
    (tmp_path / "worker-12_3.log").write_text(
        "x worker-12_3 INFO trial 5: start {'lr': 0.1}\nx worker-12_3 INFO trial 5: COMPLETE value=0.2\n"
        "x worker-12_3 INFO trial 7: start {'lr': 0.3}\n")
    unclaimed = {7: {"number": 7, "worker": ""}, 8: {"number": 8, "worker": ""}}
    assert claim_from_log("12_3", [tmp_path], unclaimed) == {"number": 7, "worker": "12_3"}
    assert list(unclaimed) == [8]  # trial 8 is nobody's: it may be stale
    assert claim_from_log("12_3", [tmp_path], unclaimed) is None  # 7 is no longer unclaimed
    assert duration(59) == "59s" and duration(3600 * 26) == "1d02h" and duration(None) == "-"


def test_watch_refreshes_until_ctrl_c(tmp_path: Path) -> None:
    import signal
    import time

    env = {"PATH": "/usr/bin:/bin", "HPOPT_RUN_DIR": str(tmp_path / "run"), "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-m", "hpopt", "status", "--watch", "--json", "--interval", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 15
    lines: list[str] = []
    while len(lines) < 2 and time.monotonic() < deadline:
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    reports = [json.loads(line) for line in lines + out.splitlines() if line.strip()]
    assert len(reports) >= 2 and all(r["warnings"][0]["code"] == "nothing_started" for r in reports)


def test_unattributed_trial_is_stale_only_when_every_live_worker_is_busy() -> None:
    from hpopt.status import assess

    def report(current: int | None) -> dict[str, Any]:
        task = {"key": "7_0", "state": "RUNNING", "bucket": "running", "via": "sbatch", "current_trial": current}
        return {"run_dir": "/r", "storage": "rdb", "slurm": {"available": True, "error": None},
                "db": {"started": True, "reachable": True, "state": "RUNNING"},
                "workers": {"tasks": [task]},
                "study": {"available": True, "running_trials": [{"number": 3, "worker": ""}, {"number": 4, "worker": "7_0"}],
                          "recent_states": [], "recent_errors": [], "remaining": 5}}

    assert "stale_trials" not in {w["code"] for w in assess(report(None))}  # 7_0 may be starting #3
    busy = {w["code"]: w["message"] for w in assess(report(4))}
    assert "#3" in busy["stale_trials"] and "#4" not in busy["stale_trials"]


def test_worker_tally_counts_each_finished_trial_once(tmp_path: Path) -> None:
    from hpopt.status import WorkerTally

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="t", storage=storage)

    def trial(worker: str, finish: bool = True) -> optuna.Trial:
        t = study.ask()
        t.set_user_attr("worker_job_id", worker)
        if finish:
            study.tell(t, 1.0)
        return t

    trial("5_0"), trial("5_1")
    open_trial = trial("5_0", finish=False)
    trial("5_1")
    tally, since = WorkerTally(), datetime(2000, 1, 1)

    def counts() -> dict[str, int]:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        return summarize_rdb(storage.engine, "t", now, since, tally).finished_by_worker

    assert counts() == {"5_0": 1, "5_1": 2}
    assert tally.closed == {"5_0": 1, "5_1": 1}  # the trial after the open one may not count as closed yet
    study.tell(open_trial, 2.0)
    trial("5_0")
    assert counts() == counts() == {"5_0": 3, "5_1": 2}  # no trial counted twice across refreshes
    assert tally.closed_through == 5
