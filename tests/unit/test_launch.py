"""Launch planning, rendering and records, without a cluster (the cluster tests are tests/e2e/)."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from hpopt.config import Config, SlurmProfile
from hpopt.errors import HpoptError
from hpopt.launch import (active_launches, append_launch, fill_template, make_plan, parse_time, worker_alive,
                          read_launches, render, render_sbatch, render_submitit, submitit_parameters)
from hpopt.rundir import RunDir
from hpopt.slurm import JobInfo


def config(tmp_path: Path, **slurm: object) -> Config:
    profile = SlurmProfile(account="gts-pi", qos="inferno", cpu_partition="cpu-small", gpu_partition="gpu-v100",
                           gpu_gres="gpu:V100:1", cpus_per_task=4, mem="16G", worker_time="2:00:00",
                           prelude=["module load anaconda3", "source $HOME/venv/bin/activate"])
    for key, value in slurm.items():
        setattr(profile, key, value)
    return Config(run_dir=str(tmp_path / "run"), slurm=profile, source="test.toml")


def plan(tmp_path: Path, **kwargs: object):
    options = dict(study="painn", workers=8, gpu=True, slurm_available=True, workdir=tmp_path)
    options.update(kwargs)
    slurm = options.pop("profile", {})
    return make_plan(config(tmp_path, **slurm), **options)


@pytest.mark.parametrize("text,seconds", [
    ("90", 5400), ("10:30", 630), ("4:00:00", 14400), ("1-12", 129600), ("2-0:30", 174600),
    ("1-00:00:01", 86401),
])
def test_slurm_time_formats(text: str, seconds: int) -> None:
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "4h", "1:2:3:4", "0", "-5", "1-"])
def test_bad_times_are_refused(text: str) -> None:
    with pytest.raises(HpoptError, match="--time"):
        parse_time(text)


def test_gpu_plan_takes_the_profiles_gpu_partition_and_gres(tmp_path: Path) -> None:
    p = plan(tmp_path)
    assert (p.via, p.partition, p.gres, p.time_s) == ("submitit", "gpu-v100", "gpu:V100:1", 7200)
    cpu = plan(tmp_path, gpu=False, time="30", partition="debug")
    assert (cpu.partition, cpu.gres, cpu.time_s) == ("debug", "", 1800)
    assert plan(tmp_path, gpu=False).partition == "cpu-small"
    assert (p.warn_s, plan(tmp_path, time="4").warn_s) == (120, 60)  # a short job is not warned at its start


def test_plan_overrides_only_what_the_launch_changes_and_leaves_the_config_alone(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    p = make_plan(cfg, study="painn", workers=2, gpu=True, time="30", partition="gpu-a100", slurm_available=True)
    assert (p.partition, p.time, p.slurm.cpu_partition) == ("gpu-a100", "30", "cpu-small")
    assert (p.slurm.account, p.slurm.mem, p.slurm.prelude) == ("gts-pi", "16G", cfg.slurm.prelude)
    assert (cfg.slurm.gpu_partition, cfg.slurm.worker_time) == ("gpu-v100", "2:00:00")
    with pytest.raises(HpoptError, match="--time '1h'"):
        plan(tmp_path, profile={"worker_time": "1h"})  # a malformed profile walltime is refused too


def test_local_mode_when_asked_or_without_slurm_and_refusals(tmp_path: Path) -> None:
    assert plan(tmp_path, gpu=False, local=True).via == "local"
    assert plan(tmp_path, gpu=False, slurm_available=False).via == "local"
    with pytest.raises(HpoptError, match="needs Slurm"):
        plan(tmp_path, via="sbatch", slurm_available=False)
    with pytest.raises(HpoptError, match="--via"):
        plan(tmp_path, via="pbs")
    with pytest.raises(HpoptError, match="at least 1"):
        plan(tmp_path, workers=0)
    with pytest.raises(HpoptError, match="gpu_gres"):
        plan(tmp_path, profile={"gpu_gres": ""})


def test_local_gpu_launch_hands_out_visible_devices_round_robin(tmp_path: Path) -> None:
    p = plan(tmp_path, local=True, workers=3, env={"CUDA_VISIBLE_DEVICES": "2,5"})
    assert p.local_gpus == ("2", "5")
    lines = render(p).splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["CUDA_VISIBLE_DEVICES=2", "CUDA_VISIBLE_DEVICES=5",
                                                  "CUDA_VISIBLE_DEVICES=2"]
    with pytest.raises(HpoptError, match="no GPU"):
        plan(tmp_path, local=True, env={"CUDA_VISIBLE_DEVICES": ""})


def test_template_drops_lines_whose_fields_are_all_empty() -> None:
    text = "#SBATCH --account={{account}}\n#SBATCH --qos={{ qos }}\necho {{a}}{{b}}\nkeep\n"
    assert fill_template(text, {"account": "", "qos": "q", "a": "", "b": "x"}) == \
        "#SBATCH --qos=q\necho x\nkeep\n"
    with pytest.raises(HpoptError, match=r"unknown field \{\{acount\}\}"):
        fill_template("#SBATCH --account={{acount}}\n", {"account": ""})


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            options[key] = value
    return options


def test_sbatch_script_carries_the_profile_and_runs_the_worker(tmp_path: Path) -> None:
    p = plan(tmp_path, via="sbatch", profile={"extra_sbatch": ["--constraint=v100"]})
    script = render_sbatch(p)
    opts = sbatch_options(script)
    assert opts["array"] == "0-7" and opts["account"] == "gts-pi" and opts["qos"] == "inferno"
    assert opts["partition"] == "gpu-v100" and opts["gres"] == "gpu:V100:1" and opts["time"] == "2:00:00"
    assert opts["cpus-per-task"] == "4" and opts["mem"] == "16G" and opts["constraint"] == "v100"
    assert opts["signal"] == "B:USR1@120" and opts["job-name"] == "hpopt-worker-painn"
    assert opts["output"] == f"{tmp_path}/run/logs/workers/worker-%A_%a.out"
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert body == ["module load anaconda3", "source $HOME/venv/bin/activate",
                    f"export HPOPT_RUN_DIR={tmp_path}/run",
                    f"exec {sys.executable} -m hpopt worker --study painn"]
    assert "{{" not in script


def test_sbatch_script_without_account_qos_or_gpu_has_no_empty_options(tmp_path: Path) -> None:
    p = plan(tmp_path, via="sbatch", gpu=False, profile={"account": "", "qos": "", "cpu_partition": ""})
    opts = sbatch_options(render_sbatch(p))
    assert not {"account", "qos", "partition", "gres"} & set(opts)
    assert all(value for value in opts.values())


def test_a_users_copy_of_the_template_wins(tmp_path: Path) -> None:
    (tmp_path / "sbatch").mkdir()
    (tmp_path / "sbatch" / "worker.sbatch").write_text("#!/bin/bash\n#SBATCH --array=0-{{last_index}}\nmine {{study}}\n")
    assert render_sbatch(plan(tmp_path, via="sbatch", workers=3)) == "#!/bin/bash\n#SBATCH --array=0-2\nmine painn\n"


def test_submitit_script_is_a_job_array_with_usr1_warning(tmp_path: Path) -> None:
    p = plan(tmp_path, time="1:30:00")
    opts = sbatch_options(render_submitit(p))
    assert opts["array"] == "0-7%8" and opts["gres"] == "gpu:V100:1" and opts["partition"] == "gpu-v100"
    assert opts["signal"] == "USR1@120" and opts["time"] == "90" and opts["account"] == "gts-pi"
    assert opts["output"] == f"{tmp_path}/run/logs/submitit/%A_%a_0_log.out"
    script = render_submitit(p)
    assert "module load anaconda3" in script and "-m submitit.core._submit" in script
    assert submitit_parameters(p)["setup"][0] == f"export HPOPT_RUN_DIR={tmp_path}/run"


def test_submitit_accepts_our_parameters(tmp_path: Path) -> None:
    """submitit validates parameter names itself; ours must all be ones it knows."""
    from submitit.slurm.slurm import _get_default_parameters

    assert set(submitit_parameters(plan(tmp_path))) <= set(_get_default_parameters())


def _append(path: str, i: int) -> None:
    append_launch(RunDir(Path(path)), {"job_id": str(i), "n_workers": 1, "study": "s", "via": "sbatch"})


def test_concurrent_launch_records_are_all_kept(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_append, [(str(run_dir.root), i) for i in range(24)])
    assert sorted(int(r["job_id"]) for r in read_launches(run_dir)) == list(range(24))
    assert set(json.loads(run_dir.workers_file.read_text())) == {"launches"}
    assert run_dir.workers_file.stat().st_mode & 0o777 == 0o600


class QueueOnly:
    """Stands in for the Slurm adapter's squeue answer (launch reads nothing else from it)."""

    def __init__(self, jobs: list[JobInfo]) -> None:
        self.jobs = {j.job_id: j for j in jobs}
        self.asked: list[list[str]] = []

    def queue(self, job_ids: list[str]) -> dict[str, JobInfo]:
        self.asked.append(list(job_ids))
        return self.jobs


