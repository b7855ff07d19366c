"""What the rest of hpopt calls: one trial (`run_trial`), and the final `retrain_and_test`.

A trial trains on the manifest's train split and is scored on its validation split; the test
split is read only by `retrain_and_test`. Every figure comes with the linear-composition baseline
(per-element reference energies fitted on the training split), because on total DFT energies a
model that does not beat it has learned nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ase import Atoms

from hpopt.errors import HpoptError
from hpopt.train import fingerprints, trainer
from hpopt.train.config import TrainConfig, parse_config
from hpopt.train.data import composition, energies, fit_references, mae, read_images
from hpopt.train.fingerprints import Fingerprints
from hpopt.train.model import PotentialModel, counts, fit_scalers, load_model
from hpopt.train.split import Manifest, load_manifest

__all__ = ["TrainResult", "Pruned", "run_trial", "retrain_and_test", "load_model", "resolve_device"]


@dataclass
class TrainResult:
    val_mae: float  # eV, validation energy MAE (the Optuna objective)
    train_mae: float  # eV
    val_mae_per_atom: float  # eV/atom
    train_mae_per_atom: float
    baseline_val_mae: float  # linear composition fit on the training split, scored on validation (eV)
    baseline_val_mae_per_atom: float
    epochs_run: int
    device: str  # "cpu" or "cuda:0"
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Pruned(Exception):
    """Raised by an epoch callback to stop a trial early (optuna.TrialPruned works the same)."""


def resolve_device(device: str | None, config: TrainConfig) -> str:
    """The explicit `device` wins; else `optim.gpus > 0` means cuda:0; else cpu."""
    name = device or ("cuda:0" if config.optim.gpus > 0 else "cpu")
    if name == "cuda":
        name = "cuda:0"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HpoptError(f"device {name} requested but CUDA is not available on this node")
    if name != "cpu" and not name.startswith("cuda"):
        raise HpoptError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    return name


def split_fingerprints(manifest: Manifest, part: str, model_spec: fingerprints.FingerprintSpec,
                cache_dir: str | Path | None, device: str, dtype: torch.dtype) -> Fingerprints:
    """Fingerprints of one split part, from the cache when another trial already made them."""
    indices: list[int] = getattr(manifest, part)
    data_key = f"{manifest.sha256}:" + hashlib.sha256(str(indices).encode()).hexdigest()
    return fingerprints.cached(model_spec, data_key, lambda: read_images(manifest.source_path, indices),
                               cache_dir, device, dtype)


def _dtype(config: TrainConfig) -> torch.dtype:
    return torch.float64 if config.cmd.dtype == "float64" else torch.float32


@dataclass
class Labels:
    """What scoring needs of a set of images: energies, sizes, composition (numpy, float64)."""

    energy: np.ndarray
    n_atoms: np.ndarray
    counts: np.ndarray

    @staticmethod
    def of(fps: Fingerprints, n_elements: int) -> "Labels":
        return Labels(fps.energy.cpu().numpy(), fps.n_atoms.cpu().numpy(), counts(fps, n_elements).cpu().numpy())

    @staticmethod
    def of_images(images: list[Atoms], elements: list[str]) -> "Labels":
        return Labels(energies(images), np.array([len(a) for a in images]), composition(images, elements))


def _train_native(config: TrainConfig, manifest: Manifest, train: Fingerprints, val: Fingerprints,
                  device: str, on_epoch: trainer.EpochCallback | None, keep_best: bool = True
                  ) -> tuple[PotentialModel, trainer.FitOutcome]:
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(config.cmd.seed)
        spec = fingerprints.spec_from_config(config.dataset, manifest.elements)
        model = PotentialModel(config, spec, fit_scalers(train, len(spec.elements)), device)
        outcome = trainer.fit(model, train, val, epochs=config.optim.epochs, on_epoch=on_epoch,
                              keep_best=keep_best)
    return model, outcome


def run_trial(config: dict[str, Any], manifest_path: str | Path, *,
              on_epoch: Callable[[int, float, float], None] | None = None,
              cache_dir: str | Path | None = None, device: str | None = None) -> TrainResult:
    """Train once on the manifest's train split, score on its validation split.

    `on_epoch(epoch, val_mae_eV, train_mae_eV)` is called after every epoch (native trainer: exact
    validation MAE, running train MAE of the epoch's batches); exceptions raised from it propagate
    (that is how pruning stops a trial). The returned MAEs are exact, of the restored best epoch.
    `config` is the amptorch-shaped dict; missing keys take defaults, unknown keys raise
    HpoptError. Never touches the test split.
    """
    started = time.perf_counter()
    cfg = parse_config(config)
    manifest = load_manifest(manifest_path)
    device = resolve_device(device, cfg)
    if cfg.trainer == "amptorch":
        from hpopt.train import amptorch_backend

        train_images = read_images(manifest.source_path, manifest.train)
        val_images = read_images(manifest.source_path, manifest.validation)
        train_pred, val_pred, epochs_run = amptorch_backend.train_and_predict(
            cfg, train_images, val_images, on_epoch=on_epoch, device=device)
        return _result(Labels.of_images(train_images, manifest.elements), Labels.of_images(val_images, manifest.elements),
                       train_pred, val_pred, epochs_run, device, time.perf_counter() - started)
    spec = fingerprints.spec_from_config(cfg.dataset, manifest.elements)
    train = split_fingerprints(manifest, "train", spec, cache_dir, device, _dtype(cfg))
    val = split_fingerprints(manifest, "validation", spec, cache_dir, device, _dtype(cfg))
    _, outcome = _train_native(cfg, manifest, train, val, device, on_epoch)
    return _result(Labels.of(train, len(spec.elements)), Labels.of(val, len(spec.elements)),
                   outcome.train_energy.cpu().numpy(), outcome.val_energy.cpu().numpy(),
                   outcome.epochs_run, device, time.perf_counter() - started)


def _result(train: Labels, val: Labels, train_pred: np.ndarray, val_pred: np.ndarray,
            epochs_run: int, device: str, seconds: float) -> TrainResult:
    baseline = val.counts @ fit_references(train.counts, train.energy)
    return TrainResult(
        val_mae=mae(val_pred, val.energy), train_mae=mae(train_pred, train.energy),
        val_mae_per_atom=mae(val_pred, val.energy, val.n_atoms),
        train_mae_per_atom=mae(train_pred, train.energy, train.n_atoms),
        baseline_val_mae=mae(baseline, val.energy), baseline_val_mae_per_atom=mae(baseline, val.energy, val.n_atoms),
        epochs_run=epochs_run, device=device, seconds=seconds,
    )


def retrain_and_test(config: dict[str, Any], manifest_path: str | Path, out_path: str | Path, *,
                     include_val: bool = False, epochs: int | None = None,
                     cache_dir: str | Path | None = None, device: str | None = None) -> dict[str, Any]:
    """Train the chosen config (on train, or train+validation), score it once on the test split,
    and save the model to `out_path` (reload it with `load_model`)."""
    started = time.perf_counter()
    cfg = parse_config(config)
    if epochs is not None:
        cfg.optim.epochs = epochs
    if cfg.trainer != "native":
        raise HpoptError("retrain_and_test supports the native trainer only; set trainer: native")
    manifest = load_manifest(manifest_path)
    if not manifest.test:
        raise HpoptError(f"{manifest_path}: the test split is empty; make a split with a test fraction")
    device = resolve_device(device, cfg)
    spec = fingerprints.spec_from_config(cfg.dataset, manifest.elements)
    train = split_fingerprints(manifest, "train", spec, cache_dir, device, _dtype(cfg))
    val = split_fingerprints(manifest, "validation", spec, cache_dir, device, _dtype(cfg))
    if include_val:
        train = Fingerprints.cat([train, val])
    model, outcome = _train_native(cfg, manifest, train, val, device, None, keep_best=not include_val)
    test = split_fingerprints(manifest, "test", spec, None, device, _dtype(cfg))
    n_el = len(spec.elements)
    scored = _result(Labels.of(train, n_el), Labels.of(test, n_el), outcome.train_energy.cpu().numpy(),
                     model.energies(test).cpu().numpy(), outcome.epochs_run, device, 0.0)
    return {
        "test_mae": scored.val_mae, "test_mae_per_atom": scored.val_mae_per_atom,
        "baseline_test_mae": scored.baseline_val_mae, "baseline_test_mae_per_atom": scored.baseline_val_mae_per_atom,
        "train_mae": scored.train_mae, "train_mae_per_atom": scored.train_mae_per_atom,
        "include_val": include_val, "epochs_run": outcome.epochs_run, "device": device,
        "model_path": str(model.save(out_path)), "seconds": time.perf_counter() - started,
    }
