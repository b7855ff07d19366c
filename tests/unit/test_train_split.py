"""Split manifests: a round trip keeps every index once, and changed data is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpopt.errors import HpoptError
from hpopt.train.demo import make_demo
from hpopt.train.split import load_manifest, make_split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("data") / "demo.traj", n_images=40, seed=1)


def test_round_trip_partitions_every_image_once(dataset: Path, tmp_path: Path) -> None:
    path = make_split(dataset, "demo", out_dir=tmp_path, seed=3, fractions=(0.5, 0.25, 0.25))
    manifest = load_manifest(path)
    parts = manifest.train + manifest.validation + manifest.test
    assert sorted(parts) == list(range(40))
    assert (len(manifest.train), len(manifest.validation), len(manifest.test)) == (20, 10, 10)
    assert manifest.source_path == dataset.resolve()
    assert set(manifest.elements) <= {"H", "C", "N", "O", "Cu", "Pt", "Au"}
    again = make_split(dataset, "again", out_dir=tmp_path, seed=3, fractions=(0.5, 0.25, 0.25))
    assert load_manifest(again).train == manifest.train
    other = make_split(dataset, "other", out_dir=tmp_path, seed=4, fractions=(0.5, 0.25, 0.25))
    assert load_manifest(other).train != manifest.train


def test_changed_data_is_refused(tmp_path: Path) -> None:
    data = make_demo(tmp_path / "small.traj", n_images=12, seed=0)
    path = make_split(data, "small", out_dir=tmp_path / "splits")
    make_demo(data, n_images=12, seed=1)
    with pytest.raises(HpoptError, match="changed since the split"):
        load_manifest(path)


def test_bad_fractions_and_missing_manifest(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(HpoptError, match="summing to 1"):
        make_split(dataset, "bad", out_dir=tmp_path, fractions=(0.8, 0.3, 0.1))
    with pytest.raises(HpoptError, match="not found"):
        load_manifest(tmp_path / "nope.json")


def test_demo_is_deterministic(tmp_path: Path) -> None:
    a = make_demo(tmp_path / "a.traj", n_images=5, seed=7)
    b = make_demo(tmp_path / "b.traj", n_images=5, seed=7)
    assert a.read_bytes() == b.read_bytes()
    record = json.loads(make_split(a, "a", out_dir=tmp_path, fractions=(0.6, 0.2, 0.2)).read_text())
    assert record["sha256"] and record["version"] == 1
