"""Deterministic demo data: rattled EMT metal slabs and bulk cells, some with adsorbates.

ASE's EMT calculator covers Al, Cu, Ag, Au, Ni, Pd, Pt and H, C, N, O, takes milliseconds per
small cell, and needs no DFT, so a few thousand labelled images come out in seconds; that is
enough to exercise splitting, fingerprints and training end to end.
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from hpopt.errors import HpoptError

METALS = ("Cu", "Pt", "Au")
ADSORBATES = ("O", "H", "C", "N")
SITE_HEIGHTS = {"ontop": (1.7, 2.1), "bridge": (1.4, 1.8), "fcc": (1.1, 1.5), "hcp": (1.1, 1.5)}  # Angstrom


def _structure(rng: np.random.Generator) -> Atoms:
    """One random structure: strained bulk or a slab, random alloying, maybe an adsorbate."""
    host = METALS[rng.integers(len(METALS))]
    if rng.random() < 0.3:
        atoms = bulk(host, "fcc", cubic=True).repeat((1, 1, int(rng.integers(1, 3))))
        atoms.set_cell(atoms.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
    else:
        atoms = fcc111(host, size=(2, 2, int(rng.integers(2, 4))), vacuum=5.0)
        if rng.random() < 0.7:
            site = tuple(SITE_HEIGHTS)[rng.integers(len(SITE_HEIGHTS))]
            add_adsorbate(atoms, ADSORBATES[rng.integers(len(ADSORBATES))], rng.uniform(*SITE_HEIGHTS[site]), site)
    symbols = atoms.get_chemical_symbols()
    for k, symbol in enumerate(symbols):
        if symbol in METALS and rng.random() < 0.2:
            symbols[k] = METALS[rng.integers(len(METALS))]
    atoms.set_chemical_symbols(symbols)
    atoms.rattle(stdev=float(rng.uniform(0.02, 0.1)), seed=int(rng.integers(2**31)))
    return atoms


def make_demo(path: str | Path, n_images: int = 2000, seed: int = 0) -> Path:
    """Write `n_images` EMT-labelled images (energy and forces) to `path` (.traj, .extxyz, .db)."""
    if n_images < 1:
        raise HpoptError(f"--images must be at least 1, got {n_images}")
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        atoms = _structure(rng)
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        images.append(atoms)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # ASE appends to an existing db
    ase.io.write(str(path), images)
    return path
