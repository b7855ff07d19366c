"""Which Optuna storage a run uses, opened one way for everyone (CLI, workers, status).

An endpoint file in the run directory means the MariaDB server job is in charge: we build an
`RDBStorage` from the endpoint + credentials files. No endpoint file means local mode: an Optuna
`JournalStorage` on `run_dir.journal_file`, which needs no server at all.

Liveness of trials is handled here for both backends, because Optuna only does half of it:
its heartbeat thread runs only inside `study.optimize()` (not with ask/tell, optuna#3293), stale
trials are only failed when someone calls `fail_stale_trials`, and JournalStorage has no
heartbeat at all. So the worker beats with `beat()` from its own thread, and every worker
(and `hpopt study show`) calls `reap_stale()`, which fails trials whose last beat is older than
the grace period and enqueues a retry with the same parameters (`fail_and_requeue`, Optuna's
`RetryHeartbeatStaleTrialCallback` rule in one transaction on MariaDB).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models  # Optuna 5.0's tables (pinned): the worker writes them directly
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from hpopt.rundir import RunDir

log = logging.getLogger("hpopt.storage")

# Journal mode keeps its heartbeat as a trial system attribute (wall-clock seconds).
HEARTBEAT_ATTR = "hpopt:heartbeat"


@dataclass(frozen=True)
class Liveness:
    """How often a running trial proves it is alive, and how long silence means it is dead.

    The grace period must outlast a DB renewal (the server job restarting elsewhere), or trials
    of healthy workers that were merely cut off would be failed and run twice. Override with
    HPOPT_WORKER_HEARTBEAT_S / HPOPT_WORKER_GRACE_S / HPOPT_WORKER_MAX_RETRY (tests shorten them).
    """

    heartbeat_s: int = 30
    grace_s: int = 600
    max_retry: int = 2

    @staticmethod
    def from_env(env: dict[str, str] | None = None) -> "Liveness":
        env = dict(os.environ) if env is None else env
        default = Liveness()
        return Liveness(
            heartbeat_s=int(env.get("HPOPT_WORKER_HEARTBEAT_S", default.heartbeat_s)),
            grace_s=int(env.get("HPOPT_WORKER_GRACE_S", default.grace_s)),
            max_retry=int(env.get("HPOPT_WORKER_MAX_RETRY", default.max_retry)),
        )


def engine_options(pool_size: int | None, retried: bool = False) -> dict[str, Any]:
    """SQLAlchemy engine options for one process.

    MariaDB allows 151 connections by default and SQLAlchemy's default pool is 5 + 10 overflow
    per process, so ten workers could exhaust the server on their own. A worker uses at most
    two at once (its main thread and its heartbeat thread), so we keep 2 + 2: 32 workers then
    need at most 128 connections, leaving room for status, the dashboard and the DB job's tools.
    `pool_pre_ping` replaces connections the server dropped (restart, wait_timeout) instead of
    failing the next query; `pool_recycle` stays below MariaDB's 8 h wait_timeout.

    `retried`: the caller (the worker) retries every DB call after reconnecting, so a dropped
    connection costs one failed call and neither the ping on checkout nor the rollback on return
    is needed. Every transaction then must end in commit or rollback (`engine.begin()`, Optuna's
    sessions): a transaction left open would carry its stale read view to the next checkout.
    Each is a round trip per transaction.

    `client_flag`: SQLAlchemy's default (FOUND_ROWS) plus MULTI_STATEMENTS for `claim_trial`'s
    batches; every value still goes through the driver's escaping.
    """
    from pymysql.constants import CLIENT

    size = 2 if pool_size is None else max(1, pool_size)
    return {"pool_size": size, "max_overflow": 2, "pool_pre_ping": not retried, "pool_recycle": 3600,
            "pool_timeout": 30, **({"pool_reset_on_return": None} if retried else {}),
            "connect_args": {"client_flag": CLIENT.FOUND_ROWS | CLIENT.MULTI_STATEMENTS}}


def open_storage(run_dir: RunDir, *, pool_size: int | None = None, create_schema: bool = False,
                 liveness: Liveness | None = None, retried: bool = False) -> BaseStorage:
    """The run's storage: MariaDB when an endpoint file exists, else the local journal.

    `create_schema=True` is for `hpopt study create` only: workers never create tables, because
    eight of them racing `create_all` on an empty MariaDB crash with "Duplicate entry" on the
    alembic version row or "Table ... already exists". `retried`: see `engine_options`.
    """
    liveness = liveness or Liveness.from_env()
    if run_dir.endpoint_file.exists():
        from hpopt.db.endpoint import sqlalchemy_url

        url = sqlalchemy_url(run_dir, show_password=True)
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            backend = RDBStorage(
                url,
                engine_kwargs=engine_options(pool_size, retried),
                skip_table_creation=not create_schema,
                heartbeat_interval=liveness.heartbeat_s,
                grace_period=liveness.grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=liveness.max_retry),
            )
        return optuna.storages.get_storage(backend)  # wraps it in Optuna's trial cache
    run_dir.ensure()
    return JournalStorage(JournalFileBackend(str(run_dir.journal_file)))


def close_storage(storage: BaseStorage) -> None:
    """Give the DB connections back now (a reconnect replaces the storage object)."""
    backend = getattr(storage, "_backend", storage)
    engine = getattr(backend, "engine", None)
    if engine is not None:
        engine.dispose()


def beat(storage: BaseStorage, trial_id: int) -> None:
    """Record that the trial's worker is alive (RDB: Optuna's heartbeat table; journal: an attr)."""
    if optuna.storages._heartbeat.is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
    else:
        storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())


def reap_stale(study: optuna.Study, liveness: Liveness | None = None) -> None:
    """Fail RUNNING trials whose worker stopped beating and queue a retry of each.

    RDB: Optuna's stale rule (DB clock); journal: the same rule on our heartbeat attribute. A
    trial that never beat is left alone, exactly like Optuna does; the worker beats before it
    starts training to keep that window tiny. Each trial is failed and re-queued by
    `fail_and_requeue`, atomically on MariaDB.
    """
    storage = study._storage
    liveness = liveness or Liveness.from_env()
    if optuna.storages._heartbeat.is_heartbeat_enabled(storage):
        stale = list(storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]
    else:
        now = time.time()
        stale = [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if t.system_attrs.get(HEARTBEAT_ATTR) is not None
                 and now - float(t.system_attrs[HEARTBEAT_ATTR]) > liveness.grace_s]
    for trial_id in stale:
        if fail_and_requeue(study, trial_id, {}, liveness.max_retry):
            log.warning("trial %d went stale (no heartbeat); re-queued with the same parameters",
                        trial_number(storage, trial_id))


def is_disconnect(exc: BaseException) -> bool:
    """Errors that mean "the DB is not reachable right now", worth reconnecting and retrying.

    Optuna wraps SQLAlchemy errors raised inside its sessions in StorageInternalError, so the
    whole cause chain is inspected. A missing endpoint file counts too (the DB job is renewing).
    """
    import pymysql.err
    import sqlalchemy.exc

    transient = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                 sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError, ConnectionError,
                 FileNotFoundError,
                 pymysql.err.OperationalError, pymysql.err.InterfaceError)  # raw, unwrapped: claim_trial
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, transient):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _mysql_backend(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage under Optuna's cache when it talks to MariaDB/MySQL, else None."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) and backend.engine.name == "mysql" else None


def mysql_engine(storage: BaseStorage) -> Any:
    """The SQLAlchemy engine of a MariaDB/MySQL storage (None for other backends)."""
    backend = _mysql_backend(storage)
    return None if backend is None else backend.engine


# The worker's two writes per trial, each one transaction of a few statements on MariaDB.
#
# Through Optuna's ORM a trial costs ~35 queries: creating it with its parameters checks each
# parameter's distribution against the study and re-reads the trial (~15 queries), then the
# first heartbeat, the user attrs and the final state are a transaction each. Here the same rows
# go into Optuna 5.0's own tables (its SQLAlchemy table objects, pinned version) in one
# transaction for "claim" and one for "finish". Distributions need no check: they all come from
# the study's stored search space. The first heartbeat is written with the trial, so a trial can
# never be RUNNING without a heartbeat (Optuna never reaps those).


@dataclass(frozen=True)
class Claimed:
    """A trial a worker now runs: a fresh one, or a queued retry with its own parameters."""

    trial_id: int
    number: int
    params: dict[str, Any]
    retry: bool


@dataclass(frozen=True)
class Claim:
    """What `claim_trial` saw and did; `trial` is None when the budget left no slot."""

    trial: Claimed | None
    counts: dict[TrialState, int]  # trials per state just before the claim


def claim_trial(storage: BaseStorage, study_id: int, budget: int, params: dict[str, Any],
                distributions: dict[str, Any], user_attrs: dict[str, Any]) -> Claim:
    """Start a trial only if the budget has a free slot, deciding and creating in one transaction.

    MariaDB only (see `atomic_claims`). Under a lock on the study's row: count trials per state;
    refuse when finished + running >= budget; else pop the oldest queued retry (WAITING) if there
    is one, or create a trial with `params`. Every claim in the fleet is serialized by that lock,
    so the budget is never overshot and trial numbers are "trials created before this one", as
    Optuna numbers them. `user_attrs` (who runs it, for `hpopt status`) and the first heartbeat
    are written with the trial.

    Because claims are serialized, the time the lock is held bounds the fleet's trials/s, and
    with many workers on few cores every round trip inside it waits for a CPU. So the statements
    go as multi-statement batches (the connection's CLIENT.MULTI_STATEMENTS, see
    `engine_options`): lock + count in one round trip, and a fresh trial's rows + COMMIT in a
    second; only a queued retry (rare) takes a few more.
    """
    import json

    from optuna.distributions import distribution_to_json, json_to_distribution

    from hpopt.budget import may_start, tally_counts

    backend = _mysql_backend(storage)
    assert backend is not None, "claim_trial needs MariaDB/MySQL (see atomic_claims)"
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # Optuna 5 stores naive UTC
    trials, trial_params = models.TrialModel.__tablename__, models.TrialParamModel.__tablename__
    raw = backend.engine.raw_connection()
    try:
        cursor = raw.cursor()
        counts = {TrialState[state]: n for state, n in _batch(
            cursor, f"SELECT study_id FROM {models.StudyModel.__tablename__} WHERE study_id = %s FOR UPDATE; "
                    f"SELECT state, COUNT(*) FROM {trials} WHERE study_id = %s GROUP BY state", (study_id, study_id))}
        if not may_start(tally_counts(counts), budget):
            raw.rollback()
            return Claim(None, counts)
        # the claimed trial's first heartbeat and user attrs (upserted: a retry carries its failed
        # trial's), then COMMIT; the trial's id is in @hpopt_trial
        tail = f"INSERT INTO {models.TrialHeartbeatModel.__tablename__} (trial_id, heartbeat) VALUES (@hpopt_trial, NOW()); "
        tail_args: list[Any] = []
        if user_attrs:
            tail += (f"INSERT INTO {models.TrialUserAttributeModel.__tablename__} (trial_id, `key`, value_json) VALUES "
                     + ", ".join(["(@hpopt_trial, %s, %s)"] * len(user_attrs))
                     + " ON DUPLICATE KEY UPDATE value_json = VALUES(value_json); ")
            tail_args = [x for k, v in user_attrs.items() for x in (k, json.dumps(v))]
        tail += "COMMIT"
        if counts.get(TrialState.WAITING):
            trial_id, number = _batch(cursor, f"SELECT trial_id, number FROM {trials} WHERE study_id = %s AND "
                                              "state = 'WAITING' ORDER BY trial_id LIMIT 1", (study_id,))[0]
            params = {name: json_to_distribution(dist).to_external_repr(value) for name, value, dist in _batch(
                cursor, f"UPDATE {trials} SET state = 'RUNNING', datetime_start = %s WHERE trial_id = %s; "
                        f"SELECT param_name, param_value, distribution_json FROM {trial_params} WHERE trial_id = %s",
                (now, trial_id, trial_id))}
            _batch(cursor, "SET @hpopt_trial = %s; " + tail, [trial_id, *tail_args])
            return Claim(Claimed(trial_id, number, params, retry=True), counts)
        number = sum(counts.values())
        sql = (f"INSERT INTO {trials} (number, study_id, state, datetime_start) VALUES (%s, %s, 'RUNNING', %s); "
               "SET @hpopt_trial = LAST_INSERT_ID(); ")
        args: list[Any] = [number, study_id, now]
        if params:
            sql += (f"INSERT INTO {trial_params} (trial_id, param_name, param_value, distribution_json) VALUES "
                    + ", ".join(["(@hpopt_trial, %s, %s, %s)"] * len(params)) + "; ")
            args += [x for name, value in params.items() for x in (
                name, distributions[name].to_internal_repr(value), distribution_to_json(distributions[name]))]
        (trial_id,), = _batch(cursor, sql + tail + "; SELECT @hpopt_trial", args + tail_args)
        return Claim(Claimed(int(trial_id), number, params, retry=False), counts)
    except BaseException:
        with contextlib.suppress(Exception):  # a dead connection cannot roll back; the server does
            raw.rollback()
        raise
    finally:
        raw.close()


def _batch(cursor: Any, sql: str, args: Any) -> list[tuple[Any, ...]]:
    """Run `;`-separated statements in one round trip; the rows of the last one that has rows."""
    cursor.execute(sql, args)
    rows: list[tuple[Any, ...]] = []
    while True:
        if cursor.description:
            rows = list(cursor.fetchall())
        if not cursor.nextset():
            return rows


def atomic_claims(storage: BaseStorage) -> bool:
    """Whether `claim_trial` works here: the budget check and trial creation in one transaction."""
    return _mysql_backend(storage) is not None


def finish_trial(storage: BaseStorage, trial_id: int, state: TrialState, value: float | None,
                 attrs: dict[str, Any]) -> bool:
    """Store user attrs, value and final state at once; False if the trial is no longer RUNNING
    (it was reaped as stale while this worker could not reach the DB)."""
    backend = _mysql_backend(storage)
    if backend is None:
        try:
            for key, attr in attrs.items():
                storage.set_trial_user_attr(trial_id, key, attr)
            storage.set_trial_state_values(trial_id, state=state, values=None if value is None else [value])
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True
    import sqlalchemy as sa

    trials = models.TrialModel.__table__
    with backend.engine.begin() as conn:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        claimed = conn.execute(sa.update(trials).where(trials.c.trial_id == trial_id,
                                                       trials.c.state == TrialState.RUNNING)
                               .values(state=state, datetime_complete=now)).rowcount
        if not claimed:
            return False
        if value is not None:
            stored, kind = models.TrialValueModel.value_to_stored_repr(value)
            conn.execute(sa.insert(models.TrialValueModel.__table__).values(
                trial_id=trial_id, objective=0, value=stored, value_type=kind))
        _upsert_user_attrs(conn, trial_id, attrs)
    return True


def _upsert_user_attrs(conn: Any, trial_id: int, attrs: dict[str, Any]) -> None:
    """Insert or overwrite a trial's user attrs inside a MariaDB transaction (JSON, like Optuna)."""
    if not attrs:
        return
    import json

    from sqlalchemy.dialects.mysql import insert

    stmt = insert(models.TrialUserAttributeModel.__table__)  # rows as parameters: compiled once, cached
    conn.execute(stmt.on_duplicate_key_update(value_json=stmt.inserted.value_json),
                 [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])


