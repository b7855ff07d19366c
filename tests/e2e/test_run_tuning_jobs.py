"""jobs/run-tuning-jobs.sh on the real test cluster: arguments, idempotence, resume."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest

from hpopt.launch import read_launches
from hpopt.rundir import read_json
from test_launch_cluster import Project, make_project

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "run-tuning-jobs.sh"


def run_script(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(project.env, STUDY="login", SPACE="space.yaml", SPLIT="data/splits/demo.json")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=project.root, env=env, capture_output=True,
                          text=True, timeout=180)


def finished(project: Project, study: str) -> int:
    return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
               for t in project.trials(study))


@pytest.mark.parametrize("args,message", [(["0"], "WORKERS"), (["x", "3"], "WORKERS"), (["2", "three"], "TRIALS")])
def test_bad_arguments_are_refused_with_the_usage(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr and "jobs/run-tuning-jobs.sh [WORKERS]" in result.stderr


@pytest.mark.cluster
def test_twice_in_a_row_then_resume_with_a_bigger_budget(cluster: dict[str, str], tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", cluster)
    try:
        first = run_script(project, "2", "3", "--time", "10")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "hpopt status --study login --watch" in first.stdout
        db_job = read_json(project.run_dir.db_job_file)["job_id"]
        # WORKERS=2 and TRIALS=3 differ, so swapped arguments cannot pass
        [launch] = read_launches(project.run_dir)
        assert (launch["n_workers"], launch["study"], launch["gpu"]) == (2, "login", True)
        assert project.budget("login") == 3

        second = run_script(project, "2", "3", "--time", "10")
        assert second.returncode == 0, second.stdout + second.stderr
        # the first workers are live (listed) or already done with the budget: either way none are added
        assert ("already has live workers, launching none" in second.stdout
                and f"job {launch['job_id']} (submitit)" in second.stdout) or \
            "has finished its budget (3/3 trials): no workers launched" in second.stdout, second.stdout
        assert "exists: resuming it" in second.stdout
        assert read_json(project.run_dir.db_job_file)["job_id"] == db_job  # no second DB job
        assert len(read_launches(project.run_dir)) == 1  # no second array
        assert [s.study_name for s in optuna.get_all_study_summaries(project.storage())] == ["login"]

        project.wait_idle("login")
        assert finished(project, "login") >= 3

        third = run_script(project, "2", "5", "--time", "10")  # done: a bigger budget resumes the study
        assert third.returncode == 0, third.stdout + third.stderr
        assert project.budget("login") == 5
        assert [r["n_workers"] for r in read_launches(project.run_dir)] == [2, 2]  # workers for the rest
    finally:
        project.cleanup()
