"""`hpopt launch` on the real test cluster: submitit and sbatch job arrays on fake GPUs, dry-run.

One project (demo data, split, tiny search space, run directory) is shared by the module; the
first launch starts its DB job, the later ones find it running. Trials are real (EMT demo data,
a 3-epoch tiny network), so a budget is finished by the real worker and trainer.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna
import pytest

from hpopt.launch import active_launches, read_launches
from hpopt.rundir import RunDir
from hpopt.slurm import JobInfo, Slurm, SlurmError

pytestmark = pytest.mark.cluster

SPACE = """\
optim:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  batch_size: 16
  epochs: 3
model:
  num_layers: 2
  num_nodes: {type: int, low: 4, high: 8}
"""


@dataclass
class Project:
    """A directory a user would launch from: hpopt.toml, data, split, space; commands run there."""

    root: Path
    env: dict[str, str]

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.root / "run")

    def hpopt(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpopt", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def create_study(self, name: str, budget: int) -> None:
        result = self.hpopt("study", "create", name, "--space", "space.yaml", "--split", "data/splits/demo.json",
                            "--budget", str(budget), "--pruner", "none")
        assert result.returncode == 0, result.stderr

    def storage(self) -> optuna.storages.BaseStorage:
        from hpopt.storage import open_storage

        return open_storage(self.run_dir)

    def trials(self, study: str) -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name=study, storage=self.storage()).get_trials()

    def budget(self, study: str) -> int:
        return optuna.load_study(study_name=study, storage=self.storage()).user_attrs["budget"]

    def wait_idle(self, study: str, timeout: float = 150) -> None:
        """Until no worker of the study is queued or running."""
        slurm = Slurm(env=self.env)
        deadline = time.monotonic() + timeout
        while active_launches(self.run_dir, study, slurm):
            assert time.monotonic() < deadline, f"workers of {study} still active after {timeout} s"
            time.sleep(1)

    def final_accounting(self, job_id: str, tasks: int, timeout: float = 60) -> dict[str, JobInfo]:
        """sacct's view once every task has a final state (slurmdbd records job ends a little
        after the tasks leave squeue, so a first read can still say RUNNING)."""
        slurm = Slurm(env=self.env)
        deadline = time.monotonic() + timeout
        while True:
            done = slurm.accounting([job_id])
            if len(done) == tasks and not any(info.is_active for info in done.values()):
                return done
            assert time.monotonic() < deadline, f"sacct has no final state for {job_id} after {timeout} s: {done}"
            time.sleep(0.5)

    def cleanup(self) -> None:
        """Cancel every job this project submitted, then stop its DB (the data is thrown away)."""
        ids = [r["job_id"] for r in read_launches(self.run_dir) if r.get("job_id")]
        if ids:
            try:
                Slurm(env=self.env).cancel(ids)
            except SlurmError:
                pass
        self.hpopt("db", "stop", "--timeout", "30")


def make_project(root: Path, cluster_env: dict[str, str]) -> Project:
    from hpopt.train.demo import make_demo
    from hpopt.train.split import make_split

    root.mkdir(parents=True, exist_ok=True)
    (root / "hpopt.toml").write_text(
        'run_dir = "run"\n[slurm]\ncpu_partition = "cpu"\ngpu_partition = "gpu"\nmem = "400M"\n'
        'worker_time = "0:10:00"\n')
    (root / "space.yaml").write_text(SPACE)
    make_demo(root / "data" / "demo.traj", 48)
    make_split(root / "data" / "demo.traj", "demo", out_dir=root / "data" / "splits")
    env = dict(cluster_env, HPOPT_CONFIG=str(root / "hpopt.toml"), PATH=f"{Path(sys.executable).parent}:{cluster_env['PATH']}",
               HPOPT_WORKER_POLL_S="0.5", OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("HPOPT_RUN_DIR", None)
    return Project(root, env)


@pytest.fixture(scope="module")
def project(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
            monkeymodule: pytest.MonkeyPatch) -> Iterator[Project]:
    proj = make_project(tmp_path_factory.mktemp("launch") / "proj", cluster_env)
    monkeymodule.setenv("SLURM_CONF", cluster_env["SLURM_CONF"])  # the test reads the DB and squeue too
    try:
        yield proj
    finally:
        proj.cleanup()


@pytest.fixture(scope="module")
def monkeymodule() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


LOG_LINE = re.compile(r"^(\S+ \S+) (worker-\S+) INFO (.*)$")


def worker_runs(run_dir: RunDir, job_id: str) -> dict[str, dict]:
    """Per array task (from its worker log): the GPU it saw and when it started and ended."""
    runs = {}
    for log in run_dir.worker_logs_dir.glob(f"worker-{job_id}_*.log"):
        times, gpu = [], None
        for line in log.read_text().splitlines():
            match = LOG_LINE.match(line)
            if not match:
                continue
            times.append(dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"))
            found = re.search(r"CUDA_VISIBLE_DEVICES='([^']*)'", match.group(3))
            gpu = found.group(1) if found else gpu
        runs[log.stem.removeprefix("worker-")] = {"gpu": gpu, "start": times[0], "end": times[-1]}
    return runs


def assert_own_gpus(runs: dict[str, dict]) -> None:
    """Every worker saw exactly one fake GPU, and workers that ran at the same time saw different ones."""
    assert runs and all(run["gpu"] in {"0", "1", "2", "3"} for run in runs.values()), runs
    items = sorted(runs.items())
    for i, (a, ra) in enumerate(items):
        for b, rb in items[i + 1:]:
            if ra["start"] < rb["end"] and rb["start"] < ra["end"]:
                assert ra["gpu"] != rb["gpu"], f"{a} and {b} ran at the same time on GPU {ra['gpu']}"


def assert_budget_finished(project: Project, study: str, budget: int, job_id: str, runs: dict[str, dict]) -> None:
    trials = project.trials(study)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= budget, [t.state for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for trial in finished:  # each trial names its worker and the GPU that worker saw
        worker = trial.user_attrs["worker_job_id"]
        assert worker.startswith(f"{job_id}_") and trial.user_attrs["gpu"] == runs[worker]["gpu"]


def test_dry_run_prints_scripts_slurm_accepts_and_submits_nothing(project: Project) -> None:
    slurm = Slurm(env=project.env)
    for via in ("submitit", "sbatch"):
        result = project.hpopt("launch", "-n", "8", "--gpu", "-s", "anything", "--via", via, "--dry-run")
        assert result.returncode == 0, result.stderr
        assert "#SBATCH --array=0-7" in result.stdout and "#SBATCH --gres=gpu:1" in result.stdout
        assert "sbatch --test-only accepts it" in result.stderr
        assert "to start at" in slurm.test_only(result.stdout)  # and once more by the test itself
    refused = project.hpopt("launch", "-n", "2", "-s", "anything", "--partition", "nope", "--dry-run")
    assert refused.returncode == 1 and "Slurm would refuse this script" in refused.stderr
    assert not project.run_dir.workers_file.exists() and not project.run_dir.db_job_file.exists()
    assert not slurm.queue(name="hpopt-worker-anything")


def test_submitit_array_of_8_gpu_workers_finishes_the_budget(project: Project) -> None:
    assert project.hpopt("db", "start").returncode == 0
    project.create_study("sub", budget=8)
    assert project.hpopt("db", "stop").returncode == 0  # e.g. its walltime ran out overnight
    args = ["launch", "--workers", "8", "--gpu", "--study", "sub", "--time", "10"]
    result = project.hpopt(*args)
    assert result.returncode == 0, result.stderr
    assert re.search(r"DB job \d+ started", result.stderr), result.stderr  # launch started it again
    [record] = read_launches(project.run_dir)
    assert (record["via"], record["n_workers"], record["study"], record["gpu"]) == ("submitit", 8, "sub", True)
    job_id = record["job_id"]
    assert f"Slurm array job {job_id}" in result.stdout

    # what --dry-run prints is exactly what submitit gave sbatch
    submitted = (Path(record["log_dir"]) / f"{job_id}_submission.sh").read_text()
    assert project.hpopt(*args, "--dry-run").stdout == submitted

    project.wait_idle("sub")
    done = project.final_accounting(job_id, 8)
    assert sorted(done) == [f"{job_id}_{i}" for i in range(8)]
    assert {info.state for info in done.values()} == {"COMPLETED"}, done
    runs = worker_runs(project.run_dir, job_id)
    assert len(runs) == 8
    assert_own_gpus(runs)
    assert_budget_finished(project, "sub", 8, job_id, runs)


def test_sbatch_template_workers_finish_the_budget(project: Project) -> None:
    project.create_study("tmpl", budget=3)
    result = project.hpopt("launch", "--workers", "3", "--gpu", "--study", "tmpl", "--via", "sbatch", "--time", "10")
    assert result.returncode == 0, result.stderr
    assert re.search(r"DB job \d+ (already running|started)", result.stderr), result.stderr
    record = [r for r in read_launches(project.run_dir) if r["study"] == "tmpl"][-1]
    assert record["via"] == "sbatch" and record["n_workers"] == 3
    job_id = record["job_id"]

    project.wait_idle("tmpl")
    outputs = sorted(p.name for p in project.run_dir.worker_logs_dir.glob(f"worker-{job_id}_*.out"))
    assert outputs == [f"worker-{job_id}_{i}.out" for i in range(3)]
    runs = worker_runs(project.run_dir, job_id)
    assert len(runs) == 3
    assert_own_gpus(runs)
    assert_budget_finished(project, "tmpl", 3, job_id, runs)
