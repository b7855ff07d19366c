"""Symmetry functions: equal to a loop-by-loop reference, invariant, and cached once.

The production path batches all images: G5 as quadratic forms of per-atom moments
(fingerprints._angular_g5), G4 over padded per-centre rows (fingerprints._angular_g4); the
reference here is the textbook definition, one image, one neighbour and one triplet at a time."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from hpopt.errors import HpoptError
from hpopt.train import amptorch_backend, fingerprints
from hpopt.train.config import DatasetConfig, default_fp_params, parse_config
from hpopt.train.fingerprints import FingerprintSpec, spec_from_config

ELEMENTS = ["H", "C", "O", "Cu", "Pt"]


def _spec(scheme: str, cutoff: float = 4.5, angular: str = "g5") -> FingerprintSpec:
    return spec_from_config(DatasetConfig(fp_scheme=scheme, cutoff=cutoff, angular=angular), ELEMENTS)


def _slab() -> Atoms:
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)
    slab[0].symbol = "Pt"
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.rattle(0.05, seed=3)
    return slab


def _reference(atoms: Atoms, spec: FingerprintSpec) -> np.ndarray:
    """The textbook sums for one image, one neighbour and one triplet at a time, on ASE's
    neighbour list, in either layout (element-resolved blocks, or plain + Z-weighted), with G4
    or G5 (G4 without the r_jk terms)."""
    rc4 = spec.angular_cutoff or spec.cutoff
    fc = lambda r, rc: 0.5 * (math.cos(math.pi * r / rc) + 1) if r < rc else 0.0  # noqa: E731
    n_el, col = len(spec.elements), {e: k for k, e in enumerate(spec.elements)}
    pairs = [(a, b) for a in range(n_el) for b in range(a, n_el)]
    i_list, j_list, d_list = neighbor_list("ijD", atoms, spec.cutoff)
    out = np.zeros((len(atoms), spec.n_features))
    sym, z = atoms.get_chemical_symbols(), atoms.numbers
    gaussian, g4 = spec.scheme == "gaussian", spec.angular == "g4"
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
                r2, fc_jk = (rj**2 + rk**2 + rjk**2, fc(rjk, rc4)) if g4 else (rj**2 + rk**2, 1.0)
                term = np.array([2 ** (1 - zeta) * (1 + g * cos) ** zeta * math.exp(-eta * r2)
                                 * fc(rj, rc4) * fc(rk, rc4) * fc_jk
                                 for eta in spec.g4_etas for zeta in spec.g4_zetas for g in spec.g4_gammas])
                if gaussian:
                    angular[pairs.index(tuple(sorted((col[sym[j]], col[sym[k]]))))] += term
                else:
                    angular += [term, z[j] * z[k] * term]
        out[i] = np.concatenate([radial.ravel(), angular.ravel()])
    return out


@pytest.mark.parametrize("angular", ["g5", "g4"])
@pytest.mark.parametrize("atoms", [_slab(), molecule("CH3OH")], ids=["slab", "molecule"])
def test_matches_reference_sums(atoms: Atoms, angular: str) -> None:
    spec = _spec("gaussian", angular=angular)
    got = fingerprints.compute([atoms], spec, dtype=torch.float64).features.numpy()
    np.testing.assert_allclose(got, _reference(atoms, spec), rtol=1e-9, atol=1e-12)


def _images() -> list[Atoms]:
    """Images of different kinds and neighbour counts: 2D/3D/no periodicity, an atom with no
    neighbours, atoms with a single neighbour of an element, a tiny cell with many copies."""
    images = [_slab(), molecule("CH3OH"), bulk("Cu", "fcc", a=3.6, cubic=True), Atoms("H", positions=[[0.0, 0.0, 0.0]]),
              bulk("Pt", "fcc", a=3.9), molecule("CO")]
    images[2].rattle(0.05, seed=1)
    return images


def _within_rounding(single: np.ndarray, want: np.ndarray, spec: FingerprintSpec) -> None:
    """float32 against the float64 reference: relative error, or absolute error against the
    size of the feature's channel (a sum like (1 - cos)^zeta can be tiny next to its terms)."""
    blocks = np.split(want, [spec.radial_channels * spec.n_radial], axis=1)
    scales = [np.abs(block.reshape(len(want), -1, size)).max(axis=(0, 2), keepdims=True).repeat(size, 2).reshape(1, -1)
              for block, size in zip(blocks, (spec.n_radial, spec.n_angular))]
    np.testing.assert_array_less(np.abs(single - want), 2e-4 * np.abs(want) + 1e-6 * np.concatenate(scales, 1) + 1e-30)


