"""The worker loop in local (journal) mode with a fake trainer: budget, pruning, attrs, failures,
signals, the walltime guard, and kill -9 of a worker mid-trial (reaped and retried)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpopt.rundir import RunDir
from hpopt.space import parse_space
from hpopt.storage import Liveness, open_storage
from hpopt.study import StudySpec, create_study
from hpopt.worker import Settings, run_worker

SPACE = {"optim": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, "epochs": 4},
         "model": {"dropout": {"type": "categorical", "choices": [False, True]},
                   "dropout_rate": {"type": "float", "low": 0.1, "high": 0.5, "when": {"model.dropout": True}}}}
FAST = Settings(poll_s=0.2, liveness=Liveness(heartbeat_s=1, grace_s=3, max_retry=2))

# A fake trainer: val MAE depends on lr, each epoch sleeps EPOCH_S (a real trainer's shape).
WORKER_SCRIPT = """
import math, sys, time
from pathlib import Path
from hpopt.rundir import RunDir
from hpopt.worker import run_worker
EPOCH_S = float(sys.argv[3])
def trainer(config, split, on_epoch, device):
    lr = config["optim"]["lr"]
    for epoch in range(config["optim"]["epochs"]):
        time.sleep(EPOCH_S)
        val = abs(math.log10(lr) + 2.5) + 1.0 / (epoch + 1)
        on_epoch(epoch, val, 0.9 * val)
    return {"val_mae": val, "train_mae": 0.9 * val, "val_mae_per_atom": val / 8, "epochs_run": epoch + 1}
