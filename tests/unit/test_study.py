"""Studies in local (journal) mode: create once, attrs, samplers, list/show/delete, budget rules."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpopt.budget import Tally, is_surplus, may_start, tally
from hpopt.errors import HpoptError
from hpopt.rundir import RunDir
from hpopt.sampling import WindowedTPESampler, bound_trials
from hpopt.space import parse_space
from hpopt.storage import open_storage
from hpopt.study import StudySpec, create_study, delete_study, describe_study, list_studies, load_experiment

SPACE = parse_space({"optim": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
                     "model": {"num_layers": {"type": "int", "low": 1, "high": 4}}})


@pytest.fixture()
def run_dir(tmp_path: Path) -> RunDir:
    return RunDir(tmp_path / ".hpopt").ensure()


def test_create_stores_the_experiment_and_refuses_duplicates(run_dir: RunDir) -> None:
    storage = open_storage(run_dir, create_schema=True)
    spec = StudySpec("s", SPACE, base_config={"cmd": {"seed": 1}}, split="/x.json", budget=7)
    create_study(storage, spec)
    attrs = optuna.load_study(study_name="s", storage=storage).user_attrs
    assert attrs["budget"] == 7 and attrs["split"] == "/x.json" and attrs["sampler"] == "tpe"
    assert attrs["space"] == SPACE.to_dict() and attrs["base_config"] == {"cmd": {"seed": 1}}
    assert attrs["optuna_version"] == optuna.__version__ and attrs["hpopt_version"] and attrs["created_at"]
    with pytest.raises(HpoptError, match="already exists"):
        create_study(storage, spec)


def test_load_experiment_builds_parallel_aware_tpe_with_distinct_seeds(run_dir: RunDir) -> None:
    storage = open_storage(run_dir)
    create_study(storage, StudySpec("s", SPACE, budget=3))
    a, b = load_experiment(storage, "s"), load_experiment(storage, "s")
    assert isinstance(a.study.sampler, WindowedTPESampler)
    assert a.study.sampler._multivariate and a.study.sampler._constant_liar
    assert a.seed != b.seed
    assert isinstance(a.study.pruner, optuna.pruners.HyperbandPruner)
    with pytest.raises(HpoptError, match="no study named 'nope'"):
        load_experiment(storage, "nope")


def test_worker_refuses_another_optuna_major(run_dir: RunDir) -> None:
    storage = open_storage(run_dir)
    create_study(storage, StudySpec("s", SPACE))
    optuna.load_study(study_name="s", storage=storage).set_user_attr("optuna_version", "4.5.0")
    with pytest.raises(HpoptError, match="created with optuna 4.5.0"):
        load_experiment(storage, "s")


@pytest.mark.parametrize("sampler, kind", [("random", optuna.samplers.RandomSampler),
                                           ("cmaes", optuna.samplers.CmaEsSampler),
                                           ("grid", optuna.samplers.GridSampler)])
def test_other_samplers(run_dir: RunDir, sampler: str, kind: type) -> None:
    storage = open_storage(run_dir)
    create_study(storage, StudySpec("s", SPACE if sampler != "grid" else parse_space(
        {"a": {"type": "int", "low": 1, "high": 3}}), sampler=sampler, pruner="none"))
    assert isinstance(load_experiment(storage, "s").study.sampler, kind)


def test_invalid_spec_is_rejected_before_anything_is_stored(run_dir: RunDir) -> None:
    storage = open_storage(run_dir)
    for spec, msg in [(StudySpec("s", SPACE, sampler="bo"), "unknown sampler"),
                      (StudySpec("s", SPACE, pruner="sha"), "unknown pruner"),
                      (StudySpec("s", SPACE, budget=0), "budget must be at least 1"),
                      (StudySpec("s", SPACE, sampler="grid"), "needs a `step`")]:
        with pytest.raises(HpoptError, match=msg):
            create_study(storage, spec)
    assert list_studies(storage) == []


def test_list_show_delete(run_dir: RunDir) -> None:
    storage = open_storage(run_dir)
    study = create_study(storage, StudySpec("s", SPACE, budget=5))
    for value in (3.0, 1.0, 2.0):
        trial = study.ask()
        SPACE.suggest(trial)
        study.tell(trial, value)
    [row] = list_studies(storage)
    assert row["name"] == "s" and row["trials"] == 3 and row["best"] == 1.0 and row["budget"] == 5
    info = describe_study(storage, "s")
    assert info["counts"]["complete"] == 3 and info["best"]["number"] == 1
    delete_study(storage, "s")
    assert list_studies(storage) == []
    with pytest.raises(HpoptError, match="no study named"):
        delete_study(storage, "s")


def test_cli_create_show_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpopt.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPOPT_RUN_DIR", str(tmp_path / "run"))
    (tmp_path / "space.yaml").write_text("optim:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                         "model:\n  num_layers: {type: int, low: 1, high: 3}\n")
    (tmp_path / "split.json").write_text("{}")
    (tmp_path / "trainer.yaml").write_text("model: {batchnorm: true}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["study", "create", "s", "--space", "space.yaml", "--split", "split.json",
                                 "--budget", "4", "--set", "num_layers=2", "--config-base", "trainer.yaml"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["study", "show", "s", "--json"])
    assert result.exit_code == 0, result.output
    assert '"model.num_layers": 2' in result.output and '"batchnorm": true' in result.output
    (tmp_path / "typo.yaml").write_text("model:\n  num_layer: {type: int, low: 1, high: 3}\n")
    result = runner.invoke(app, ["study", "create", "t", "--space", "typo.yaml", "--split", "split.json"])
    assert result.exit_code == 1 and "num_layer" in str(result.exception)  # caught before any worker
    assert runner.invoke(app, ["study", "delete", "s"], input="n\n").exit_code == 1  # asked, declined
    assert "s" in runner.invoke(app, ["study", "list"]).output
    assert runner.invoke(app, ["study", "delete", "s", "--yes"]).exit_code == 0
    assert "no studies yet" in runner.invoke(app, ["study", "list"]).output


def _trial(number: int, state: optuna.trial.TrialState, value: float | None = None, retry: bool = False):
    trial = optuna.trial.create_trial(state=state, value=value, params={}, distributions={},
                                      system_attrs={"failed_trial": 0} if retry else {})
    trial.number = number
    return trial


def test_budget_rules() -> None:
    S = optuna.trial.TrialState
    trials = [_trial(0, S.COMPLETE, 1.0), _trial(1, S.PRUNED), _trial(2, S.FAIL), _trial(3, S.RUNNING),
              _trial(4, S.WAITING)]
    counts = tally(trials)
    assert counts == Tally(complete=1, pruned=1, failed=1, running=1, waiting=1) and counts.finished == 2
    assert may_start(counts, 4) and not may_start(counts, 3)
    # 3, 5 and 6 race for the last two slots of budget 4: the latest is surplus; a retry wins
    racers = trials[:2] + [_trial(5, S.RUNNING), _trial(6, S.RUNNING), _trial(3, S.RUNNING)]
    assert not is_surplus(racers, 3, 4) and not is_surplus(racers, 5, 4) and is_surplus(racers, 6, 4)
    retried = trials[:2] + [_trial(5, S.RUNNING), _trial(7, S.RUNNING, retry=True)]
    assert not is_surplus(retried, 7, 3) and is_surplus(retried, 5, 3)


def test_bounded_view_keeps_running_recent_and_best() -> None:
    S = optuna.trial.TrialState
    trials = [_trial(i, S.COMPLETE, float(i % 97)) for i in range(1000)] + [_trial(1000, S.RUNNING)]
    kept = bound_trials(trials, recent=100, elite=20, direction=optuna.study.StudyDirection.MINIMIZE)
    numbers = {t.number for t in kept}
    assert 1000 in numbers and set(range(900, 1000)) <= numbers and len(kept) == 121
    assert all(t.value <= 1.0 for t in kept if t.number < 900)  # only the best of the old ones
    assert bound_trials(trials[:50], 100, 20, optuna.study.StudyDirection.MINIMIZE) == trials[:50]
