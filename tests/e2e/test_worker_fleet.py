"""Worker jobs on the real Slurm test cluster against a real MariaDB (`hpopt db` local mode),
training the real trainer on a tiny EMT demo set.

* a 4-task GPU array (fake GPUs: each task its own CUDA_VISIBLE_DEVICES) finishes the budget
  with pruning; `kill -9` of one worker mid-trial gets that trial reaped and re-run with the
  same parameters, and the study ends with exactly the budget finished and nothing RUNNING;
* the DB "renews itself" mid-run (stopped, restarted on another port, endpoint file rewritten):
  the workers reconnect and no finished trial's result is lost.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from optuna.trial import TrialState

from hpopt.config import load_config
from hpopt.db import server
from hpopt.db.endpoint import read_endpoint
from hpopt.rundir import RunDir
from hpopt.slurm import Slurm
from hpopt.storage import open_storage
from polling import wait_for

pytestmark = pytest.mark.cluster

SPACE = """\
optim:
  lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  epochs: 6
  batch_size: 16
model:
  num_layers: {type: int, low: 1, high: 2}
  num_nodes: {type: int, low: 4, high: 16, step: 4}
  dropout: {type: categorical, choices: [false, true]}
  dropout_rate: {type: float, low: 0.05, high: 0.3, when: {model.dropout: true}}
"""



@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 EMT images and a split manifest: trials of ~1 s on one CPU."""
    from hpopt.train.demo import make_demo
    from hpopt.train.split import make_split

    base = tmp_path_factory.mktemp("demo")
    make_demo(base / "demo.traj", n_images=60)
    return make_split(base / "demo.traj", "e2e", out_dir=base / "splits")


@pytest.fixture()
def run(cluster: dict[str, str], shared_tmp: Path) -> Iterator[RunDir]:
    """A run directory with a running `hpopt db` (local mode)."""
    run_dir = RunDir(shared_tmp / "run")
    server.start(load_config(None, env={}), run_dir, local=True)
    yield run_dir
    server.stop(run_dir)


def hpopt(run_dir: RunDir, *args: str) -> str:
    env = dict(os.environ, HPOPT_RUN_DIR=str(run_dir.root))
    done = subprocess.run([sys.executable, "-m", "hpopt", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def create(run_dir: RunDir, manifest: Path, budget: int, pruner: str) -> None:
    space = run_dir.root / "space.yaml"
    space.write_text(SPACE)
    hpopt(run_dir, "study", "create", "e2e", "--space", str(space), "--split", str(manifest),
          "--budget", str(budget), "--pruner", pruner)


def submit_workers(run_dir: RunDir, cluster: dict[str, str], n: int, grace_s: int) -> str:
    script = f"""#!/bin/bash
#SBATCH --job-name=hpopt-test-worker
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --array=0-{n - 1}
#SBATCH --time=10
#SBATCH --output={run_dir.root}/slurm-%A_%a.out
export HPOPT_RUN_DIR={run_dir.root} HPOPT_WORKER_HEARTBEAT_S=1 HPOPT_WORKER_GRACE_S={grace_s}
export HPOPT_WORKER_POLL_S=0.5 HPOPT_WORKER_DB_RETRY_S=120
exec {sys.executable} -m hpopt worker --study e2e
"""
    return Slurm(env=cluster).submit(script)


def wait_done(cluster: dict[str, str], job_id: str, n: int, timeout: float = 150) -> dict[str, str]:
    slurm = Slurm(env=cluster)
    tasks = [f"{job_id}_{i}" for i in range(n)]

    def finished() -> dict[str, str] | None:
        states = slurm.states(tasks)
        return {k: v.state for k, v in states.items()} if len(states) == n and not any(
            v.is_active for v in states.values()) else None

    try:
        return wait_for(finished, timeout=timeout, every=1.0)
    except AssertionError:
        slurm.cancel([job_id])
        raise


def trials(run_dir: RunDir) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="e2e", storage=open_storage(run_dir)).get_trials()


def worker_logs(run_dir: RunDir) -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(run_dir.worker_logs_dir.glob("*.log"))}


