"""Questions asked of a running server through pymysql, as the application user.

Readiness means a real query works as the app user, not merely that the port is open: a server
that answers "access denied" is up but not yet configured, and workers would fail against it.
`KeptProbe` asks the same facts over one connection kept between calls (`hpopt status --watch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pymysql

from hpopt.db.endpoint import Credentials, Endpoint

# MySQL error codes that prove a server answered (it refused us) rather than nobody listening.
SERVER_ANSWERED = {1045, 1130, 1044, 1049}


class ProbeError(Exception):
    """The server did not answer the query; `answered` tells a live-but-refusing server apart."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


@dataclass
class ServerFacts:
    rtt_ms: float
    connections: int | None = None
    studies: list[dict[str, Any]] = field(default_factory=list)


def connect(endpoint: Endpoint, creds: Credentials, timeout_s: float = 5.0) -> pymysql.connections.Connection:
    """One connection as the app user; failures become a ProbeError naming the address."""
    try:
        # autocommit: a connection kept open must not read every refresh from one old snapshot
        return pymysql.connect(host=endpoint.host, port=endpoint.port, user=creds.user, password=creds.password,
                               database=creds.schema, connect_timeout=timeout_s, read_timeout=timeout_s,
                               write_timeout=timeout_s, autocommit=True)
    except pymysql.err.MySQLError as exc:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        text = exc.args[1] if len(exc.args) > 1 else str(exc)
        raise ProbeError(f"{endpoint.address}: {text}", answered=code in SERVER_ANSWERED) from None


def ping(endpoint: Endpoint, creds: Credentials, timeout_s: float = 5.0) -> float:
    """Round trip of `SELECT 1` in milliseconds (readiness check of `db start`)."""
    conn = connect(endpoint, creds, timeout_s)
    try:
        return _select_one(conn)
    finally:
        conn.close()


def _select_one(conn: pymysql.connections.Connection) -> float:
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        if cur.fetchone() != (1,):
            raise ProbeError("SELECT 1 returned something else")
    return (time.perf_counter() - t0) * 1000.0


def facts(endpoint: Endpoint, creds: Credentials, timeout_s: float = 5.0) -> ServerFacts:
    """Round trip, open connections, and trial counts per study, over a connection of its own."""
    conn = connect(endpoint, creds, timeout_s)
    try:
        return _ask_facts(conn, endpoint)
    finally:
        conn.close()


def _ask_facts(conn: pymysql.connections.Connection, endpoint: Endpoint) -> ServerFacts:
    """The facts from Optuna's tables (if any); any server error becomes a ProbeError."""
    try:
        out = ServerFacts(rtt_ms=_select_one(conn))
        with conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
            row = cur.fetchone()
            out.connections = int(row[1]) if row else None
            cur.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() "
                        "AND table_name IN ('studies', 'trials')")
            if cur.fetchone()[0] == 2:
                cur.execute("SELECT s.study_name, t.state, COUNT(t.trial_id) FROM studies s "
                            "LEFT JOIN trials t ON t.study_id = s.study_id "
                            "GROUP BY s.study_name, t.state ORDER BY s.study_name")
                by_study: dict[str, dict[str, int]] = {}
                for name, state, count in cur.fetchall():
                    counts = by_study.setdefault(name, {})
                    if state is not None:
                        counts[str(state)] = int(count)
                out.studies = [{"name": n, "trials_by_state": c} for n, c in by_study.items()]
        return out
    except pymysql.err.MySQLError as exc:
        raise ProbeError(f"{endpoint.address}: {exc}") from None


class KeptProbe:
    """`facts` over one connection kept open between calls, for `hpopt status --watch`.

    Connecting (TCP, authentication) costs more than the probe's queries, so a watch reconnects only
    when it must: when the endpoint it is given moved (the DB job renewed itself on another node or
    port; callers read the endpoint file each time) or when the kept connection fails (the server
    restarted, or closed an idle connection). `close` hangs up; the probe can be used again after.
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._conn: pymysql.connections.Connection | None = None
        self._address = ""

    def facts(self, endpoint: Endpoint, creds: Credentials) -> ServerFacts:
        if self._conn is not None and self._address == endpoint.address:
            try:
                return _ask_facts(self._conn, endpoint)
            except ProbeError:
                pass  # dropped: one fresh connection below decides whether the server answers
        self.close()
        self._conn = connect(endpoint, creds, self.timeout_s)
        self._address = endpoint.address
        return _ask_facts(self._conn, endpoint)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()  # sends QUIT if it can; never raises for a dead server
            self._conn = None
