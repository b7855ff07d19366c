"""Atomic trial claims on a real MariaDB (`hpopt db` local mode): the budget check, the trial's
creation and the hand-out of queued retries happen in one transaction, so racing workers can
never overshoot the budget or share a trial number. And the workers' lean trial feed reads
what Optuna reads."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from optuna.trial import TrialState

from hpopt.config import load_config
from hpopt.db import server
from hpopt.rundir import RunDir
from hpopt.sampling import sample_params, sampler_window
from hpopt.space import parse_space
from hpopt.storage import atomic_claims, claim_trial, close_storage, fail_and_requeue, finish_trial, open_storage
from hpopt.study import StudySpec, create_study, load_experiment
from hpopt.trial_feed import TrialFeed

pytestmark = pytest.mark.cluster

SPACE = parse_space({
    "optim": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    "model": {"dropout": {"type": "categorical", "choices": [False, True]},
              "dropout_rate": {"type": "float", "low": 0.05, "high": 0.3, "when": {"model.dropout": True}}},
})


@pytest.fixture()
def run_dir(tmp_path: Path) -> Iterator[RunDir]:
    run = RunDir(tmp_path / "run")
    server.start(load_config(None, env={}), run, local=True)
    yield run
    server.stop(run)


SEEDS = itertools.count()  # like workers, each claim samples with its own seed


def fresh_claim(storage: optuna.storages.BaseStorage, name: str, budget: int, attrs: dict | None = None):
    exp = load_experiment(storage, name, seed=next(SEEDS))
    window = sampler_window(exp.study, exp.study.get_trials(deepcopy=False))
    params, dists, _ = sample_params(exp.study, exp.space, window)
    return claim_trial(storage, exp.study._study_id, budget, params, dists, attrs or {"host": "test"}), params


def test_claims_stop_at_the_budget_and_hand_out_retries_first(run_dir: RunDir) -> None:
    storage = open_storage(run_dir, create_schema=True)
    assert atomic_claims(storage)
    study = create_study(storage, StudySpec("c", SPACE, budget=3, pruner="none"))
    claims = [fresh_claim(storage, "c", 3)[0] for _ in range(4)]
    assert [c.trial.number for c in claims[:3]] == [0, 1, 2]
    assert claims[3].trial is None and claims[3].counts == {TrialState.RUNNING: 3}
    first = study.get_trials()[0]
    assert first.state == TrialState.RUNNING and first.user_attrs == {"host": "test"}
    assert first.params == claims[0].trial.params and first.params  # stored with their distributions

    assert finish_trial(storage, claims[0].trial.trial_id, TrialState.COMPLETE, 1.5, {"val_mae": 1.5})
    assert fresh_claim(storage, "c", 3)[0].trial is None  # 1 finished + 2 running fill the budget
    assert fail_and_requeue(study, claims[1].trial.trial_id, {"abandoned": "test"}, max_retry=2)
    retry, sampled = fresh_claim(storage, "c", 3, {"host": "other"})
    assert retry.trial is not None and retry.trial.retry and retry.trial.number == 3
    assert retry.trial.params == claims[1].trial.params != sampled
    stored = study.get_trials()[3]
    assert stored.state == TrialState.RUNNING and stored.user_attrs["host"] == "other"
    assert stored.system_attrs["failed_trial"] == 1
    close_storage(storage)


def test_racing_claims_never_overshoot_or_share_numbers(run_dir: RunDir) -> None:
    storage = open_storage(run_dir, create_schema=True)
    create_study(storage, StudySpec("race", SPACE, budget=5, pruner="none"))
    close_storage(storage)
    claimed: list[int] = []
    errors: list[BaseException] = []

    def racer() -> None:
        own = open_storage(run_dir)  # one engine per racer, like one per worker process
        try:
            for _ in range(3):
                claim, _ = fresh_claim(own, "race", 5)
                if claim.trial is not None:
                    claimed.append(claim.trial.number)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            close_storage(own)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(claimed) == [0, 1, 2, 3, 4]
    trials = optuna.load_study(study_name="race", storage=open_storage(run_dir)).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]


def test_trial_feed_matches_optuna_and_follows_changes(run_dir: RunDir) -> None:
    storage = open_storage(run_dir, create_schema=True)
    study = create_study(storage, StudySpec("feed", SPACE, budget=10, pruner="none"))
    claims = [fresh_claim(storage, "feed", 10)[0].trial for _ in range(4)]
    assert finish_trial(storage, claims[0].trial_id, TrialState.COMPLETE, 0.25, {"wall_s": 1.5})
    assert finish_trial(storage, claims[1].trial_id, TrialState.PRUNED, 0.5, {"wall_s": 2.0})
    feed = TrialFeed(study._study_id)

    def same_as_optuna() -> None:
        ours = feed.read(storage)
        theirs = optuna.load_study(study_name="feed", storage=open_storage(run_dir)).get_trials()
        assert [(t._trial_id, t.number, t.state, t.value, t.params, t.distributions) for t in ours] == \
            [(t._trial_id, t.number, t.state, t.value, t.params, t.distributions) for t in theirs]
        assert [t.user_attrs.get("wall_s") for t in ours] == [t.user_attrs.get("wall_s") for t in theirs]

    same_as_optuna()
    assert finish_trial(storage, claims[2].trial_id, TrialState.COMPLETE, 0.125, {"wall_s": 3.0})  # was RUNNING
    assert fail_and_requeue(study, claims[3].trial_id, {}, max_retry=2)  # a FAIL and a new WAITING retry
    same_as_optuna()
    assert [t.state for t in feed.read(storage)][3:] == [TrialState.FAIL, TrialState.WAITING]
    assert fresh_claim(storage, "feed", 10)[0].trial.retry  # WAITING -> RUNNING
    same_as_optuna()
    assert [t.state for t in feed.read(storage)] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE,
                                                     TrialState.FAIL, TrialState.RUNNING]
