"""What every worker job runs: ask -> train (per-epoch report/prune) -> tell, until done.

A worker stops when the study's fleet-wide budget is finished (hpopt/budget.py), when the next
trial would not fit in the walltime left (estimated from finished trials' wall time), or when
Slurm warns it (`--signal=USR1@...`) or terminates it (SIGTERM). A trial cut short is abandoned
cleanly: marked FAIL and re-queued with the same parameters, never left RUNNING. A killed worker
(kill -9, node failure) cannot do that, so each worker beats for its trial from a thread and
every worker reaps trials whose beat went silent (hpopt/storage.py), re-queueing them too.

The DB may vanish for a while (its job renewing itself on another node, a network blip): every
DB call is retried with backoff for `db_retry_s`, re-reading the endpoint file each time, and a
finished trial's result is kept in memory until it is told.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import statistics
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import optuna
from optuna.trial import TrialState

from hpopt.budget import (Tally, budget_reached, failures_exhausted, is_surplus, may_start, near_end, tally,
                          tally_counts)
from hpopt.errors import HpoptError
from hpopt.rundir import RunDir
from hpopt.sampling import sample_params, sampler_window, supports_snapshot
from hpopt.space import apply_values
from hpopt.storage import (Liveness, atomic_claims, beat, claim_trial, close_storage, count_states, fail_and_requeue,
                           finish_trial, is_disconnect, open_storage, reap_stale, withdraw)
from hpopt.study import Experiment, load_experiment
from hpopt.trial_feed import TrialFeed

T = TypeVar("T")
OnEpoch = Callable[[int, float, float], None]
# trainer(config, split_manifest, on_epoch, device) -> TrainResult-like mapping (val_mae, ...)
Trainer = Callable[[dict[str, Any], str, OnEpoch, str], Mapping[str, Any]]
RESULT_KEYS = ("train_mae", "val_mae", "val_mae_per_atom", "train_mae_per_atom", "baseline_val_mae")


@dataclass(frozen=True)
class Settings:
    """Worker knobs; environment overrides (HPOPT_WORKER_*) exist for tests and odd clusters."""

    db_retry_s: float = 900.0  # how long the DB may be unreachable before the worker gives up
    poll_s: float = 5.0  # wait between budget checks while other workers hold the last slots
    margin_s: float = 30.0  # time kept free before the deadline to tell and exit
    signal_grace_s: float = 120.0  # time assumed left after USR1 when no deadline is known
    max_consecutive_failures: int = 3
    snapshot_s: float = 1.0  # how stale the sampler's view of other trials may get
    liveness: Liveness = field(default_factory=Liveness)

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> "Settings":
        env = dict(os.environ) if env is None else dict(env)
        d = Settings()
        return Settings(
            db_retry_s=float(env.get("HPOPT_WORKER_DB_RETRY_S", d.db_retry_s)),
            poll_s=float(env.get("HPOPT_WORKER_POLL_S", d.poll_s)),
            margin_s=float(env.get("HPOPT_WORKER_MARGIN_S", d.margin_s)),
            signal_grace_s=float(env.get("HPOPT_WORKER_SIGNAL_GRACE_S", d.signal_grace_s)),
            max_consecutive_failures=int(env.get("HPOPT_WORKER_MAX_FAILURES", d.max_consecutive_failures)),
            snapshot_s=float(env.get("HPOPT_WORKER_SNAPSHOT_S", d.snapshot_s)),
            liveness=Liveness.from_env(env),
        )


@dataclass(frozen=True)
class Identity:
    """Who this worker is, from the Slurm environment (all empty when run by hand)."""

    tag: str
    job_id: str
    array_index: int | None
    host: str
    gpu: str

    @staticmethod
    def from_env(worker_tag: str | None = None, env: Mapping[str, str] | None = None) -> "Identity":
        env = os.environ if env is None else env
        job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID", "")
        task = env.get("SLURM_ARRAY_TASK_ID")
        index = int(task) if task and task.isdigit() else None
        job_id = f"{job}_{index}" if job and index is not None else job
        tag = worker_tag or (f"worker-{job_id}" if job_id else f"worker-local-{os.getpid()}")
        return Identity(tag=tag, job_id=job_id, array_index=index, host=socket.gethostname(),
                        gpu=env.get("CUDA_VISIBLE_DEVICES", ""))


class AbandonTrial(Exception):
    """Raised from the epoch callback: stop training this trial and re-queue it."""


class StopFlags:
    """Set from signal handlers; the loop and the epoch callback look at them."""

    def __init__(self) -> None:
        self.stop = False  # finish (or abandon) the current trial, start no other
        self.abandon = False  # SIGTERM: abandon the current trial at the next epoch
        self.wake = threading.Event()
        self.reason = ""

    def request(self, reason: str, abandon: bool) -> None:
        self.stop = True
        self.abandon = self.abandon or abandon
        self.reason = reason
        self.wake.set()


class Connection:
    """The storage + loaded study, replaced whenever the DB has to be found again."""

    def __init__(self, run_dir: RunDir, study_name: str, settings: Settings, log: logging.Logger) -> None:
        self.run_dir = run_dir
        self.study_name = study_name
        self.settings = settings
        self.log = log
        self.server = run_dir.endpoint_file.exists()  # a server run never falls back to the journal
        self.seed: int | None = None
        self.exp: Experiment = self.call(lambda exp: exp)  # connects

    def _connect(self) -> Experiment:
        if self.server and not self.run_dir.endpoint_file.exists():
            raise FileNotFoundError(f"{self.run_dir.endpoint_file} (DB job renewing?)")
        storage = open_storage(self.run_dir, liveness=self.settings.liveness, retried=True)
        exp = load_experiment(storage, self.study_name, seed=self.seed)
        self.seed = exp.seed
        return exp

    def call(self, fn: Callable[[Experiment], T]) -> T:
        """Run fn against the study; on DB loss reconnect with backoff until db_retry_s runs out."""
        give_up = time.monotonic() + self.settings.db_retry_s
        delay = 1.0
        while True:
            try:
                if not hasattr(self, "exp"):
                    self.exp = self._connect()
                return fn(self.exp)
            except Exception as exc:  # noqa: BLE001 - only disconnects are retried, see below
                if not is_disconnect(exc):
                    raise
                if time.monotonic() + delay > give_up:
                    raise HpoptError(f"the study DB has been unreachable for {self.settings.db_retry_s:.0f} s "
                                     f"(last error: {_short(exc)}); is the DB job running?") from None
                self.log.warning("DB unreachable (%s); reconnecting in %.0f s", _short(exc), delay)
                self.drop()
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def drop(self) -> None:
        if hasattr(self, "exp"):
            close_storage(self.exp.study._storage)
            del self.exp


class Heartbeat:
    """Beats for the trial being trained from one thread per worker (a thread per trial would
    cost a thread start per trial); a failed beat is logged, never fatal."""

    def __init__(self, conn: Connection, interval_s: float) -> None:
        self.conn = conn
        self.interval_s = interval_s
        self.trial_id: int | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def beating(self, trial_id: int) -> Iterator[None]:
        """Beat for `trial_id` while the block runs (its first beat was written with the trial)."""
        self.trial_id = trial_id
        try:
            yield
        finally:
            self.trial_id = None

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            trial_id, exp = self.trial_id, getattr(self.conn, "exp", None)
            if trial_id is None or exp is None:
                continue
            try:
                beat(exp.study._storage, trial_id)
            except Exception as exc:  # noqa: BLE001 - the main thread handles reconnects
                self.conn.log.warning("heartbeat for trial id %d failed: %s", trial_id, _short(exc))


@dataclass(frozen=True)
class Asked:
    """A trial this worker now owns."""

    trial_id: int
    number: int
    values: dict[str, Any]  # fixed values + this trial's parameters, by dotted name


@dataclass
class Outcome:
    """A trial's end as the worker saw it, kept until the DB has it."""

    state: TrialState
    value: float | None
    attrs: dict[str, Any]
    intermediate: dict[int, float]
    unreported: set[int]  # epochs the DB did not get while it was away
    abandoned: str = ""


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _setup_log(run_dir: RunDir, tag: str) -> logging.Logger:
    """One log file per worker in the run directory, plus stderr (the Slurm output file)."""
    run_dir.worker_logs_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("hpopt")
    log.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s {tag} %(levelname)s %(message)s")
    for handler in list(log.handlers):
        if getattr(handler, "_hpopt_worker", False):
            log.removeHandler(handler)
            handler.close()
    for handler in (logging.FileHandler(run_dir.worker_logs_dir / f"{tag}.log"), logging.StreamHandler()):
        handler.setFormatter(fmt)
        handler._hpopt_worker = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return log


