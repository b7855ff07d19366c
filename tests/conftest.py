"""Fixtures for the real single-node Slurm + MariaDB cluster brought up by tests/cluster/up.sh.

Tests marked `cluster` use it; they are skipped with a reason when it is not running (the README
test command always brings it up, so in CI they run). Pure unit tests need nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = Path(os.environ.get("HPOPT_CLUSTER_DIR", "/var/tmp/hpopt-cluster"))


def _cluster_env() -> dict[str, str] | None:
    conf = CLUSTER_DIR / "etc" / "slurm.conf"
    if not conf.exists() or shutil.which("sbatch") is None:
        return None
    env = dict(os.environ, SLURM_CONF=str(conf))
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
    return env if ping.returncode == 0 and "UP" in ping.stdout else None


@pytest.fixture(scope="session")
def cluster_env() -> dict[str, str]:
    """Environment (with SLURM_CONF) for talking to the test cluster."""
    env = _cluster_env()
    if env is None:
        if os.environ.get("HPOPT_REQUIRE_CLUSTER"):
            pytest.fail("HPOPT_REQUIRE_CLUSTER is set but the test cluster is not up")
        pytest.skip("test cluster not running: run tests/cluster/up.sh as root (the README test command does)")
    return env


@pytest.fixture()
def cluster(cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test's process (and jobs it submits) at the test cluster."""
    monkeypatch.setenv("SLURM_CONF", cluster_env["SLURM_CONF"])
    return cluster_env


@pytest.fixture()
def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory jobs can see too (the one-node cluster shares the filesystem)."""
    return tmp_path_factory.mktemp("shared")
