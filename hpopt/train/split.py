"""Fixed train / validation / test splits, written once and verified by every training run.

A manifest pins the dataset by sha256, so a study never mixes trials scored on different data:
if the file changed since `hpopt split`, training refuses with one line. The test indices are
recorded here and read only by `retrain_and_test`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers

from hpopt.errors import HpoptError
from hpopt.rundir import write_json_atomic
from hpopt.train.data import read_images

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What `data/splits/<name>.json` holds; `source` is relative to the manifest's folder."""

    name: str
    source: str
    sha256: str
    n_images: int
    elements: list[str]  # every element of the source, so fingerprint channels never change
    seed: int
    fractions: list[float]
    train: list[int]
    validation: list[int]
    test: list[int]
    path: str = ""  # where the manifest was read from; not stored

    @property
    def source_path(self) -> Path:
        source = Path(self.source)
        return source if source.is_absolute() else (Path(self.path).parent / source).resolve()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """One hash per file version per process: a worker runs many trials on one dataset."""
    return _sha256(Path(path))


def file_sha256(path: Path) -> str:
    stat = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise HpoptError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    if n_train < 1 or n_val < 1 or n_train + n_val > n:
        raise HpoptError(f"{n} images are too few for fractions {list(fractions)}: need at least one "
                         "training and one validation image")
    return n_train, n_val


def make_split(source: str | Path, name: str, out_dir: str | Path = "data/splits", seed: int = 0,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Path:
    """Write `<out_dir>/<name>.json` with a seeded random split of every image in `source`."""
    source = Path(source)
    images = read_images(source)
    n_train, n_val = _split_counts(len(images), tuple(fractions))
    order = np.random.default_rng(seed).permutation(len(images))
    out = Path(out_dir) / f"{name}.json"
    symbols = {s for atoms in images for s in atoms.get_chemical_symbols()}
    manifest = Manifest(
        name=name,
        source=os.path.relpath(source.resolve(), out.parent.resolve()),
        sha256=file_sha256(source),
        n_images=len(images),
        elements=sorted(symbols, key=atomic_numbers.__getitem__),
        seed=seed,
        fractions=[float(f) for f in fractions],
        train=sorted(int(i) for i in order[:n_train]),
        validation=sorted(int(i) for i in order[n_train:n_train + n_val]),
        test=sorted(int(i) for i in order[n_train + n_val:]),
    )
    record = asdict(manifest)
    del record["path"]
    record["version"] = MANIFEST_VERSION
    write_json_atomic(out, record, mode=0o644)
    return out


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest and check that its dataset is byte-for-byte the one it was made from."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise HpoptError(f"split manifest not found: {path} (create it with `hpopt split`)") from None
    except json.JSONDecodeError as exc:
        raise HpoptError(f"{path}: not a valid split manifest ({exc})") from None
    if record.pop("version", None) != MANIFEST_VERSION:
        raise HpoptError(f"{path}: unsupported manifest version; recreate it with `hpopt split`")
    try:
        manifest = Manifest(**record, path=str(path))
    except TypeError as exc:
        raise HpoptError(f"{path}: not a valid split manifest ({exc})") from None
    source = manifest.source_path
    if not source.exists():
        raise HpoptError(f"{path}: dataset {source} is missing")
    if file_sha256(source) != manifest.sha256:
        raise HpoptError(f"{path}: dataset {source} changed since the split was made (sha256 differs); "
                         "restore it or make a new split under a new name")
    return manifest
