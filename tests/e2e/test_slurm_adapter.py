"""The Slurm adapter against the real test cluster: submission, squeue and sacct parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpopt.slurm import Slurm, SlurmError
from polling import wait_for

pytestmark = pytest.mark.cluster



def test_gpu_array_gets_distinct_devices(cluster, shared_tmp: Path) -> None:
    slurm = Slurm(env=cluster)
    script = (
        "#!/bin/bash\n#SBATCH --partition=gpu\n#SBATCH --gres=gpu:1\n#SBATCH --array=0-3\n"
        f"#SBATCH --output={shared_tmp}/task_%a.out\n#SBATCH --job-name=hpopt-test-gres\n"
        "echo \"$CUDA_VISIBLE_DEVICES\"\nsleep 4\n"
    )
    job_id = slurm.submit(script)
    assert job_id.isdigit()

    live = wait_for(lambda: {k: v for k, v in slurm.queue([job_id]).items() if v.state == "RUNNING"} or None)
    assert all(info.array_job_id == job_id for info in live.values())
    assert {info.array_task for info in live.values()} <= {0, 1, 2, 3}

    def all_done():
        states = slurm.states([f"{job_id}_{i}" for i in range(4)])
        return states if len(states) == 4 and all(s.state == "COMPLETED" for s in states.values()) else None

    done = wait_for(all_done, timeout=90)
    assert {s.source for s in done.values()} == {"sacct"}
    assert all(s.exit_code == "0:0" for s in done.values())
    devices = {(shared_tmp / f"task_{i}.out").read_text().strip() for i in range(4)}
    assert devices == {"0", "1", "2", "3"}


def test_pending_reason_and_cancel(cluster) -> None:
    slurm = Slurm(env=cluster)
    job_id = slurm.submit("#!/bin/bash\n#SBATCH --hold\n#SBATCH --job-name=hpopt-test-held\nsleep 30\n")
    info = wait_for(lambda: slurm.queue([job_id]).get(job_id))
    assert info.is_pending and info.reason  # held jobs report JobHeldUser
    assert slurm.show_job(job_id)["JobName"] == "hpopt-test-held"
    slurm.cancel([job_id])
    final = wait_for(lambda: (s := slurm.states([job_id]).get(job_id)) and not s.is_active and s)
    assert final.state == "CANCELLED"


def test_slurm_errors_are_one_line(cluster) -> None:
    slurm = Slurm(env=cluster)
    with pytest.raises(SlurmError) as excinfo:
        slurm.submit("#!/bin/bash\n#SBATCH --partition=no-such-partition\ntrue\n")
    assert "sbatch failed" in str(excinfo.value) and "\n" not in str(excinfo.value)
