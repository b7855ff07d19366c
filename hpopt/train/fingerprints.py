"""Behler–Parrinello symmetry functions, vectorised in torch, with a content-addressed disk cache.

Radial  G2_i = sum_j            exp(-eta (r_ij - rs)^2) fc(r_ij)
Angular G4_i = sum_{j<k} 2^(1-zeta) (1 + gamma cos t_ijk)^zeta exp(-eta (r_ij^2 + r_ik^2 + r_jk^2))
               fc(r_ij) fc(r_ik) fc(r_jk)
with the cosine cutoff fc(r) = (cos(pi r / rc) + 1) / 2 for r < rc, eta in 1/Angstrom^2. G4 may use
a shorter cutoff than G2 (`angular_cutoff`, as in ANI): triplets grow with rc^6, so this is where
fingerprint time goes.

Two ways to split the sums by neighbour element:
* "gaussian": one G2 block per neighbour element and one G4 block per element pair (amptorch's
  layout); its size grows with the square of the number of elements.
* "weighted": element-weighted symmetry functions (Gastegger et al., J. Chem. Phys. 148, 241709,
  2018): each sum once unweighted and once weighted by the atomic numbers (Z_j, or Z_j Z_k), so
  the size does not depend on the number of elements (55 in the OC20 sample).

Speed (OC20: ~71 atoms, ~38 neighbours and ~55,000 triplets per atom-image at 6 Angstrom): the
neighbour pairs of thousands of images come from one k-d tree query (scipy, a dependency of ASE),
and everything after that is batched over all those images in torch: G2 is one pass over the
pair list, G4 a few dozen elementwise passes over padded per-centre neighbour rows (see
`_angular`), with no per-image or per-triplet Python and no triplet index lists. The pair search
runs on the CPU; the triplet work runs on `device` (the GPU when it is one).

Results are cached on disk by a hash of everything they depend on (including FORMAT_VERSION);
concurrent workers write to a temp file and `os.replace` it, so a reader sees either no file or a
whole one, and two writers of the same key write identical bytes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers
from scipy.spatial import cKDTree

from hpopt.errors import HpoptError
from hpopt.train.config import DatasetConfig

FORMAT_VERSION = 2  # bump when the numbers computed for a given spec (or the file layout) change
CHUNK_ATOMS = 5_000  # atoms processed together: bounds memory, and keeps pair arrays cache-sized
BLOCK_TRIPLETS = 1 << 17  # padded triplets per vectorised pass: big enough to amortise Python,
#                           small enough that the dozen temporaries stay in cache
PAD_STEP = 2  # neighbour rows are padded to 2H + 1 slots with H a multiple of this


@dataclass(frozen=True)
class FingerprintSpec:
    """Everything the numbers depend on besides the structures; its hash keys the cache."""

    scheme: str  # "gaussian" | "weighted" ("auto" is resolved before this point)
    elements: tuple[str, ...]
    cutoff: float
    angular_cutoff: float  # 0: same as cutoff
    g2_etas: tuple[float, ...]
    g2_rs: tuple[float, ...]
    g4_etas: tuple[float, ...] = ()
    g4_zetas: tuple[float, ...] = ()
    g4_gammas: tuple[float, ...] = ()

    @property
    def n_radial(self) -> int:
        return len(self.g2_etas) * len(self.g2_rs)

    @property
    def n_angular(self) -> int:
        return len(self.g4_etas) * len(self.g4_zetas) * len(self.g4_gammas)

    @property
    def radial_channels(self) -> int:
        return len(self.elements) if self.scheme == "gaussian" else 2

    @property
    def angular_channels(self) -> int:
        n = len(self.elements)
        return n * (n + 1) // 2 if self.scheme == "gaussian" else 2

    @property
    def n_features(self) -> int:
        return self.radial_channels * self.n_radial + self.angular_channels * self.n_angular

    def digest(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def spec_from_config(dataset: DatasetConfig, elements: list[str]) -> FingerprintSpec:
    """Resolve `fp_scheme: auto` (element-resolved for few elements, weighted for many)."""
    scheme = dataset.fp_scheme
    if scheme == "auto":
        scheme = "gaussian" if len(elements) <= dataset.auto_max_elements else "weighted"
    g2, g4 = dataset.fp_params["G2"], dataset.fp_params.get("G4", {})
    return FingerprintSpec(
        scheme=scheme, elements=tuple(elements), cutoff=float(dataset.cutoff),
        angular_cutoff=float(dataset.angular_cutoff),
        g2_etas=tuple(g2["etas"]), g2_rs=tuple(g2["rs_s"]),
        g4_etas=tuple(g4.get("etas", ())), g4_zetas=tuple(g4.get("zetas", ())),
        g4_gammas=tuple(g4.get("gammas", ())),
    )


@dataclass
class Fingerprints:
    """Per-atom features of many images, flattened (atoms of image 0, then image 1, ...), with
    the images' energies so that a cache hit never needs to read the dataset."""

    features: torch.Tensor  # (n_atoms, n_features)
    element: torch.Tensor  # (n_atoms,) index into spec.elements
    n_atoms: torch.Tensor  # (n_images,)
    energy: torch.Tensor  # (n_images,) eV, float64; NaN where an image has none

    def to(self, device: str | torch.device) -> "Fingerprints":
        return Fingerprints(*(getattr(self, name).to(device) for name in FIELDS))

    @staticmethod
    def cat(parts: list["Fingerprints"]) -> "Fingerprints":
        return Fingerprints(*(torch.cat([getattr(p, name) for p in parts]) for name in FIELDS))