def pick_device() -> str:
    """The GPU Slurm gave us (CUDA_VISIBLE_DEVICES makes it cuda:0), else the CPU."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def estimate_trial_s(trials: list[optuna.trial.FrozenTrial]) -> float | None:
    """A pessimistic trial duration: the 90th percentile of the last 20 complete trials."""
    walls: list[float] = []
    for trial in reversed(trials):  # newest first; a big study is not walked every trial
        if trial.state == TrialState.COMPLETE and "wall_s" in trial.user_attrs:
            walls.append(float(trial.user_attrs["wall_s"]))
            if len(walls) == 20:
                break
    if not walls:
        return None
    return statistics.quantiles(walls, n=10)[-1] if len(walls) >= 2 else walls[0]


def default_trainer(run_dir: RunDir) -> Trainer:
    """The real trainer (hpopt/train), with the run's shared fingerprint cache."""

    def train(config: dict[str, Any], split: str, on_epoch: OnEpoch, device: str) -> Mapping[str, Any]:
        from hpopt.train.api import run_trial

        result = run_trial(config, split, on_epoch=on_epoch, cache_dir=run_dir.cache_dir, device=device)
        return result.as_dict()

    return train


class Worker:
    """One worker process's loop; `run_worker` is its public face."""

    def __init__(self, run_dir: RunDir, study_name: str, deadline: float | None, ident: Identity,
                 trainer: Trainer, settings: Settings, log: logging.Logger) -> None:
        self.run_dir = run_dir
        self.deadline = deadline
        self.ident = ident
        self.trainer = trainer
        self.settings = settings
        self.log = log
        self.flags = StopFlags()
        self.device = pick_device()
        self.conn = Connection(run_dir, study_name, settings, log)
        self.heartbeat = Heartbeat(self.conn, settings.liveness.heartbeat_s)
        self.last_reap = 0.0
        self.last_sync = 0.0
        self.snapshot: list[optuna.trial.FrozenTrial] = []
        self.window: list[optuna.trial.FrozenTrial] = []  # the part of the snapshot the sampler sees
        self.counts: Tally | None = None  # trials per state, as last seen
        self.feed: TrialFeed | None = None  # lean trial reads, with atomic claims
        self.finished = 0

    # -- signals ---------------------------------------------------------------------------
    def install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_usr1(signum: int, frame: object) -> None:
            if self.deadline is None:
                self.deadline = time.time() + self.settings.signal_grace_s
            self.flags.request("walltime warning (SIGUSR1)", abandon=False)

        def on_term(signum: int, frame: object) -> None:
            self.flags.request("terminated (SIGTERM)", abandon=True)

        signal.signal(signal.SIGUSR1, on_usr1)
        signal.signal(signal.SIGTERM, on_term)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        try:
            return self._loop()
        finally:
            self.heartbeat.stop()
            self.conn.drop()

    def _loop(self) -> int:
        exp = self.conn.exp
        self.log.info("worker %s: study %s, device %s (CUDA_VISIBLE_DEVICES=%r), host %s, job %s, pid %d, seed %d",
                      self.ident.tag, exp.study.study_name, self.device, self.ident.gpu, self.ident.host,
                      self.ident.job_id or "-", os.getpid(), exp.seed)
        failures = 0
        while not self.flags.stop:
            trials, counts, budget = self.conn.call(self._refresh)
            if budget_reached(counts, budget):
                self.log.info("budget reached: %d/%d trials finished", counts.finished, budget)
                if counts.waiting:
                    self.conn.call(self._withdraw_queued)
                break
            if failures_exhausted(counts, budget):
                self.log.error("%d trials failed (budget %d): stopping; see the worker logs", counts.failed, budget)
                break
            if not may_start(counts, budget):
                self.flags.wake.wait(self.settings.poll_s)  # the last slots are held; one may go stale
                self.counts = None
                continue
            estimate = estimate_trial_s(trials)
            if self.deadline is not None and estimate is not None and \
                    time.time() + estimate + self.settings.margin_s > self.deadline:
                self.log.info("stopping: a trial takes ~%.0f s and only %.0f s are left", estimate,
                              self.deadline - time.time())
                break
            asked = self.conn.call(lambda e: self._ask(e, counts))
            if asked is None:
                continue
            outcome = self._train(asked, estimate)
            self.conn.call(lambda e: self._tell(e, asked, outcome))
            if outcome.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self.finished += 1
                failures = 0
            elif not outcome.abandoned:
                failures += 1
                if failures >= self.settings.max_consecutive_failures:
                    self.log.error("%d trials in a row failed here: stopping this worker", failures)
                    break
        if self.flags.stop:
            self.log.info("stopping: %s", self.flags.reason)
        self.log.info("worker %s done: %d trials finished here", self.ident.tag, self.finished)
        return self.finished

    def _refresh(self, exp: Experiment) -> tuple[list[optuna.trial.FrozenTrial], Tally, int]:
        """Reap stale trials (every heartbeat interval), know the counts, re-read trials when due.

        The trials (for the sampler and the duration estimate) are re-read at most every
        `snapshot_s`; trials take minutes, so in production that is every time. Counts: with
        atomic claims the last claim's are enough (the next claim re-checks the budget under a
        lock); otherwise one `GROUP BY` query per trial, and fresh trials near the end of the
        budget, where racing workers must see each other to give surplus trials back.
        """
        if time.monotonic() - self.last_reap >= self.settings.liveness.heartbeat_s:
            reap_stale(exp.study, self.settings.liveness)
            exp.budget = int(exp.study.user_attrs.get("budget", exp.budget))
            self.last_reap = time.monotonic()
            self.counts = None
        atomic = self._atomic(exp)
        due = time.monotonic() - self.last_sync >= self.settings.snapshot_s
        if not due and (self.counts is None or not atomic):
            by_state = count_states(exp.study._storage, exp.study._study_id)
            self.counts = tally_counts(by_state) if by_state is not None else None
            due = self.counts is None or (not atomic and near_end(self.counts, exp.budget))
        if due:
            if atomic:
                self.feed = self.feed or TrialFeed(exp.study._study_id)
                self.snapshot = self.feed.read(exp.study._storage)
                self.window = sampler_window(exp.study, self.snapshot)
            else:
                self.snapshot, self.window = exp.study.get_trials(deepcopy=False), []
            self.last_sync = time.monotonic()
            self.counts = tally(self.snapshot)
        assert self.counts is not None
        return self.snapshot, self.counts, exp.budget

    @staticmethod
    def _atomic(exp: Experiment) -> bool:
        """Whether trials are claimed in one transaction: MariaDB, and a sampler that can sample
        before the trial exists (TPE, random; CMA-ES and grid keep state in the trial)."""
        return atomic_claims(exp.study._storage) and supports_snapshot(exp.study.sampler)

    def _withdraw_queued(self, exp: Experiment) -> None:
        """The budget is finished: a retry still queued can only be surplus (journal mode, where a
        retry is queued apart from failing its trial), so it must not outlive the fleet."""
        for trial in exp.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if withdraw(exp.study._storage, trial._trial_id, {"surplus": True}):
                self.log.info("trial %d: queued retry withdrawn, the budget is finished", trial.number)

    def _identity(self) -> dict[str, Any]:
        """Who runs a trial, stored when it starts so `hpopt status` can show it."""
        return {"worker_job_id": self.ident.job_id, "array_index": self.ident.array_index,
                "host": self.ident.host, "gpu": self.ident.gpu, "device": self.device}

    def _ask(self, exp: Experiment, counts: Tally) -> Asked | None:
        """Our next trial, beating from the start (a trial that never beat is never reaped); None
        when the budget's last slots went to other workers.

        MariaDB with TPE or random sampling: sample from the snapshot, then `claim_trial` checks
        the budget and creates the trial with all its parameters in one transaction (or hands
        us a queued retry). Otherwise `study.ask()`, and near the end of the budget a recount
        that gives the trial back if racing workers already claimed the last slots.
        """
        study, storage = exp.study, exp.study._storage
        if self._atomic(exp):
            params, dists, values = sample_params(study, exp.space, self.window)
            claim = claim_trial(storage, study._study_id, exp.budget, params, dists, self._identity())
            self.counts = tally_counts(claim.counts)
            if claim.trial is None:
                return None
            if claim.trial.retry:
                values = {**exp.space.fixed, **claim.trial.params}
            return Asked(claim.trial.trial_id, claim.trial.number, values)
        with warnings.catch_warnings():  # "heartbeat is meant for optimize()": we beat ourselves
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        beat(storage, trial._trial_id)
        for key, value in self._identity().items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
        asked = Asked(trial._trial_id, trial.number, exp.space.suggest(trial))
        if near_end(counts, exp.budget) and is_surplus(study.get_trials(deepcopy=False), asked.number, exp.budget) \
                and finish_trial(storage, asked.trial_id, TrialState.FAIL, None, {"surplus": True}):
            self.log.info("trial %d: surplus (budget already claimed by other workers), not run", asked.number)
            return None
        return asked

    def _train(self, asked: Asked, estimate: float | None) -> Outcome:
        """Train one trial; every way it can end becomes an Outcome, nothing escapes."""
        exp = self.conn.exp
        config = apply_values(exp.base_config, asked.values)
        started = time.time()
        intermediate: dict[int, float] = {}
        unreported: set[int] = set()
        last = {"train_mae_running": None, "val_mae": None}  # a pruned trial keeps these
        planned_epochs = (config.get("optim") or {}).get("epochs") if isinstance(config.get("optim"), dict) else None
        trial_id = asked.trial_id

        def on_epoch(epoch: int, val_mae: float, train_mae: float) -> None:
            intermediate[epoch] = float(val_mae)
            # the trainer's per-epoch train MAE is a running mean over the epoch's batches, not
            # the exact MAE a finished trial reports, hence its own name on a pruned trial
            last.update(train_mae_running=float(train_mae), val_mae=float(val_mae))
            if self.flags.abandon:
                raise AbandonTrial(self.flags.reason)
            if self.deadline is not None:
                per_epoch = (time.time() - started) / len(intermediate)
                left = (planned_epochs - len(intermediate)) * per_epoch if isinstance(planned_epochs, int) else (
                    max((estimate or 0) - (time.time() - started), per_epoch))
                if time.time() + left + self.settings.margin_s > self.deadline:
                    raise AbandonTrial(f"walltime: ~{left:.0f} s of training left, deadline too close")
            pruned = self._report(trial_id, epoch, float(val_mae))
            if pruned is None:
                unreported.add(epoch)
            elif pruned:
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        self.log.info("trial %d: start %s", asked.number, asked.values)
        attrs: dict[str, Any] = {}
        try:
            with self.heartbeat.beating(trial_id):
                result = dict(self.trainer(config, exp.split, on_epoch, self.device))
            state, value, abandoned = TrialState.COMPLETE, float(result["val_mae"]), ""
            attrs.update({k: result[k] for k in RESULT_KEYS if k in result})
            attrs["epochs"] = int(result.get("epochs_run", len(intermediate)))
            if not math.isfinite(value):
                state, value = TrialState.FAIL, None
                attrs["error"] = "validation MAE is not finite (training diverged)"
        except optuna.TrialPruned:
            state, value, abandoned = TrialState.PRUNED, last["val_mae"], ""
            attrs.update({k: v for k, v in last.items() if v is not None}, epochs=len(intermediate))
        except AbandonTrial as exc:
            state, value, abandoned = TrialState.FAIL, None, str(exc) or "abandoned"
            attrs.update(epochs=len(intermediate), abandoned=abandoned)
        except Exception as exc:  # noqa: BLE001 - a trainer crash fails this trial, not the worker
            self.log.error("trial %d failed:\n%s", asked.number, traceback.format_exc())
            state, value, abandoned = TrialState.FAIL, None, ""
            attrs.update(epochs=len(intermediate), error=_short(exc))
        attrs["wall_s"] = round(time.time() - started, 3)
        self.log.info("trial %d: %s value=%s after %d epochs, %.1f s%s", asked.number, state.name, value,
                      attrs.get("epochs", 0), attrs["wall_s"], f" ({abandoned})" if abandoned else "")
        return Outcome(state, value, attrs, intermediate, unreported, abandoned)

    def _report(self, trial_id: int, epoch: int, val_mae: float) -> bool | None:
        """Report an epoch and ask the pruner; None: the DB is away, or the trial was reaped (a
        missed beat), so keep training unpruned and let `_tell` store or recover the result."""
        try:
            exp = self.conn.exp
            storage = exp.study._storage
            storage.set_trial_intermediate_value(trial_id, epoch, val_mae)
            return bool(exp.study.pruner.prune(exp.study, storage.get_trial(trial_id)))
        except optuna.exceptions.UpdateFinishedTrialError:
            return None
        except Exception as exc:  # noqa: BLE001
            if not is_disconnect(exc):
                raise
            self.log.warning("epoch %d not reported (DB unreachable); kept for later", epoch)
            return None

    def _tell(self, exp: Experiment, asked: Asked, outcome: Outcome) -> None:
        """Store attrs, missing epochs and the final state; a reaped trial is recovered, not lost.

        Told through the storage (like the trial was created): a pruned trial's value is its
        last validation MAE, as `study.tell` would store it.
        """
        storage = exp.study._storage
        value = None if outcome.state == TrialState.FAIL else outcome.value
        try:
            for step in sorted(outcome.unreported):
                storage.set_trial_intermediate_value(asked.trial_id, step, outcome.intermediate[step])
            told = (fail_and_requeue(exp.study, asked.trial_id, outcome.attrs, max_retry=None) if outcome.abandoned
                    else finish_trial(storage, asked.trial_id, outcome.state, value, outcome.attrs))
        except optuna.exceptions.UpdateFinishedTrialError:
            told = False
        if not told:
            self._recover(exp, storage.get_trial(asked.trial_id), outcome)
            return
        if outcome.abandoned:
            self.log.info("trial %d abandoned and re-queued with the same parameters", asked.number)

    def _recover(self, exp: Experiment, frozen: optuna.trial.FrozenTrial, outcome: Outcome) -> None:
        """Our trial was reaped as stale (DB away, or a beat missed under load) while it trained.

        Its retry holds its budget slot. If the retry is still queued, withdraw it and keep our
        result in its place. If another worker already runs (or ran) it, adding our result would
        spend the slot twice: keep it as a FAIL trial whose user attrs hold the numbers.
        """
        if outcome.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        storage = exp.study._storage
        retries = [t for t in exp.study.get_trials(deepcopy=False)
                   if t.system_attrs.get("retry_history", [None])[-1] == frozen.number]
        superseded = any(withdraw(storage, t._trial_id, {"superseded": True}) for t in retries
                         if t.state == TrialState.WAITING)
        kept = outcome.state if superseded or not retries else TrialState.FAIL
        exp.study.add_trial(optuna.trial.create_trial(
            state=kept, value=outcome.value if kept == TrialState.COMPLETE else None,
            params=frozen.params, distributions=frozen.distributions,
            user_attrs={**self._identity(), **outcome.attrs, "recovered_from": frozen.number,
                        **({} if kept == outcome.state else {"duplicate_of_retry": retries[0].number})},
            intermediate_values=outcome.intermediate))
        self.log.warning("trial %d had been reaped while it trained; its result was kept%s", frozen.number,
                         "" if kept == outcome.state else f" as FAIL (retry {retries[0].number} already started)")


