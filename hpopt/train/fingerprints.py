"""Behler–Parrinello symmetry functions, vectorised in torch, with a content-addressed disk cache.

Radial            G2_i = sum_j exp(-eta (r_ij - rs)^2) fc(r_ij)
Angular (default) G5_i = 2^(1-zeta) sum_{j<k} (1 + gamma cos t_ijk)^zeta exp(-eta (r_ij^2 + r_ik^2))
                         fc(r_ij) fc(r_ik)
Angular (exact)   G4_i = 2^(1-zeta) sum_{j<k} (1 + gamma cos t_ijk)^zeta exp(-eta (r_ij^2 + r_ik^2 + r_jk^2))
                         fc(r_ij) fc(r_ik) fc(r_jk)
with the cosine cutoff fc(r) = (cos(pi r / rc) + 1) / 2 for r < rc and eta in 1/Angstrom^2. The
angular functions may use a shorter cutoff than G2 (`angular_cutoff`, as in ANI). The dataset
option `angular` picks G5 or G4 for the one angular parameter set (`fp_params.G4`, amptorch's
key); both are in amptorch.

Why G5 is the default: without the r_jk terms every triplet term is a j factor times a k factor
times a polynomial in cos t_ijk = u_j . u_k (for whole zetas), so the sum over neighbour pairs is
a quadratic form in per-atom moments M_alpha = sum_j a_j u_j^alpha (35 of them up to zeta = 4;
see `_angular_g5`). That costs O(neighbours) per atom instead of O(neighbours^2): ~37 pairs
instead of ~700 triplets per atom on OC20 at 6 Angstrom. G4 does not factorise (r_jk couples j
and k); it stays a triplet sum over padded per-centre neighbour rows (`_angular_g4`). G5 needs
whole zetas >= 1 (the config refuses others: use G4 for them); its cost grows with the number
of moments, (zeta + 1)(zeta + 2)(zeta + 3)/6 for the largest zeta.

Two ways to split the sums by neighbour element:
* "gaussian": one G2 block per neighbour element and one angular block per element pair
  (amptorch's layout); its size grows with the square of the number of elements.
* "weighted": element-weighted symmetry functions (Gastegger et al., J. Chem. Phys. 148, 241709,
  2018): each sum once unweighted and once weighted by the atomic numbers (Z_j, or Z_j Z_k), so
  the size does not depend on the number of elements (55 in the OC20 sample).

Speed (OC20: ~71 atoms and ~37 neighbours per atom at 6 Angstrom; one CPU thread): G2 + G5 about
0.7 ms per image, G2 + G4 about 1.7 (benchmarks/bench_train.py). The neighbour pairs of a chunk
of images come from one k-d tree query (scipy, a dependency of ASE) on the CPU, about half of
the G5 time; everything after that runs on `device`, batched over all images: pairs sorted by
(centre, neighbour element), every per-atom sum one CSR sparse-dense product, and no per-image,
per-pair or per-triplet Python.

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
import warnings
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

FORMAT_VERSION = 3  # bump when the numbers computed for a given spec (or the file layout) change
CHUNK_ATOMS = 5_000  # atoms processed together: bounds memory, and keeps pair arrays cache-sized
BLOCK_TRIPLETS = 1 << 17  # padded triplets per vectorised pass: big enough to amortise Python,
#                           small enough that the dozen temporaries stay in cache
PAD_STEP = 2  # neighbour rows are padded to 2H + 1 slots with H a multiple of this
FILL_PAIRS = 1 << 14  # pairs per monomial pass on the CPU (G5): the block stays in L2 cache


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
    angular: str = "g4"  # "g5" | "g4"; the default is what specs saved before G5 existed meant

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
        g4_gammas=tuple(g4.get("gammas", ())), angular=dataset.angular,
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


def _points(images: list[Atoms], cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point, owner, move): every atom wrapped into its cell (atom k is point k), then every
    periodic copy of an atom that can lie within `cutoff` of its image's bounding box; the atom
    each point is a copy of; and the x offset that places each image beside the previous one,
    more than `cutoff` apart, so that one k-d tree holds all images without a pair across two.
    Vectorised over all images: only the lattice translations are looked up per image."""
    sizes = np.array([len(atoms) for atoms in images])
    start, image = np.cumsum(sizes) - sizes, np.repeat(np.arange(len(images)), sizes)
    pbc = np.array([atoms.pbc for atoms in images])
    cells = np.array([atoms.cell.complete() if atoms.pbc.any() else np.eye(3) for atoms in images])
    inverse = np.linalg.inv(cells)  # its columns are the reciprocal vectors
    per_atom = functools.partial(np.take, indices=image, axis=0)  # np.take: 4x faster than [] on rows
    frac = np.einsum("ni,nij->nj", np.concatenate([atoms.positions for atoms in images]), per_atom(inverse))
    positions = np.einsum("ni,nij->nj", np.where(per_atom(pbc), frac % 1.0, frac), per_atom(cells))
    low, high = np.minimum.reduceat(positions, start), np.maximum.reduceat(positions, start)

    # Lattice translations per image (cutoff / plane spacing along each periodic axis), the zero
    # translation first, without those whose copy of the bounding box is farther than `cutoff`.
    reps = np.where(pbc, np.ceil(cutoff * np.linalg.norm(inverse, axis=1)), 0).astype(int)
    shifts = [_grid(tuple(r)) @ cell for r, cell in zip(reps.tolist(), cells)]
    shift_image = np.repeat(np.arange(len(images)), [len(s) for s in shifts])
    shift = np.concatenate(shifts)
    gap = np.maximum(0.0, np.maximum(low[shift_image] - (high[shift_image] + shift),
                                     (low[shift_image] + shift) - high[shift_image]))
    near = np.einsum("ij,ij->i", gap, gap) < cutoff * cutoff  # always true for the zero translation
    shift, shift_image = shift[near], shift_image[near]
    per_image = np.bincount(shift_image, minlength=len(images))
    first_shift = np.cumsum(per_image) - per_image
    x_low = low[:, 0] + np.minimum.reduceat(shift[:, 0], first_shift)
    width = high[:, 0] + np.maximum.reduceat(shift[:, 0], first_shift) - x_low + 2.0 * cutoff + 1.0
    move = np.cumsum(width) - width - x_low

    # Copies of whole images under the non-zero translations, then only atoms near the box.
    nonzero = np.ones(len(shift), dtype=bool)
    nonzero[first_shift] = False
    shift, shift_image = shift[nonzero], shift_image[nonzero]
    counts = sizes[shift_image]
    copy_image = np.repeat(shift_image, counts)
    owner = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts - start[shift_image], counts)
    copy = np.take(positions, owner, axis=0) + np.repeat(shift, counts, axis=0)
    gap = np.maximum(0.0, np.maximum(np.take(low, copy_image, axis=0) - copy, copy - np.take(high, copy_image, axis=0)))
    near = np.einsum("ij,ij->i", gap, gap) < cutoff * cutoff
    return (np.concatenate([positions, copy[near]]), np.concatenate([np.arange(len(positions)), owner[near]]),
            np.concatenate([move[image], move[copy_image[near]]]))


