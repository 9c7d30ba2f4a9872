"""A bare protocol-v1 peer for tests: real WebSocket, real msgpack, no SDK conveniences,
so tests can send exactly the frames (good or bad) they mean to."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import httpx
import msgpack
import websockets
from websockets.asyncio.client import ClientConnection

from hoomi_protocol import Hello, MessageBody, Send, Welcome, decode_server, encode_client
from server.testing.inprocess import InProcessReplica
from server.testing.replica import ADMIN_TOKEN, Replica

TIMEOUT = 10.0


class Peer:
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, url: str) -> Peer:
        # max_queue=None: a test that stops reading must not stall the closing handshake.
        return cls(await websockets.connect(url, max_size=2**22, open_timeout=TIMEOUT,
                                            max_queue=None))

    async def send(self, frame: Any) -> None:
        await self.conn.send(encode_client(frame))

    async def send_raw(self, data: bytes | str) -> None:
        await self.conn.send(data)

    async def send_map(self, m: dict[str, Any]) -> None:
        await self.conn.send(msgpack.packb(m, use_bin_type=True))

    async def recv(self, timeout: float = TIMEOUT) -> Any:
        data = await asyncio.wait_for(self.conn.recv(), timeout)
        assert isinstance(data, bytes), "frames must be binary"
        return decode_server(data)

    async def recv_until(self, kind: type, timeout: float = TIMEOUT) -> tuple[Any, list[Any]]:
        """The first frame of `kind`, and the frames that came before it."""
        before = []
        while True:
            frame = await self.recv(timeout)
            if isinstance(frame, kind):
                return frame, before
            before.append(frame)

    async def closed(self, timeout: float = TIMEOUT) -> tuple[int, list[Any]]:
        """Read until the server closes; returns (close code, frames read)."""
        frames = []
        try:
            while True:
                data = await asyncio.wait_for(self.conn.recv(), timeout)
                frames.append(decode_server(data))
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return exc.rcvd.code, frames

    async def close(self) -> None:
        await self.conn.close()


def send(hoomi: UUID, ref: int | str | None = None, body: bytes | None = None,
         cmid: UUID | None = None) -> Send:
    return Send(hoomi_id=hoomi, client_msg_id=cmid or uuid4(), content=body or os.urandom(32),
                nonce=os.urandom(12), session_id="s1", ref=ref)


async def joined(url: str, token: str, resume: dict[UUID, int] | None = None
                 ) -> tuple[Peer, Welcome]:
    peer = await Peer.connect(url)
    await peer.send(Hello(token=token, resume=resume or {}))
    welcome = await peer.recv()
    assert isinstance(welcome, Welcome), welcome
    return peer, welcome


async def messages(peer: Peer, n: int, hoomi: UUID | None = None) -> list[MessageBody]:
    got: list[MessageBody] = []
    while len(got) < n:
        frame = await peer.recv()
        if isinstance(frame, MessageBody) and (hoomi is None or frame.hoomi_id == hoomi):
            got.append(frame)
    return got


class Admin:
    """The operator API over real HTTP."""

    def __init__(self, base: str) -> None:
        self.http = httpx.AsyncClient(base_url=base, timeout=TIMEOUT,
                                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    async def user(self) -> UUID:
        r = await self.http.post("/v1/admin/users", json={})
        assert r.status_code == 201, r.text
        return UUID(r.json()["id"])

    async def hoomi(self, admins: list[UUID], members: list[UUID] = ()) -> UUID:  # type: ignore[assignment]
        roster = [{"user_id": str(u), "role": "admin"} for u in admins]
        roster += [{"user_id": str(u), "role": "member"} for u in members]
        r = await self.http.post("/v1/admin/hoomis", json={"members": roster})
        assert r.status_code == 201, r.text
        return UUID(r.json()["id"])

    async def token(self, user_id: UUID, ttl: int = 3600) -> str:
        r = await self.http.post("/v1/admin/tokens", json={"user_id": str(user_id),
                                                          "ttl_seconds": ttl})
        assert r.status_code == 200, r.text
        return str(r.json()["token"])

    async def close(self) -> None:
        await self.http.aclose()


@asynccontextmanager
async def own_replica(dsn: str, redis_url: str | None, name: str, *, process: bool = False,
                      **env: str) -> AsyncIterator[tuple[Any, Admin]]:
    """A replica started with its own settings for one test, and an operator client on
    it; both stopped afterwards. In this event loop (`InProcessReplica`), or with
    `process=True` a `hoomi serve` process (`Replica`: for a test that kills it, or reads
    its RSS or file descriptors)."""
    replica: Any
    if process:
        replica = Replica(dsn, redis_url, name=name, **env).start()
    else:
        replica = await InProcessReplica(dsn, redis_url, name=name, **env).start()
    admin = Admin(replica.http)
    try:
        yield replica, admin
    finally:
        await admin.close()
        if process:
            replica.stop()
        else:
            await replica.stop()