@pytest.mark.parametrize("angular, zetas", [("g5", (1.0, 2.0, 5.0)), ("g4", (1.0, 2.5, 4.0))])
@pytest.mark.parametrize("scheme", ["gaussian", "weighted"])
def test_batched_path_equals_per_image_reference(scheme: str, angular: str, zetas: tuple[float, ...],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Many images in one call (so several padded row lengths and empty rows for G4, and
    moments of every degree up to 5 for G5), split into several chunks and monomial blocks, two
    etas, both gammas, a shorter angular cutoff: every number equals the per-image reference,
    in float64 and to rounding in float32."""
    monkeypatch.setattr(fingerprints, "CHUNK_ATOMS", 20)
    monkeypatch.setattr(fingerprints, "FILL_PAIRS", 97)
    spec = FingerprintSpec(scheme=scheme, elements=tuple(ELEMENTS), cutoff=4.5, angular_cutoff=4.0,
                           g2_etas=(0.05, 1.0), g2_rs=(0.0, 1.5), g4_etas=(0.005, 0.2),
                           g4_zetas=zetas, g4_gammas=(1.0, -1.0), angular=angular)
    images = _images()
    got = fingerprints.compute(images, spec, dtype=torch.float64).features.numpy()
    want = np.concatenate([_reference(atoms, spec) for atoms in images])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    single = fingerprints.compute(images, spec, dtype=torch.float32).features.numpy()
    _within_rounding(single, want, spec)  # the training dtype


@pytest.mark.parametrize("scheme", ["gaussian", "weighted"])
def test_g5_at_one_cutoff_with_many_zetas(scheme: str) -> None:
    """G5 with the angular cutoff equal to the radial one (the default: shared pair list) and
    zetas 1..4 and 8 (moments up to degree 8), against the reference."""
    spec = FingerprintSpec(scheme=scheme, elements=tuple(ELEMENTS), cutoff=4.0, angular_cutoff=0.0,
                           g2_etas=(0.3,), g2_rs=(0.0,), g4_etas=(0.01, 0.5), g4_zetas=(1.0, 2.0, 3.0, 4.0, 8.0),
                           g4_gammas=(-1.0, 1.0), angular="g5")
    images = _images()[:4]
    got = fingerprints.compute(images, spec, dtype=torch.float64).features.numpy()
    np.testing.assert_allclose(got, np.concatenate([_reference(atoms, spec) for atoms in images]),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spread", [1, 10_000], ids=["16-bit keys", "64-bit keys"])
def test_pairs_sorted_by_centre_then_label(spread: int) -> None:
    """The pair list is ASE's, ordered by centre and then by the neighbour's label (the CSR rows
    of the "gaussian" channels), whichever way the sort keys are stored."""
    images = [_slab(), bulk("Cu", "fcc", a=3.6, cubic=True), molecule("CH3OH")]
    label = np.random.default_rng(0).integers(0, 5, sum(len(a) for a in images)) * spread
    i, j, d = fingerprints._pairs(images, 4.5, label)
    key = i.astype(np.int64) * (label.max() + 1) + label[j]
    assert (np.diff(key) >= 0).all()
    offsets = np.cumsum([0] + [len(a) for a in images])
    want = sorted((a + o, b + o, *np.round(v, 9)) for atoms, o in zip(images, offsets)
                  for a, b, v in zip(*neighbor_list("ijD", atoms, 4.5)))
    assert sorted(zip(i.tolist(), j.tolist(), *np.round(d, 9).T.tolist())) == want


def test_lonely_neighbour_gives_exact_zero() -> None:
    """An element with one neighbour has no pair j < k in its channel: exactly 0 in float32,
    not the rounding of subtracting its j = k term (standardising would blow that up)."""
    spec = _spec("gaussian")
    co = fingerprints.compute([molecule("CO")], spec, dtype=torch.float32).features
    assert torch.count_nonzero(co[:, spec.radial_channels * spec.n_radial:]) == 0


@pytest.mark.parametrize("angular", ["g5", "g4"])
@pytest.mark.parametrize("scheme", ["gaussian", "weighted"])
def test_invariant_to_rotation_translation_and_order(scheme: str, angular: str) -> None:
    spec = _spec(scheme, angular=angular)
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


def test_cache_key_depends_on_the_angular_function(tmp_path: Path) -> None:
    g5, g4 = _spec("weighted"), _spec("weighted", angular="g4")
    assert g5.angular == "g5" and g4.angular == "g4" and g5.digest() != g4.digest()
    saved_before_g5 = {k: v for k, v in dataclasses.asdict(g4).items() if k != "angular"}
    assert FingerprintSpec(**saved_before_g5) == g4  # models saved before G5 existed used G4
    first = fingerprints.cached(g5, "data-1", lambda: [_slab()], tmp_path)
    second = fingerprints.cached(g4, "data-1", lambda: [_slab()], tmp_path)
    assert len(list(tmp_path.glob("fp-*.pt"))) == 2
    assert not torch.equal(first.features, second.features)


def test_angular_option_is_validated() -> None:
    assert parse_config({}).dataset.angular == "g5"
    assert parse_config({"dataset": {"angular": "G4"}}).dataset.angular == "g4"
    with pytest.raises(HpoptError, match="'dataset.angular' is 'g3'; choose one of g5, g4"):
        parse_config({"dataset": {"angular": "g3"}})
    half = {"G2": {"etas": [1.0], "rs_s": [0.0]}, "G4": {"etas": [0.1], "zetas": [1.0, 2.5], "gammas": [1.0]}}
    with pytest.raises(HpoptError, match="'dataset.fp_params.G4.zetas' must be whole numbers >= 1") as info:
        parse_config({"dataset": {"fp_params": half}})
    assert "\n" not in str(info.value)
    g4 = parse_config({"dataset": {"fp_params": half, "angular": "g4"}}).dataset
    assert g4.fp_params["G4"]["zetas"] == [1.0, 2.5]
    spec = FingerprintSpec(scheme="weighted", elements=("Cu",), cutoff=4.0, angular_cutoff=0.0, g2_etas=(1.0,),
                           g2_rs=(0.0,), g4_etas=(0.1,), g4_zetas=(2.5,), g4_gammas=(1.0,), angular="g5")
    with pytest.raises(HpoptError, match="whole zetas"):  # a spec built by hand is refused too
        fingerprints.compute([bulk("Cu")], spec)


@pytest.mark.parametrize("angular, key", [("g5", "G5"), ("g4", "G4")])
def test_amptorch_backend_gets_the_same_angular_function(angular: str, key: str) -> None:
    cfg = parse_config({"dataset": {"angular": angular, "fp_scheme": "gaussian"}})
    params = amptorch_backend.amptorch_config(cfg, [bulk("Cu")], "/abs/run", "cpu")["dataset"]["fp_params"]["default"]
    assert set(params) == {"G2", key, "cutoff"} and params[key] == cfg.dataset.fp_params["G4"]
