"""Trial configs: amptorch's shape, defaults filled in, mistakes named by key."""

from __future__ import annotations

import pytest
import torch

from hpopt.errors import HpoptError
from hpopt.train.config import default_config, parse_config


def test_defaults_and_amptorch_values() -> None:
    raw = {"model": {"name": "BPNN", "activation": torch.nn.Tanh, "hidden_layers": [8, 4]},
           "optim": {"lr": 1, "scheduler": {"policy": "StepLR", "params": {"step_size": 5, "gamma": 0.5}}},
           "cmd": {"dtype": "double"}}
    cfg = parse_config(raw)
    assert cfg.model.name == "bpnn" and cfg.model.activation == "tanh" and cfg.model.widths == [8, 4]
    assert cfg.optim.lr == 1.0 and cfg.optim.epochs == default_config()["optim"]["epochs"]
    assert cfg.cmd.dtype == "float64"
    assert raw["model"]["name"] == "BPNN"  # input not mutated


@pytest.mark.parametrize("raw, key", [
    ({"optim": {"epoks": 3}}, "optim.epoks"),
    ({"modle": {}}, "modle"),
    ({"dataset": {"fp_params": {"G2": {"etas": [1.0], "rs_s": [0.0], "sigma": [1]}}}}, "dataset.fp_params.G2.sigma"),
    ({"optim": {"scheduler": {"policy": "StepLR", "parms": {}}}}, "optim.scheduler.parms"),
])
def test_unknown_key_is_named(raw: dict, key: str) -> None:
    with pytest.raises(HpoptError, match=f"unknown key '{key}'"):
        parse_config(raw)


@pytest.mark.parametrize("raw, text", [
    ({"optim": {"lr": "fast"}}, "'optim.lr' must be float"),
    ({"model": {"activation": "swishy"}}, "'model.activation'"),
    ({"optim": {"batch_size": 0}}, "'optim.batch_size' must be > 0"),
    ({"trainer": "keras"}, "'trainer'"),
    ({"dataset": {"fp_params": {"G2": {"etas": [1.0], "rs_s": [0.0]},
                                "G4": {"etas": [1.0], "zetas": [1.0], "gammas": [0.5]}}}}, "gammas"),
])
def test_bad_values_are_one_clear_line(raw: dict, text: str) -> None:
    with pytest.raises(HpoptError, match=text) as info:
        parse_config(raw)
    assert "\n" not in str(info.value)
