"""Results side on synthetic studies that carry the contract's attributes: selection rule,
report files, comparison, retrain planning, dashboard and export commands."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpopt.config import Config
from hpopt.errors import HpoptError
from hpopt.results.best import select
from hpopt.results.compare import common_target, study_curve, write_comparison
from hpopt.results.report import write_report
from hpopt.results.retrain import plan_retrain, render_sbatch
from hpopt.results.snapshot import resolve_study_name, snapshot
from hpopt.rundir import RunDir

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTS = {"optim.lr": FloatDistribution(1e-4, 1e-1, log=True), "model.hidden": IntDistribution(4, 64),
         "model.act": CategoricalDistribution(["tanh", "relu"])}
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def frozen(number: int, state: TrialState, value: float | None, train: float | None = None,
           params: dict[str, Any] | None = None, worker: str = "100_0", start_s: float = 0.0,
           wall: float = 30.0, curve: dict[int, float] | None = None) -> FrozenTrial:
    attrs: dict[str, Any] = {"worker_job_id": worker, "array_index": int(worker.split("_")[-1]),
                             "host": "node1", "gpu": "0", "wall_s": wall, "device": "cpu"}
    if train is not None:
        attrs["train_mae"] = train
    if curve:
        attrs["epochs"] = len(curve)
    start = T0 + dt.timedelta(seconds=start_s)
    done = None if state == TrialState.RUNNING else start + dt.timedelta(seconds=wall)
    params = params or {"optim.lr": 1e-3, "model.hidden": 8, "model.act": "tanh"}
    return FrozenTrial(number=number, state=state, value=value, datetime_start=start,
                       datetime_complete=done, params=params,
                       distributions={k: DISTS[k] for k in params}, user_attrs=attrs,
                       system_attrs={}, intermediate_values=curve or {}, trial_id=number)


def make_study(n: int = 24, seed: int = 0, name: str = "synth", storage: Any = None,
               sampler: str = "tpe") -> optuna.Study:
    """A study shaped like one hpopt workers produce: 3 workers, 1 in 4 trials pruned, one failed."""
    rng = random.Random(seed)
    study = optuna.create_study(study_name=name, storage=storage or optuna.storages.InMemoryStorage())
    for key, value in {"space": {"params": [], "fixed": {"optim.epochs": 5}}, "budget": n,
                       "base_config": {"optim": {"batch_size": 8}}, "split": "/nonexistent.json",
                       "sampler": sampler, "pruner": "hyperband"}.items():
        study.set_user_attr(key, value)
    for i in range(n):
        p = {"optim.lr": 10 ** rng.uniform(-4, -1), "model.hidden": rng.randint(4, 64),
             "model.act": rng.choice(["tanh", "relu"])}
        val = abs(p["optim.lr"] - 0.01) * 10 + 1 / p["model.hidden"] + 0.05
        curve = {e: val * (1 + 1 / (e + 1)) for e in range(5)}
        state = TrialState.PRUNED if i % 4 == 3 else TrialState.COMPLETE
        if i == n - 1:
            state, curve = TrialState.FAIL, {}
        if state == TrialState.PRUNED:
            curve = {e: c for e, c in curve.items() if e < 2}
        study.add_trial(frozen(i, state, val if state == TrialState.COMPLETE else None,
                               val * rng.uniform(0.3, 0.9), p, f"100_{i % 3}", 20.0 * i,
                               rng.uniform(20, 60), curve))
    return study


# --- selection rule ------------------------------------------------------------------------

def test_near_tie_with_smaller_gap_wins_over_lowest_value() -> None:
    trials = [frozen(0, TrialState.COMPLETE, 0.100, train=0.020),  # lowest, val/train 5
              frozen(1, TrialState.COMPLETE, 0.103, train=0.080),  # within 5 %, val/train 1.29
              frozen(2, TrialState.COMPLETE, 0.200, train=0.190)]  # far worse
    sel = select(trials)
    assert sel.best.number == 1 and sel.lowest.number == 0
    assert sel.ranked[0].overfit and not sel.ranked[1].overfit
    assert sel.n_candidates == 2
    assert sel.best.gap == pytest.approx(0.023)


def test_tolerance_zero_is_plain_lowest_and_far_trials_never_win() -> None:
    trials = [frozen(0, TrialState.COMPLETE, 0.100, train=0.010),
              frozen(1, TrialState.COMPLETE, 0.120, train=0.119)]
    assert select(trials).best.number == 0  # 20 % worse is not a near-tie, however healthy
    assert select(trials, tolerance=0.0).best.number == 0
    assert select(trials, tolerance=0.25).best.number == 1


def test_all_flagged_falls_back_and_missing_train_mae_is_unflagged() -> None:
    both_flagged = [frozen(0, TrialState.COMPLETE, 0.10, train=0.01),
                    frozen(1, TrialState.COMPLETE, 0.101, train=0.02)]
    assert select(both_flagged).best.number == 1  # smaller ratio among flagged
    no_train = [frozen(0, TrialState.COMPLETE, 0.10), frozen(1, TrialState.COMPLETE, 0.2, train=0.1)]
    sel = select(no_train)
    assert sel.best.number == 0 and sel.best.gap is None and not sel.best.overfit


def test_no_complete_trial_is_one_clear_error() -> None:
    with pytest.raises(HpoptError, match="no complete trial yet .*1 pruned"):
        select([frozen(0, TrialState.PRUNED, None, curve={0: 1.0})])


# --- snapshot and study names --------------------------------------------------------------

def test_snapshot_copies_trials_and_attrs() -> None:
    study = make_study(12)
    snap = snapshot(study)
    assert snap.user_attrs == study.user_attrs
    assert [(t.number, t.state, t.value, t.params, t.user_attrs, t.intermediate_values)
            for t in snap.trials] == [(t.number, t.state, t.value, t.params, t.user_attrs,
                                       t.intermediate_values) for t in study.trials]


def test_study_name_resolution() -> None:
    storage = optuna.storages.InMemoryStorage()
    with pytest.raises(HpoptError, match="hpopt study create"):
        resolve_study_name(storage, None)
    optuna.create_study(study_name="a", storage=storage)
    assert resolve_study_name(storage, None) == "a"
    optuna.create_study(study_name="b", storage=storage)
    with pytest.raises(HpoptError, match=r"several studies exist \(a, b\): pass --study"):
        resolve_study_name(storage, None)
    with pytest.raises(HpoptError, match="no study named 'c'"):
        resolve_study_name(storage, "c")


# --- report --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    result = write_report(make_study(24), out, top_n=5)
    assert result.skipped == {}
    return out


def test_report_files_parse(report_dir: Path) -> None:
    rows = list(csv.DictReader((report_dir / "all_trials.csv").open()))
    assert [int(r["number"]) for r in rows] == list(range(24))
    assert {r["state"] for r in rows} == {"COMPLETE", "PRUNED", "FAIL"}
    assert rows[0]["worker"] == "100_0" and rows[1]["worker_job_id"] == "100_1"
    assert rows[3]["state"] == "PRUNED" and rows[3]["epochs"] == "2" and rows[3]["val_mae"] == ""
    assert {"param_optim.lr", "param_model.hidden", "param_model.act", "wall_s", "duration_s"} <= set(rows[0])
    best = json.loads((report_dir / "best_params.json").read_text())
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    lowest = min(complete, key=lambda r: float(r["val_mae"]))
    assert best["lowest_val_mae_trial"] == int(lowest["number"])
    assert best["val_mae"] <= float(lowest["val_mae"]) * 1.05 + 1e-12
    assert set(best["params"]) == {"optim.lr", "model.hidden", "model.act"}
    top = list(csv.DictReader((report_dir / "top_5.csv").open()))
    assert len(top) == 5 and [float(r["val_mae"]) for r in top] == sorted(float(r["val_mae"]) for r in top)
    assert sum(r["selected"] == "True" for r in top) == 1


def test_report_figures_exist_in_both_formats(report_dir: Path) -> None:
    names = ["optimization_history", "param_importances", "parallel_coordinate", "slice",
             "intermediate_values", "wallclock_by_worker"]
    for name in names:
        assert (report_dir / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page = (report_dir / "figures" / f"{name}.html").read_text()
        assert re.search(r"<script[^>]* src=\"plotly.min.js\">", page) and "Plotly.newPlot" in page
    index = (report_dir / "index.html").read_text()
    assert index.count("Plotly.newPlot") == len(names)
    assert "https://cdn" not in index.split("</head>")[1]  # offline: no CDN script in the body
    assert len(index) > 3_000_000  # plotly.js inlined


def test_report_of_a_young_study_says_what_is_missing(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="young", storage=optuna.storages.InMemoryStorage())
    study.add_trial(frozen(0, TrialState.COMPLETE, 0.5, train=0.4))
    study.add_trial(frozen(1, TrialState.RUNNING, None))
    result = write_report(study, tmp_path)
    assert "at least 2 complete trials (has 1)" in result.skipped["param_importances"]
    assert "per-epoch" in result.skipped["intermediate_values"]
    assert (tmp_path / "best_params.json").exists()
    assert len(list(csv.DictReader((tmp_path / "all_trials.csv").open()))) == 2
    assert "Not drawn: needs at least 2 complete trials" in (tmp_path / "index.html").read_text()

    empty = optuna.create_study(study_name="empty", storage=optuna.storages.InMemoryStorage())
    result = write_report(empty, tmp_path / "empty")
    assert "no complete trial" in result.skipped["best_params.json"]
    assert not (tmp_path / "empty" / "best_params.json").exists()
    assert (tmp_path / "empty" / "all_trials.csv").read_text().startswith("number,state,val_mae")


# --- compare -------------------------------------------------------------------------------

def test_compare_curves_and_files(tmp_path: Path) -> None:
    a, b = make_study(16, seed=1, name="rand", sampler="random"), make_study(16, seed=2, name="tpe")
    curve = study_curve(a)
    assert len(curve.gpu_h) == 16 and curve.gpu_h == sorted(curve.gpu_h)
    walls = sum(t.user_attrs["wall_s"] for t in a.trials) / 3600
    assert curve.total_gpu_h == pytest.approx(walls)
    bests = [x for x in curve.best if x is not None]
    assert bests == sorted(bests, reverse=True)
    target = common_target([curve, study_curve(b)])
    assert target == max(curve.final_best, study_curve(b).final_best)
    files, rows = write_comparison([a, b], tmp_path)
    assert {p.name for p in files} == {"compare.html", "compare.csv", "compare.png"}
    assert [r["study"] for r in rows] == ["rand", "tpe"] and all(r["gpu_h_to_target"] for r in rows)
    assert (tmp_path / "compare.html").read_text().count("Plotly.newPlot") == 1


# --- retrain planning ----------------------------------------------------------------------

def test_retrain_plan_rebuilds_the_worker_config(tmp_path: Path) -> None:
    manifest = tmp_path / "split.json"
    manifest.write_text("{}")
    study = make_study(8)
    study.set_user_attr("split", str(manifest))
    plan = plan_retrain(study, epochs=3, out_path=tmp_path / "m.pt")
    chosen = study.trials[plan.trial]
    assert plan.config["optim"] == {"batch_size": 8, "epochs": 5, "lr": chosen.params["optim.lr"]}
    assert plan.config["model"] == {"hidden": chosen.params["model.hidden"], "act": chosen.params["model.act"]}
    assert plan.manifest == manifest and plan.epochs == 3 and plan.val_mae == chosen.value
    with pytest.raises(HpoptError, match="trial 3 .* is pruned"):
        plan_retrain(study, trial=3)
    study.set_user_attr("split", str(tmp_path / "gone.json"))
    with pytest.raises(HpoptError, match="gone.json .* not found"):
        plan_retrain(study)


def test_retrain_sbatch_script(tmp_path: Path) -> None:
    manifest = tmp_path / "split.json"
    manifest.write_text("{}")
    study = make_study(8)
    study.set_user_attr("split", str(manifest))
    plan = plan_retrain(study, trial=0, out_path=tmp_path / "m.pt", include_val=True)
    config = Config()
    config.slurm.gpu_partition, config.slurm.account, config.slurm.gpu_gres = "gpu-v100", "gts-x", "gpu:V100:1"
    config.slurm.prelude = ["module load anaconda3"]
    script = render_sbatch(plan, config, RunDir(tmp_path / "run"), workdir=tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for option in ("--job-name=hpopt-retrain-synth", "--partition=gpu-v100", "--gres=gpu:V100:1",
                   "--account=gts-x", f"--output={tmp_path}/run/logs/retrain-synth-%j.log"):
        assert f"#SBATCH {option}" in lines
    assert "module load anaconda3" in lines
    assert lines[-1].startswith(f"exec {sys.executable} -m hpopt retrain --study synth --trial 0 --out ")
    assert lines[-1].endswith("--include-val")
    cpu = render_sbatch(plan, config, RunDir(tmp_path / "run"), gpu=False)
    assert "--gres" not in cpu


# --- commands on a local (journal) run directory --------------------------------------------

def hpopt(run_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HPOPT_RUN_DIR=str(run_dir), COLUMNS="200")
    env.pop("HPOPT_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "hpopt", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def journal_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpopt.storage import open_storage

    root = tmp_path_factory.mktemp("run")
    make_study(12, storage=open_storage(RunDir(root / ".hpopt")))
    return root


def test_best_command(journal_run: Path) -> None:
    result = hpopt(journal_run / ".hpopt", "best", "--json", "--top", "3", cwd=journal_run)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["study"] == "synth" and len(data["top"]) == 3
    assert {"val_mae", "train_mae", "gap", "worker", "params"} <= set(data["selected"])
    table = hpopt(journal_run / ".hpopt", "best", cwd=journal_run)
    assert "selected trial" in table.stdout and "val/train" in table.stdout


def test_report_command_default_dir(journal_run: Path) -> None:
    result = hpopt(journal_run / ".hpopt", "report", cwd=journal_run)
    assert result.returncode == 0, result.stderr
    assert (journal_run / "reports" / "synth" / "index.html").exists()
    assert len(list(csv.DictReader((journal_run / "reports/synth/all_trials.csv").open()))) == 12


def test_missing_study_is_one_line(journal_run: Path) -> None:
    result = hpopt(journal_run / ".hpopt", "best", "--study", "nope", cwd=journal_run)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: no study named 'nope' in the study DB (studies: synth)"]


def test_retrain_needs_best_or_trial(journal_run: Path) -> None:
    result = hpopt(journal_run / ".hpopt", "retrain", cwd=journal_run)
    assert result.returncode == 1 and "pass either --best or --trial N" in result.stderr


def test_dashboard_print_only(journal_run: Path) -> None:
    env_login = "login-phoenix.pace.gatech.edu"
    result = hpopt(journal_run / ".hpopt", "dashboard", "--print-only", "--port", "18765",
                   "--login", env_login, cwd=journal_run)
    assert result.returncode == 0, result.stderr
    assert "ssh -N -L 18765:localhost:18765 " in result.stdout and f"@{env_login}" in result.stdout
    assert "journal.log --host 127.0.0.1 --port 18765" in result.stdout


def test_dashboard_without_optuna_dashboard_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpopt.results import dashboard

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import now raises ImportError
    with pytest.raises(HpoptError, match=r"^optuna-dashboard is not installed: pip install optuna-dashboard$"):
        dashboard.require_dashboard()


def test_dashboard_serves_the_study(journal_run: Path) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard not installed (extra: dashboard)")
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, HPOPT_RUN_DIR=str(journal_run / ".hpopt"))
    proc = subprocess.Popen([sys.executable, "-m", "hpopt", "dashboard", "--port", str(port)],
                            cwd=journal_run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    studies = json.load(resp)["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["synth"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_export_mlflow_skips_cleanly_without_mlflow(journal_run: Path) -> None:
    env_path = journal_run / "nomlflow"
    env_path.mkdir(exist_ok=True)
    # whether or not mlflow is installed here, a None entry in sys.modules hides it
    (env_path / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    env = dict(os.environ, HPOPT_RUN_DIR=str(journal_run / ".hpopt"),
               PYTHONPATH=str(env_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "hpopt", "export", "mlflow"], cwd=journal_run,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mlflow is not installed; nothing exported (pip install mlflow to use this)"


def test_negative_gap_is_not_rewarded() -> None:
    undertrained = frozen(0, TrialState.COMPLETE, 0.101, train=0.300)  # val/train 0.34
    balanced = frozen(1, TrialState.COMPLETE, 0.100, train=0.100)  # val/train 1.0
    assert select([undertrained, balanced]).best.number == 1  # 0.34 counts as 1.0; lower val wins
    overfit_a_bit = frozen(2, TrialState.COMPLETE, 0.100, train=0.090)  # val/train 1.11
    assert select([undertrained, overfit_a_bit]).best.number == 0