FIELDS = ("features", "element", "n_atoms", "energy")


def _cutoff_fn(r: torch.Tensor, rc: float) -> torch.Tensor:
    return torch.where(r < rc, 0.5 * (torch.cos(math.pi / rc * r) + 1.0), torch.zeros_like(r))


def _wrapped(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions wrapped into the cell, and the Cartesian lattice translations that can bring a
    neighbour within `cutoff` of one of them (the zero shift first); copies whose bounding box
    is farther than `cutoff` (e.g. across a slab's vacuum) are dropped."""
    positions = atoms.positions
    if not atoms.pbc.any():
        return positions, np.zeros((1, 3))
    cell = atoms.cell.complete()
    inverse = np.linalg.inv(cell)  # its columns are the reciprocal vectors
    frac = positions @ inverse
    frac[:, atoms.pbc] %= 1.0
    positions = frac @ cell
    reps = tuple(int(math.ceil(cutoff * np.linalg.norm(inverse[:, axis]))) if periodic else 0
                 for axis, periodic in enumerate(atoms.pbc))  # cutoff / plane spacing
    shifts = _grid(reps) @ cell
    low, high = positions.min(axis=0), positions.max(axis=0)
    gap = np.maximum(0.0, np.maximum(low - (high + shifts), (low + shifts) - high))
    return positions, shifts[(gap * gap).sum(axis=1) < cutoff * cutoff]


@functools.lru_cache(maxsize=64)
def _grid(reps: tuple[int, ...]) -> np.ndarray:
    """Integer lattice translations within `reps`, the zero translation first."""
    grid = sorted(itertools.product(*(range(-n, n + 1) for n in reps)), key=lambda g: g != (0, 0, 0))
    return np.array(grid, dtype=float)


def _pairs(images: list[Atoms], cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, D_ij) for every ordered neighbour pair closer than `cutoff` in all `images` (atoms
    numbered consecutively across images), sorted by i; D_ij = r_j + shift - r_i.

    One k-d tree query for all images: each image with its periodic copies is placed beside the
    previous one along x, more than `cutoff` apart, so no pair crosses images; vectors come from
    the unplaced coordinates, so placement costs no precision."""
    centres, copies, placed, owners, first, edge = [], [], [], [], 0, 0.0
    for atoms in images:
        positions, shifts = _wrapped(atoms, cutoff)
        copy = (shifts[:, None, :] + positions[None, :, :]).reshape(-1, 3)  # copy 0: the atoms
        move = np.array([edge - copy[:, 0].min(), 0.0, 0.0])
        edge += copy[:, 0].max() - copy[:, 0].min() + 2.0 * cutoff + 1.0
        centres.append(positions)
        copies.append(copy)
        placed.append(copy + move)
        owners.append(first + np.tile(np.arange(len(positions)), len(shifts)))
        first += len(positions)
    sizes = [len(c) for c in centres]
    copy, owner, placed_copy = np.concatenate(copies), np.concatenate(owners), np.concatenate(placed)
    starts = np.cumsum([0] + [len(c) for c in copies[:-1]])
    own = np.concatenate([start + np.arange(n) for start, n in zip(starts, sizes)])  # copy 0 rows
    found = cKDTree(placed_copy[own]).sparse_distance_matrix(cKDTree(placed_copy), cutoff, output_type="ndarray")
    i, column = np.ascontiguousarray(found["i"]), np.ascontiguousarray(found["j"])
    order = np.argsort(i, kind="stable")
    i, column = i[order], column[order]
    keep = column != own[i]
    i, column = i[keep], column[keep]
    return i, owner[column], copy[column] - copy[own[i]]


def _accumulate(values: torch.Tensor, center: torch.Tensor, n_atoms: int, spec: FingerprintSpec,
                channel: torch.Tensor, weight: torch.Tensor, n_channels: int) -> torch.Tensor:
    """Per-atom sums of `values` (one row per pair), split into channels: by element `channel`
    for "gaussian", unweighted and `weight`-ed for "weighted"."""
    if spec.scheme == "gaussian":
        out = torch.zeros(n_atoms * n_channels, values.shape[1], device=values.device, dtype=values.dtype)
        return out.index_add_(0, center * n_channels + channel, values).view(n_atoms, -1)
    both = torch.cat([values, values * weight[:, None]], dim=1)
    out = torch.zeros(n_atoms, both.shape[1], device=values.device, dtype=values.dtype)
    return out.index_add_(0, center, both)


def _power(base: torch.Tensor, zeta: float) -> torch.Tensor:
    """base ** zeta; integer zetas (the usual 1, 2, 4, 16) by squaring, far cheaper than pow."""
    if zeta != int(zeta) or zeta < 1:
        return base.clamp_min(0.0).pow(zeta)
    out, square, n = None, base, int(zeta)
    while True:
        if n & 1:
            out = square if out is None else out * square
        n >>= 1
        if not n:
            return out
        square = square * square


def _blocks(half: torch.Tensor) -> list[tuple[int, int, int]]:
    """(H, first, last) ranges of centres, in the order of a stable sort by H, that share one
    padded row length 2H + 1 and hold at most about BLOCK_TRIPLETS padded triplets."""
    blocks, start = [], 0
    for h, count in zip(*(t.tolist() for t in torch.unique(half, return_counts=True))):
        rows = max(1, BLOCK_TRIPLETS // max(1, h * (2 * h + 1)))
        if h:
            blocks.extend((h, a, min(a + rows, start + count)) for a in range(start, start + count, rows))
        start += count
    return blocks


def _angular(center: torch.Tensor, vec: torch.Tensor, r: torch.Tensor, neighbour: torch.Tensor,
             n_atoms: int, spec: FingerprintSpec, dtype: torch.dtype) -> torch.Tensor:
    """G4 of every atom, from the pairs within the angular cutoff (sorted by centre).

    Each centre's neighbours fill the slots of a zero-padded row of odd length N = 2H + 1; the
    unordered neighbour pairs of the row are exactly (s, s + d mod N) for d = 1..H, so one
    strided view of the row extended by its first H slots gives every partner k for all d at
    once without a gather,
    and the triplet terms are a few dozen elementwise passes over (centres, H, N) tensors.
    Centres are grouped by H, so padding wastes little. `neighbour` is the element column
    ("gaussian") or the atomic number ("weighted") of each pair's neighbour.
    """
    rc = spec.angular_cutoff or spec.cutoff
    device, n_eta = center.device, len(spec.g4_etas)
    combos = [(zeta, gamma) for zeta in spec.g4_zetas for gamma in spec.g4_gammas]
    n_values = n_eta * len(combos)
    out = torch.zeros(n_atoms, spec.angular_channels * n_values, device=device, dtype=dtype)
    counts = torch.bincount(center, minlength=n_atoms)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(center.numel(), device=device) - first[center]
    half = (counts - 1).clamp_min(0).add_(2 * PAD_STEP - 1).div_(2 * PAD_STEP, rounding_mode="floor").mul_(PAD_STEP)

    # Per pair: unit vector, r, r^2, exp(-eta r^2) fc(r) for each eta, neighbour label.
    etas = torch.as_tensor(spec.g4_etas, device=device, dtype=r.dtype)
    radial = torch.exp(-etas[None, :] * (r * r)[:, None]) * _cutoff_fn(r, rc)[:, None]
    per_pair = torch.cat([vec / r[:, None], r[:, None], (r * r)[:, None], radial,
                          neighbour[:, None].to(dtype)], dim=1)
    n_planes, lab = per_pair.shape[1], per_pair.shape[1] - 1
    one = torch.ones((), device=device, dtype=dtype)
    scale = torch.as_tensor([0.5 * 2.0 ** (1.0 - zeta) for _ in spec.g4_etas for zeta, _ in combos],
                            device=device, dtype=dtype)  # 0.5: fc(r_jk) is carried as 1 + cos
    if spec.scheme == "gaussian":
        n_el = len(spec.elements)
        pair_channel = torch.zeros(n_el, n_el, dtype=torch.long, device=device)
        lo, hi = torch.triu_indices(n_el, n_el, device=device)
        pair_channel[lo, hi] = pair_channel[hi, lo] = torch.arange(lo.numel(), device=device)

    # Centres sorted by H (stable), pairs likewise: every block is a slice of both orders.
    atom_order = torch.argsort(half, stable=True)
    rank = torch.empty_like(atom_order)
    rank[atom_order] = torch.arange(n_atoms, device=device)
    pair_order = torch.argsort(half[center], stable=True)
    pair_rank, slot, per_pair = rank[center[pair_order]], slot[pair_order], per_pair[pair_order]
    pair_bounds = torch.cumsum(counts[atom_order], 0).tolist()
    planes_offset = torch.arange(n_planes, device=device)
    for h, a0, a1 in _blocks(half):
        n, rows = 2 * h + 1, a1 - a0
        atoms = atom_order[a0:a1]
        p0, p1 = pair_bounds[a0 - 1] if a0 else 0, pair_bounds[a1 - 1]
        width = n + h  # the row, then its first h slots again: slot s + d without a modulo
        planes = torch.zeros(rows, n_planes, width, device=device, dtype=dtype)
        target = ((pair_rank[p0:p1] - a0) * (n_planes * width) + slot[p0:p1])[:, None] + planes_offset * width
        planes.view(-1)[target.view(-1)] = per_pair[p0:p1].reshape(-1)
        planes[:, :, n:] = planes[:, :, :h]
        j = planes[:, :, None, :n]  # (rows, planes, 1, N): the first neighbour, slot s
        k = planes.as_strided((rows, n_planes, h, n), (n_planes * width, width, 1, 1), 1)  # slot s + d

        cos = k[:, 0] * j[:, 0]
        cos.addcmul_(k[:, 1], j[:, 1]).addcmul_(k[:, 2], j[:, 2])
        r2_jk = k[:, 4] + j[:, 4]
        r2_jk.addcmul_(k[:, 3] * j[:, 3], cos, value=-2.0)
        fc_jk = torch.clamp(r2_jk, 0.0, rc * rc).sqrt_().mul_(math.pi / rc).cos_().add_(1.0)
        values = torch.empty(rows, n_values, h * n, device=device, dtype=dtype)
        bases = {gamma: torch.add(one, cos, alpha=gamma) for gamma in spec.g4_gammas}
        angles = [_power(bases[gamma], zeta) for zeta, gamma in combos]
        for e, eta in enumerate(spec.g4_etas):
            weight = torch.mul(r2_jk, -eta).exp_().mul_(fc_jk).mul_(k[:, 5 + e]).mul_(j[:, 5 + e])
            for c, angle in enumerate(angles):
                torch.mul(weight, angle, out=values[:, e * len(combos) + c].view(rows, h, n))
        if spec.scheme == "gaussian":
            channel = pair_channel[k[:, lab].long(), j[:, lab].long()].reshape(rows, h * n)
            sums = torch.bmm(values, torch.nn.functional.one_hot(channel, lo.numel()).to(dtype))
            out[atoms] = (sums * scale[None, :, None]).transpose(1, 2).reshape(rows, -1)
        else:
            zz = (k[:, lab] * j[:, lab]).reshape(rows, h * n, 1)
            sums = torch.stack([values.sum(-1), torch.bmm(values, zz).squeeze(-1)], dim=1)
            out[atoms] = (sums * scale).reshape(rows, -1)
    return out


def _features(images: list[Atoms], spec: FingerprintSpec, device: torch.device, dtype: torch.dtype,
              lookup: np.ndarray) -> torch.Tensor:
    """Features of many images at once: one flat pair list, one pass per padded-row block."""
    i, j, vec = (torch.as_tensor(a, device=device) for a in _pairs(images, spec.cutoff))
    offset = sum(len(atoms) for atoms in images)
    r = vec.norm(dim=-1).to(dtype)  # float64 geometry, then everything in `dtype`
    vec = vec.to(dtype)
    elem = torch.as_tensor(lookup[np.concatenate([a.numbers for a in images])], device=device)
    z = torch.as_tensor([atomic_numbers[e] for e in spec.elements], device=device, dtype=dtype)[elem]
    etas = torch.as_tensor(spec.g2_etas, device=device, dtype=dtype)
    rs = torch.as_tensor(spec.g2_rs, device=device, dtype=dtype)
    g2 = torch.exp(-etas[:, None] * (r[:, None, None] - rs[None, None, :]) ** 2).flatten(1)
    g2 *= _cutoff_fn(r, spec.cutoff)[:, None]
    parts = [_accumulate(g2, i, offset, spec, elem[j], z[j], len(spec.elements))]
    if spec.n_angular:
        keep = r < (spec.angular_cutoff or spec.cutoff)
        label = elem[j] if spec.scheme == "gaussian" else z[j]
        parts.append(_angular(i[keep], vec[keep], r[keep], label[keep], offset, spec, dtype))
    return torch.cat(parts, dim=1)


def _element_lookup(images: list[Atoms], spec: FingerprintSpec) -> np.ndarray:
    """Atomic number -> column in spec.elements; one clear error for an element outside it."""
    lookup = np.full(max(atomic_numbers.values()) + 1, -1)
    lookup[[atomic_numbers[e] for e in spec.elements]] = np.arange(len(spec.elements))
    for atoms in images:
        if (lookup[atoms.numbers] < 0).any():
            bad = next(s for s, z in zip(atoms.get_chemical_symbols(), atoms.numbers) if lookup[z] < 0)
            raise HpoptError(f"element {bad} is not among the fingerprint elements {', '.join(spec.elements)}")
    return lookup


def features(images: list[Atoms], spec: FingerprintSpec, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-atom features of `images`, flattened (n_atoms, spec.n_features); no labels, no cache."""
    device = torch.device(device)
    lookup = _element_lookup(images, spec)
    chunks, chunk, size = [], [], 0
    for atoms in images:  # bounded memory for any number of images
        chunk.append(atoms)
        size += len(atoms)
        if size >= CHUNK_ATOMS:
            chunks.append(_features(chunk, spec, device, dtype, lookup))
            chunk, size = [], 0
    if chunk:
        chunks.append(_features(chunk, spec, device, dtype, lookup))
    return torch.cat(chunks) if chunks else torch.zeros(0, spec.n_features, dtype=dtype, device=device)


def compute(images: list[Atoms], spec: FingerprintSpec, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float64) -> Fingerprints:
    """Fingerprints of `images` with their elements and energies, computed on `device` (no cache)."""
    device = torch.device(device)
    lookup = _element_lookup(images, spec)
    numbers = np.concatenate([a.numbers for a in images]) if images else np.zeros(0, dtype=int)
    return Fingerprints(
        features=features(images, spec, device, dtype),
        element=torch.as_tensor(lookup[numbers], dtype=torch.long, device=device),
        n_atoms=torch.as_tensor([len(a) for a in images], dtype=torch.long, device=device),
        energy=torch.as_tensor([_energy(a) for a in images], dtype=torch.float64, device=device),
    )


def _energy(atoms: Atoms) -> float:
    return atoms.get_potential_energy() if atoms.calc is not None else math.nan


def cached(spec: FingerprintSpec, data_key: str, load_images: Callable[[], list[Atoms]],
           cache_dir: str | Path | None, device: str | torch.device = "cpu",
           dtype: torch.dtype = torch.float32) -> Fingerprints:
    """Fingerprints for the images identified by `data_key` (e.g. dataset sha256 + indices).

    A hit reads the file and never calls `load_images`; a miss computes, then publishes the file
    atomically. With `cache_dir=None` nothing is read or written.
    """
    if cache_dir is None:
        return compute(load_images(), spec, device, dtype)
    key = hashlib.sha256(f"{spec.digest()}:{dtype}:{data_key}".encode()).hexdigest()[:40]
    path = Path(cache_dir) / f"fp-{key}.pt"
    if path.exists():
        try:
            return Fingerprints(**torch.load(path, map_location=device, weights_only=True))
        except Exception:  # a truncated file from a killed writer on a non-POSIX FS: recompute
            pass
    fps = compute(load_images(), spec, device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({k: v.cpu() for k, v in vars(fps).items()}, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fps
