"""Connection pools: every pool the hub opens is made here, with the same settings."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import parse_qsl, urlsplit

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
        # Fail fast when PostgreSQL is unreachable so sends get `unavailable` quickly.
        timeout=10,
        command_timeout=30,
        server_settings={"application_name": APPLICATION_NAME},
    )
    assert pool is not None
    return pool


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
            conn = await asyncpg.connect(dsn, timeout=max(1.0, min(10.0, timeout_s)))
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
