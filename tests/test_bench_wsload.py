"""bench/wsload.py, the load generator's WebSocket client, against the `websockets`
library's server over a real loopback socket: every frame it sends must pass a strict
RFC 6455 peer (masked, lengths in all three encodings), and it must read what a server
may send it (fragments, pings, the close handshake)."""

from __future__ import annotations

import asyncio
import random

from websockets.asyncio.server import ServerConnection, serve

from bench import wsload


async def test_lean_client_speaks_rfc6455_to_a_strict_server() -> None:
    received: list[bytes] = []
    pinged = asyncio.Event()
    ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            assert isinstance(message, bytes)
            received.append(message)
            if message == b"fragments":
                await ws.send([b"frag", b"ments", b" joined"])  # three frames
            elif message == b"ping":
                pong = await ws.ping(b"are you there")
                await asyncio.wait_for(pong, 5)
                pinged.set()
                await ws.send(b"ponged")
            else:
                await ws.send(message)
        ended.set_result(ws.close_code)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=2**20) as server:
        port = server.sockets[0].getsockname()[1]
        sock = await wsload.connect(f"ws://127.0.0.1:{port}/v1/ws", random.Random(1))
        # Before `listen`: messages are kept for recv(), in order...
        sock.send(b"first reply")
        sock.send(b"kept for the callback")
        assert await asyncio.wait_for(sock.recv(), 5) == b"first reply"
        async with asyncio.timeout(5):
            while not sock._kept:  # the second has come back, not read
                await asyncio.sleep(0.01)
        got: asyncio.Queue[bytes] = asyncio.Queue()
        sock.listen(got.put_nowait)  # ...and the callback gets what was not read first
        assert got.get_nowait() == b"kept for the callback"
        # 7-bit, 16-bit and 64-bit payload lengths, each masked with its own key.
        for payload in (b"x" * 100, bytes(range(256)) * 4, b"\x01" * 70_000):
            sock.send(payload)
            assert await asyncio.wait_for(got.get(), 5) == payload
        sock.send(b"fragments")
        assert await asyncio.wait_for(got.get(), 5) == b"fragments joined"
        sock.send(b"ping")
        assert await asyncio.wait_for(got.get(), 5) == b"ponged"
        assert pinged.is_set()
        await sock.close()
        assert await asyncio.wait_for(ended, 5) == 1000  # the server saw our close
        assert sock.closed.done() and sock.error is None
    assert received[:5] == [b"first reply", b"kept for the callback", b"x" * 100,
                            bytes(range(256)) * 4, b"\x01" * 70_000]


async def test_lean_client_refuses_a_server_that_does_not_upgrade() -> None:
    async def not_websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_websocket, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        try:
            await wsload.connect(f"ws://127.0.0.1:{port}/v1/ws", random.Random(2))
        except ConnectionError as exc:
            assert "404" in str(exc)
        else:
            raise AssertionError("connected to a server that answered 404")