def slurm_deadline(job_id: str) -> float | None:
    """The job's end time as Unix seconds, from `scontrol show job` (None if unknown)."""
    if not job_id:
        return None
    import datetime as dt

    from hpopt.slurm import Slurm

    try:
        end = Slurm().show_job(job_id).get("EndTime", "")
        return dt.datetime.fromisoformat(end).timestamp() if end and end != "Unknown" else None
    except (HpoptError, ValueError):
        return None


def run_worker(run_dir: RunDir, study_name: str, *, deadline: float | None = None,
               worker_tag: str | None = None, trainer: Trainer | None = None,
               settings: Settings | None = None) -> int:
    """Run trials of `study_name` until the budget, the deadline or a signal; returns trials finished here.

    `deadline` is Unix time (None: no limit known). `trainer` defaults to hpopt's trainer;
    benchmarks and tests pass their own with the same signature.
    """
    ident = Identity.from_env(worker_tag)
    log = _setup_log(run_dir, ident.tag)
    worker = Worker(run_dir, study_name, deadline, ident, trainer or default_trainer(run_dir),
                    settings or Settings.from_env(), log)
    worker.install_signals()
    return worker.run()


def worker_entry(run_dir_path: str, study_name: str) -> int:
    """Entry point for submitit job arrays: the deadline comes from the Slurm job itself."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    return run_worker(RunDir(Path(run_dir_path)), study_name, deadline=slurm_deadline(job_id))
