"""The Slurm adapter: the only module that runs sbatch, squeue, sacct, scontrol and scancel.

Like submitit's executor, one class owns talking to Slurm and job state is parsed in one place
(`JobState`). Slurm 22.05 has no usable JSON for filtered queries, so we read `squeue -O`,
`sacct --parsable2` and `scontrol show job -o`. Every failing Slurm command becomes one
`SlurmError` line that names the command and Slurm's own message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from hpopt.errors import HpoptError

# Slurm's job states grouped by what a user does about them.
PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
ACTIVE_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"} | PENDING_STATES
FAILED_STATES = {"FAILED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "DEADLINE", "TIMEOUT", "PREEMPTED"}
DONE_STATES = {"COMPLETED", "CANCELLED", "REVOKED"} | FAILED_STATES

SQUEUE_FIELDS = ["JobID", "ArrayJobID", "ArrayTaskID", "Name", "State", "Reason", "NodeList",
                 "TimeUsed", "TimeLeft", "StartTime", "Partition", "tres-per-node"]
SACCT_FIELDS = ["JobID", "JobName", "State", "ExitCode", "NodeList", "Elapsed", "Start", "End",
                "Partition", "AllocTRES"]


class SlurmError(HpoptError):
    """A Slurm command failed or is missing."""


def parse_state(raw: str) -> str:
    """Normalise Slurm's state text: 'CANCELLED by 0' -> 'CANCELLED', 'R' stays as given upper."""
    state = raw.strip().split(" ")[0].rstrip("+").upper()
    return state or "UNKNOWN"


@dataclass
class JobInfo:
    """One job or array task as Slurm reports it (from squeue while queued, from sacct after)."""

    job_id: str  # "123" or "123_4" for an array task
    state: str
    name: str = ""
    reason: str = ""  # pending reason (Priority, Resources, QOSMaxJobs...) while pending
    node: str = ""
    elapsed: str = ""
    time_left: str = ""
    start: str = ""
    partition: str = ""
    exit_code: str = ""
    gres: str = ""
    source: str = "squeue"

    @property
    def array_job_id(self) -> str:
        return self.job_id.split("_")[0]

    @property
    def array_task(self) -> int | None:
        parts = self.job_id.split("_")
        return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else None

    @property
    def is_pending(self) -> bool:
        return self.state in PENDING_STATES

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def is_failed(self) -> bool:
        return self.state in FAILED_STATES


@dataclass
class Slurm:
    """Talks to one Slurm cluster through its command-line tools."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    timeout_s: float = 60.0

    @staticmethod
    def available() -> bool:
        """True when the Slurm client tools are on PATH (else hpopt runs in local mode)."""
        return shutil.which("sbatch") is not None and shutil.which("squeue") is not None

    def _run(self, args: Sequence[str], stdin: str | None = None, with_stderr: bool = False) -> str:
        if shutil.which(args[0]) is None:
            raise SlurmError(f"`{args[0]}` not found on PATH: is Slurm available here (or use --local)?")
        try:
            proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True,
                                  env=self.env, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmError(f"`{' '.join(args[:2])}` did not answer within {self.timeout_s:.0f}s") from None
        if proc.returncode != 0:
            message = " ".join((proc.stderr or proc.stdout).split()) or f"exit code {proc.returncode}"
            raise SlurmError(f"{args[0]} failed: {message}")
        return proc.stdout + proc.stderr if with_stderr else proc.stdout

    def submit(self, script: str, extra_args: Iterable[str] = ()) -> str:
        """Submit a batch script (given as text, on stdin) and return its job id."""
        out = self._run(["sbatch", "--parsable", *extra_args], stdin=script).strip()
        job_id = out.split(";")[0].strip()  # --parsable prints "id" or "id;cluster"
        if not job_id.isdigit():
            raise SlurmError(f"sbatch returned no job id (output: {out!r})")
        return job_id

    def test_only(self, script: str) -> str:
        """Have sbatch validate a batch script without submitting it (`sbatch --test-only`).

        Returns Slurm's estimate ("Job N to start at ... in partition P"); an invalid script
        (unknown partition, account, gres) raises SlurmError with sbatch's reason.
        """
        return self._run(["sbatch", "--test-only"], stdin=script, with_stderr=True).strip()

    def queue(self, job_ids: Iterable[str] = (), name: str | None = None) -> dict[str, JobInfo]:
        """Live jobs from one squeue call, keyed by job id ('123' or '123_4')."""
        ids = sorted({j.split("_")[0] for j in job_ids})
        args = ["squeue", "-h", "-a", "-r", "-O", ",".join(f"{f}:|" for f in SQUEUE_FIELDS)]
        if ids:
            args += ["-j", ",".join(ids)]
        elif name:
            args += ["-n", name]
        try:
            out = self._run(args)
        except SlurmError as exc:
            if "Invalid job id" in str(exc):  # every requested job has left squeue
                return {}
            raise
        jobs: dict[str, JobInfo] = {}
        for line in out.splitlines():
            cols = [c.strip() for c in line.split("|")]
            if len(cols) < len(SQUEUE_FIELDS):
                continue
            row = dict(zip(SQUEUE_FIELDS, cols))
            task = row["ArrayTaskID"]
            job_id = f"{row['ArrayJobID']}_{task}" if task not in ("N/A", "") and "[" not in task else row["JobID"]
            jobs[job_id] = JobInfo(
                job_id=job_id, state=parse_state(row["State"]), name=row["Name"],
                reason="" if row["Reason"] in ("None", "(null)") else row["Reason"],
                node=row["NodeList"], elapsed=row["TimeUsed"], time_left=row["TimeLeft"],
                start=row["StartTime"], partition=row["Partition"], gres=row["tres-per-node"],
            )
        return jobs

    def accounting(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """Finished (and running) jobs from one batched sacct call; needs slurmdbd."""
        ids = sorted({j.split("_")[0] for j in job_ids})
        if not ids:
            return {}
        out = self._run(["sacct", "-n", "-X", "--parsable2", "-j", ",".join(ids),
                         "-o", ",".join(SACCT_FIELDS)])
        jobs: dict[str, JobInfo] = {}
        for line in out.splitlines():
            cols = line.split("|")
            if len(cols) != len(SACCT_FIELDS):
                continue
            row = dict(zip(SACCT_FIELDS, cols))
            jobs[row["JobID"]] = JobInfo(
                job_id=row["JobID"], state=parse_state(row["State"]), name=row["JobName"],
                node=row["NodeList"], elapsed=row["Elapsed"], start=row["Start"],
                partition=row["Partition"], exit_code=row["ExitCode"], gres=row["AllocTRES"],
                source="sacct",
            )
        return jobs

    def states(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """Current view of jobs: squeue for what is queued, sacct only for what has left it."""
        wanted = list(job_ids)
        live = self.queue(wanted) if wanted else {}
        live_parents = {j.array_job_id for j in live.values()} | set(live)
        gone = [j for j in wanted if j not in live and j not in live_parents]
        finished = {k: v for k, v in self.accounting(gone).items() if k not in live}
        return {**finished, **live}

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (used for details squeue lacks, e.g. the command line)."""
        out = self._run(["scontrol", "show", "job", "-o", job_id])
        fields: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def cancel(self, job_ids: Iterable[str], signal: str | None = None, batch_only: bool = False) -> None:
        """scancel the given jobs; with `signal`, deliver it instead of killing."""
        ids = list(job_ids)
        if not ids:
            return
        args = ["scancel"]
        if signal:
            args.append(f"--signal={signal}")
        if batch_only:
            args.append("--batch")
        self._run(args + ids)
