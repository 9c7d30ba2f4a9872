"""The reference client of protocol v1: asyncio, reconnecting, exactly-once sends.

    client = HoomiClient(["ws://127.0.0.1:8000/v1/ws"], token, keyring=ring)
    await client.start()                          # hello (with resume), welcome
    ack = await client.send_text(hoomi_id, b"hi")  # encrypted here, acked after commit
    async for event in client.events():            # message pushes, in seq order per Hoomi
        print(client.open(event).plaintext)

Guarantees:
- `send` returns only with the hub's ack; until then it is retried, on reconnect and on
  `unavailable`/`rate_limited`, under the same client_msg_id, so the hub stores it once.
  With a `state_path` the outbox survives a restart of the client process too.
- `events()` yields each message once, in seq order per Hoomi: the client remembers the
  last seq seen per Hoomi and resumes from it on every reconnect.
- Reconnects use full-jitter exponential backoff across the given URLs (replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import websockets

from protocol import (
    Ack,
    ClientFrame,
    Delete,
    Deleted,
    Error,
    ErrorCode,
    Hello,
    History,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    Send,
    Sync,
    Welcome,
    decode_server,
    encode_client,
)

from .crypto import Opened, decrypt, encrypt
from .keys import Keyring
from .state import ClientState, Outgoing

_log = logging.getLogger(__name__)

Event = MessageBody | Deleted | Membership
RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED}


class HubError(Exception):
    """The hub refused a request; `code` is the protocol error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class Unauthorized(HubError):
    """The token was refused (close 4401): reconnecting will not help."""


