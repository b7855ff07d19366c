"""Local mode end to end: the README's quick start (jobs/quickstart.sh) with real workers and trainer.

Needs no cluster: the workers are local processes and the study lives in the journal file. The
test's own virtualenv stands in for .venv (torch and hpopt from this checkout are already there,
so the script installs nothing); the budget and epochs are shrunk to keep it short.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna

from hpopt.launch import read_launches
from hpopt.rundir import RunDir
from hpopt.storage import open_storage

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "quickstart.sh"


def quickstart(root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPOPT_")}
    env.update(HPOPT_VENV=sys.prefix, QUICKSTART_DIR=str(root), QUICKSTART_BUDGET="4", QUICKSTART_EPOCHS="3",
               QUICKSTART_IMAGES="48", QUICKSTART_MINUTES="3", COLUMNS="120")
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240)


def test_quickstart_runs_two_local_workers_to_the_budget_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "qs"
    first = quickstart(root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "workers done: 0 workers active; 4/4 trials finished" in first.stdout
    assert "selected trial" in first.stdout  # `hpopt best` printed the best trial

    run_dir = RunDir(root / "run")
    assert run_dir.journal_file.exists() and not run_dir.endpoint_file.exists()  # no DB server involved
    [launch] = read_launches(run_dir)
    assert (launch["via"], launch["n_workers"], launch["job_id"], len(launch["pids"])) == ("local", 2, "", 2)
    study = optuna.load_study(study_name="quickstart", storage=open_storage(run_dir))
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 4
    assert {t.user_attrs["worker_job_id"] for t in study.get_trials() if t.user_attrs} == {""}  # not Slurm
    for pid in launch["pids"]:
        assert (run_dir.worker_logs_dir / f"worker-local-{pid}.log").exists()

    again = quickstart(root)  # the same study is resumed; its budget is done, so nothing is launched
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "exists: resuming it" in again.stdout and "has finished its budget (4/4 trials)" in again.stdout
    assert len(read_launches(run_dir)) == 1
