"""Connection pools: every pool the hub opens is made here, with the same settings."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg

from .errors import is_outage

_log = logging.getLogger(__name__)

# How hub connections show in pg_stat_activity (a restore refuses to run while any do).
APPLICATION_NAME = "hoomi-hub"


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        connect=connect,
        # Fail fast when PostgreSQL is unreachable so sends get `unavailable` quickly.
        timeout=10,
        command_timeout=30,
        server_settings={"application_name": APPLICATION_NAME},
    )
    assert pool is not None
    return pool


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
    tasks = [asyncio.ensure_future(_connect_one(d, **kwargs)) for d in hosts]
    errors: list[BaseException] = []
    winner: asyncpg.Connection | None = None
    try:
        pending = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    errors.append(exc)
                elif winner is None:
                    winner = task.result()
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:  # a second writable host (split brain) or a late one
            if task.done() and not task.cancelled() and task.exception() is None:
                if task.result() is not winner:
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
