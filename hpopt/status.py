"""`hpopt status`: the DB job, the workers and the study collected into one JSON-ready dict.

It is polled from a shared login node (`--watch`, cron), where heavy sacct polling has stalled
clusters (submitit#1759). So one refresh costs one squeue call for every job we know of, sacct
only for jobs that have left the queue (batched, and remembered once they are finished), and a
few aggregate SQL queries on Optuna's schema instead of loading every trial: `get_trials()` on a
10,000-trial study takes seconds. The view (status_view.py) and `--json` both read the dict built
here, so what a script sees is what a user sees.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import sqlalchemy as sa

from hpopt.db.probe import KeptProbe
from hpopt.errors import HpoptError
from hpopt.launch import read_launches, worker_alive
from hpopt.rundir import RunDir, read_json
from hpopt.slurm import DONE_STATES, FAILED_STATES, PENDING_STATES, JobInfo, Slurm

FINISHED_STATES = ("COMPLETE", "PRUNED")  # the trial states that count toward the budget
TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
RECENT_WINDOW = 5  # "all recent trials failing" looks at this many latest finished trials
RATE_WINDOW = timedelta(hours=1)
LOG_TAIL_LINES = 15
DB_KEYS = ("job_id", "state", "reason", "node", "host", "port", "uptime_s", "time_left", "renewal_scheduled",
           "reachable", "rtt_ms", "connections", "studies", "error")  # collect_db_status's contract
WORKER_ATTRS = ("worker_job_id", "array_index", "host", "gpu")
ERROR_ATTR = "error"  # user attr a failed trial carries (the worker stores the exception there)
# FAIL trials that are bookkeeping, not failures: budget surplus, abandoned at walltime and re-queued,
# superseded retries (hpopt/worker.py); they never count as "recent trials failing".
BENIGN_FAIL_ATTRS = ("surplus", "abandoned", "superseded")


# --------------------------------------------------------------------------- study summary


@dataclass
class StudySummary:
    """What the view needs from a study, however large it is."""

    name: str
    storage: str  # "mariadb", "sqlite", ... or "journal"
    direction: str = "minimize"
    budget: int | None = None
    counts: dict[str, int] = field(default_factory=lambda: {s.lower(): 0 for s in TRIAL_STATES})
    best: dict[str, Any] | None = None  # {"number", "value", "params"}
    finished_last_hour: int = 0
    rate_window_s: float = RATE_WINDOW.total_seconds()  # shorter when the first of those trials started later
    running: list[dict[str, Any]] = field(default_factory=list)  # {"number", "worker", "host", "gpu", "started_at"}
    finished_by_worker: dict[str, int] = field(default_factory=dict)
    recent_states: list[str] = field(default_factory=list)  # latest finished trials, newest first
    recent_errors: list[str] = field(default_factory=list)  # errors of those that failed


def worker_key(job_id: Any, array_index: Any = None) -> str:
    """One name per worker: '123_4' for array task 4 of job 123, whichever way the attrs spell it."""
    job = str(job_id or "").strip()
    if not job or "_" in job or array_index in (None, ""):
        return job
    return f"{job}_{array_index}"


def summarize_trials(name: str, storage: str, trials: Sequence[Any], direction: str,
                     budget: int | None, now: datetime) -> StudySummary:
    """Summarise FrozenTrials in Python: used for journal storage, where no SQL is available.

    `now` is naive local time, like FrozenTrial datetimes.
    """
    summary = StudySummary(name=name, storage=storage, direction=direction, budget=budget)
    since = now - RATE_WINDOW
    best = None
    first_start: datetime | None = None
    finished: list[Any] = []
    for trial in trials:
        state = trial.state.name
        summary.counts[state.lower()] = summary.counts.get(state.lower(), 0) + 1
        attrs = trial.user_attrs
        worker = worker_key(attrs.get("worker_job_id"), attrs.get("array_index"))
        if state == "RUNNING":
            summary.running.append(_running_entry(trial.number, trial.datetime_start, attrs))
        if state in FINISHED_STATES:
            if worker:
                summary.finished_by_worker[worker] = summary.finished_by_worker.get(worker, 0) + 1
            if trial.datetime_complete and trial.datetime_complete >= since:
                summary.finished_last_hour += 1
                first_start = min(filter(None, (first_start, trial.datetime_start)), default=None)
        if state in (*FINISHED_STATES, "FAIL") and trial.datetime_complete and not any(
                key in attrs for key in BENIGN_FAIL_ATTRS):
            finished.append(trial)
        if state == "COMPLETE" and trial.value is not None and (
            best is None or (trial.value < best.value if direction == "minimize" else trial.value > best.value)
        ):
            best = trial
    if best is not None:
        summary.best = {"number": best.number, "value": best.value, "params": dict(best.params)}
    finished.sort(key=lambda t: t.datetime_complete, reverse=True)
    recent = finished[:RECENT_WINDOW]
    summary.rate_window_s = _window_s(first_start, now)
    summary.recent_states = [t.state.name for t in recent]
    summary.recent_errors = [str(t.user_attrs[ERROR_ATTR]) for t in recent
                             if t.state.name == "FAIL" and t.user_attrs.get(ERROR_ATTR)]
    return summary


def _running_entry(number: int, started: datetime | None, attrs: dict[str, Any]) -> dict[str, Any]:
    return {
        "number": number,
        "worker": worker_key(attrs.get("worker_job_id"), attrs.get("array_index")),
        "host": attrs.get("host"),
        "gpu": attrs.get("gpu"),
        "started_at": started.isoformat(timespec="seconds") if started else None,
    }


# Optuna's RDB schema, only the columns read here (plain table() constructs: portable SQL with
# proper quoting and DateTime binding on MariaDB and SQLite alike, no private Optuna imports).
_studies = sa.table("studies", sa.column("study_id"), sa.column("study_name"))
_directions = sa.table("study_directions", sa.column("study_id"), sa.column("direction"), sa.column("objective"))
_study_attrs = sa.table("study_user_attributes", sa.column("study_id"), sa.column("key"), sa.column("value_json"))
_trials = sa.table("trials", sa.column("trial_id"), sa.column("number"), sa.column("study_id"),
                   sa.column("state"), sa.column("datetime_start", sa.DateTime),
                   sa.column("datetime_complete", sa.DateTime))
_values = sa.table("trial_values", sa.column("trial_id"), sa.column("objective"), sa.column("value"),
                   sa.column("value_type"))
_params = sa.table("trial_params", sa.column("trial_id"), sa.column("param_name"), sa.column("param_value"),
                   sa.column("distribution_json"))
_trial_attrs = sa.table("trial_user_attributes", sa.column("trial_id"), sa.column("key"), sa.column("value_json"))


@dataclass
class WorkerTally:
    """Trials finished per worker, kept between refreshes of one collector (`--watch`).

    Finished trials never change, so every trial up to `closed_through` (the trial id below the
    oldest unfinished one) is counted once into `closed`; a refresh only counts the trials above.
    One tally belongs to one study and one `workers_since`.
    """

    closed_through: int = 0
    closed: dict[str, int] = field(default_factory=dict)


def summarize_rdb(engine: sa.engine.Engine, name: str, now_utc: datetime,
                  workers_since: datetime | None = None, tally: WorkerTally | None = None) -> StudySummary:
    """Summarise a study with a few aggregate queries on one connection (no per-trial loading).

    `now_utc` is naive UTC, as Optuna's RDB schema stores trial datetimes. Trials finished per
    worker (the costliest query: two attr lookups per trial) are counted only for trials started
    since `workers_since`, the first launch on record, and not at all without one; with a `tally`
    from the previous refresh only the trials that were not finished then are looked at.
    """
    from optuna.distributions import json_to_distribution

    with engine.connect() as conn:
        study_id = conn.execute(sa.select(_studies.c.study_id).where(_studies.c.study_name == name)).scalar()
        if study_id is None:
            raise KeyError(name)
        direction = conn.execute(sa.select(_directions.c.direction).where(
            _directions.c.study_id == study_id, _directions.c.objective == 0)).scalar() or "MINIMIZE"
        budget_json = conn.execute(sa.select(_study_attrs.c.value_json).where(
            _study_attrs.c.study_id == study_id, _study_attrs.c.key == "budget")).scalar()
        summary = StudySummary(name=name, storage=engine.dialect.name.replace("mysql", "mariadb"),
                               direction=str(direction).lower(), budget=_budget(budget_json))
        in_study = _trials.c.study_id == study_id

        for state, count in conn.execute(
                sa.select(_trials.c.state, sa.func.count()).where(in_study).group_by(_trials.c.state)):
            summary.counts[str(state).lower()] = int(count)

        order = _values.c.value.asc() if summary.direction == "minimize" else _values.c.value.desc()
        best = conn.execute(
            sa.select(_trials.c.trial_id, _trials.c.number, _values.c.value)
            .select_from(_trials.join(_values, _values.c.trial_id == _trials.c.trial_id))
            .where(in_study, _trials.c.state == "COMPLETE", _values.c.objective == 0,
                   _values.c.value_type == "FINITE")
            .order_by(order).limit(1)).first()
        if best is not None:
            params = {
                pname: json_to_distribution(dist).to_external_repr(value)
                for pname, value, dist in conn.execute(
                    sa.select(_params.c.param_name, _params.c.param_value, _params.c.distribution_json)
                    .where(_params.c.trial_id == best.trial_id))
            }
            summary.best = {"number": best.number, "value": best.value, "params": params}

        finished = _trials.c.state.in_(FINISHED_STATES)
        count, first_start = conn.execute(
            sa.select(sa.func.count(), sa.func.min(_trials.c.datetime_start))
            .where(in_study, finished, _trials.c.datetime_complete >= now_utc - RATE_WINDOW)).one()
        summary.finished_last_hour = int(count)
        summary.rate_window_s = _window_s(first_start, now_utc)

        if workers_since is not None:
            _count_by_worker(conn, in_study, workers_since, tally or WorkerTally(), summary.finished_by_worker)

        running: dict[int, tuple[datetime | None, dict[str, Any]]] = {}
        for number, started, key, value_json in conn.execute(
                sa.select(_trials.c.number, _trials.c.datetime_start, _trial_attrs.c.key, _trial_attrs.c.value_json)
                .select_from(_trials.outerjoin(_trial_attrs, sa.and_(
                    _trial_attrs.c.trial_id == _trials.c.trial_id, _trial_attrs.c.key.in_(WORKER_ATTRS))))
                .where(in_study, _trials.c.state == "RUNNING")):
            entry = running.setdefault(number, (_utc_to_local(started), {}))
            if key is not None:
                entry[1][key] = _loads(value_json)
        summary.running = [_running_entry(n, started, attrs) for n, (started, attrs) in sorted(running.items())]

        benign = _trial_attrs.alias("benign")
        recent = conn.execute(
            sa.select(_trials.c.state, _trial_attrs.c.value_json)
            .select_from(_trials.outerjoin(_trial_attrs, sa.and_(
                _trial_attrs.c.trial_id == _trials.c.trial_id, _trial_attrs.c.key == ERROR_ATTR)))
            .where(in_study, _trials.c.state.in_((*FINISHED_STATES, "FAIL")),
                   _trials.c.datetime_complete.is_not(None),
                   ~sa.exists().where(benign.c.trial_id == _trials.c.trial_id,
                                      benign.c.key.in_(BENIGN_FAIL_ATTRS)))
            .order_by(_trials.c.datetime_complete.desc()).limit(RECENT_WINDOW)).all()
        summary.recent_states = [str(state) for state, _ in recent]
        summary.recent_errors = [str(_loads(err)) for state, err in recent if str(state) == "FAIL" and err]
    return summary


def _window_s(first_start: datetime | None, now: datetime) -> float:
    """The rate's time base: the last hour, or less when the trials in it began more recently
    (16 trials in the first 10 minutes are 96/hour, not 16/hour)."""
    full = RATE_WINDOW.total_seconds()
    if first_start is None:
        return full
    return min(full, max(60.0, (now - first_start).total_seconds()))


def _count_by_worker(conn: sa.engine.Connection, in_study: Any, since: datetime, tally: WorkerTally,
                     out: dict[str, int]) -> None:
    """Finished trials per worker into `out`, moving what can no longer change into `tally`."""
    oldest_open = conn.execute(sa.select(sa.func.min(_trials.c.trial_id)).where(
        in_study, _trials.c.state.in_(("RUNNING", "WAITING")))).scalar()
    newest = conn.execute(sa.select(sa.func.max(_trials.c.trial_id)).where(in_study)).scalar() or 0
    closing = newest if oldest_open is None else oldest_open - 1
    job, index = _trial_attrs.alias("job"), _trial_attrs.alias("idx")
    closed = (_trials.c.trial_id <= closing).label("closed")
    rows = conn.execute(
        sa.select(job.c.value_json, index.c.value_json, closed, sa.func.count())
        .select_from(_trials
                     .join(job, sa.and_(job.c.trial_id == _trials.c.trial_id, job.c.key == "worker_job_id"))
                     .outerjoin(index, sa.and_(index.c.trial_id == _trials.c.trial_id, index.c.key == "array_index")))
        .where(in_study, _trials.c.state.in_(FINISHED_STATES), _trials.c.datetime_start >= since,
               _trials.c.trial_id > tally.closed_through)
        .group_by(job.c.value_json, index.c.value_json, sa.literal_column("closed"))).all()
    out.update(tally.closed)
    for job_json, index_json, is_closed, count in rows:
        key = worker_key(_loads(job_json), _loads(index_json))
        if not key:
            continue
        out[key] = out.get(key, 0) + int(count)
        if is_closed:
            tally.closed[key] = tally.closed.get(key, 0) + int(count)
    tally.closed_through = max(tally.closed_through, closing)


def _loads(value_json: str | None) -> Any:
    return None if value_json is None else json.loads(value_json)


def _budget(value_json: str | None) -> int | None:
    value = _loads(value_json)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _utc_to_local(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None) if value else None


def open_study_source(run_dir: RunDir) -> Any:
    """What the study is read from: a small SQLAlchemy engine on the DB server, or the local journal.

    The same rule as hpopt.storage.open_storage (an endpoint file means the DB server), but for the
    DB a bare engine instead of Optuna's RDBStorage: status only reads, needs a connect timeout so a
    dead server costs seconds rather than a hang, and must work before `hpopt study create` has
    made Optuna's tables (RDBStorage refuses an empty schema then).
    """
    if run_dir.endpoint_file.exists():
        from hpopt.db.endpoint import sqlalchemy_url

        return sa.create_engine(sqlalchemy_url(run_dir), pool_size=1, max_overflow=1, pool_pre_ping=True,
                                pool_recycle=3600, connect_args={"connect_timeout": 5, "read_timeout": 60})
    from hpopt.storage import open_storage

    return open_storage(run_dir)


def study_names(source: Any) -> list[str]:
    """Study names, oldest first; a DB without Optuna's tables yet has none (no study created)."""
    if not isinstance(source, sa.engine.Engine):
        return [s.study_name for s in source.get_all_studies()]
    try:
        with source.connect() as conn:
            return list(conn.execute(sa.select(_studies.c.study_name).order_by(_studies.c.study_id)).scalars())
    except (sa.exc.ProgrammingError, sa.exc.OperationalError):
        if sa.inspect(source).has_table("studies"):
            raise
        return []


