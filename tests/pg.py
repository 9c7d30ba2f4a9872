"""Test harness for a real PostgreSQL: one embedded server per test session, a fresh
database per test cloned from a migrated template (CREATE DATABASE ... TEMPLATE is a file
copy: a few ms, versus re-running migrations)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from storage.embedded import EmbeddedPostgres, start_embedded
from storage.migrate import migrate

TEMPLATE = "hoomi_template"
_counter = itertools.count(1)


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