def fail_and_requeue(study: optuna.Study, trial_id: int, attrs: dict[str, Any], max_retry: int | None) -> bool:
    """Fail a RUNNING trial (stale or abandoned) and queue a WAITING copy with its parameters, as
    Optuna's RetryHeartbeatStaleTrialCallback does (system attrs `failed_trial`, `retry_history`;
    no copy past `max_retry`). False if the trial was no longer RUNNING.

    On MariaDB both happen in one transaction. In two steps (Optuna's way), a worker counting
    trials between them sees a free slot and no retry, starts a fresh trial in the slot, and the
    retry queued a moment later is left WAITING when the fleet finishes the budget without it.
    """
    storage = study._storage
    backend = _mysql_backend(storage)
    if backend is None:
        if not finish_trial(storage, trial_id, TrialState.FAIL, None, attrs):
            return False
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, storage.get_trial(trial_id))
        return True
    import json

    import sqlalchemy as sa

    trials, studies = models.TrialModel.__table__, models.StudyModel.__table__
    params, user, system = (models.TrialParamModel.__table__, models.TrialUserAttributeModel.__table__,
                            models.TrialSystemAttributeModel.__table__)
    with backend.engine.begin() as conn:
        study_id, number = conn.execute(sa.select(trials.c.study_id, trials.c.number)
                                        .where(trials.c.trial_id == trial_id)).one()
        conn.execute(sa.select(studies.c.study_id).where(studies.c.study_id == study_id).with_for_update())
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        claimed = conn.execute(sa.update(trials).where(trials.c.trial_id == trial_id,
                                                       trials.c.state == TrialState.RUNNING)
                               .values(state=TrialState.FAIL, datetime_complete=now)).rowcount
        if not claimed:
            return False
        _upsert_user_attrs(conn, trial_id, attrs)
        sys_attrs = {k: json.loads(v) for k, v in conn.execute(
            sa.select(system.c.key, system.c.value_json).where(system.c.trial_id == trial_id))}
        sys_attrs = {"failed_trial": number, "retry_history": [], **sys_attrs}
        sys_attrs["retry_history"] = [*sys_attrs["retry_history"], number]
        if max_retry is not None and len(sys_attrs["retry_history"]) > max_retry:
            return True
        retry_id = conn.execute(sa.insert(trials).values(study_id=study_id, state=TrialState.WAITING,
                                                         datetime_start=None)).inserted_primary_key[0]
        retry_number = conn.execute(sa.select(sa.func.count(trials.c.trial_id)).where(
            trials.c.study_id == study_id, trials.c.trial_id < retry_id)).scalar_one()
        conn.execute(sa.update(trials).where(trials.c.trial_id == retry_id).values(number=retry_number))
        for table, columns in ((params, ("param_name", "param_value", "distribution_json")),
                               (user, ("key", "value_json"))):
            conn.execute(sa.insert(table).from_select(
                ["trial_id", *columns],
                sa.select(sa.literal(retry_id), *(table.c[c] for c in columns)).where(table.c.trial_id == trial_id)))
        conn.execute(sa.insert(system), [{"trial_id": retry_id, "key": k, "value_json": json.dumps(v)}
                                         for k, v in sys_attrs.items()])
    return True


def withdraw(storage: BaseStorage, trial_id: int, attrs: dict[str, Any]) -> bool:
    """Take a WAITING trial out of the queue as FAIL with `attrs`; False if a worker popped it first."""
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return finish_trial(storage, trial_id, TrialState.FAIL, None, attrs)


def count_states(storage: BaseStorage, study_id: int) -> dict[TrialState, int] | None:
    """Trials per state in one `GROUP BY` query on MariaDB (None elsewhere: read the trials)."""
    backend = _mysql_backend(storage)
    if backend is None:
        return None
    import sqlalchemy as sa

    trials = models.TrialModel.__table__
    with backend.engine.begin() as conn:  # begin: committed, so no read view outlives the query
        rows = conn.execute(sa.select(trials.c.state, sa.func.count()).where(trials.c.study_id == study_id)
                            .group_by(trials.c.state)).all()
    return {state: n for state, n in rows}


def trial_number(storage: BaseStorage, trial_id: int) -> int:
    """A new trial's number without a DB round trip when Optuna's RDB cache already knows it."""
    cached = getattr(storage, "_trial_id_to_study_id_and_number", {}).get(trial_id)
    return cached[1] if cached else storage.get_trial(trial_id).number
