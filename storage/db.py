"""Connection pools: every pool the hub opens is made here, with the same settings."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from .errors import is_outage

_log = logging.getLogger(__name__)

# How hub connections show in pg_stat_activity (a restore refuses to run while any do).
APPLICATION_NAME = "hoomi-hub"


# A pool on several hosts checks which one is the primary this often (_FollowingPool).
FOLLOW_INTERVAL_S = 1.0
_POOL_SETTINGS: dict[str, Any] = {
    # Fail fast when PostgreSQL is unreachable so sends get `unavailable` quickly.
    "timeout": 10,
    "command_timeout": 30,
    "server_settings": {"application_name": APPLICATION_NAME},
}


# True while `stateless` gives a connection back after its block ran to the end.
_STATELESS_RELEASE: ContextVar[bool] = ContextVar("hoomi_stateless_release", default=False)


async def _reset(conn: asyncpg.Connection) -> None:
    """Every pool's reset when a connection goes back (asyncpg has already rolled back an
    open transaction): asyncpg's own reset query (advisory locks, cursors, LISTEN,
    settings), except for a connection `stateless` lent, which holds nothing to undo."""
    if _STATELESS_RELEASE.get():
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


@asynccontextmanager
async def stateless(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection from `pool` for statements that leave no session state behind (plain
    SELECTs: no SET, no advisory lock, no LISTEN, no cursor or transaction left open),
    given back without asyncpg's reset, a second round trip (four statements) per use:
    16 % of the hub's CPU per history page (bench/RESULTS.md). A block that raises is
    reset as usual."""
    conn = await pool.acquire()
    clean = False
    try:
        yield conn
        clean = True
    finally:
        # The pool releases in a task of its own, which copies this context.
        token = _STATELESS_RELEASE.set(clean)
        try:
            await pool.release(conn)
        finally:
            _STATELESS_RELEASE.reset(token)


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10,
                      connection_class: type[asyncpg.Connection] = asyncpg.Connection
                      ) -> asyncpg.Pool:
    """`connection_class`: for tests and benches that count statements
    (server/testing/counting.py) on a pool made as the hub makes its own."""
    hosts = _single_host_dsns(dsn)
    if len(hosts) > 1:
        pool: asyncpg.Pool = await _FollowingPool(
            dsn, hosts=hosts, min_size=min_size, max_size=max_size,
            connection_class=connection_class, **_POOL_SETTINGS)
        return pool
    made = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     reset=_reset, connection_class=connection_class,
                                     **_POOL_SETTINGS)
    assert made is not None
    return made


# Where a multi-host DATABASE_URL asks for the primary, every host is tried at once.
_WRITABLE = {"read-write", "primary"}


class NoWritableServer(ConnectionError):
    """No host of a multi-host DSN is a writable primary now (mid-switchover, say): an
    outage like a refused connection (is_outage), so callers answer `unavailable`."""


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect, but a multi-host DSN that asks for the primary
    (`target_session_attrs=read-write`, as after a Patroni failover) tries all its hosts
    at once and takes the one that is writable.

    asyncpg tries the hosts one after another under one overall timeout, so a host that
    hangs (a frozen or partitioned old leader: TCP accepts, PostgreSQL never answers)
    would use the whole timeout and the new primary behind it would never be reached.
    """
    hosts = _single_host_dsns(dsn)
    if len(hosts) <= 1:
        return await _connect_one(dsn, **kwargs)
    conn, _ = await _connect_any(hosts, **kwargs)
    return conn


async def _connect_any(hosts: list[str], **kwargs: Any) -> tuple[asyncpg.Connection, str]:
    """The first writable host of `hosts` (single-host DSNs), tried at once: the
    connection and the DSN it came from."""
    tasks = {asyncio.ensure_future(_connect_one(d, **kwargs)): d for d in hosts}
    errors: list[BaseException] = []
    winner: tuple[asyncpg.Connection, str] | None = None
    try:
        pending = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    errors.append(exc)
                elif winner is None:
                    winner = (task.result(), tasks[task])
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:  # a second writable host (split brain) or a late one
            if task.done() and not task.cancelled() and task.exception() is None:
                if winner is None or task.result() is not winner[0]:
                    task.result().terminate()
    if winner is not None:
        return winner
    # A refusal or timeout says more than "not writable" from a standby that answered.
    errors.sort(key=lambda e: isinstance(e, NoWritableServer))
    raise errors[0]


async def _connect_one(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except asyncpg.exceptions.TargetServerAttributeNotMatched as exc:
        raise NoWritableServer(str(exc)) from None


def _single_host_dsns(dsn: str) -> list[str]:
    """One DSN per host of a URL-form multi-host DSN asking for the primary; else []."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return []
    query = dict(parse_qsl(parts.query))
    if parts.scheme not in ("postgres", "postgresql") or \
            query.get("target_session_attrs") not in _WRITABLE:
        return []
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    hosts = [h for h in hostlist.split(",") if h]
    if len(hosts) <= 1:
        return []
    prefix = f"{userinfo}@" if userinfo else ""
    return [urlunsplit((parts.scheme, prefix + h, parts.path, parts.query, parts.fragment))
            for h in hosts]


