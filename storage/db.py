"""Connection pools: every pool the hub opens is made here, with the same settings."""

from __future__ import annotations

import asyncpg

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