# --------------------------------------------------------------------------- Slurm snapshot


@dataclass
class SnapshotSlurm(Slurm):
    """A Slurm that answers from this refresh's squeue/sacct results, so the DB collector adds no calls.

    Jobs it was not asked about still go to Slurm (a renewal job id appearing mid-refresh).
    """

    live: dict[str, JobInfo] = field(default_factory=dict)
    done: dict[str, JobInfo] = field(default_factory=dict)
    asked: set[str] = field(default_factory=set)  # parent job ids covered by the snapshot

    def queue(self, job_ids: Iterable[str] = (), name: str | None = None) -> dict[str, JobInfo]:
        parents = {j.split("_")[0] for j in job_ids}
        if parents and parents <= self.asked and name is None:
            return {k: v for k, v in self.live.items() if v.array_job_id in parents}
        return super().queue(job_ids, name)

    def accounting(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        parents = {j.split("_")[0] for j in job_ids}
        if parents and parents <= self.asked:
            return {k: v for k, v in self.done.items() if v.array_job_id in parents}
        return super().accounting(job_ids)


def _bucket(state: str) -> str:
    """Which summary column a job state counts in."""
    if state in PENDING_STATES:
        return "pending"
    if state in ("COMPLETED", "EXITED"):
        return "completed"
    if state in ("CANCELLED", "REVOKED"):
        return "cancelled"
    if state in FAILED_STATES:
        return "failed"
    if state in DONE_STATES or state == "UNKNOWN":
        return "unknown"
    return "running"


def is_live(state: str) -> bool:
    """A job that is executing right now (pending ones are not: they hold no trial)."""
    return _bucket(state) == "running"


def tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> list[str]:
    """The last lines of a log, reading only its end (logs of long runs grow large)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines()[-lines:]]


def find_log(key: str, dirs: Iterable[Path]) -> Path | None:
    """A worker's log: the newest file naming its job (stderr first: that is where tracebacks go)."""
    matches: list[Path] = []
    for directory in dirs:
        if directory.is_dir():
            matches += [p for p in directory.glob(f"*{key}*") if p.is_file() and _names_job(p.name, key)]
    if not matches:
        return None
    return max(matches, key=lambda p: (p.suffix == ".err" and p.stat().st_size > 0, p.stat().st_mtime))


def _names_job(filename: str, key: str) -> bool:
    """'123_4' must not match '1123_4' or '123_45'."""
    start = filename.find(key)
    while start >= 0:
        before = filename[start - 1] if start else ""
        after = filename[start + len(key):start + len(key) + 1]
        if not before.isdigit() and not after.isdigit():
            return True
        start = filename.find(key, start + 1)
    return False


# --------------------------------------------------------------------------- the collector


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _db_job_ids(run_dir: RunDir) -> list[str]:
    """The DB job ids on record (endpoint and job files), for the one squeue call."""
    ids: list[str] = []
    for path in (run_dir.db_job_file, run_dir.endpoint_file):
        try:
            job = str(read_json(path).get("job_id") or "")
        except (FileNotFoundError, HpoptError, AttributeError):
            continue
        if job.isdigit() and job not in ids:
            ids.append(job)
    return ids


class StatusCollector:
    """Builds status reports; keeps what never changes (finished jobs, the storage) between refreshes.

    Under `--watch` it also keeps its DB connections open (the probe's and the study engine's), so a
    refresh does not pay for connecting; `close()` (or `with`) hangs them up.
    """

    def __init__(self, run_dir: RunDir, *, study: str | None = None, slurm: Slurm | None = None,
                 use_slurm: bool | None = None,
                 open_source: Callable[[RunDir], Any] | None = None,
                 db_status: Callable[[RunDir, Slurm | None], dict[str, Any]] | None = None) -> None:
        self.run_dir = run_dir
        self.study = study
        if use_slurm is None:
            use_slurm = slurm is not None or Slurm.available()
        self.slurm = (slurm or Slurm()) if use_slurm else None
        self._open_source = open_source or open_study_source
        self._db_status = db_status
        self._finished: dict[str, JobInfo] = {}  # terminal sacct answers, never asked again
        self._source: Any = None  # an Engine (RDB) or an Optuna storage (journal), kept for --watch
        self._source_address: str | None = None  # the DB endpoint the engine was opened on
        self._probe = KeptProbe()
        self._tallies: dict[tuple[str, datetime | None], WorkerTally] = {}  # per study and first launch

    # -- Slurm

    def _snapshot(self, expected: list[str]) -> tuple[SnapshotSlurm | None, dict[str, JobInfo], str | None]:
        """One squeue call for every expected job; one sacct call for those that left the queue."""
        if self.slurm is None:
            return None, {}, None
        snap = SnapshotSlurm(env=self.slurm.env, timeout_s=self.slurm.timeout_s,
                             asked={k.split("_")[0] for k in expected})
        if not expected:
            return snap, {}, None
        try:
            snap.live = self.slurm.queue(expected)
            gone = [k for k in expected if _lookup(snap.live, k) is None and k not in self._finished]
            fresh = self.slurm.accounting(gone) if gone else {}
        except HpoptError as exc:
            snap.asked = set()  # let the DB collector meet the same error on its own terms
            return snap, {}, str(exc)
        self._finished.update({k: v for k, v in fresh.items() if v.state in DONE_STATES})
        snap.done = {**self._finished, **fresh}
        return snap, {**snap.done, **snap.live}, None

    # -- DB

    def _db(self, slurm: Slurm | None) -> dict[str, Any]:
        if not (self.run_dir.endpoint_file.exists() or self.run_dir.db_job_file.exists()):
            return {**dict.fromkeys(DB_KEYS), "started": False, "reachable": False}
        try:
            if self._db_status is not None:
                report = dict(self._db_status(self.run_dir, slurm))
            else:
                from hpopt.db.server import collect_db_status

                report = dict(collect_db_status(self.run_dir, slurm, kept=self._probe))
        except HpoptError as exc:
            report = {"state": "UNKNOWN", "reachable": False, "error": str(exc)}
        report["started"] = True
        return {**dict.fromkeys(DB_KEYS), **report}

    # -- study

    def _storage_kind(self) -> str:
        """'rdb' when a DB endpoint is on record, 'journal' for local mode, 'none' before either."""
        if self.run_dir.endpoint_file.exists():
            return "rdb"
        return "journal" if self.run_dir.journal_file.exists() else "none"

    def _source_handle(self, db: dict[str, Any]) -> Any:
        """The study source, opened again when the DB endpoint moved (the DB job renewed itself)."""
        address = f"{db.get('host')}:{db.get('port')}"
        if self._source is not None and address != self._source_address:
            self._drop_source()
        if self._source is None:
            self._source = self._open_source(self.run_dir)
            self._source_address = address
        return self._source

    def _drop_source(self) -> None:
        if isinstance(self._source, sa.engine.Engine):
            self._source.dispose()
        self._source = None

    def _study(self, db: dict[str, Any], launches: list[dict[str, Any]]) -> dict[str, Any]:
        """The study section; `problem` says whether its absence needs a human (vs. not created yet)."""
        kind = self._storage_kind()
        if kind == "none":
            return {"available": False, "problem": False, "name": self.study,
                    "error": "no study storage yet: no DB started (`hpopt db start`) and no local journal"}
        if kind == "rdb" and db.get("reachable") is False:
            return {"available": False, "problem": False, "name": self.study,
                    "error": "study not readable: the DB is not reachable"}
        try:
            source = self._source_handle(db)
            names = study_names(source)
            name = self._pick_study(names, launches)
            if name is None:
                return {"available": False, "problem": False, "name": None, "studies": names,
                        "error": "no study yet: create one with `hpopt study create NAME`"}
            summary = self._summarize(source, name, [la for la in launches if la.get("study") == name])
        except HpoptError as exc:
            self._drop_source()
            return {"available": False, "problem": True, "name": self.study, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a DB hiccup must not kill --watch
            self._drop_source()
            return {"available": False, "problem": True, "name": self.study,
                    "error": f"study storage error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        return {"available": True, "problem": False, "studies": names, **_study_section(summary)}

    def _pick_study(self, names: list[str], launches: list[dict[str, Any]]) -> str | None:
        """--study, else the only study, else the one launched last, else the newest."""
        if self.study is not None:
            if self.study not in names:
                raise HpoptError(f"no study named '{self.study}' (studies: {', '.join(names) or 'none'})")
            return self.study
        for launch in reversed(launches):
            if launch.get("study") in names:
                return launch["study"]
        return names[-1] if names else None

    def _summarize(self, source: Any, name: str, launches: list[dict[str, Any]]) -> StudySummary:
        if isinstance(source, sa.engine.Engine):
            since = _first_launch_utc(launches)
            tally = self._tallies.setdefault((name, since), WorkerTally())
            return summarize_rdb(source, name, _utcnow().replace(tzinfo=None), since, tally)
        study_id = source.get_study_id_from_name(name)
        budget = source.get_study_user_attrs(study_id).get("budget")
        direction = source.get_study_directions(study_id)[0].name.lower()
        return summarize_trials(name, "journal", source.get_all_trials(study_id, deepcopy=False),
                                direction, budget if isinstance(budget, int) else None, datetime.now())

    # -- workers

    def _workers(self, launches: list[dict[str, Any]], jobs: dict[str, JobInfo], study: dict[str, Any],
                 slurm_ok: bool) -> list[dict[str, Any]]:
        running = {r["worker"]: r for r in study.get("running_trials", []) if r.get("worker")}
        unclaimed = {r["number"]: r for r in study.get("running_trials", []) if not r.get("worker")}
        finished = study.get("finished_by_worker", {})
        tasks = []
        for launch in launches:
            log_dirs = [Path(launch["log_dir"])] if launch.get("log_dir") else []
            log_dirs.append(self.run_dir.worker_logs_dir)
            job_id = str(launch.get("job_id") or "")
            if launch.get("via") == "local" or not job_id:
                keys = [(f"local-{pid}", None, i) for i, pid in enumerate(launch.get("pids", []))]
            else:
                keys = [(f"{job_id}_{i}", _lookup(jobs, f"{job_id}_{i}"), i)
                        for i in range(int(launch.get("n_workers", 0)))]
            for key, info, index in keys:
                if key.startswith("local-"):
                    alive = worker_alive(int(key.split("-", 1)[1]))
                    task = {"state": "RUNNING" if alive else "EXITED", "node": os.uname().nodename}
                else:
                    task = _job_fields(info, slurm_ok and self.slurm is not None)
                current = running.get(key)
                if current is None and _bucket(task["state"]) == "running":
                    current = claim_from_log(key, log_dirs, unclaimed)
                task.update(key=key, launch_job_id=job_id, array_index=index, study=launch.get("study"),
                            via=launch.get("via"),
                            current_trial=current["number"] if current else None,
                            trials_finished=int(finished.get(key, 0)))
                if current and current.get("gpu") not in (None, ""):
                    task["gpu"] = str(current["gpu"])
                task["bucket"] = _bucket(task["state"])
                log = find_log(key, log_dirs) if task["bucket"] == "failed" else None
                task["log_file"] = str(log) if log else None
                task["log_tail"] = tail(log) if log else []
                tasks.append(task)
        return tasks

    # -- everything

    def collect(self) -> dict[str, Any]:
        """One refresh: the whole report as plain JSON types."""
        started = time.perf_counter()
        launches = [launch for launch in read_launches(self.run_dir)
                    if self.study is None or launch.get("study") == self.study]
        expected = _db_job_ids(self.run_dir) + [
            f"{launch['job_id']}_{i}" for launch in launches
            if launch.get("via") != "local" and launch.get("job_id")
            for i in range(int(launch.get("n_workers", 0)))
        ]
        snap, jobs, slurm_error = self._snapshot(expected)
        db = self._db(snap)
        study = self._study(db, launches)
        shown = study.get("name")  # the workers of the study on screen; all of them if none is
        mine = [launch for launch in launches if shown is None or launch.get("study") == shown]
        tasks = self._workers(mine, jobs, study, slurm_error is None)
        summary = Counter(t["bucket"] for t in tasks)
        report: dict[str, Any] = {
            "generated_at": _utcnow().isoformat(timespec="seconds"),
            "run_dir": str(self.run_dir.root),
            "storage": self._storage_kind(),
            "slurm": {"available": self.slurm is not None, "error": slurm_error},
            "db": db,
            "workers": {
                "launches": len(mine),
                "other_launches": len(launches) - len(mine),  # of other studies (see --study)
                "tasks": tasks,
                "summary": {k: summary.get(k, 0) for k in
                            ("running", "pending", "completed", "failed", "cancelled", "unknown")},
            },
            "study": study,
        }
        if not any(t["bucket"] in ("running", "pending") for t in tasks) and study.get("remaining"):
            study["eta_s"] = None  # nobody is working on it: no ETA at any rate
        report["warnings"] = assess(report)
        report["attention"] = any(w["severity"] == "error" for w in report["warnings"])
        report["refresh_s"] = round(time.perf_counter() - started, 4)
        return report

    def close(self) -> None:
        """Hang up the kept DB connections (the end of `--watch`); a later refresh reconnects."""
        self._probe.close()
        self._drop_source()

    def __enter__(self) -> StatusCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TRIAL_LINE = re.compile(r"\btrial (\d+): (\w+)")


def claim_from_log(key: str, log_dirs: list[Path], unclaimed: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The RUNNING trial a live worker's log says it started and has not ended ("trial N: start").

    For trials that carry no worker attrs yet (a worker may store them only when it tells, and local
    workers have no job id); the claimed trial gets this worker, so it is not taken for stale.
    """
    log = find_log(key, log_dirs)
    current = None
    for line in tail(log, lines=200) if log else []:
        match = _TRIAL_LINE.search(line)
        if match:
            number = int(match.group(1))
            if match.group(2) == "start":
                current = number
            elif number == current:
                current = None
    entry = unclaimed.pop(current, None) if current is not None else None
    if entry is not None:
        entry["worker"] = key
    return entry


def _first_launch_utc(launches: list[dict[str, Any]]) -> datetime | None:
    """When the study's first launch was submitted (naive UTC, minus clock-skew slack); None if never
    or unknown (then every trial counts: a record without a time must not hide trials)."""
    times = []
    for launch in launches:
        try:
            when = datetime.fromisoformat(str(launch["submitted_at"]))
        except (KeyError, ValueError):
            return datetime(1970, 1, 1)
        times.append((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc))
    return min(times).replace(tzinfo=None) - timedelta(minutes=10) if times else None


def _lookup(jobs: dict[str, JobInfo], key: str) -> JobInfo | None:
    """A task's job: '123_4', or plain '123' when a single worker was not submitted as an array."""
    return jobs.get(key) or jobs.get(key.split("_")[0])


def _job_fields(info: JobInfo | None, slurm_ok: bool) -> dict[str, Any]:
    if info is None:
        return {"state": "UNKNOWN", "reason": "" if slurm_ok else "Slurm not reachable from here",
                "node": "", "gpu": "", "elapsed": "", "time_left": "", "exit_code": ""}
    gres = info.gres.replace("gres:", "").replace("gres/", "")
    return {"state": info.state, "reason": info.reason, "node": "" if info.is_pending else info.node,
            "gpu": gres if "gpu" in gres else "", "elapsed": info.elapsed, "time_left": info.time_left,
            "exit_code": info.exit_code}


def _study_section(summary: StudySummary) -> dict[str, Any]:
    """The study part of the report, with the figures derived from the summary (rate, ETA)."""
    data = asdict(summary)
    counts = data["counts"]
    finished = sum(counts.get(s.lower(), 0) for s in FINISHED_STATES)
    remaining = max(0, summary.budget - finished) if summary.budget is not None else None
    rate = summary.finished_last_hour * 3600.0 / summary.rate_window_s
    eta = None
    if remaining == 0:
        eta = 0.0
    elif remaining is not None and rate > 0:
        eta = remaining / rate * 3600.0
    data.update(finished=finished, remaining=remaining, trials_per_hour=rate, eta_s=eta,
                running_trials=data.pop("running"))
    return data


def assess(report: dict[str, Any]) -> list[dict[str, str]]:
    """Warnings for what needs a human; severity 'error' makes `hpopt status` exit non-zero."""
    out: list[dict[str, str]] = []

    def add(severity: str, code: str, message: str) -> None:
        out.append({"severity": severity, "code": code, "message": message})

    db, study, workers = report["db"], report["study"], report["workers"]
    tasks = workers["tasks"]
    slurm_tasks = [t for t in tasks if t.get("via") != "local"]
    live = {t["key"] for t in tasks if is_live(t["state"])}
    journal = report["storage"] == "journal"

    if report["slurm"]["error"]:
        add("warning", "slurm_error", f"could not ask Slurm: {report['slurm']['error']}")
    elif not report["slurm"]["available"] and slurm_tasks:
        add("warning", "slurm_unavailable", "workers were submitted to Slurm but Slurm is not available here")

    db_up = db.get("reachable") is True
    if not db["started"]:
        if not tasks and not journal:
            add("info", "nothing_started", "nothing started yet: `hpopt db start`, `hpopt study create`, `hpopt launch`")
        elif not journal:
            add("info", "no_db", "no DB started yet: run `hpopt db start`")
    elif not db_up:
        state = db.get("state") or "UNKNOWN"
        if state in PENDING_STATES:
            add("info", "db_pending", f"DB job {db.get('job_id')} is pending ({db.get('reason') or 'no reason given'})")
        elif state in ("COMPLETED", "CANCELLED", "STOPPED") and not any(
                t["bucket"] in ("running", "pending") for t in tasks):
            add("info", "db_stopped", f"DB stopped ({state}) and no worker needs it; `hpopt db start` resumes")
        else:
            add("error", "db_down", f"DB is down: {db.get('error') or f'job state {state}'}")
    running_without_db = [t for t in tasks if t["key"] in live] if not db_up and not journal else []
    if running_without_db:
        add("error", "workers_without_db", f"{len(running_without_db)} worker(s) running while the DB is not reachable")

    failed = [t for t in tasks if t["bucket"] == "failed"]
    if failed:
        codes = Counter(t.get("exit_code") or t["state"] for t in failed)
        add("error", "workers_failed", f"{len(failed)} worker(s) failed ("
            + ", ".join(f"{n}x {c}" for c, n in codes.most_common()) + "): see their log tails")

    if study.get("available"):
        can_judge = not report["slurm"]["error"] and (report["slurm"]["available"] or not slurm_tasks)
        # a trial nobody is known to run is stale only when every live worker is busy with another one
        idle = [t for t in tasks if t["key"] in live and t["current_trial"] is None]
        stale = [r for r in study["running_trials"] if can_judge and r["worker"] not in live
                 and (r["worker"] or not idle)]
        if stale:
            numbers = ", ".join(f"#{r['number']}" + (f" ({r['worker']})" if r["worker"] else "") for r in stale[:10])
            add("error", "stale_trials",
                f"{len(stale)} trial(s) RUNNING with no live worker: {numbers}"
                + (" ..." if len(stale) > 10 else "")
                + "; once their heartbeat is past the grace period a worker or `hpopt study show` fails and retries them")
        recent = study["recent_states"]
        if len(recent) >= min(3, RECENT_WINDOW) and all(s == "FAIL" for s in recent):
            common = Counter(study["recent_errors"]).most_common(1)
            error = common[0][0] if common else _error_from_logs(failed) or "no error recorded"
            add("error", "trials_failing", f"the last {len(recent)} trials all failed; most common error: {error}")
        if not tasks:
            add("info", "no_workers", "no workers launched yet: run `hpopt launch`")
        elif study.get("remaining") and not any(t["bucket"] in ("running", "pending") for t in tasks):
            add("info", "no_live_workers",
                f"no worker is running or queued and {study['remaining']} trials are left: `hpopt launch`")
        if study.get("remaining") == 0:
            add("info", "budget_reached", f"budget of {study['budget']} finished trials reached")
    elif study.get("problem"):
        add("error", "study_unreadable", study["error"])
    return out


def _error_from_logs(failed: list[dict[str, Any]]) -> str | None:
    """The last non-empty log line of a failed worker, when the trials themselves carry no error."""
    for task in failed:
        lines = [line for line in task.get("log_tail", []) if line.strip()]
        if lines:
            return lines[-1].strip()
    return None


def collect_status(run_dir: RunDir, *, study: str | None = None, slurm: Slurm | None = None) -> dict[str, Any]:
    """One report for `run_dir` (see StatusCollector for what a refresh costs)."""
    with StatusCollector(run_dir, study=study, slurm=slurm) as collector:
        return collector.collect()
