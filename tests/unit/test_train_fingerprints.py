"""Symmetry functions: equal to a loop-by-loop reference, invariant, and cached once.

The production path batches all images into padded per-centre rows (fingerprints._angular); the
reference here is the textbook definition, one image, one neighbour and one triplet at a time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from hpopt.train import fingerprints
from hpopt.train.config import DatasetConfig, default_fp_params
from hpopt.train.fingerprints import FingerprintSpec, spec_from_config

ELEMENTS = ["H", "C", "O", "Cu", "Pt"]


def _spec(scheme: str, cutoff: float = 4.5) -> FingerprintSpec:
    return spec_from_config(DatasetConfig(fp_scheme=scheme, cutoff=cutoff), ELEMENTS)


def _slab() -> Atoms:
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)
    slab[0].symbol = "Pt"
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.rattle(0.05, seed=3)
    return slab


def _reference(atoms: Atoms, spec: FingerprintSpec) -> np.ndarray:
    """The textbook sums for one image, one neighbour and one triplet at a time, on ASE's
    neighbour list, in either layout (element-resolved blocks, or plain + Z-weighted)."""
    rc4 = spec.angular_cutoff or spec.cutoff
    fc = lambda r, rc: 0.5 * (math.cos(math.pi * r / rc) + 1) if r < rc else 0.0  # noqa: E731
    n_el, col = len(spec.elements), {e: k for k, e in enumerate(spec.elements)}
    pairs = [(a, b) for a in range(n_el) for b in range(a, n_el)]
    i_list, j_list, d_list = neighbor_list("ijD", atoms, spec.cutoff)
    out = np.zeros((len(atoms), spec.n_features))
    sym, z = atoms.get_chemical_symbols(), atoms.numbers
    gaussian = spec.scheme == "gaussian"
    for i in range(len(atoms)):
        mine = [(j, d) for ii, j, d in zip(i_list, j_list, d_list) if ii == i]
        radial = np.zeros((n_el if gaussian else 2, spec.n_radial))
        angular = np.zeros((len(pairs) if gaussian else 2, spec.n_angular))
        for j, d in mine:
            r = np.linalg.norm(d)
            g2 = np.array([math.exp(-eta * (r - rs) ** 2) * fc(r, spec.cutoff)
                           for eta in spec.g2_etas for rs in spec.g2_rs])
            if gaussian:
                radial[col[sym[j]]] += g2
            else:
                radial += [g2, z[j] * g2]
        near = [(j, d) for j, d in mine if np.linalg.norm(d) < rc4]
        for a in range(len(near)):
            for b in range(a + 1, len(near)):
                (j, dj), (k, dk) = near[a], near[b]
                rj, rk, rjk = np.linalg.norm(dj), np.linalg.norm(dk), np.linalg.norm(dk - dj)
                cos = dj @ dk / (rj * rk)
                g4 = np.array([2 ** (1 - zeta) * (1 + g * cos) ** zeta * math.exp(-eta * (rj**2 + rk**2 + rjk**2))
                               * fc(rj, rc4) * fc(rk, rc4) * fc(rjk, rc4)
                               for eta in spec.g4_etas for zeta in spec.g4_zetas for g in spec.g4_gammas])
                if gaussian:
                    angular[pairs.index(tuple(sorted((col[sym[j]], col[sym[k]]))))] += g4
                else:
                    angular += [g4, z[j] * z[k] * g4]
        out[i] = np.concatenate([radial.ravel(), angular.ravel()])
    return out


@pytest.mark.parametrize("atoms", [_slab(), molecule("CH3OH")], ids=["slab", "molecule"])
def test_matches_reference_sums(atoms: Atoms) -> None:
    spec = _spec("gaussian")
    got = fingerprints.compute([atoms], spec, dtype=torch.float64).features.numpy()
    np.testing.assert_allclose(got, _reference(atoms, spec), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scheme", ["gaussian", "weighted"])
def test_batched_path_equals_per_image_reference(scheme: str) -> None:
    """Many images of different kinds and neighbour counts in one call (so several padded row
    lengths, empty rows, 2D/3D/no periodicity), two etas, a non-integer zeta, a shorter angular
    cutoff: every number equals the per-image reference."""
    spec = FingerprintSpec(scheme=scheme, elements=tuple(ELEMENTS), cutoff=4.5, angular_cutoff=4.0,
                           g2_etas=(0.05, 1.0), g2_rs=(0.0, 1.5), g4_etas=(0.005, 0.2),
                           g4_zetas=(1.0, 2.5, 4.0), g4_gammas=(1.0, -1.0))
    lone = Atoms("H", positions=[[0.0, 0.0, 0.0]])  # no neighbours at all
    images = [_slab(), molecule("CH3OH"), bulk("Cu", "fcc", a=3.6, cubic=True), lone,
              bulk("Pt", "fcc", a=3.9), molecule("CO")]
    images[2].rattle(0.05, seed=1)
    got = fingerprints.compute(images, spec, dtype=torch.float64).features.numpy()
    want = np.concatenate([_reference(atoms, spec) for atoms in images])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    single = fingerprints.compute(images, spec, dtype=torch.float32).features.numpy()
    np.testing.assert_allclose(single, want, rtol=2e-4, atol=1e-6)  # the training dtype


@pytest.mark.parametrize("scheme", ["gaussian", "weighted"])
def test_invariant_to_rotation_translation_and_order(scheme: str) -> None:
    spec = _spec(scheme)
    atoms = _slab()
    base = fingerprints.compute([atoms], spec, dtype=torch.float64).features

    moved = atoms.copy()
    moved.rotate(37, "z", rotate_cell=True)
    moved.rotate(20, (1, 1, 0), rotate_cell=True)
    moved.translate([1.3, -2.1, 0.7])
    torch.testing.assert_close(fingerprints.compute([moved], spec, dtype=torch.float64).features, base)

    order = np.random.default_rng(0).permutation(len(atoms))
    shuffled = atoms[order]
    got = fingerprints.compute([shuffled], spec, dtype=torch.float64).features
    torch.testing.assert_close(got, base[torch.as_tensor(order)])


def test_weighted_size_does_not_grow_with_elements() -> None:
    many = ["H", "C", "N", "O"] + ["Cu", "Ag", "Au", "Pt", "Pd", "Ni", "Al"]
    few = spec_from_config(DatasetConfig(fp_scheme="weighted"), many[:2])
    lots = spec_from_config(DatasetConfig(fp_scheme="weighted"), many)
    assert few.n_features == lots.n_features
    assert spec_from_config(DatasetConfig(), many).scheme == "weighted"  # auto for many elements
    assert spec_from_config(DatasetConfig(), many[:3]).scheme == "gaussian"
    assert len(default_fp_params()["G2"]["etas"]) == 4


def test_cache_hit_does_not_recompute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec("weighted")
    loads = []

    def load() -> list[Atoms]:
        loads.append(1)
        return [_slab(), _slab()]

    first = fingerprints.cached(spec, "data-1", load, tmp_path)
    monkeypatch.setattr(fingerprints, "compute", lambda *a, **k: pytest.fail("recomputed on a cache hit"))
    second = fingerprints.cached(spec, "data-1", load, tmp_path)
    assert loads == [1]
    torch.testing.assert_close(second.features, first.features)
    assert torch.equal(second.n_atoms, first.n_atoms)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with pytest.raises(pytest.fail.Exception):  # a different key is a miss
        fingerprints.cached(spec, "data-2", load, tmp_path)
