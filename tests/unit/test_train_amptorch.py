"""The amptorch backend: config mapping always; a real trial only where amptorch is importable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from hpopt.errors import HpoptError
from hpopt.train import amptorch_backend
from hpopt.train.api import run_trial
from hpopt.train.config import parse_config
from hpopt.train.demo import make_demo
from hpopt.train.split import make_split

needs_amptorch = pytest.mark.skipif(
    not amptorch_backend.available(),
    reason="amptorch is not importable (not on PyPI: pip install git+https://github.com/ulissigroup/amptorch)")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("amptorch")
    return make_split(make_demo(root / "demo.traj", n_images=40, seed=0), "demo", out_dir=root / "splits")


def test_config_maps_to_atoms_trainer_shape() -> None:
    cfg = parse_config({"model": {"hidden_layers": [10, 5], "activation": "relu"}, "optim": {"gpus": 0}})
    images = [bulk("Cu")]
    mapped = amptorch_backend.amptorch_config(cfg, images, "/abs/run", "cpu")
    assert mapped["model"]["activation"] is torch.nn.ReLU and mapped["model"]["hidden_layers"] == [10, 5]
    assert mapped["model"]["get_forces"] is False and mapped["dataset"]["save_fps"] is False
    assert mapped["dataset"]["fp_params"]["default"]["cutoff"] == cfg.dataset.cutoff
    assert mapped["cmd"]["run_dir"] == "/abs/run" and mapped["optim"]["optimizer"] is torch.optim.Adam


@pytest.mark.skipif(amptorch_backend.available(), reason="amptorch is importable here")
def test_missing_amptorch_is_one_clear_error(manifest: Path) -> None:
    with pytest.raises(HpoptError, match="amptorch importable"):
        run_trial({"trainer": "amptorch"}, manifest)


@needs_amptorch
def test_amptorch_trial_reports_every_epoch_and_restores_process_state(manifest: Path) -> None:
    cwd, dtype, numpy_rng = Path.cwd(), torch.get_default_dtype(), np.random.get_state()[1].copy()
    seen: list[int] = []
    result = run_trial({"trainer": "amptorch", "optim": {"epochs": 3}, "dataset": {"fp_scheme": "gaussian"}},
                       manifest, on_epoch=lambda e, v, t: seen.append(e))
    assert seen == [1, 2, 3] and result.val_mae > 0
    assert Path.cwd() == cwd and torch.get_default_dtype() == dtype
    assert np.array_equal(np.random.get_state()[1], numpy_rng)  # amptorch reseeds it


@needs_amptorch
def test_predictor_matches_atoms_trainer_predict(manifest: Path) -> None:
    """The per-epoch scorer (fingerprints built once) gives AtomsTrainer.predict's energies."""
    from amptorch.trainer import AtomsTrainer

    from hpopt.train.data import read_images
    from hpopt.train.split import load_manifest

    m = load_manifest(manifest)
    train, val = read_images(m.source_path, m.train), read_images(m.source_path, m.validation)
    cfg = parse_config({"trainer": "amptorch", "optim": {"epochs": 2}, "dataset": {"fp_scheme": "gaussian"}})
    amptorch_backend.patch_upstream()
    with amptorch_backend.contained() as run_dir:
        trainer = AtomsTrainer(amptorch_backend.amptorch_config(cfg, train, run_dir, "cpu"))
        trainer.load()
        predictor = amptorch_backend.Predictor(trainer, val)
        trainer.pretrained = True
        trainer.train()
        want = np.asarray(trainer.predict(val)["energy"], dtype=float).reshape(-1)
        got = predictor.energies()
    assert got.shape == (len(val),) and np.allclose(got, want, rtol=1e-9, atol=1e-9)
