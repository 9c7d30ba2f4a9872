"""What the benchmarks share: a database to run on (embedded unless DATABASE_URL is set)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import uuid4

import asyncpg

from storage.embedded import start_embedded
from storage.migrate import migrate


@asynccontextmanager
async def fresh_database(*, migrated: bool = True) -> AsyncIterator[str]:
    """A new database, migrated unless `migrated` is False (a replica started on it then
    applies its own code's migrations); dropped afterwards. Yields its DSN."""
    base = os.environ.get("DATABASE_URL")
    server = None
    tmp = None
    if base is None:
        tmp = tempfile.TemporaryDirectory(prefix="hoomi-bench-")
        server = start_embedded(Path(tmp.name))
        base = server.dsn
    name = f"bench_{uuid4().hex[:8]}"
    admin = await asyncpg.connect(base)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = _with_database(base, name) if server is None else server._handle.get_uri(database=name)
    try:
        if migrated:
            conn = await asyncpg.connect(dsn)
            await migrate(conn)
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()


def _with_database(dsn: str, name: str) -> str:
    head, _, tail = dsn.partition("?")
    head = head.rsplit("/", 1)[0] + "/" + name
    return head + ("?" + tail if tail else "")
