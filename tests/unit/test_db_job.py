"""The node-side runner's decisions that need no server: SQL, addresses, who owns the datadir."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from hpopt.db import job


def _job(tmp_path: Path, *extra: str) -> job.DbJob:
    args = job.parse_args(["--run-dir", str(tmp_path / "run"), "--datadir", str(tmp_path / "data"),
                           "--mode", "local", *extra])
    return job.DbJob(args)


def test_setup_sql_escapes_the_password_and_grants_the_schema_only() -> None:
    sql = job.setup_sql("hpopt", "a'b\\c", "hpopt")
    assert "IDENTIFIED BY 'a\\'b\\\\c'" in sql
    assert "GRANT ALL PRIVILEGES ON `hpopt`.* TO 'hpopt'@'%'" in sql
    assert "DROP DATABASE IF EXISTS test" in sql and "WHERE User = ''" in sql
    with pytest.raises(job.JobFailure):
        job.setup_sql("x; DROP", "pw", "hpopt")


def test_bind_addresses() -> None:
    assert job.node_address("loopback") == "127.0.0.1"
    assert job.node_address("10.1.2.3") == "10.1.2.3"
    socket.inet_aton(job.node_address("node"))  # some IPv4 address of this machine
    port = job.free_port("127.0.0.1")
    assert 0 < port < 65536


def test_datadir_is_taken_over_from_a_silent_or_dead_owner(tmp_path: Path) -> None:
    runner = _job(tmp_path)
    os.makedirs(runner.datadir)
    owner = Path(runner.owner_path)
    owner.write_text(json.dumps({"job": "12", "host": "elsewhere", "pid": 1}))
    old = time.time() - job.OWNER_STALE_S - 5
    os.utime(owner, (old, old))
    t0 = time.monotonic()
    runner.acquire_datadir()
    assert time.monotonic() - t0 < 1.0
    assert json.loads(owner.read_text())["job"] == runner.me
    assert os.stat(runner.datadir).st_mode & 0o777 == 0o700

    successor = _job(tmp_path)
    successor.me = "local-successor"
    owner.write_text(json.dumps({"job": "13", "host": socket.gethostname(), "pid": 2 ** 22 + 7}))  # no such pid
    successor.acquire_datadir()
    assert json.loads(owner.read_text())["job"] == "local-successor"
    successor.release_datadir()
    assert not owner.exists()


def test_a_live_owner_is_asked_to_hand_over(tmp_path: Path) -> None:
    runner = _job(tmp_path)
    os.makedirs(runner.datadir)
    Path(runner.owner_path).write_text(json.dumps({"job": "12", "host": "elsewhere", "pid": 1}))
    runner.flags.stop = True  # stop while waiting: it must neither hang nor take the datadir
    runner.acquire_datadir()
    assert json.loads(Path(runner.owner_path).read_text())["job"] == "12"

    runner.flags.stop = False
    import threading

    waiter = threading.Thread(target=runner.acquire_datadir)
    waiter.start()
    deadline = time.monotonic() + 5
    while not os.path.exists(runner.handoff_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(Path(runner.handoff_path).read_text())["job"] == runner.me
    assert waiter.is_alive()  # still waiting for the owner
    os.unlink(runner.owner_path)  # the owner shut down and released it
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert json.loads(Path(runner.owner_path).read_text())["job"] == runner.me
    assert not os.path.exists(runner.handoff_path)


def test_missing_server_and_loose_credentials_are_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    args = ["--run-dir", str(tmp_path / "run"), "--datadir", str(tmp_path / "data"), "--mode", "local",
            "--mariadbd", "no-such-mariadbd"]
    assert job.main(args) == 3
    assert capsys.readouterr().err.startswith("hpopt-db: error: no-such-mariadbd not found on PATH on node")

    runner = _job(tmp_path)
    os.makedirs(runner.db_dir)
    creds = Path(runner.db_dir) / "credentials.json"
    creds.write_text(json.dumps({"user": "hpopt", "password": "x" * 40}))
    os.chmod(creds, 0o640)
    with pytest.raises(job.JobFailure, match="mode 0640; it must be 0600"):
        runner.credentials()
