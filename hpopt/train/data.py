"""Datasets as the trainer sees them: ASE images, their energies, and their composition.

Raw total energies span hundreds of eV and are mostly explained by composition, so every model
is trained on the residual after per-element reference energies fitted by least squares on the
training split; the same fit, scored on validation, is the baseline every result is shown beside.
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

from hpopt.errors import HpoptError


def read_images(path: str | Path, indices: list[int] | None = None) -> list[Atoms]:
    """All images of an ASE-readable file (.traj, .extxyz, ASE db), or those at `indices`."""
    try:
        images = ase.io.read(str(path), ":")
    except FileNotFoundError:
        raise HpoptError(f"dataset not found: {path}") from None
    except Exception as exc:  # ASE raises many types for unreadable files
        raise HpoptError(f"cannot read {path} with ASE: {exc}") from None
    if not images:
        raise HpoptError(f"{path} holds no images")
    return images if indices is None else [images[i] for i in indices]


def energies(images: list[Atoms]) -> np.ndarray:
    """Total energies in eV; every image must carry one (from its calculator)."""
    out = np.empty(len(images))
    for k, atoms in enumerate(images):
        try:
            out[k] = atoms.get_potential_energy()
        except Exception:
            raise HpoptError(f"image {k} has no energy; the dataset must store DFT/EMT energies") from None
    return out


def composition(images: list[Atoms], elements: list[str]) -> np.ndarray:
    """Counts of each element per image, shape (n_images, n_elements)."""
    column = {e: i for i, e in enumerate(elements)}
    counts = np.zeros((len(images), len(elements)))
    for k, atoms in enumerate(images):
        for symbol in atoms.get_chemical_symbols():
            if symbol not in column:
                raise HpoptError(f"element {symbol} of image {k} is not among {', '.join(elements)}")
            counts[k, column[symbol]] += 1
    return counts


def fit_references(counts: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Per-element reference energies by least squares; elements absent from `counts` get 0."""
    present = counts.sum(axis=0) > 0
    refs = np.zeros(counts.shape[1])
    refs[present] = np.linalg.lstsq(counts[:, present], energy, rcond=None)[0]
    return refs


def mae(pred: np.ndarray, target: np.ndarray, n_atoms: np.ndarray | None = None) -> float:
    """Mean absolute error, per image or (with n_atoms) per atom."""
    err = np.abs(np.asarray(pred) - np.asarray(target))
    return float(np.mean(err if n_atoms is None else err / n_atoms))
