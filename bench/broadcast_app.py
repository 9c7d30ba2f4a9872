"""The baseline for bench/fanout.py: a bare Starlette WebSocket broadcast.

Same framework, server and WebSocket implementation as the hub. The first frame of a
socket (its `hello`) is answered with one small frame and the socket joins the room;
every later frame is sent, as is, to every socket in the room. No storage, no ordering,
no per-socket queue: the floor for fan-out through this stack on this machine.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

_room: set[WebSocket] = set()


async def broadcast(ws: WebSocket) -> None:
    await ws.accept()
    try:
        await ws.receive_bytes()
        await ws.send_bytes(b"\x81\xa4type\xa7welcome")
        _room.add(ws)
        while True:
            data = await ws.receive_bytes()
            for peer in list(_room):
                try:
                    await peer.send_bytes(data)
                except Exception:
                    _room.discard(peer)
    except WebSocketDisconnect:
        pass
    finally:
        _room.discard(ws)


app = Starlette(routes=[WebSocketRoute("/v1/ws", broadcast)])
