"""server/testing/inprocess.py: `hoomi serve`'s server in the test's event loop, on a real
port; stopped, it closes its port and can start again on the same one; a replica that
cannot start says why, and only its own log says it."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from server.testing.inprocess import InProcessReplica
from tests.wsclient import Admin


async def test_stop_closes_the_port_and_start_serves_on_it_again(module_dsn, valkey):
    r = await InProcessReplica(module_dsn, valkey.url, name="again").start()
    async with httpx.AsyncClient() as http:
        assert (await http.get(r.http + "/healthz")).status_code == 200
        await r.stop()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", r.port)
        await r.start()
        try:
            admin = Admin(r.http)
            await admin.user()  # the database and the operator API work after a restart
            await admin.close()
        finally:
            await r.stop()


async def test_a_replica_that_cannot_start_raises_with_its_own_log(module_dsn, valkey):
    good = await InProcessReplica(module_dsn, valkey.url, name="good").start()
    try:
        missing = module_dsn.replace("/t_", "/no_such_db_", 1)
        assert missing != module_dsn
        bad = InProcessReplica(missing, valkey.url, name="bad")
        with pytest.raises(RuntimeError, match="replica bad exited") as failed:
            await bad.start()
        assert "no_such_db_" in str(failed.value)
        assert "no_such_db_" not in good.output()
    finally:
        await good.stop()


async def test_its_sockets_have_tcp_nodelay_as_hoomi_serves_do(module_dsn, valkey):
    # Without it each response's last segment waited ~40 ms for the client's delayed ACK.
    r = await InProcessReplica(module_dsn, valkey.url, name="nodelay").start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        (conn,) = r.server.server_state.connections
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
    finally:
        await r.stop()