class HoomiClient:
    def __init__(self, urls: list[str] | str, token: str, *, keyring: Keyring | None = None,
                 state_path: Path | None = None, backoff_min: float = 0.05,
                 backoff_max: float = 5.0) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.token = token
        self.keyring = keyring
        self.state = ClientState.load(state_path)
        self.user_id: UUID | None = None
        self.welcome: Welcome | None = None
        self._backoff = (backoff_min, backoff_max)
        self._refs = itertools.count(1)
        self._pending: dict[int, tuple[ClientFrame, asyncio.Future[Any]]] = {}
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._closing = False
        self.connects = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout: float = 30) -> Welcome:
        self._task = asyncio.get_running_loop().create_task(self._run())
        waiter = asyncio.ensure_future(self._welcomed.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self._fatal is not None:
                raise self._fatal
            raise TimeoutError("no welcome from the hub")
        assert self.welcome is not None
        # Sends left over from a previous run of this client go out again.
        for out in list(self.state.outbox.values()):
            self._spawn_resend(out)
        return self.welcome

    async def close(self) -> None:
        self._closing = True
        self.state.save()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        attempt = 0
        for url in itertools.cycle(self.urls):
            if self._closing:
                return
            try:
                # No compression: ciphertext is incompressible.
                async with websockets.connect(url, max_queue=None, max_size=2**22,
                                              open_timeout=10, compression=None) as ws:
                    self._ws = ws
                    await self._session(ws)
                    attempt = 0
            except Unauthorized as exc:
                self._fatal = exc
                self._fail_all(exc)
                return
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                _log.info("connection to %s lost: %s", url, exc)
            finally:
                self._ws = None
                self._connected.clear()
            if self._closing:
                return
            attempt += 1
            lo, hi = self._backoff
            await asyncio.sleep(random.uniform(lo, min(hi, lo * 2**attempt)))

    async def _session(self, ws: Any) -> None:
        await ws.send(encode_client(Hello(token=self.token, resume=dict(self.state.last_seq))))
        try:
            first = decode_server(await asyncio.wait_for(ws.recv(), 15))
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4401:
                raise Unauthorized(ErrorCode.UNAUTHORIZED, exc.rcvd.reason) from None
            raise
        if isinstance(first, Error):
            raise Unauthorized(first.code, first.message)
        if not isinstance(first, Welcome):
            raise websockets.WebSocketException(f"expected welcome, got {first}")
        self.welcome, self.user_id = first, first.user_id
        for h in first.hoomis:
            self.state.last_seq.setdefault(h.hoomi_id, h.last_seq)
        self.connects += 1
        self._connected.set()
        self._welcomed.set()
        # Everything not answered on the previous connection is asked again.
        for frame, _ in list(self._pending.values()):
            await ws.send(encode_client(frame))
        try:
            async for data in ws:
                self._dispatch(decode_server(data))
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4401:
                raise Unauthorized(ErrorCode.UNAUTHORIZED, exc.rcvd.reason) from None
            raise

    def _dispatch(self, frame: Any) -> None:
        if isinstance(frame, MessageBody):
            last = self.state.last_seq.get(frame.hoomi_id, 0)
            if frame.seq <= last:
                return  # already seen (e.g. a resume overlapping a push)
            self.state.last_seq[frame.hoomi_id] = frame.seq
            self._events.put_nowait(frame)
            return
        if isinstance(frame, Deleted | Membership):
            self._events.put_nowait(frame)
            return
        ref = getattr(frame, "ref", None)
        if not isinstance(ref, int) or ref not in self._pending:
            return
        entry = self._pending[ref]
        sent, future = entry
        if isinstance(frame, Error) and frame.code in RETRYABLE:
            delay = (frame.retry_after_ms or 1000) / 1000
            asyncio.get_running_loop().call_later(delay, self._resend, ref)
            return
        del self._pending[ref]
        if future.done():
            return
        if isinstance(frame, Error):
            future.set_exception(HubError(frame.code, frame.message))
        else:
            future.set_result(frame)

    def _resend(self, ref: int) -> None:
        entry = self._pending.get(ref)
        if entry is not None and self._ws is not None and self._connected.is_set():
            asyncio.ensure_future(self._ws.send(encode_client(entry[0])))

    def _fail_all(self, exc: BaseException) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    async def _request(self, make: Any) -> Any:
        if self._fatal is not None:
            raise self._fatal
        ref = next(self._refs)
        frame = make(ref)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ref] = (frame, future)
        if self._connected.is_set() and self._ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._ws.send(encode_client(frame))
        return await future

    # -- requests ----------------------------------------------------------------------------

    async def send(self, hoomi_id: UUID, content: bytes, nonce: bytes, session_id: str,
                   client_msg_id: UUID | None = None) -> Ack:
        """Send ciphertext; returns the ack. Retried until acked, never stored twice."""
        out = Outgoing(hoomi_id, client_msg_id or uuid4(), content, nonce, session_id)
        self.state.outbox[out.client_msg_id] = out
        self.state.save()
        return await self._deliver(out)

    async def _deliver(self, out: Outgoing) -> Ack:
        try:
            ack: Ack = await self._request(lambda ref: Send(
                hoomi_id=out.hoomi_id, client_msg_id=out.client_msg_id, content=out.content,
                nonce=out.nonce, session_id=out.session_id, ref=ref))
        except HubError as exc:
            if isinstance(exc, Unauthorized):
                raise  # kept: it goes out once the client has a valid token again
            self.state.outbox.pop(out.client_msg_id, None)  # refused for good
            self.state.save()
            raise
        self.state.outbox.pop(out.client_msg_id, None)
        self.state.save()
        return ack

    def _spawn_resend(self, out: Outgoing) -> None:
        task = asyncio.ensure_future(self._deliver(out))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def send_text(self, hoomi_id: UUID, plaintext: bytes) -> Ack:
        """Encrypt with the Hoomi's current key, then send."""
        if self.keyring is None or self.user_id is None:
            raise RuntimeError("send_text needs a keyring and a started client")
        cmid = uuid4()
        sealed = encrypt(self.keyring.current(hoomi_id), hoomi_id, self.user_id, cmid, plaintext)
        return await self.send(hoomi_id, sealed.content, sealed.nonce, sealed.session_id, cmid)

    def open(self, message: MessageBody) -> Opened:
        """Decrypt a pushed or paged message; DecryptError if it cannot be opened."""
        if self.keyring is None:
            raise RuntimeError("open needs a keyring")
        if message.deleted or message.content is None or message.nonce is None:
            raise ValueError("a deleted message has no content")
        return decrypt(self.keyring, message.hoomi_id, message.sender_id, message.content,
                       message.nonce, message.session_id or "")

    async def history(self, hoomi_id: UUID, before: int | None = None, limit: int = 50) -> Page:
        page: Page = await self._request(
            lambda ref: History(hoomi_id=hoomi_id, before=before, limit=limit, ref=ref))
        return page

    async def scroll(self, hoomi_id: UUID, limit: int = 50) -> AsyncIterator[list[MessageBody]]:
        """Pages from the newest back to the oldest stored message (infinite scroll)."""
        before: int | None = None
        while True:
            page = await self.history(hoomi_id, before, limit)
            if page.messages:
                yield page.messages
            if page.next_before is None:
                return
            before = page.next_before

    async def sync(self, hoomi_id: UUID, after: int, limit: int = 100) -> Page:
        page: Page = await self._request(
            lambda ref: Sync(hoomi_id=hoomi_id, after=after, limit=limit, ref=ref))
        return page

    async def delete(self, hoomi_id: UUID, message_id: UUID) -> Ack:
        ack: Ack = await self._request(
            lambda ref: Delete(hoomi_id=hoomi_id, id=message_id, ref=ref))
        return ack

    async def ping(self) -> Pong:
        pong: Pong = await self._request(lambda ref: Ping(ref=ref))
        return pong

    async def events(self) -> AsyncIterator[Event]:
        """Pushes as they come: messages in seq order per Hoomi, deletions, membership."""
        while True:
            yield await self._events.get()

    async def next_event(self, timeout: float | None = None) -> Event:
        return await asyncio.wait_for(self._events.get(), timeout)