def test_active_launches_count_live_tasks_and_processes(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "hpopt-worker"])
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # as if the pid was reused
    dead = subprocess.Popen([sys.executable, "-c", "pass", "hpopt-worker"])
    dead.wait()
    try:
        for record in ({"job_id": "100", "n_workers": 3, "study": "s", "via": "submitit"},
                       {"job_id": "200", "n_workers": 2, "study": "s", "via": "sbatch"},
                       {"job_id": "300", "n_workers": 2, "study": "other", "via": "sbatch"},
                       {"job_id": "", "n_workers": 2, "study": "s", "via": "local", "pids": [sleeper.pid, dead.pid]},
                       {"job_id": "", "n_workers": 1, "study": "s", "via": "local", "pids": [dead.pid, stranger.pid]}):
            append_launch(run_dir, record)
        slurm = QueueOnly([JobInfo("100_0", "RUNNING"), JobInfo("100_1", "PENDING"), JobInfo("100_2", "PENDING"),
                           JobInfo("200_0", "COMPLETING"), JobInfo("300_0", "RUNNING")])
        active = active_launches(run_dir, "s", slurm)  # type: ignore[arg-type]
        assert [(a.record["job_id"], a.running, a.pending) for a in active] == [("100", 1, 2), ("200", 1, 0), ("", 1, 0)]
        assert slurm.asked == [["100", "200"]]
        assert "job 100 (submitit): 1 running, 2 pending" == active[0].describe()
    finally:
        for proc in (sleeper, stranger):
            proc.kill()
            proc.wait()
    assert not worker_alive(sleeper.pid) and not worker_alive(dead.pid)


def hpopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(cwd / "no-slurm-here"), "COLUMNS": "200", "HOME": str(cwd)}  # no sbatch: local mode
    return subprocess.run([sys.executable, "-m", "hpopt", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_dry_run_without_slurm_prints_local_commands_and_records_nothing(tmp_path: Path) -> None:
    result = hpopt("launch", "-n", "2", "-s", "demo", "--time", "5", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# 2 local worker processes")
    assert lines[1].endswith("-m hpopt worker --study demo --time-left-s 300 &") and len(lines) == 3
    assert not (tmp_path / ".hpopt" / "workers.json").exists()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    for args, message in ((["--via", "sbatch"], "needs Slurm"), (["--time", "4h"], "not a Slurm time")):
        result = hpopt("launch", "-s", "demo", "--dry-run", *args, cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr
        assert result.stderr.strip().count("\n") == 0


def journal_study(root: Path, budget: int) -> RunDir:
    """A study in the local journal storage of `root/.hpopt` (the default run directory)."""
    from hpopt.space import parse_space
    from hpopt.storage import open_storage
    from hpopt.study import StudySpec, create_study

    run_dir = RunDir(root / ".hpopt").ensure()
    space = parse_space({"optim": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}})
    create_study(open_storage(run_dir, create_schema=True), StudySpec("s", space, split="/split.json", budget=budget))
    return run_dir


def test_launch_adds_nothing_while_workers_live_or_when_the_budget_is_finished(tmp_path: Path) -> None:
    import optuna

    from hpopt.storage import open_storage

    run_dir = journal_study(tmp_path, budget=2)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "hpopt-worker"])
    try:
        append_launch(run_dir, {"job_id": "", "n_workers": 1, "study": "s", "via": "local", "pids": [sleeper.pid]})
        live = hpopt("launch", "-n", "2", "-s", "s", "--unless-active", cwd=tmp_path)
        assert live.returncode == 0, live.stderr
        assert "already has live workers, launching none" in live.stdout
        assert f"local pids {sleeper.pid} (local): 1 running, 0 pending" in live.stdout
    finally:
        sleeper.kill()
        sleeper.wait()

    study = optuna.load_study(study_name="s", storage=open_storage(run_dir))
    for value in (0.5, 0.4):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}))
    done = hpopt("launch", "-n", "2", "-s", "s", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "has finished its budget (2/2 trials): no workers launched" in done.stdout
    assert len(read_launches(run_dir)) == 1  # neither call launched anything

    missing = hpopt("launch", "-s", "nope", cwd=tmp_path)
    assert missing.returncode == 1 and "no study named 'nope'" in missing.stderr and "studies here: s" in missing.stderr
