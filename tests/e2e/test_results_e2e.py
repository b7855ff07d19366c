"""Results on a study produced by real workers: two hpopt workers run as a Slurm job array on the
test cluster, training the native trainer on tiny EMT data; then `report`, `best` and `retrain`
(here and as a Slurm job) on what they wrote."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from hpopt.rundir import RunDir
from hpopt.slurm import Slurm

pytestmark = pytest.mark.cluster

STUDY = "e2e-results"
SPACE = """
optim:
  lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  epochs: 4
  batch_size: 8
model:
  num_nodes: {type: int, low: 4, high: 12}
  num_layers: 1
"""
BASE_CONFIG = {"dataset": {"fp_params": {"G2": {"etas": [0.05, 1.0], "rs_s": [0.0]},
                                         "G4": {"etas": [0.005], "zetas": [1.0], "gammas": [1.0]}},
                           "cutoff": 4.0}}
BUDGET = 4


def _browser_helpers():
    path = Path(__file__).parents[1] / "unit" / "test_results_browser.py"
    spec = importlib.util.spec_from_file_location("_hpopt_results_browser", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def hpopt(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "hpopt", *args], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"hpopt {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def wait_done(slurm: Slurm, job_id: str, timeout_s: float) -> dict[str, str]:
    """Wait until every task of the job left the queue; return task id -> final state."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        jobs = slurm.states([job_id])
        if jobs and not any(j.is_active for j in jobs.values()):
            return {k: j.state for k, j in jobs.items()}
        time.sleep(1)
    slurm.cancel([job_id])
    pytest.fail(f"job {job_id} still running after {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def searched(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A finished study: tiny EMT data, split, study, 2 workers as a Slurm array."""
    from hpopt.space import parse_space
    from hpopt.storage import open_storage
    from hpopt.study import StudySpec, create_study
    from hpopt.train.demo import make_demo
    from hpopt.train.split import make_split

    work = tmp_path_factory.mktemp("results-e2e")
    env = dict(os.environ, **cluster_env, HPOPT_RUN_DIR=str(work / ".hpopt"), COLUMNS="200",
               HPOPT_WORKER_POLL_S="0.5", HPOPT_SLURM_GPU_PARTITION="gpu")
    env.pop("HPOPT_CONFIG", None)
    manifest = make_split(make_demo(work / "emt.traj", n_images=40), "tiny", work / "data" / "splits")
    run_dir = RunDir(work / ".hpopt")
    spec = StudySpec(name=STUDY, space=parse_space(yaml.safe_load(SPACE)), base_config=BASE_CONFIG,
                     split=str(manifest), budget=BUDGET, sampler="random", pruner="median")
    create_study(open_storage(run_dir, create_schema=True), spec)

    script = "\n".join([
        "#!/bin/bash", "#SBATCH --job-name=hpopt-e2e-results-workers", "#SBATCH --array=0-1",
        f"#SBATCH --output={work}/worker-%A_%a.log", "#SBATCH --time=5:00", "#SBATCH --mem=2G",
        f"cd {work}",
        f"exec {sys.executable} -c 'from hpopt.rundir import RunDir; from hpopt.worker import run_worker; "
        f"from pathlib import Path; run_worker(RunDir(Path(\"{run_dir.root}\")), \"{STUDY}\")'",
    ]) + "\n"
    slurm = Slurm(env=env)
    job_id = slurm.submit(script)
    states = wait_done(slurm, job_id, 150)
    logs = "\n".join(p.read_text() for p in sorted(work.glob("worker-*.log")))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    return work, env


def test_report_and_best_on_real_workers(searched: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    from hpopt.storage import open_storage

    work, env = searched
    study = optuna.load_study(study_name=STUDY, storage=open_storage(RunDir(work / ".hpopt")))
    trials = study.get_trials()
    workers = {t.user_attrs.get("worker_job_id") for t in trials if t.user_attrs.get("worker_job_id")}
    assert len(workers) == 2, f"both array tasks should have run trials: {workers}"

    hpopt(work, env, "report", "--out", str(work / "report"), "--top", "3")
    out = work / "report"
    rows = list(csv.DictReader((out / "all_trials.csv").open()))
    assert len(rows) == len(trials) and [int(r["number"]) for r in rows] == [t.number for t in trials]
    assert {r["worker"] for r in rows if r["state"] == "COMPLETE"} <= workers
    assert all(float(r["wall_s"]) > 0 and int(r["epochs"]) >= 1 for r in rows if r["state"] == "COMPLETE")
    best = json.loads((out / "best_params.json").read_text())
    assert set(best["params"]) == {"optim.lr", "model.num_nodes"} and best["train_mae"] > 0
    assert len(list(csv.DictReader((out / "top_3.csv").open()))) == min(3, sum(r["state"] == "COMPLETE" for r in rows))
    for png in (out / "figures").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"

    browser = _browser_helpers()
    if browser.CHROMIUM is not None:  # the unit test says so when it is missing
        drawn = len(list((out / "figures").glob("*.png")))
        browser.assert_report_renders(out / "index.html", drawn, tmp_path)

    data = json.loads(hpopt(work, env, "best", "--json").stdout)
    assert data["selected"]["trial"] == best["trial"]


def test_retrain_records_test_mae_and_model_reloads(searched: tuple[Path, dict[str, str]]) -> None:
    from hpopt.storage import open_storage
    from hpopt.train.api import load_model
    from hpopt.train.data import energies, read_images
    from hpopt.train.split import load_manifest

    work, env = searched
    model_path = work / "models" / "best.pt"
    hpopt(work, env, "retrain", "--best", "--epochs", "3", "--out", str(model_path))
    study = optuna.load_study(study_name=STUDY, storage=open_storage(RunDir(work / ".hpopt")))
    result = study.user_attrs["test_result"]
    assert result["test_mae"] > 0 and result["epochs_run"] == 3 and Path(result["model_path"]).exists()
    assert json.loads(model_path.with_name("best.pt.test.json").read_text())["test_mae"] == result["test_mae"]

    manifest = load_manifest(work / "data" / "splits" / "tiny.json")
    test_images = read_images(manifest.source_path, manifest.test)
    model = load_model(result["model_path"])
    predicted = np.asarray(model.predict(test_images), dtype=float)
    assert predicted.shape == (len(test_images),)
    assert np.mean(np.abs(predicted - energies(test_images))) == pytest.approx(result["test_mae"], rel=1e-4)
    assert np.array_equal(predicted, np.asarray(load_model(result["model_path"]).predict(test_images)))


def test_retrain_as_slurm_job(searched: tuple[Path, dict[str, str]]) -> None:
    work, env = searched
    model_path = work / "models" / "submitted.pt"
    dry = hpopt(work, env, "retrain", "--best", "--submit", "--dry-run", "--epochs", "2", "--out", str(model_path))
    assert "#SBATCH --partition=gpu" in dry.stdout and "#SBATCH --gres=gpu:1" in dry.stdout
    submitted = hpopt(work, env, "retrain", "--best", "--submit", "--epochs", "2", "--out", str(model_path))
    match = re.search(r"as job (\d+)", submitted.stdout)
    assert match, submitted.stdout
    job_id = match.group(1)
    states = wait_done(Slurm(env=env), job_id, 120)
    log = next((work / ".hpopt" / "logs").glob(f"retrain-*-{job_id}.log"), None)
    assert states == {job_id: "COMPLETED"}, log.read_text() if log else states
    record = json.loads(model_path.with_name("submitted.pt.test.json").read_text())
    assert record["epochs_requested"] == 2 and record["test_mae"] > 0