@functools.lru_cache(maxsize=64)
def _grid(reps: tuple[int, ...]) -> np.ndarray:
    """Integer lattice translations within `reps`, the zero translation first."""
    grid = sorted(itertools.product(*(range(-n, n + 1) for n in reps)), key=lambda g: g != (0, 0, 0))
    return np.array(grid, dtype=float)


def _pairs(images: list[Atoms], cutoff: float, label: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, D_ij) for every ordered neighbour pair closer than `cutoff` in all `images` (atoms
    numbered consecutively across images), sorted by i and then by `label[j]` (a small integer
    per atom, if given); D_ij = r_j + shift - r_i.

    One k-d tree query for all images placed side by side (`_points`); vectors come from the
    unplaced coordinates, so placement costs no precision."""
    point, owner, move = _points(images, cutoff)
    placed = point.copy()
    placed[:, 0] += move
    n_atoms = sum(len(atoms) for atoms in images)
    tree = functools.partial(cKDTree, balanced_tree=False, compact_nodes=False)  # 2x faster to build
    found = tree(placed[:n_atoms]).sparse_distance_matrix(tree(placed), cutoff, output_type="ndarray")
    i, column = np.ascontiguousarray(found["i"]), np.ascontiguousarray(found["j"])
    keep = column != i
    i, column = i[keep], column[keep]
    n_labels = 1 if label is None else int(label.max()) + 1
    key = i * n_labels + (0 if label is None else label[owner[column]])
    if n_atoms * n_labels <= 1 << 16:
        key = key.astype(np.uint16)  # numpy sorts 16-bit keys by radix, 10x faster
    order = np.argsort(key, kind="stable")
    i, column = i[order], column[order]
    return i, owner[column], np.take(point, column, axis=0) - np.take(point, i, axis=0)


@dataclass
class _Channels:
    """Per-atom sums over neighbour pairs, split into the scheme's channels, each one sparse
    matrix product: the rows are atoms ("weighted": one plain and one Z_j-weighted channel) or
    (atom, neighbour element) pairs ("gaussian"). Sorting the pairs by row once makes every sum
    a CSR product, several times faster than index_add."""

    rows: torch.Tensor  # (pairs,) the output row of each pair, sorted (see `_pairs`)
    crow: torch.Tensor  # CSR row pointers, int32 like `columns`: what MKL and cuSPARSE take
    columns: torch.Tensor  # CSR column indices: 0, 1, ..., pairs - 1
    weights: torch.Tensor  # (channels per row, pairs): 1 for each pair, and Z_j for "weighted"
    n_atoms: int

    @property
    def n_channels(self) -> int:
        return (len(self.crow) - 1) // self.n_atoms * len(self.weights)

    def sum(self, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(atoms, channels, columns): sum over each atom's pairs of weight * channel weight * values."""
        shape = (len(self.crow) - 1, len(self.rows))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            sums = [torch.sparse_csr_tensor(self.crow, self.columns, weight * w, shape, check_invariants=False)
                    @ values for w in self.weights]
        return torch.stack(sums, 1).view(self.n_atoms, -1, values.shape[1])

    def counts(self) -> torch.Tensor:
        """(atoms, channels): the number of pairs in each channel."""
        per_row = (self.crow[1:] - self.crow[:-1]).view(self.n_atoms, -1)
        return per_row.repeat_interleave(len(self.weights), dim=1)

    def sum_squares(self, weight: torch.Tensor) -> torch.Tensor:
        """(atoms, channels): sum over each atom's pairs of (weight * channel weight)^2."""
        zeros = torch.zeros(len(self.crow) - 1, device=weight.device, dtype=weight.dtype)
        sums = [zeros.clone().index_add_(0, self.rows, (weight * w) ** 2) for w in self.weights]
        return torch.stack(sums, 1).view(self.n_atoms, -1)