def _any_session(dsn: str) -> str:
    """The same single-host DSN without target_session_attrs: a standby answers too."""
    parts = urlsplit(dsn)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query)
                       if k != "target_session_attrs"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class _FollowingPool(asyncpg.Pool):
    """A pool on several hosts that follows the primary.

    New connections go to whichever host is writable (`_connect_any`). That alone does
    not move the connections the pool already holds: after a failover whose old leader
    hangs instead of dying (frozen, partitioned: TCP still accepted, no answer) they sit
    on it until command_timeout, then again for the ROLLBACK: 60 s after the hang, 38 s
    after Patroni promoted the standby (measured by bench/ha.py's freeze). So every
    FOLLOW_INTERVAL_S the pool asks each host (one small connection each, bounded by a
    timeout) whether it is in recovery; when exactly one host is writable and some of
    the pool's connections are elsewhere, those are terminated: their statements fail
    at once as an outage, the writer settles and its clients retry on the new primary.
    Two writable hosts (an old leader not yet demoted) or none: nothing is done.
    """

    def __init__(self, dsn: str, *, hosts: list[str],
                 connection_class: type[asyncpg.Connection] = asyncpg.Connection,
                 **kwargs: Any) -> None:
        self._follow_hosts = hosts
        self._host_of: weakref.WeakKeyDictionary[asyncpg.Connection, str] = \
            weakref.WeakKeyDictionary()
        self._follower: asyncio.Task[None] | None = None
        super().__init__(
            dsn, connect=self._connect_tracked, max_queries=50000,
            max_inactive_connection_lifetime=300.0, setup=None, init=None, reset=_reset,
            loop=None, connection_class=connection_class, record_class=asyncpg.Record,
            **kwargs)

    async def _async__init__(self) -> _FollowingPool:  # type: ignore[override]
        await super()._async__init__()
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        return self

    async def _connect_tracked(self, dsn: str, **kwargs: Any) -> asyncpg.Connection:
        conn, host = await _connect_any(self._follow_hosts, **kwargs)
        self._host_of[conn] = host
        return conn

    async def close(self) -> None:
        self._stop_following()
        await super().close()

    def terminate(self) -> None:
        self._stop_following()
        super().terminate()

    def _stop_following(self) -> None:
        if self._follower is not None:
            self._follower.cancel()

    async def _follow(self) -> None:
        probes: dict[str, asyncpg.Connection] = {}
        try:
            while not self.is_closing():
                await asyncio.sleep(FOLLOW_INTERVAL_S)
                writable = await asyncio.gather(*(self._probe(probes, h)
                                                  for h in self._follow_hosts))
                primaries = [h for h, w in zip(self._follow_hosts, writable, strict=True)
                             if w]
                if len(primaries) != 1:
                    continue
                stale = [c for c, h in list(self._host_of.items())
                         if h != primaries[0] and not c.is_closed()]
                if stale:
                    _log.warning("PostgreSQL primary is now %s: dropping %d connection(s) "
                                 "to the old one", where(primaries[0]), len(stale))
                    for c in stale:
                        c.terminate()
        finally:
            for c in probes.values():
                c.terminate()

    async def _probe(self, probes: dict[str, asyncpg.Connection], host: str) -> bool:
        """True if `host` answers that it is not in recovery (a primary)."""
        wait = FOLLOW_INTERVAL_S  # a round takes at most two intervals
        conn = probes.get(host)
        try:
            if conn is None or conn.is_closed():
                conn = probes[host] = await asyncpg.connect(
                    _any_session(host), timeout=wait,
                    server_settings={"application_name": APPLICATION_NAME})
            return not await conn.fetchval("SELECT pg_is_in_recovery()", timeout=wait)
        except asyncio.CancelledError:
            raise
        except Exception:  # down, hung, refusing: not the primary as far as we know
            gone = probes.pop(host, None)
            if gone is not None:
                gone.terminate()
            return False


class DatabaseUnreachable(Exception):
    """PostgreSQL did not answer in time; the message names where, never a password."""


async def wait_for_database(dsn: str, timeout_s: float) -> None:
    """Return once PostgreSQL at `dsn` accepts a connection; retry with backoff for up to
    `timeout_s` (a hub started alongside its database, as compose and Kubernetes do,
    must not fail because it won the race)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            conn = await connect(dsn, timeout=max(1.0, min(10.0, timeout_s)))
        except (OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            left = deadline - time.monotonic()
            if not is_outage(exc) or left <= 0:
                raise DatabaseUnreachable(f"PostgreSQL at {where(dsn)}: {describe(exc)}"
                                          ) from None
            _log.warning("waiting for PostgreSQL at %s: %s", where(dsn), describe(exc))
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)
            continue
        await conn.close()
        return


def where(dsn: str) -> str:
    """host:port/database of a DSN, for messages: no user, no password."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = parts.hostname or query.get("host", "localhost")
    port = parts.port or query.get("port", 5432)
    return f"{host}:{port}{parts.path or '/'}"


def describe(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class WalClock:
    """The primary's WAL position, for read standbys (docs/scaling.md, "Read standbys").

    `now()` answers a position read by a query that *started after* the call: every
    commit acknowledged before the call has its commit record at or below it, so a
    standby that has replayed up to it shows all of them. Callers that arrive while a
    read is in flight share the next one, so the primary answers at most one
    `pg_current_wal_lsn()` per round trip however many pages are asked at once.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._next: asyncio.Future[str] | None = None
        self._reading = False
        self._task: asyncio.Task[None] | None = None

    async def now(self) -> str:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_consume)
            if not self._reading:
                self._reading = True
                self._task = asyncio.get_running_loop().create_task(self._read())
        return await asyncio.shield(self._next)

    async def _read(self) -> None:
        try:
            while (fut := self._next) is not None:
                self._next = None
                try:
                    fut.set_result(await self._pool.fetchval(
                        "SELECT pg_current_wal_lsn()::text"))
                except Exception as exc:
                    fut.set_exception(exc)
        finally:
            self._reading = False


def _consume(fut: asyncio.Future[str]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: every waiter may have gone
