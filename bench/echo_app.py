"""The baseline for bench/hub.py: a bare Starlette WebSocket that echoes binary frames.

Same framework, server and WebSocket implementation as the hub, and no work: the ceiling
for one round trip through this stack on this machine.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            await ws.send_bytes(await ws.receive_bytes())
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[WebSocketRoute("/v1/ws", echo)])
