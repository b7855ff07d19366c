"""Job state parsing in the Slurm adapter, with the Slurm commands stubbed (the real ones are
exercised in tests/e2e/test_slurm_adapter.py)."""

from __future__ import annotations

import subprocess

import pytest

from hpopt import slurm as slurm_module
from hpopt.slurm import SQUEUE_FIELDS, Slurm, SlurmError, parse_state


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("CANCELLED by 0", "CANCELLED"), ("RUNNING", "RUNNING"), ("completed+", "COMPLETED"), ("", "UNKNOWN")],
)
def test_parse_state(raw: str, expected: str) -> None:
    assert parse_state(raw) == expected


def fake_run(monkeypatch: pytest.MonkeyPatch, stdout: str, returncode: int = 0, stderr: str = "") -> list[list[str]]:
    calls: list[list[str]] = []

    def run(args, **kwargs):
        calls.append(list(args))
        return subprocess.CompletedProcess(args, returncode, stdout, stderr)

    monkeypatch.setattr(slurm_module.subprocess, "run", run)
    monkeypatch.setattr(slurm_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    return calls


def squeue_line(**values: str) -> str:
    row = {name: "N/A" for name in SQUEUE_FIELDS} | values
    return "|".join(row[name] for name in SQUEUE_FIELDS) + "|"


def test_queue_parses_array_tasks_and_pending_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    out = "\n".join([
        squeue_line(JobID="11_2", ArrayJobID="11", ArrayTaskID="2", State="RUNNING", Reason="None",
                    NodeList="atl1-1-02", Name="hpopt-worker"),
        squeue_line(JobID="11_[3-5]", ArrayJobID="11", ArrayTaskID="[3-5]", State="PENDING",
                    Reason="QOSMaxJobsPerUserLimit", Name="hpopt-worker"),
        squeue_line(JobID="12", ArrayJobID="12", State="PENDING", Reason="Priority", Name="hpopt-db"),
    ])
    calls = fake_run(monkeypatch, out)
    jobs = Slurm(env={}).queue(["11", "12"])
    assert calls[0][:3] == ["squeue", "-h", "-a"] and calls[0][-1] == "11,12"
    assert jobs["11_2"].state == "RUNNING" and jobs["11_2"].array_task == 2 and jobs["11_2"].node == "atl1-1-02"
    assert jobs["11_[3-5]"].is_pending and jobs["11_[3-5]"].reason == "QOSMaxJobsPerUserLimit"
    assert jobs["12"].reason == "Priority" and jobs["12"].array_task is None


def test_sacct_rows_and_failed_states(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, "40_0|hpopt-worker|FAILED|3:0|n1|00:01:00|t0|t1|gpu|gres/gpu=1\n"
                          "40_1|hpopt-worker|CANCELLED by 0|0:15|n1|00:02:00|t0|t1|gpu|gres/gpu=1\n")
    jobs = Slurm(env={}).accounting(["40_0", "40_1"])
    assert jobs["40_0"].is_failed and jobs["40_0"].exit_code == "3:0"
    assert jobs["40_1"].state == "CANCELLED" and not jobs["40_1"].is_active


def test_submit_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, "", returncode=1, stderr="sbatch: error: Invalid account\nor account/partition combination\n")
    with pytest.raises(SlurmError, match=r"^sbatch failed: sbatch: error: Invalid account or account/partition combination$"):
        Slurm(env={}).submit("#!/bin/bash\ntrue\n")


def test_missing_slurm_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_module.shutil, "which", lambda name: None)
    with pytest.raises(SlurmError, match="`squeue` not found on PATH"):
        Slurm(env={}).queue(["1"])