def kill_mid_trial(run_dir: RunDir) -> int:
    """kill -9 a worker that is training; returns the number of the trial it was running."""
    def victim() -> tuple[Path, int] | None:
        for path, text in worker_logs(run_dir).items():
            lines = text.strip().splitlines()
            pid = re.search(r"pid (\d+)", text)
            if pid and lines and re.search(r"trial \d+: start", lines[-1]) and len(re.findall(": COMPLETE|: PRUNED", text)) >= 1:
                return path, int(pid.group(1))
        return None

    for _ in range(5):
        path, pid = wait_for(victim, every=0.05)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        last = path.read_text().strip().splitlines()[-1]
        started = re.search(r"trial (\d+): start", last)
        if started:  # it died training that trial
            return int(started.group(1))
    raise AssertionError("could not catch a worker mid-trial")


def test_fleet_finishes_the_budget_and_a_killed_workers_trial_is_retried(
        cluster: dict[str, str], run: RunDir, manifest: Path) -> None:
    budget = 16
    create(run, manifest, budget, pruner="median")
    job_id = submit_workers(run, cluster, n=4, grace_s=4)
    killed = kill_mid_trial(run)
    wait_done(cluster, job_id, n=4)

    done = trials(run)
    by_number = {t.number: t for t in done}
    assert len(by_number) == len(done)  # workers racing to create trials never share a number
    states = [t.state for t in done]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == budget
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert TrialState.PRUNED in states  # pruning on the per-epoch validation MAE
    assert by_number[killed].state == TrialState.FAIL
    [retry] = [t for t in done if t.system_attrs.get("failed_trial") == killed]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params == by_number[killed].params

    finished = [t for t in done if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert {t.user_attrs["gpu"] for t in finished} <= {"0", "1", "2", "3"}
    assert len({t.user_attrs["gpu"] for t in finished}) >= 2  # each task its own fake GPU
    assert all(t.user_attrs["worker_job_id"].startswith(f"{job_id}_") for t in finished)
    assert all(t.user_attrs["device"] == "cpu" and t.user_attrs["wall_s"] > 0 for t in finished)
    complete = next(t for t in finished if t.state == TrialState.COMPLETE)
    assert complete.value == complete.user_attrs["val_mae"] and complete.user_attrs["epochs"] == 6
    assert complete.user_attrs["baseline_val_mae"] > 0 and len(complete.intermediate_values) == 6
    logs = worker_logs(run)
    assert len(logs) == 4 and all("device cpu (CUDA_VISIBLE_DEVICES=" in text for text in logs.values())
    assert "went stale (no heartbeat); re-queued" in "".join(logs.values())
    shown = hpopt(run, "study", "show", "e2e")
    assert f"budget {budget}: {budget} finished" in shown and "0 running" in shown


def test_db_renewal_mid_run_loses_no_result(cluster: dict[str, str], run: RunDir, manifest: Path) -> None:
    budget = 10
    create(run, manifest, budget, pruner="none")
    job_id = submit_workers(run, cluster, n=2, grace_s=60)
    wait_for(lambda: len([t for t in trials(run) if t.state == TrialState.COMPLETE]) >= 2)
    old_port = read_endpoint(run).port
    server.stop(run)  # the DB job ends ...
    time.sleep(3)  # ... workers keep training and hit the dead endpoint ...
    server.start(load_config(None, env={}), run, local=True)  # ... a renewal comes up elsewhere
    assert read_endpoint(run).port != old_port
    wait_done(cluster, job_id, n=2)

    done = trials(run)
    states = [t.state for t in done]
    assert states.count(TrialState.COMPLETE) == budget
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    logs = "".join(worker_logs(run).values())
    assert "DB unreachable" in logs
    told = {int(n): float(v) for n, v in re.findall(r"trial (\d+): COMPLETE value=([\d.e+-]+)", logs)}
    stored = {t.number: t.value for t in done if t.state == TrialState.COMPLETE}
    recovered = {t.user_attrs["recovered_from"]: t.value for t in done if "recovered_from" in t.user_attrs}
    for number, value in told.items():  # every result a worker finished is in the DB
        assert stored.get(number, recovered.get(number)) == pytest.approx(value)