run_worker(RunDir(Path(sys.argv[1])), sys.argv[2], worker_tag=sys.argv[4], trainer=trainer)
"""


def fake_trainer(config, split, on_epoch, device, epoch_s: float = 0.0):
    import math

    lr = config["optim"]["lr"]
    for epoch in range(config["optim"]["epochs"]):
        time.sleep(epoch_s)
        val = abs(math.log10(lr) + 2.5) + 1.0 / (epoch + 1)
        on_epoch(epoch, val, 0.9 * val)
    return {"val_mae": val, "train_mae": 0.9 * val, "val_mae_per_atom": val / 8, "train_mae_per_atom": val / 9,
            "baseline_val_mae": 3.0, "epochs_run": epoch + 1}


def make_study(tmp_path: Path, budget: int, pruner: str = "median") -> RunDir:
    run_dir = RunDir(tmp_path / ".hpopt").ensure()
    create_study(open_storage(run_dir, create_schema=True),
                 StudySpec("s", parse_space(SPACE), split="/split.json", budget=budget, pruner=pruner))
    return run_dir


def trials_of(run_dir: RunDir) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s", storage=open_storage(run_dir)).get_trials()


def test_worker_runs_the_budget_with_pruning_and_stores_attrs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    run_dir = make_study(tmp_path, budget=14)
    seen = []

    def trainer(config, split, on_epoch, device):
        seen.append((split, device))
        return fake_trainer(config, split, on_epoch, device)

    assert run_worker(run_dir, "s", trainer=trainer, settings=FAST) == 14
    trials = trials_of(run_dir)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 14 and len(trials) == 14
    assert TrialState.PRUNED in states  # the median pruner acted on the per-epoch validation MAE
    done = next(t for t in trials if t.state == TrialState.COMPLETE)
    assert {"worker_job_id", "array_index", "host", "gpu", "wall_s", "epochs", "train_mae", "val_mae",
            "val_mae_per_atom", "train_mae_per_atom", "baseline_val_mae", "device"} <= set(done.user_attrs)
    assert done.user_attrs["worker_job_id"] == "77_3" and done.user_attrs["array_index"] == 3
    assert done.user_attrs["gpu"] == "2" and done.user_attrs["device"] == "cpu" and done.user_attrs["epochs"] == 4
    assert done.value == done.user_attrs["val_mae"] and sorted(done.intermediate_values) == [0, 1, 2, 3]
    assert seen[0] == ("/split.json", "cpu")
    log = (run_dir.worker_logs_dir / "worker-77_3.log").read_text()
    assert "device cpu (CUDA_VISIBLE_DEVICES='2')" in log and "budget reached: 14/14" in log


def test_trainer_errors_fail_the_trial_not_the_worker(tmp_path: Path) -> None:
    run_dir = make_study(tmp_path, budget=5)

    def broken(config, split, on_epoch, device):
        raise RuntimeError("CUDA out of memory")

    assert run_worker(run_dir, "s", trainer=broken, settings=FAST) == 0
    trials = trials_of(run_dir)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3  # stops after 3 failures in a row
    assert trials[0].user_attrs["error"] == "CUDA out of memory"


def test_no_trial_is_started_that_cannot_finish_before_the_deadline(tmp_path: Path) -> None:
    import torch  # noqa: F401 - imported up front so a loaded CI machine spends the time here

    run_dir = make_study(tmp_path, budget=50, pruner="none")
    trainer = lambda c, s, cb, d: fake_trainer(c, s, cb, d, epoch_s=0.1)  # ~0.4 s a trial
    settings = Settings(poll_s=0.2, margin_s=0.5, liveness=FAST.liveness)
    deadline = time.time() + 4.0
    finished = run_worker(run_dir, "s", deadline=deadline, trainer=trainer, settings=settings, worker_tag="dl")
    assert finished >= 1 and time.time() < deadline
    assert "stopping: a trial takes" in (run_dir.worker_logs_dir / "dl.log").read_text()
    trials = trials_of(run_dir)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # A loaded machine can slow the last trial's epochs past the estimate it was started on; the
    # in-trial guard then abandons it and re-queues its parameters. At most that one trial: a
    # worker without the start check would start (and abandon) trials until the deadline.
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) <= 1
    for trial in failed:
        assert trial.user_attrs["abandoned"].startswith("walltime")
        assert [t.params for t in trials if t.state == TrialState.WAITING] == [trial.params]


def spawn(run_dir: RunDir, tag: str, epoch_s: float) -> subprocess.Popen:
    env = dict(os.environ, HPOPT_WORKER_HEARTBEAT_S="1", HPOPT_WORKER_GRACE_S="3", HPOPT_WORKER_POLL_S="0.3")
    return subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(run_dir.root), "s", str(epoch_s), tag],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def running_trial(run_dir: RunDir, tag: str, timeout: float = 30) -> int:
    """The trial the worker `tag` is training now (from its log)."""
    log = run_dir.worker_logs_dir / f"{tag}.log"
    deadline = time.time() + timeout
    while time.time() < deadline:
        started = re.findall(r"trial (\d+): start", log.read_text()) if log.exists() else []
        if started:
            return int(started[-1])
        time.sleep(0.05)
    raise AssertionError(f"{tag} never started a trial")


def test_kill_9_mid_trial_is_reaped_and_retried_with_the_same_params(tmp_path: Path) -> None:
    run_dir = make_study(tmp_path, budget=10, pruner="none")
    victim = spawn(run_dir, "victim", epoch_s=1.0)
    number = running_trial(run_dir, "victim")
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    others = [spawn(run_dir, f"w{i}", epoch_s=0.05) for i in range(2)]
    for proc in others:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    trials = trials_of(run_dir)
    killed = trials[number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 10
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states


def test_sigterm_abandons_the_trial_cleanly_and_it_is_rerun(tmp_path: Path) -> None:
    run_dir = make_study(tmp_path, budget=3, pruner="none")
    worker = spawn(run_dir, "term", epoch_s=1.0)
    number = running_trial(run_dir, "term")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, worker.stderr.read()
    trials = trials_of(run_dir)
    assert trials[number].state == TrialState.FAIL and "SIGTERM" in trials[number].user_attrs["abandoned"]
    assert [t.state for t in trials if t.system_attrs.get("failed_trial") == number] == [TrialState.WAITING]
    assert run_worker(run_dir, "s", trainer=fake_trainer, settings=FAST) == 3
    retry = next(t for t in trials_of(run_dir) if t.system_attrs.get("failed_trial") == number)
    assert retry.state == TrialState.COMPLETE and retry.params == trials[number].params


def _running_trial_id(storage) -> int:
    [trial] = optuna.load_study(study_name="s", storage=storage).get_trials(states=(TrialState.RUNNING,))
    return trial._trial_id


def test_a_retry_queued_after_its_slot_was_taken_does_not_outlive_the_budget(tmp_path: Path) -> None:
    """The flaky-fleet race, made deterministic: a reaper fails a dead worker's trial, a worker
    counts in that instant (a free slot, no retry queued yet) and starts a fresh trial, then the
    retry is queued. The fresh trial finishes the budget; the retry must not be left WAITING."""
    run_dir = make_study(tmp_path, budget=1, pruner="none")
    storage = open_storage(run_dir)
    study = optuna.load_study(study_name="s", storage=storage)
    study.enqueue_trial({"optim.lr": 1e-3, "model.dropout": False})
    dead = study.ask()  # the killed worker's trial, already failed by the paused reaper
    storage.set_trial_state_values(dead._trial_id, state=TrialState.FAIL)
    calls = []

    def trainer(config, split, on_epoch, device):
        if not calls:  # the reaper resumes while our fresh trial trains
            optuna.storages.RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(dead._trial_id))
        calls.append(1)
        return fake_trainer(config, split, on_epoch, device)

    assert run_worker(run_dir, "s", trainer=trainer, settings=FAST) == 1
    trials = trials_of(run_dir)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 1
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state == TrialState.FAIL and retry.user_attrs["surplus"] is True


def test_a_live_trial_reaped_mid_training_keeps_its_result_without_spending_the_slot_twice(tmp_path: Path) -> None:
    """A beat missed under load: our trial is reaped while it trains. While its retry is still
    queued, our result takes the retry's place; once another worker ran the retry, our result is
    kept as FAIL (numbers in its attrs) so the budget is not overshot."""
    from hpopt.storage import fail_and_requeue, finish_trial

    run_dir = make_study(tmp_path, budget=3, pruner="none")
    storage = open_storage(run_dir)
    study = optuna.load_study(study_name="s", storage=storage)
    calls = []

    def trainer(config, split, on_epoch, device):
        calls.append(1)
        if len(calls) <= 2:
            assert fail_and_requeue(study, _running_trial_id(storage), {}, max_retry=2)  # another worker reaps us
        if len(calls) == 2:  # ... and yet another one runs the retry to completion before we tell
            [retry] = study.get_trials(states=(TrialState.WAITING,))
            assert storage.set_trial_state_values(retry._trial_id, state=TrialState.RUNNING)
            assert finish_trial(storage, retry._trial_id, TrialState.COMPLETE, 1.5, {})
        return fake_trainer(config, split, on_epoch, device)

    run_worker(run_dir, "s", trainer=trainer, settings=FAST)
    trials = trials_of(run_dir)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    first, second = sorted((t for t in trials if "recovered_from" in t.user_attrs), key=lambda t: t.number)
    assert first.state == TrialState.COMPLETE and first.value == first.user_attrs["val_mae"]
    assert [t.user_attrs.get("superseded") for t in trials
            if t.system_attrs.get("retry_history", [None])[-1] == first.user_attrs["recovered_from"]] == [True]
    assert second.state == TrialState.FAIL and second.user_attrs["val_mae"] > 0
    assert second.user_attrs["gpu"] == "" and "duplicate_of_retry" in second.user_attrs


def test_db_losses_are_recognised_wrapped_or_raw() -> None:
    import pymysql.err
    import sqlalchemy.exc

    from hpopt.storage import is_disconnect

    lost = pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
    wrapped = sqlalchemy.exc.OperationalError("SELECT 1", {}, lost)
    try:
        try:
            raise lost
        except pymysql.err.OperationalError as exc:
            raise RuntimeError("storage call failed") from exc
    except RuntimeError as chained:
        assert is_disconnect(chained)
    assert is_disconnect(lost) and is_disconnect(wrapped) and is_disconnect(FileNotFoundError("endpoint.json"))
    assert not is_disconnect(ValueError("bad value")) and not is_disconnect(pymysql.err.ProgrammingError(1064, "syntax"))