def _channels(spec: FingerprintSpec, center: torch.Tensor, neighbour_element: torch.Tensor,
              neighbour_z: torch.Tensor, n_atoms: int) -> _Channels:
    """The scheme's rows and channel weights for pairs sorted by centre and, for "gaussian", by
    neighbour element (as `_pairs` returns them)."""
    if spec.scheme == "gaussian":
        n_rows, rows = n_atoms * len(spec.elements), center * len(spec.elements) + neighbour_element
        weights = torch.ones_like(neighbour_z)[None]
    else:
        n_rows, rows = n_atoms, center
        weights = torch.stack([torch.ones_like(neighbour_z), neighbour_z])
    crow = torch.zeros(n_rows + 1, dtype=torch.int32, device=center.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=crow[1:])
    return _Channels(rows, crow, torch.arange(len(rows), dtype=torch.int32, device=center.device), weights, n_atoms)


@functools.lru_cache(maxsize=16)
def _moment_table(degree: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Degree n and multinomial weight n!/(a! b! c!) of every monomial x^a y^b z^c with
    n = a + b + c <= degree, in the order `_monomials` fills them: degree by degree, each one x
    times the previous degree, then y times its x-free tail, then z^n (so a degree's x-free
    monomials are always its tail, and each degree is three slice multiplications)."""
    levels = [[(0, 0, 0)]]
    for n in range(1, degree + 1):
        previous = levels[-1]
        levels.append([(a + 1, b, c) for a, b, c in previous] + [(a, b + 1, c) for a, b, c in previous[-n:]]
                      + [(0, 0, n)])
    exponents = [e for level in levels for e in level]
    return (tuple(sum(e) for e in exponents),
            tuple(math.factorial(sum(e)) // math.prod(math.factorial(k) for k in e) for e in exponents))


def _monomials(unit: torch.Tensor, degree: int) -> torch.Tensor:
    """(pairs, monomials) every monomial of degree <= `degree` of each unit vector, in
    `_moment_table` order. On the CPU the pairs go through in blocks that stay in L2 cache,
    about twice as fast as whole columns."""
    n_pairs, n_columns = unit.shape[0], (degree + 1) * (degree + 2) * (degree + 3) // 6
    out = torch.ones(n_pairs, n_columns, device=unit.device, dtype=unit.dtype)  # column 0 stays 1
    step = FILL_PAIRS if unit.device.type == "cpu" else max(1, n_pairs)
    for start in range(0, n_pairs, step):
        block, u = out[start:start + step], unit[start:start + step]
        first = 0  # column of the previous degree's first monomial
        for n in range(1, degree + 1):
            size = n * (n + 1) // 2  # monomials of degree n - 1
            previous, at = block[:, first:first + size], first + size
            torch.mul(previous, u[:, 0:1], out=block[:, at:at + size])
            torch.mul(previous[:, -n:], u[:, 1:2], out=block[:, at + size:at + size + n])
            torch.mul(previous[:, -1:], u[:, 2:3], out=block[:, at + size + n:at + size + n + 1])
            first = at
    return out


def _angular_g5(channels: _Channels, unit: torch.Tensor, r: torch.Tensor, cutoff: torch.Tensor,
                spec: FingerprintSpec) -> torch.Tensor:
    """G5 of every atom from per-atom moment tensors, without triplets.

    With a_j = exp(-eta r_ij^2) fc(r_ij) (times the channel weight) and integer zeta,
    (1 + gamma cos)^zeta = sum_n C(zeta, n) gamma^n cos^n, and for unit vectors
    sum_{j,k} a_j a_k (u_j . u_k)^n = sum_{|alpha| = n} n!/alpha! M_alpha^2 with the moments
    M_alpha = sum_j a_j u_j^alpha (x^a y^b z^c: 35 numbers up to n = 4). The j = k terms are
    (1 + gamma)^zeta sum_j a_j^2; removing them and halving gives the sum over j < k. Between
    two element channels ("gaussian") the same bilinear form counts every unordered pair once.
    """
    zetas = [int(zeta) for zeta in spec.g4_zetas]
    if zetas != list(spec.g4_zetas) or min(zetas) < 1:
        raise HpoptError(f"G5 needs whole zetas >= 1, got {list(spec.g4_zetas)}; use dataset.angular: g4")
    degrees, multinomial = _moment_table(max(zetas))
    combos = [(zeta, gamma) for zeta in zetas for gamma in spec.g4_gammas]
    options = {"device": r.device, "dtype": r.dtype}
    coef = torch.tensor([[m * math.comb(zeta, n) * gamma ** n for zeta, gamma in combos]
                         for n, m in zip(degrees, multinomial)], **options)  # (monomials, combos)
    at_one = torch.tensor([(1.0 + gamma) ** zeta for zeta, gamma in combos], **options)
    scale = torch.tensor([2.0 ** (1 - zeta) for zeta, _ in combos], **options)
    n_channels = channels.n_channels
    if spec.scheme == "gaussian":
        lo, hi = torch.triu_indices(n_channels, n_channels, device=r.device)
    else:
        lo = hi = torch.arange(n_channels, device=r.device)
    same = (lo == hi).to(r.dtype)
    half = 1.0 - 0.5 * same  # the j < k sum within one channel is half the j != k sum
    # One neighbour in a channel: no j < k pair, so exactly 0 rather than the rounding left by
    # subtracting its j = k term (a column of such residues would be blown up by standardising).
    lonely = ((channels.counts()[:, lo] == 1) & (lo == hi))[:, :, None]

    monomials = _monomials(unit, max(zetas))
    out = []
    for eta in spec.g4_etas:
        radial = torch.exp(-eta * r * r) * cutoff
        moments = channels.sum(monomials, radial)  # (atoms, channels, monomials)
        diagonal = channels.sum_squares(radial)[:, lo] * same  # (atoms, channel pairs)
        full = torch.stack([torch.bmm(moments * coef[:, c], moments.transpose(1, 2))[:, lo, hi]
                            for c in range(len(combos))], -1)  # (atoms, channel pairs, combos)
        out.append(((full - diagonal[:, :, None] * at_one) * half[:, None] * scale).masked_fill_(lonely, 0.0))
    return torch.stack(out, 2).reshape(channels.n_atoms, -1)


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


def _angular_g4(center: torch.Tensor, vec: torch.Tensor, r: torch.Tensor, neighbour: torch.Tensor,
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
    """Features of many images at once: one flat pair list, every sum a sparse product."""
    element = lookup[np.concatenate([a.numbers for a in images])]
    found = _pairs(images, spec.cutoff, element if spec.scheme == "gaussian" else None)
    i, j = (torch.as_tensor(a, device=device) for a in found[:2])
    vec = torch.as_tensor(found[2], device=device).to(dtype)  # float64 differences, then `dtype`
    r, n_atoms = vec.norm(dim=-1), len(element)
    elem = torch.as_tensor(element, device=device)[j]
    z = torch.as_tensor([atomic_numbers[e] for e in spec.elements], device=device, dtype=dtype)[elem]
    etas = torch.as_tensor(spec.g2_etas, device=device, dtype=dtype)
    rs = torch.as_tensor(spec.g2_rs, device=device, dtype=dtype)
    g2 = torch.exp(-etas[:, None] * (r[:, None, None] - rs[None, None, :]) ** 2).flatten(1)
    channels, fc = _channels(spec, i, elem, z, n_atoms), _cutoff_fn(r, spec.cutoff)
    parts = [channels.sum(g2, fc).reshape(n_atoms, -1)]
    if spec.n_angular:
        rc = spec.angular_cutoff or spec.cutoff
        if rc < spec.cutoff:  # the angular functions' own, shorter pair list
            keep = r < rc
            i, vec, r, elem, z = (t[keep] for t in (i, vec, r, elem, z))
            channels, fc = _channels(spec, i, elem, z, n_atoms), _cutoff_fn(r, rc)
        if spec.angular == "g5":
            parts.append(_angular_g5(channels, vec / r[:, None], r, fc, spec))
        else:
            parts.append(_angular_g4(i, vec, r, elem if spec.scheme == "gaussian" else z, n_atoms, spec, dtype))
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
