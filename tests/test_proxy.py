"""server/testing/proxy.py: the fault proxy forwards real PostgreSQL and Valkey traffic, and
its faults are what a client of those servers sees when the network or the host fails."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest
import redis.asyncio as aioredis

from server.testing.proxy import FaultProxy


@pytest.fixture
async def pg_proxy(pg_template):
    proxy = await FaultProxy.in_front_of(pg_template.dsn).start()
    yield proxy
    await proxy.close()


async def test_forwards_postgresql_and_drop_resets_open_connections(pg_template, pg_proxy):
    conn = await asyncpg.connect(pg_proxy.url(pg_template.dsn))
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
        assert pg_proxy.connections == 1
        (link,) = pg_proxy._links
        client_side = link.ends[0].get_extra_info("socket")  # else ~40 ms per round trip
        assert client_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await pg_proxy.drop()
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
            await conn.fetchval("SELECT 1", timeout=5)
    finally:
        conn.terminate()
    # Only the open connections went: a new one gets through.
    again = await asyncpg.connect(pg_proxy.url(pg_template.dsn))
    assert await again.fetchval("SELECT 1") == 1
    await again.close()
    assert pg_proxy.accepted == 2


async def test_refuse_keeps_open_connections_and_resume_listens_on_the_same_port(valkey):
    proxy = await FaultProxy.in_front_of(valkey.url).start()
    url = proxy.url(valkey.url)
    port = proxy.port
    open_client = aioredis.Redis.from_url(url)
    try:
        assert await open_client.ping()
        await proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        assert await open_client.ping()  # refusing new ones leaves this one alone
        await proxy.cut()
        assert proxy.connections == 0
        await proxy.resume()
        assert proxy.port == port
        fresh = aioredis.Redis.from_url(url)
        assert await fresh.ping()
        await fresh.aclose()
    finally:
        await open_client.aclose()
        await proxy.close()
