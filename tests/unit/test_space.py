"""Search-space YAML: parameter kinds, conditions, overrides, and one-line errors with YAML paths."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpopt.errors import HpoptError
from hpopt.space import Space, apply_values, load_space, parse_override, parse_space

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "space.yaml"

SPACE = {
    "optim": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, "epochs": 40},
    "model": {
        "num_layers": {"type": "int", "low": 2, "high": 5},
        "activation": {"type": "categorical", "choices": ["tanh", "relu"]},
        "dropout": {"type": "categorical", "choices": [False, True]},
        "dropout_rate": {"type": "float", "low": 0.05, "high": 0.5, "when": {"model.dropout": True}},
    },
}


def test_parse_names_kinds_and_fixed_values() -> None:
    space = parse_space(SPACE, "space.yaml")
    assert [p.name for p in space.params] == ["optim.lr", "model.num_layers", "model.activation",
                                              "model.dropout", "model.dropout_rate"]
    assert space.fixed == {"optim.epochs": 40}
    lr = space.params[0].distribution()
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    assert isinstance(space.params[1].distribution(), optuna.distributions.IntDistribution)
    assert Space.from_dict(space.to_dict()) == space


def test_conditional_parameter_only_when_switched_on() -> None:
    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {True: 0, False: 0}
    for _ in range(30):
        trial = study.ask()
        values = space.suggest(trial)
        seen[values["model.dropout"]] += 1
        assert ("model.dropout_rate" in values) == values["model.dropout"]
        assert 1e-4 <= values["optim.lr"] <= 1e-2 and values["optim.epochs"] == 40
        study.tell(trial, 1.0)
    assert seen[True] and seen[False]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s["model"]["num_layers"].update(low=2.5), "space.yaml: model.num_layers.low must be an int"),
        (lambda s: s["model"]["num_layers"].update(type="integer"), "space.yaml: model.num_layers.type must be one of"),
        (lambda s: s["optim"]["lr"].update(low=0.0), "space.yaml: optim.lr.low must be > 0 when log is true"),
        (lambda s: s["optim"]["lr"].update(low=1.0), "space.yaml: optim.lr.low (1.0) must not exceed high"),
        (lambda s: s["optim"]["lr"].update(lo=1.0), "space.yaml: optim.lr.lo is not a float option"),
        (lambda s: s["model"]["activation"].update(choices=[]), "space.yaml: model.activation.choices must be a non-empty list"),
        (lambda s: s["model"]["dropout_rate"].update(when={"model.dropot": True}),
         "space.yaml: model.dropout_rate.when.model.dropot names no parameter declared before"),
        (lambda s: s["model"]["dropout_rate"].update(when={"model.dropout": "yes"}),
         "space.yaml: model.dropout_rate.when.model.dropout: model.dropout can never be 'yes'"),
    ],
)
def test_mistakes_name_the_yaml_path(mutate, message: str) -> None:
    import copy

    data = copy.deepcopy(SPACE)
    mutate(data)
    with pytest.raises(HpoptError) as err:
        parse_space(data, "space.yaml")
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_load_space_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "space.yaml"
    bad.write_text("model: {num_layers: {type: int, low: 1\n")
    with pytest.raises(HpoptError, match="space.yaml: not valid YAML"):
        load_space(bad)
    with pytest.raises(HpoptError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    bad.write_text("model: {hidden: 3}\n")
    with pytest.raises(HpoptError, match="no parameter to tune"):
        load_space(bad)


def test_example_space_is_valid() -> None:
    space = load_space(EXAMPLE)
    assert any(p.when for p in space.params)


def test_overrides_fix_parameters_by_short_or_dotted_name() -> None:
    space = parse_space(SPACE).with_overrides(dict([parse_override("lr=1e-3"), parse_override("model.dropout=false"),
                                                    parse_override("optim.batch_size=16")]))
    assert space.fixed == {"optim.epochs": 40, "optim.lr": 1e-3, "model.dropout": False, "optim.batch_size": 16}
    names = [p.name for p in space.params]
    assert "optim.lr" not in names and "model.dropout_rate" not in names  # dropout fixed off
    assert parse_override("model.num_layers=3") == ("model.num_layers", 3)
    with pytest.raises(HpoptError, match="no parameter named epoch"):
        parse_space(SPACE).with_overrides({"epoch": 3})
    with pytest.raises(HpoptError, match="model.num_layers is an int parameter"):
        parse_space(SPACE).with_overrides({"num_layers": "three"})
    with pytest.raises(HpoptError, match="expected key=value"):
        parse_override("lr")


def test_apply_values_builds_the_trainer_config() -> None:
    base = {"model": {"num_layers": 3, "get_forces": False}, "cmd": {"seed": 1}}
    config = apply_values(base, {"model.num_layers": 4, "optim.lr": 0.01})
    assert config == {"model": {"num_layers": 4, "get_forces": False}, "cmd": {"seed": 1}, "optim": {"lr": 0.01}}
    assert base["model"]["num_layers"] == 3  # base untouched


def test_grid_values_need_a_step_for_floats() -> None:
    space = parse_space({"a": {"type": "int", "low": 1, "high": 3}, "b": {"type": "float", "low": 0, "high": 1, "step": 0.5}})
    assert space.grid() == {"a": [1, 2, 3], "b": [0.0, 0.5, 1.0]}
    with pytest.raises(HpoptError, match="grid sampler: float parameter c needs a `step`"):
        parse_space({"c": {"type": "float", "low": 0, "high": 1}}).grid()
