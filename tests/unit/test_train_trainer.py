"""The native trainer on EMT demo data: it learns, it is reproducible, it stops when told."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpopt.errors import HpoptError
from hpopt.train.api import Pruned, load_model, retrain_and_test, run_trial
from hpopt.train.config import parse_config
from hpopt.train.data import energies, read_images
from hpopt.train.demo import make_demo
from hpopt.train.model import AtomicNetwork
from hpopt.train.split import load_manifest, make_split

FAST = {"dataset": {"cutoff": 4.5, "angular_cutoff": 3.5}, "optim": {"epochs": 40, "lr": 5e-3, "batch_size": 16}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    return make_split(make_demo(root / "demo.traj", n_images=150, seed=0), "demo", out_dir=root / "splits")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(**overrides: dict) -> dict:
    return {section: {**FAST.get(section, {}), **overrides.get(section, {})} for section in {*FAST, *overrides}}


def test_training_beats_mean_energy_baseline(manifest: Path, cache: Path) -> None:
    seen: list[tuple[int, float, float]] = []
    result = run_trial(_config(), manifest, cache_dir=cache, on_epoch=lambda *a: seen.append(a))
    m = load_manifest(manifest)
    train_e = energies(read_images(m.source_path, m.train))
    val_e = energies(read_images(m.source_path, m.validation))
    mean_baseline = float(np.mean(np.abs(val_e - train_e.mean())))
    assert result.val_mae < 0.5 * mean_baseline
    assert result.val_mae < result.baseline_val_mae  # also beats the composition fit
    assert [s[0] for s in seen] == list(range(1, 41)) and result.epochs_run == 40
    assert result.val_mae == pytest.approx(min(s[1] for s in seen))  # best epoch restored
    assert result.device == "cpu" and result.val_mae_per_atom < result.val_mae
    assert set(result.as_dict()) >= {"val_mae", "baseline_val_mae_per_atom", "seconds"}


def test_seeded_runs_are_identical_and_seeds_differ(manifest: Path, cache: Path) -> None:
    config = _config(model={"name": "bpnn", "dropout": True, "dropout_rate": 0.1}, optim={"epochs": 3})
    a, b = run_trial(config, manifest, cache_dir=cache), run_trial(config, manifest, cache_dir=cache)
    assert a.val_mae == b.val_mae and a.train_mae == b.train_mae
    c = run_trial(_config(model={"name": "bpnn"}, optim={"epochs": 3}, cmd={"seed": 1}), manifest, cache_dir=cache)
    assert c.val_mae != a.val_mae


def test_callback_exception_stops_the_trial(manifest: Path, cache: Path) -> None:
    def prune(epoch: int, val_mae: float, train_mae: float) -> None:
        if epoch == 2:
            raise Pruned()

    with pytest.raises(Pruned):
        run_trial(_config(), manifest, cache_dir=cache, on_epoch=prune)


def test_early_stopping_and_float64(manifest: Path, cache: Path) -> None:
    config = _config(optim={"lr": 1e-12, "patience": 2, "epochs": 50}, cmd={"dtype": "float64"},
                     model={"batchnorm": True})
    assert run_trial(config, manifest, cache_dir=cache).epochs_run < 50


def test_unknown_key_and_missing_amptorch(manifest: Path) -> None:
    with pytest.raises(HpoptError, match="unknown key 'model.layers'"):
        run_trial({"model": {"layers": 3}}, manifest)


def test_retrain_saves_a_model_that_reloads(manifest: Path, cache: Path, tmp_path: Path) -> None:
    out = retrain_and_test(_config(optim={"epochs": 10}), manifest, tmp_path / "model.pt", cache_dir=cache)
    assert out["test_mae"] > 0 and Path(out["model_path"]).exists()
    model = load_model(out["model_path"])
    m = load_manifest(manifest)
    test_images = read_images(m.source_path, m.test)
    pred = model.predict(test_images)
    assert np.mean(np.abs(pred - energies(test_images))) == pytest.approx(out["test_mae"], rel=1e-4)


def test_singlenn_element_lookup_equals_explicit_one_hot() -> None:
    """singlenn takes the element as an index and applies its weight block as a row lookup: the
    same outputs and gradients as feeding the one-hot through the first Linear."""
    torch.manual_seed(0)
    net = AtomicNetwork(6 + 4, 1, parse_config({"model": {"num_layers": 2, "num_nodes": 8}}).model, n_classes=4)
    x, element = torch.randn(30, 6), torch.randint(0, 4, (30,))
    got = net(x, [(0, 30)], element)
    want = net.nets[0](torch.cat([x, torch.nn.functional.one_hot(element, 4).float()], dim=1)).squeeze(-1)
    torch.testing.assert_close(got, want)
    (grad_got,) = torch.autograd.grad(got.square().sum(), net.nets[0][0].weight)
    (grad_want,) = torch.autograd.grad(want.square().sum(), net.nets[0][0].weight)
    torch.testing.assert_close(grad_got, grad_want)
