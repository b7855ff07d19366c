"""Launch: N workers of one study, as a Slurm job array or as local processes.

A launch is planned first (`make_plan`: the profile, the command-line options and what this
machine has, resolved into one `LaunchPlan`), then rendered or submitted three ways:

* ``submitit`` (default on Slurm): a submitit job array whose tasks call
  `hpopt.worker.worker_entry`; its batch script is submitit's own, rendered by the same function
  submitit uses, so `--dry-run` prints exactly what sbatch receives.
* ``sbatch``: `sbatch/worker.sbatch`, a readable template a user can copy and edit.
* ``local`` (no Slurm on PATH, or `--local`): N detached `hpopt worker` processes.

Every launch is appended to `workers.json` so `hpopt status` (and `--unless-active`) can find
its jobs; the record is written atomically under a lock, so concurrent launches never lose one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import hpopt
from hpopt.config import Config, SlurmProfile
from hpopt.errors import HpoptError
from hpopt.procs import process_alive
from hpopt.rundir import RunDir, read_json, write_json_atomic
from hpopt.slurm import Slurm

VIAS = ("submitit", "sbatch", "local")
TEMPLATE_NAME = "worker.sbatch"
# Slurm warns a worker this long before its time limit (SIGUSR1) so it can finish or hand back its
# trial; it matches the worker's own assumption (`signal_grace_s`) when it cannot read its end time.
# Short jobs are warned at 3/4 of their time instead, not at their start.
WARN_S = 120
FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


# --------------------------------------------------------------------------- the plan


def parse_time(text: str) -> int:
    """A Slurm time limit in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.

    Checked here because a malformed `--time` would otherwise be refused by sbatch only after
    the DB job had been started for nothing.
    """
    raw = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", raw)
    if not match:
        raise HpoptError(f"--time {text!r} is not a Slurm time (e.g. 4:00:00, 90, 1-12:00:00)")
    days, a, b, c = match.groups()
    nums = [int(a)] + [int(x) for x in (b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, m, s = (nums + [0, 0])[:3]
        seconds = int(days) * 86400 + h * 3600 + m * 60 + s
    elif len(nums) == 1:  # MM
        seconds = nums[0] * 60
    elif len(nums) == 2:  # MM:SS
        seconds = nums[0] * 60 + nums[1]
    else:  # HH:MM:SS
        seconds = nums[0] * 3600 + nums[1] * 60 + nums[2]
    if seconds <= 0:
        raise HpoptError(f"--time {text!r} must be longer than zero")
    return seconds


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch needs, decided before anything is submitted.

    It holds the [slurm] profile itself, with this launch's `--time` and `--partition` written into
    it, so a profile field reaches the batch script without being copied field by field.
    """

    study: str
    n_workers: int
    via: str  # submitit | sbatch | local
    gpu: bool
    slurm: SlurmProfile  # worker_time is this launch's --time; the partition in use is --partition
    run_dir: RunDir
    workdir: Path
    python: str = sys.executable
    local_gpus: tuple[str, ...] = ()  # local --gpu: device ids handed out round robin

    @property
    def time(self) -> str:
        """The walltime as the user wrote it (Slurm format)."""
        return self.slurm.worker_time

    @property
    def time_s(self) -> int:
        return parse_time(self.time)

    @property
    def warn_s(self) -> int:
        """When Slurm warns before the end (WARN_S, but a short job is not warned at its start)."""
        return min(WARN_S, max(1, self.time_s // 4))

    @property
    def partition(self) -> str:
        return self.slurm.gpu_partition if self.gpu else self.slurm.cpu_partition

    @property
    def gres(self) -> str:
        return self.slurm.gpu_gres if self.gpu else ""

    @property
    def job_name(self) -> str:
        return "hpopt-worker-" + re.sub(r"[^\w.-]", "_", self.study)

    @property
    def log_dir(self) -> Path:
        """Where the jobs' own output goes (the worker also logs to run_dir/logs/workers)."""
        if self.via == "submitit":
            return self.run_dir.logs_dir / "submitit"
        return self.run_dir.worker_logs_dir


def make_plan(config: Config, *, study: str, workers: int, gpu: bool = False, time: str | None = None,
              partition: str | None = None, via: str | None = None, local: bool = False,
              slurm_available: bool | None = None, workdir: Path | None = None,
              env: dict[str, str] | None = None) -> LaunchPlan:
    """Resolve options against the profile; local mode when asked or when there is no Slurm.

    `study` may be empty until `check_study` names it (the plan is checked before the DB starts).
    """
    if workers < 1:
        raise HpoptError(f"--workers must be at least 1, got {workers}")
    if via is not None and via not in VIAS:
        raise HpoptError(f"--via must be one of {', '.join(VIAS)}, got {via!r}")
    has_slurm = Slurm.available() if slurm_available is None else slurm_available
    if local or via == "local":
        mode = "local"
    elif has_slurm:
        mode = via or "submitit"
    elif via is not None:
        raise HpoptError(f"--via {via} needs Slurm, but sbatch is not on PATH: use --local (or load the Slurm module)")
    else:
        mode = "local"
    overrides = {"worker_time": time} if time else {}
    if partition:
        overrides["gpu_partition" if gpu else "cpu_partition"] = partition
    profile = dataclasses.replace(config.slurm, **overrides)
    parse_time(profile.worker_time)  # a malformed --time is refused here, before anything is started
    if mode != "local" and gpu and not profile.gpu_gres:
        raise HpoptError(f"--gpu needs `gpu_gres` in the [slurm] profile ({config.source})")
    return LaunchPlan(study=study, n_workers=workers, via=mode, gpu=gpu, slurm=profile,
                      run_dir=RunDir(config.run_path), workdir=(workdir or Path.cwd()).resolve(),
                      local_gpus=tuple(local_gpu_ids(env)) if gpu and mode == "local" else ())


def local_gpu_ids(env: dict[str, str] | None = None) -> list[str]:
    """GPUs a local launch may hand out: $CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = dict(os.environ) if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    elif shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        ids = [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    else:
        ids = []
    if not ids:
        raise HpoptError("--gpu with --local: no GPU is visible here (CUDA_VISIBLE_DEVICES empty, no nvidia-smi)")
    return ids


# --------------------------------------------------------------------------- rendering


def template_path(workdir: Path | None = None) -> Path:
    """./sbatch/worker.sbatch when the user keeps an edited copy, else the one shipped with hpopt."""
    local = (workdir or Path.cwd()) / "sbatch" / TEMPLATE_NAME
    return local if local.exists() else Path(hpopt.__file__).resolve().parents[1] / "sbatch" / TEMPLATE_NAME


def fill_template(template: str, values: dict[str, str], source: str = TEMPLATE_NAME) -> str:
    """Replace {{field}}s; a line whose fields are all empty is dropped (no `--account=` lines)."""
    lines = []
    for line in template.splitlines():
        names = FIELD.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise HpoptError(f"{source}: unknown field {{{{{unknown[0]}}}}} (known: {', '.join(sorted(values))})")
        if names and not any(values[n] for n in names):
            continue
        lines.append(FIELD.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def sbatch_fields(plan: LaunchPlan) -> dict[str, str]:
    """The template's fields; values used in shell commands are shell-quoted."""
    extra = [line if line.lstrip().startswith("#SBATCH") else f"#SBATCH {line.strip()}"
             for line in plan.slurm.extra_sbatch]
    return {
        "job_name": plan.job_name,
        "last_index": str(plan.n_workers - 1),
        "account": plan.slurm.account,
        "qos": plan.slurm.qos,
        "partition": plan.partition,
        "gres": plan.gres,
        "time": plan.time,
        "cpus_per_task": str(plan.slurm.cpus_per_task) if plan.slurm.cpus_per_task else "",
        "mem": plan.slurm.mem,
        "warn_s": str(plan.warn_s),
        "log_dir": str(plan.log_dir),
        "workdir": str(plan.workdir),
        "extra_sbatch": "\n".join(extra),
        "prelude": "\n".join(plan.slurm.prelude),
        "run_dir": shlex.quote(str(plan.run_dir.root)),
        "python": shlex.quote(plan.python),
        "study": shlex.quote(plan.study),
    }


def render_sbatch(plan: LaunchPlan) -> str:
    path = template_path(plan.workdir)
    try:
        template = path.read_text()
    except FileNotFoundError:
        raise HpoptError(f"sbatch template not found: {path} (reinstall hpopt or restore sbatch/{TEMPLATE_NAME})") from None
    return fill_template(template, sbatch_fields(plan), str(path))


def submitit_parameters(plan: LaunchPlan) -> dict[str, Any]:
    """SlurmExecutor parameters (submitit's own names) for this plan.

    submitit sends USR2 to its srun step for its checkpointing; our workers listen for USR1, so
    the signal is overridden (without `B:`: with srun the worker is a job step, not the batch shell).
    """
    additional: dict[str, Any] = {"signal": f"USR1@{plan.warn_s}"}
    for line in plan.slurm.extra_sbatch:
        key, _, value = line.replace("#SBATCH", "").strip().lstrip("-").partition("=")
        additional[key] = value if value else True
    params: dict[str, Any] = {
        "job_name": plan.job_name,
        "time": max(1, math.ceil(plan.time_s / 60)),
        "cpus_per_task": plan.slurm.cpus_per_task or None,
        "mem": plan.slurm.mem or None,
        "partition": plan.partition or None,
        "gres": plan.gres or None,
        "account": plan.slurm.account or None,
        "qos": plan.slurm.qos or None,
        "setup": [f"export HPOPT_RUN_DIR={shlex.quote(str(plan.run_dir.root))}", *plan.slurm.prelude],
        "array_parallelism": plan.n_workers,
        "signal_delay_s": plan.warn_s,
        "stderr_to_stdout": True,
        "additional_parameters": additional,
    }
    return {k: v for k, v in params.items() if v is not None}


def render_submitit(plan: LaunchPlan) -> str:
    """The batch script submitit will submit, from the same function submitit renders it with."""
    from submitit.slurm.slurm import _make_sbatch_string

    # the command SlurmExecutor puts in its script (tests/e2e checks the two scripts are identical)
    command = " ".join([shlex.quote(plan.python), "-u -m submitit.core._submit", shlex.quote(str(plan.log_dir))])
    return _make_sbatch_string(command=command, folder=plan.log_dir, map_count=plan.n_workers,
                               **submitit_parameters(plan))


def local_command(plan: LaunchPlan) -> list[str]:
    """What each local worker process runs (the worker names its log after its pid)."""
    return [plan.python, "-m", "hpopt", "worker", "--study", plan.study, "--time-left-s", str(plan.time_s)]


def local_env(plan: LaunchPlan, index: int) -> dict[str, str]:
    env = dict(os.environ, HPOPT_RUN_DIR=str(plan.run_dir.root))
    if plan.local_gpus:
        env["CUDA_VISIBLE_DEVICES"] = plan.local_gpus[index % len(plan.local_gpus)]
    return env


def render(plan: LaunchPlan) -> str:
    """What `--dry-run` prints: the batch script, or the local commands."""
    if plan.via == "submitit":
        return render_submitit(plan)
    if plan.via == "sbatch":
        return render_sbatch(plan)
    lines = [f"# {plan.n_workers} local worker processes in {plan.workdir}, logs in {plan.log_dir}"]
    for i in range(plan.n_workers):
        gpu = f"CUDA_VISIBLE_DEVICES={plan.local_gpus[i % len(plan.local_gpus)]} " if plan.local_gpus else ""
        lines.append(f"{gpu}HPOPT_RUN_DIR={shlex.quote(str(plan.run_dir.root))} {shlex.join(local_command(plan))} &")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- submitting


def submit_submitit(plan: LaunchPlan) -> str:
    """Submit the array through submitit; returns the array job id."""
    import submitit

    from hpopt.worker import worker_entry

    plan.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        executor = submitit.SlurmExecutor(folder=plan.log_dir, python=shlex.quote(plan.python))
        executor.update_parameters(**submitit_parameters(plan))
        jobs = executor.map_array(worker_entry, [str(plan.run_dir.root)] * plan.n_workers,
                                  [plan.study] * plan.n_workers)
    except (RuntimeError, subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as exc:
        message = " ".join(str(exc).split())
        raise HpoptError(f"submitit could not submit the workers: {message[:400]}") from None
    return str(jobs[0].job_id).split("_")[0]


def spawn_local(plan: LaunchPlan) -> list[int]:
    """Start detached worker processes (own session: closing the terminal does not kill them)."""
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    pids = []
    for i in range(plan.n_workers):
        tmp = plan.log_dir / f".spawn-{uuid.uuid4().hex}.out"
        with open(tmp, "ab") as out:
            proc = subprocess.Popen(local_command(plan), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=local_env(plan, i), cwd=plan.workdir,
                                    start_new_session=True)
        tmp.rename(plan.log_dir / f"worker-local-{proc.pid}.out")  # named like the worker's own log
        pids.append(proc.pid)
    return pids


def submit(plan: LaunchPlan, slurm: Slurm | None = None) -> dict[str, Any]:
    """Start the workers and record the launch; returns the record."""
    plan.run_dir.ensure()
    pids: list[int] = []
    if plan.via == "submitit":
        job_id = submit_submitit(plan)
    elif plan.via == "sbatch":
        plan.log_dir.mkdir(parents=True, exist_ok=True)
        job_id = (slurm or Slurm()).submit(render_sbatch(plan))
    else:
        job_id, pids = "", spawn_local(plan)
    record: dict[str, Any] = {
        "job_id": job_id, "n_workers": plan.n_workers, "study": plan.study, "via": plan.via,
        "gpu": plan.gpu, "submitted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "log_dir": str(plan.log_dir),
    }
    if plan.via == "local":
        record["pids"] = pids
    append_launch(plan.run_dir, record)
    return record


# --------------------------------------------------------------------------- records


@contextmanager
def _locked(run_dir: RunDir) -> Iterator[None]:
    run_dir.root.mkdir(parents=True, exist_ok=True)
    with open(run_dir.root / ".workers.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_launches(run_dir: RunDir) -> list[dict[str, Any]]:
    try:
        data = read_json(run_dir.workers_file)
    except FileNotFoundError:
        return []
    launches = data.get("launches", []) if isinstance(data, dict) else []
    return [launch for launch in launches if isinstance(launch, dict)]


def append_launch(run_dir: RunDir, record: dict[str, Any]) -> None:
    """Add one launch to workers.json: read-modify-replace under a lock, never a partial file."""
    with _locked(run_dir):
        launches = read_launches(run_dir)
        write_json_atomic(run_dir.workers_file, {"launches": [*launches, record]})


def worker_alive(pid: int) -> bool:
    """A live hpopt process with this pid: not a zombie, not a stranger that reused the pid."""
    return process_alive(pid, lambda argv: any("hpopt" in arg for arg in argv))


@dataclass
class ActiveLaunch:
    """A launch of which some workers are still queued or running."""

    record: dict[str, Any]
    running: int = 0
    pending: int = 0

    def describe(self) -> str:
        where = f"job {self.record['job_id']}" if self.record.get("job_id") else "local pids " + ",".join(
            map(str, self.record.get("pids", [])))
        return f"{where} ({self.record.get('via')}): {self.running} running, {self.pending} pending"


def active_launches(run_dir: RunDir, study: str, slurm: Slurm | None) -> list[ActiveLaunch]:
    """This study's launches with live workers: one squeue call for all Slurm launches."""
    launches = [r for r in read_launches(run_dir) if r.get("study") == study]
    job_ids = [str(r["job_id"]) for r in launches if r.get("job_id")]
    queue = slurm.queue(job_ids) if slurm is not None and job_ids else {}
    active = []
    for record in launches:
        found = ActiveLaunch(record)
        if record.get("job_id"):
            for info in queue.values():
                if info.array_job_id == str(record["job_id"]) and info.is_active:
                    if info.is_pending:  # squeue -r: one row per array task
                        found.pending += 1
                    else:
                        found.running += 1
        else:
            found.running = sum(worker_alive(int(pid)) for pid in record.get("pids", []))
        if found.running or found.pending:
            active.append(found)
    return active


# --------------------------------------------------------------------------- storage


def ensure_db(config: Config, run_dir: RunDir, *, slurm_mode: bool, start: bool | None, workers: int = 0,
              slurm: Slurm | None = None, say: Callable[[str], None] = print) -> str:
    """Make sure the workers will find their storage; returns which one ("db" or "journal").

    A run keeps one storage. With a DB on record (db/job.json or the endpoint file) it is started
    again if it stopped; a run whose studies live in the journal file keeps using it; a fresh run
    gets the DB job on Slurm and the journal file locally. `start=None` decides as above;
    True/False force it (False trusts whatever is on record).
    """
    db_on_record = run_dir.db_job_file.exists() or run_dir.endpoint_file.exists()
    journal_in_use = run_dir.journal_file.exists() and run_dir.journal_file.stat().st_size > 0
    if start is None:
        start = db_on_record or (slurm_mode and not journal_in_use)
    if not start:
        if db_on_record:
            return "db"
        if slurm_mode:
            say(f"no DB job: the workers share the journal file {run_dir.journal_file}")
        return "journal"
    from hpopt.db import server

    result = server.start(config, run_dir, workers=workers, local=not slurm_mode, slurm=slurm, progress=say)
    where = f" on {result.endpoint.address}" if result.endpoint is not None else ""
    say(f"DB {result.record.label} {'already running' if result.reused else 'started'}{where}")
    return "db"


def check_study(run_dir: RunDir, study: str | None) -> str:
    """The study the workers will load: given and existing, or the only one in this run."""
    from hpopt.storage import is_disconnect, open_storage

    try:
        names = sorted(s.study_name for s in open_storage(run_dir).get_all_studies())
    except Exception as exc:  # noqa: BLE001 - only "cannot reach the DB" becomes a user error
        if not is_disconnect(exc):
            raise
        root: BaseException = exc
        while root.__cause__ is not None:  # Optuna wraps the driver's error in a vaguer one
            root = root.__cause__
        raise HpoptError(f"the study DB is not reachable ({' '.join(str(root).split())[:160]}); "
                         "is the DB job running? `hpopt db status` tells, `hpopt db start` starts it") from None
    if study:
        if study not in names:
            known = f" (studies here: {', '.join(names)})" if names else ""
            raise HpoptError(f"no study named {study!r} in {run_dir.root}{known}; "
                             f"create it first: hpopt study create {study} --space space.yaml --split data/splits/X.json")
        return study
    if len(names) == 1:
        return names[0]
    if not names:
        raise HpoptError(f"no study in {run_dir.root} yet: hpopt study create NAME --space space.yaml --split data/splits/X.json")
    raise HpoptError(f"several studies in this run ({', '.join(names)}): pass --study NAME")


# --------------------------------------------------------------------------- waiting


@dataclass
class Progress:
    """What `--wait` shows while workers run."""

    active: int
    finished: int | None = None
    budget: int | None = None
    best: float | None = None
    error: str = ""

    def line(self) -> str:
        study = "" if self.finished is None else f"; {self.finished}/{self.budget} trials finished"
        best = "" if self.best is None else f", best {self.best:.6g}"
        return f"{self.active} workers active{study}{best}"


def study_progress(run_dir: RunDir, study: str) -> tuple[int, int | None, float | None]:
    """(finished trials, budget, best value) of the study, from one read of its trials."""
    import optuna

    from hpopt.budget import tally
    from hpopt.storage import open_storage

    loaded = optuna.load_study(study_name=study, storage=open_storage(run_dir))
    trials = loaded.get_trials(deepcopy=False)
    values = [t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    best = (min(values) if loaded.direction.name == "MINIMIZE" else max(values)) if values else None
    budget = loaded.user_attrs.get("budget")
    return tally(trials).finished, budget if isinstance(budget, int) else None, best


def wait_for(record: dict[str, Any], run_dir: RunDir, slurm: Slurm | None, *, poll_s: float = 5.0,
             timeout_s: float | None = None, on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Block until this launch has no live worker (or timeout_s passes); returns the last view."""
    started = time.monotonic()
    while True:
        mine = [a for a in active_launches(run_dir, record["study"], slurm)
                if a.record.get("submitted_at") == record["submitted_at"] and a.record.get("job_id") == record["job_id"]]
        progress = Progress(active=sum(a.running + a.pending for a in mine))
        try:
            progress.finished, progress.budget, progress.best = study_progress(run_dir, record["study"])
        except Exception as exc:  # noqa: BLE001 - the DB may be renewing; waiting goes on
            progress.error = " ".join(str(exc).split())[:200]
        if on_progress:
            on_progress(progress)
        if progress.active == 0 or (timeout_s is not None and time.monotonic() - started > timeout_s):
            return progress
        time.sleep(poll_s)
