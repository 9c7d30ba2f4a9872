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
  last seq the app consumed per Hoomi (saved with the state, at least every second and
  on close) and resumes from it on every reconnect, so a push queued but not consumed
  before a restart is pushed again.
- The push queue is bounded (`max_events`): while it is full the socket is not read, so
  the hub's backpressure applies (it may close TOO_SLOW; the client then resumes).
- Reconnects use full-jitter exponential backoff across the given URLs (replicas),
  reset once a session is welcomed. What a close means is the close code's own policy
  (`CloseCode.reconnect`): a refused token (`unauthorized`, UNAUTHORIZED) or a close that
  names a client bug (BAD_FRAME, POLICY_VIOLATION) stops the client; when it stops,
  pending requests and `events()` raise instead of waiting forever. The hub closes a
  socket (UNAUTHORIZED) when its token expires: give a
  token source (a callable, sync or async) instead of a fixed token and the client
  fetches a fresh one before every hello, so an expiry is a reconnect and a resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import websockets

from hoomi_protocol import (
    DEFAULT_LIMITS,
    Ack,
    ClientFrame,
    CloseCode,
    Delete,
    Deleted,
    Edit,
    EditAck,
    Edited,
    Error,
    ErrorCode,
    Hello,
    History,
    HoomiError,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    Presence,
    PresenceReply,
    ProtocolError,
    Read,
    ReadAck,
    Receipt,
    Reconnect,
    Reencrypt,
    ReencryptAck,
    ReencryptItem,
    Search,
    Send,
    Sync,
    Typing,
    TypingNotice,
    Welcome,
    decode_server,
    encode_client,
    split_stream,
)
from hoomi_protocol.limits import FRAME_OVERHEAD

from . import search as blind
from .crypto import MAX_CONTENT, NONCE_BYTES, SCHEMES, DecryptError, Opened, decrypt, encrypt
from .keys import Keyring
from .state import ClientState, Outgoing

_log = logging.getLogger(__name__)

Event = MessageBody | Deleted | Membership | Edited | Receipt | TypingNotice
# `typing` frames the client sends per Hoomi: at most one per this many seconds (the hub
# hands on no more anyway).
TYPING_EVERY = 1.0
# How many times a send or edit is sealed again with a fresh nonce after the hub's nonce
# guard refused it (it only can if this client's nonce was used before: a bug or a clone).
NONCE_RETRIES = 3
RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED}
# The largest frame the hub sends is a full page: max_page_limit messages, each at most
# max_frame_bytes (content plus the other fields), plus the page's own fields. A smaller
# bound (it was 4 MiB) makes the client close MESSAGE_TOO_BIG on a page of 100 x 64 KiB.
MAX_INCOMING_BYTES = (DEFAULT_LIMITS.max_page_limit * DEFAULT_LIMITS.max_frame_bytes
                      + FRAME_OVERHEAD)
SAVE_EVERY = 1.0  # seconds: how often consumed seqs are written to the state file


class HubError(HoomiError):
    """The hub refused a request; `code` is the protocol error code (the protocol's one
    error base, as on the hub's side)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class Unauthorized(HubError):
    """The token was refused (close UNAUTHORIZED): reconnecting will not help."""


class Closed(Exception):
    """The client is closed (or its connection loop ended): nothing more will arrive."""


class ResponseTooLarge(Exception):
    """A reply was larger than the client accepts (it closed MESSAGE_TOO_BIG); not asked
    again."""


# How many opened messages HoomiClient.open remembers to recognise a replayed copy.
REPLAY_WINDOW = 10_000

# Where a fresh token comes from: called before every hello (sync or async).
TokenSource = Callable[[], str | Awaitable[str]]


class _Retry(Exception):
    """The hub answered hello with a retryable error: reconnect after `after` seconds."""

    def __init__(self, code: ErrorCode, message: str, after: float) -> None:
        super().__init__(f"{code.value}: {message}")
        self.after = after


def _nonce_refused(exc: HubError) -> bool:
    """The hub's nonce guard said no (SPEC §7.2: `invalid` naming `nonce`)."""
    return exc.code == ErrorCode.INVALID and exc.message.startswith("nonce:")


def _close_code(close: Any) -> CloseCode | None:
    """The protocol's close code of a close frame (None: no frame, or a code it does not use)."""
    return None if close is None else CloseCode.of(int(close.code))


def _raise_if_final(exc: websockets.ConnectionClosed) -> None:
    """Stop the client where the hub's close code says reconnecting will not help."""
    code = _close_code(exc.rcvd)
    if code is None:
        return
    reason = exc.rcvd.reason if exc.rcvd else ""
    if code.reconnect is Reconnect.NEW_TOKEN:
        raise Unauthorized(ErrorCode.UNAUTHORIZED, reason) from None
    if code.reconnect is Reconnect.NEVER:
        raise Closed(f"the hub closed the socket with {int(code)} ({code.name}): {reason}; "
                     "a client bug, not retried") from None


class HoomiClient:
    def __init__(self, urls: list[str] | str, token: str | TokenSource, *,
                 keyring: Keyring | None = None,
                 state_path: Path | None = None, backoff_min: float = 0.05,
                 backoff_max: float = 5.0, max_events: int = 1000,
                 max_size: int = MAX_INCOMING_BYTES, scheme: int = 1,
                 search: bool = False, signals: bool = False, batch: bool = True) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        # A fixed token, or a source asked for a fresh one on every (re)connect: with a
        # source, a socket closed because its token expired reconnects and resumes.
        self._token = token
        self.keyring = keyring
        if scheme not in SCHEMES:
            raise ValueError(f"scheme: this client seals schemes {SCHEMES}")
        # The scheme `send_text` and `edit_text` seal with, and whether they send search
        # tokens (client/hoomi_client/search.py; off by default: tokens tell the hub which messages
        # share words, docs/encryption.md). With both defaults the client speaks v1.
        self.scheme = scheme
        self.search_enabled = search
        # Live signals (SPEC 7.2): with `signals`, the hello asks for the `receipt` and
        # `typing` pushes, which `events()` then yields. Off: the client speaks v1.
        self.signals = signals
        # "batch" (SPEC 7.2): the hub may pack several frames into one WebSocket message
        # (a msgpack stream); fewer messages each way. batch=False: one frame per message.
        self.batch = batch
        self._typed: dict[UUID, float] = {}  # hoomi -> when `typing` last went out
        # Nonces this client sealed with, per session_id: never twice (crypto draws them
        # at random; this makes "never" a check, not a probability).
        self._nonces: dict[str, set[bytes]] = {}
        self.state = ClientState.load(state_path)
        self.user_id: UUID | None = None
        self.welcome: Welcome | None = None
        self._backoff = (backoff_min, backoff_max)
        self._refs = itertools.count(1)
        self._pending: dict[int, tuple[ClientFrame, asyncio.Future[Any]]] = {}
        # None is the end-of-stream mark, put when the connection loop is over.
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(max_events)
        self._queued: dict[UUID, int] = {}  # highest seq put in _events, per Hoomi
        self._max_size = max_size
        self._attempt = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._resends: set[asyncio.Task[Any]] = set()
        self._saved_at = time.monotonic()
        # (hoomi, sealed sender, client_msg_id) -> lowest seq it was opened at.
        self._opened: OrderedDict[tuple[UUID, UUID, UUID], int] = OrderedDict()
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
            if self._fatal is None:
                # Not welcomed in time: stop trying, so nothing runs on behind the caller.
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
                raise TimeoutError("no welcome from the hub")
            raise self._fatal
        assert self.welcome is not None
        # Sends left over from a previous run of this client go out again.
        for out in list(self.state.outbox.values()):
            self._spawn(self._deliver(out), self._resends)
        return self.welcome

    async def flush(self) -> None:
        """Wait until every send left over from a previous run is acked or refused."""
        await asyncio.gather(*self._resends, return_exceptions=True)

    async def close(self) -> None:
        """Disconnect; pending requests fail with Closed and `events()` ends with it."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._shutdown(Closed("the client was closed"))
        for task in list(self._tasks):
            task.cancel()
        self.state.save()

    def _shutdown(self, exc: BaseException) -> None:
        """The connection loop is over for good: nobody may wait for it any longer."""
        if self._fatal is None:
            self._fatal = exc
        self._fail_all(self._fatal)
        if not self._events.full():
            self._events.put_nowait(None)  # wakes a reader blocked in events()

    async def _run(self) -> None:
        exc: BaseException = Closed("the client was closed")
        try:
            await self._connect_loop()
        except (Unauthorized, Closed) as err:
            exc = err
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug: end loudly rather than hang every caller
            _log.exception("client connection loop failed")
            exc = Closed(f"the connection loop failed: {err!r}")
        finally:
            self._shutdown(exc)

    async def _connect_loop(self) -> None:
        for url in itertools.cycle(self.urls):
            if self._closing:
                return
            wait = 0.0
            try:
                # No compression: ciphertext is incompressible. max_queue bounds what
                # websockets buffers while `events()` is full: past it the socket is not
                # read, so the hub's own backpressure applies (close TOO_SLOW, then resume).
                async with websockets.connect(url, max_queue=16, max_size=self._max_size,
                                              open_timeout=10, compression=None) as ws:
                    self._ws = ws
                    await self._session(ws)
            except _Retry as retry:
                _log.info("hub at %s unavailable: %s", url, retry)
                wait = retry.after
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                _log.info("connection to %s lost: %s", url, exc)
                if (isinstance(exc, websockets.ConnectionClosed)
                        and _close_code(exc.sent) == CloseCode.MESSAGE_TOO_BIG):
                    self._fail_oversized()
            finally:
                self._ws = None
                self._connected.clear()
            if self._closing:
                return
            # Capped: 2**attempt must not overflow after a long outage.
            self._attempt = min(self._attempt + 1, 30)
            lo, hi = self._backoff
            await asyncio.sleep(max(wait, random.uniform(lo, min(hi, lo * 2**self._attempt))))

    async def _current_token(self) -> str:
        if isinstance(self._token, str):
            return self._token
        got = self._token()
        return await got if inspect.isawaitable(got) else got

    async def _session(self, ws: Any) -> None:
        token = await self._current_token()
        features = (("signals",) if self.signals else ()) + (("batch",) if self.batch else ())
        await ws.send(encode_client(Hello(token=token, resume=dict(self.state.last_seq),
                                          features=features)))
        try:
            # Under "batch" the welcome may share its message with the first pushes.
            parts = split_stream(await asyncio.wait_for(ws.recv(), 15))
            first = decode_server(parts[0])
        except websockets.ConnectionClosed as exc:
            _raise_if_final(exc)
            raise
        except ProtocolError as exc:
            raise websockets.WebSocketException(f"malformed first frame: {exc}") from None
        if isinstance(first, Error):
            # Only a refused token is final; `unavailable` (storage down during hello)
            # and anything else is tried again, no sooner than the hub asked.
            if first.code == ErrorCode.UNAUTHORIZED:
                raise Unauthorized(first.code, first.message)
            raise _Retry(first.code, first.message, (first.retry_after_ms or 0) / 1000)
        if not isinstance(first, Welcome):
            raise websockets.WebSocketException(f"expected welcome, got {first}")
        self._welcome(first)
        # Everything not answered on the previous connection is asked again.
        for request, _ in list(self._pending.values()):
            await ws.send(encode_client(request))
        try:
            await self._receive_parts(parts[1:])  # what came with the welcome
            async for data in ws:
                try:
                    parts = split_stream(data)
                except ProtocolError as exc:
                    raise websockets.WebSocketException(f"malformed server frame: {exc}"
                                                        ) from None
                await self._receive_parts(parts)
        except websockets.ConnectionClosed as exc:
            code = _close_code(exc.rcvd)
            if (code is not None and code.reconnect is Reconnect.NEW_TOKEN
                    and not isinstance(self._token, str)):
                # Refused after welcome: the token expired. Ask the source for a new one
                # at once; a source that hands out a bad token is refused at hello.
                raise _Retry(ErrorCode.UNAUTHORIZED, "token expired", 0) from None
            _raise_if_final(exc)
            raise

    async def _receive_parts(self, parts: list[bytes]) -> None:
        """The frames of one WebSocket message (one, or a "batch" stream), in order."""
        for part in parts:
            try:
                frame = decode_server(part)
            except ProtocolError as exc:
                if exc.field == "type":
                    # A frame type newer than this client: skip it (forward
                    # compatibility), as the protocol's unknown keys are skipped.
                    _log.info("skipped a server frame of unknown type")
                    continue
                raise websockets.WebSocketException(f"malformed server frame: {exc}"
                                                    ) from None
            await self._dispatch(frame)

    def _welcome(self, welcome: Welcome) -> None:
        self.welcome, self.user_id = welcome, welcome.user_id
        for h in welcome.hoomis:
            saved = self.state.last_seq.get(h.hoomi_id)
            if saved is None or h.last_seq < saved:
                # New Hoomi: start at its end. Below what we saved (a database restore):
                # follow the hub down, or every message it stores next would be dropped
                # as already seen.
                self.state.last_seq[h.hoomi_id] = h.last_seq
                self._queued[h.hoomi_id] = h.last_seq
        self.state.save()
        self.connects += 1
        self._attempt = 0  # welcomed: the next loss starts backing off from the bottom
        self._connected.set()
        self._welcomed.set()

    async def _dispatch(self, frame: Any) -> None:
        if isinstance(frame, MessageBody):
            h = frame.hoomi_id
            if frame.seq <= max(self._queued.get(h, 0), self.state.last_seq.get(h, 0)):
                return  # already queued or consumed (a resume overlapping the queue)
            self._queued[h] = frame.seq
            await self._events.put(frame)  # full: stop reading, the hub holds the rest
            return
        if isinstance(frame, Deleted | Membership | Edited | Receipt | TypingNotice):
            await self._events.put(frame)
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

    def _spawn(self, coro: Any, also: set[asyncio.Task[Any]] | None = None) -> None:
        """A background task, referenced until done (the loop holds only weak ones)."""
        task = asyncio.ensure_future(coro)
        for bag in (self._tasks, also if also is not None else self._tasks):
            bag.add(task)
            task.add_done_callback(bag.discard)
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _resend(self, ref: int) -> None:
        entry = self._pending.get(ref)
        if entry is not None and self._ws is not None and self._connected.is_set():
            self._spawn(self._send_quietly(self._ws, entry[0]))

    @staticmethod
    async def _send_quietly(ws: Any, frame: ClientFrame) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(encode_client(frame))

    def _fail_oversized(self) -> None:
        """We closed MESSAGE_TOO_BIG: a reply was larger than max_size. Only a page can be; asking
        again would break the next connection the same way, so the request fails."""
        for ref, (frame, future) in list(self._pending.items()):
            if isinstance(frame, History | Sync | Search):
                del self._pending[ref]
                if not future.done():
                    kind = type(frame).__name__.lower()
                    future.set_exception(ResponseTooLarge(
                        f"the reply to {kind} was over {self._max_size} bytes; "
                        "ask for fewer messages"))

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
                   client_msg_id: UUID | None = None, *, scheme: int = 1,
                   tokens: tuple[bytes, ...] = ()) -> Ack:
        """Send ciphertext; returns the ack. Retried until acked, never stored twice.

        Give a `client_msg_id` derived from the app's own record of the message (say
        uuid5 of its local id) to make the send idempotent across a crash of the app
        itself: sending it again after a restart returns the original ack. If it is
        still in the outbox, the copy saved there is what goes out."""
        cmid = client_msg_id or uuid4()
        out = self.state.outbox.get(cmid)
        if out is None:
            out = Outgoing(hoomi_id, cmid, content, nonce, session_id, scheme, tokens)
            self.state.outbox[cmid] = out
            self.state.save()
        return await self._deliver(out)

    async def _deliver(self, out: Outgoing) -> Ack:
        try:
            ack: Ack = await self._request(lambda ref: Send(
                hoomi_id=out.hoomi_id, client_msg_id=out.client_msg_id, content=out.content,
                nonce=out.nonce, session_id=out.session_id, scheme=out.scheme,
                tokens=out.tokens, ref=ref))
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

    async def send_text(self, hoomi_id: UUID, plaintext: bytes,
                        client_msg_id: UUID | None = None) -> Ack:
        """Encrypt with the Hoomi's current key, then send (see `send` for
        `client_msg_id`)."""
        if self.keyring is None or self.user_id is None:
            raise RuntimeError("send_text needs a keyring and a started client")
        cmid = client_msg_id or uuid4()
        if cmid in self.state.outbox:
            out = self.state.outbox[cmid]
            return await self.send(out.hoomi_id, out.content, out.nonce, out.session_id, cmid,
                                   scheme=out.scheme, tokens=out.tokens)
        tokens = self.tokens_for(hoomi_id, plaintext) if self.search_enabled else ()
        for attempt in range(NONCE_RETRIES + 1):
            sealed = self._seal(hoomi_id, self.user_id, cmid, plaintext)
            try:
                return await self.send(hoomi_id, sealed.content, sealed.nonce,
                                       sealed.session_id, cmid, scheme=sealed.scheme,
                                       tokens=tokens)
            except HubError as exc:
                if not _nonce_refused(exc) or attempt == NONCE_RETRIES:
                    raise
                _log.warning("the hub refused a nonce as used; sealing again")
        raise AssertionError("unreachable")

    def _seal(self, hoomi_id: UUID, sender_id: UUID, cmid: UUID, plaintext: bytes,
              scheme: int | None = None, key: Any = None) -> Any:
        """Seal with the configured scheme (or `scheme`) and a nonce never used before by
        this client under that key's session."""
        assert self.keyring is not None
        key = key or self.keyring.current(hoomi_id)
        used = self._nonces.setdefault(key.session_id, set())
        limit = self.welcome.max_content_bytes if self.welcome is not None else None
        while True:
            nonce = os.urandom(NONCE_BYTES)
            if nonce not in used:
                break
        used.add(nonce)
        return encrypt(key, hoomi_id, sender_id, cmid, plaintext, limit or MAX_CONTENT,
                       scheme=self.scheme if scheme is None else scheme, nonce=nonce)

    def tokens_for(self, hoomi_id: UUID, plaintext: bytes) -> tuple[bytes, ...]:
        """The blind-index tokens of a message's text (client/hoomi_client/search.py), under the
        search key of the Hoomi's current group key."""
        assert self.keyring is not None
        skey = blind.search_key(self.keyring.current(hoomi_id), hoomi_id)
        return blind.message_tokens(skey, plaintext.decode("utf-8", "replace"))

    async def edit_text(self, hoomi_id: UUID, message_id: UUID, plaintext: bytes,
                        client_msg_id: UUID | None = None) -> EditAck:
        """A new version of one's own message, sealed with the current key and scheme
        (tokens too when search is on); every member gets an `edited` push."""
        if self.keyring is None or self.user_id is None:
            raise RuntimeError("edit_text needs a keyring and a started client")
        cmid = client_msg_id or uuid4()
        tokens = self.tokens_for(hoomi_id, plaintext) if self.search_enabled else ()
        for attempt in range(NONCE_RETRIES + 1):
            sealed = self._seal(hoomi_id, self.user_id, cmid, plaintext)
            try:
                return await self.edit(hoomi_id, message_id, sealed.content, sealed.nonce,
                                       sealed.session_id, scheme=sealed.scheme, tokens=tokens)
            except HubError as exc:
                if not _nonce_refused(exc) or attempt == NONCE_RETRIES:
                    raise
        raise AssertionError("unreachable")

    async def edit(self, hoomi_id: UUID, message_id: UUID, content: bytes, nonce: bytes,
                   session_id: str, *, scheme: int = 1, tokens: tuple[bytes, ...] = (),
                   ) -> EditAck:
        ack: EditAck = await self._request(lambda ref: Edit(
            hoomi_id=hoomi_id, id=message_id, content=content, nonce=nonce,
            session_id=session_id, scheme=scheme, tokens=tokens, ref=ref))
        return ack

    async def reencrypt(self, hoomi_id: UUID, items: list[ReencryptItem]) -> ReencryptAck:
        """A batch of a Hoomi admin's migration (client/hoomi_client/reencrypt.py drives it)."""
        ack: ReencryptAck = await self._request(
            lambda ref: Reencrypt(hoomi_id=hoomi_id, items=tuple(items), ref=ref))
        return ack

    async def search(self, hoomi_id: UUID, tokens: tuple[bytes, ...],
                     before: int | None = None, limit: int = 50) -> Page:
        page: Page = await self._request(lambda ref: Search(
            hoomi_id=hoomi_id, tokens=tokens, before=before, limit=limit, ref=ref))
        return page

    async def search_text(self, hoomi_id: UUID, words: str, before: int | None = None,
                          limit: int = 50) -> Page:
        """Messages holding every word (normalised as client/hoomi_client/search.py says), newest
        first; ValueError for no usable word or more than 8."""
        assert self.keyring is not None
        skey = blind.search_key(self.keyring.current(hoomi_id), hoomi_id)
        return await self.search(hoomi_id, blind.query_tokens(skey, words), before, limit)

    def open(self, message: MessageBody) -> Opened:
        """Decrypt a pushed or paged message; DecryptError if it cannot be opened.

        A replay is refused too (reason "replayed"): the hub stores a (sender,
        client_msg_id) once, so the same sealed message at a second seq can only be the
        hub serving a copy. Of two copies the lower seq is the original, whichever is
        opened first (history pages come newest first); the client remembers the last
        REPLAY_WINDOW messages it opened."""
        if self.keyring is None:
            raise RuntimeError("open needs a keyring")
        if message.deleted or message.content is None or message.nonce is None:
            raise ValueError("a deleted message has no content")
        opened = decrypt(self.keyring, message.hoomi_id, message.sender_id, message.content,
                         message.nonce, message.session_id or "", message.scheme)
        key = (message.hoomi_id, opened.sealed_by, opened.client_msg_id)
        first = self._opened.get(key)
        if first is not None and first < message.seq:
            raise DecryptError("replayed", f"seq {message.seq} repeats seq {first}")
        self._opened[key] = message.seq
        self._opened.move_to_end(key)
        if len(self._opened) > REPLAY_WINDOW:
            self._opened.popitem(last=False)
        return opened

    def open_edited(self, edited: Edited, sender_id: UUID | None) -> Opened:
        """Decrypt an `edited` push (the push does not repeat the sender: give the one of
        the message it changes). A client keeps, per message, the version with the
        greatest `updated_at`, and ignores an `edited` for a message it knows deleted."""
        if self.keyring is None:
            raise RuntimeError("open needs a keyring")
        return decrypt(self.keyring, edited.hoomi_id, sender_id, edited.content, edited.nonce,
                       edited.session_id, edited.scheme)

    async def history(self, hoomi_id: UUID, before: int | None = None, limit: int = 50,
                      scheme_below: int | None = None) -> Page:
        page: Page = await self._request(
            lambda ref: History(hoomi_id=hoomi_id, before=before, limit=limit,
                                scheme_below=scheme_below, ref=ref))
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

    async def sync(self, hoomi_id: UUID, after: int, limit: int = 100,
                   scheme_below: int | None = None) -> Page:
        page: Page = await self._request(
            lambda ref: Sync(hoomi_id=hoomi_id, after=after, limit=limit,
                             scheme_below=scheme_below, ref=ref))
        return page

    async def delete(self, hoomi_id: UUID, message_id: UUID) -> Ack:
        ack: Ack = await self._request(
            lambda ref: Delete(hoomi_id=hoomi_id, id=message_id, ref=ref))
        return ack

    async def read(self, hoomi_id: UUID, seq: int) -> int:
        """Tell the hub this user has read the Hoomi up to `seq`; returns the stored
        position (never lower than before: another device may have read further). The
        Hoomi's members that asked for signals get a `receipt`."""
        ack: ReadAck = await self._request(lambda ref: Read(hoomi_id=hoomi_id, seq=seq,
                                                            ref=ref))
        return ack.seq

    def read_seq(self, hoomi_id: UUID) -> int:
        """How far this user had read the Hoomi when the current session was welcomed."""
        for h in self.welcome.hoomis if self.welcome is not None else ():
            if h.hoomi_id == hoomi_id:
                return h.read_seq
        return 0

    async def typing(self, hoomi_id: UUID) -> None:
        """Say this user is typing (call it on every keystroke: it goes out at most once
        per TYPING_EVERY per Hoomi). No reply; dropped when not connected."""
        now = time.monotonic()
        if now - self._typed.get(hoomi_id, float("-inf")) < TYPING_EVERY:
            return
        self._typed[hoomi_id] = now
        if self._connected.is_set() and self._ws is not None:
            await self._send_quietly(self._ws, Typing(hoomi_id=hoomi_id))

    async def presence(self, hoomi_id: UUID) -> list[UUID]:
        """The Hoomi's members with at least one live socket on any replica."""
        reply: PresenceReply = await self._request(
            lambda ref: Presence(hoomi_id=hoomi_id, ref=ref))
        return reply.user_ids

    async def ping(self) -> Pong:
        pong: Pong = await self._request(lambda ref: Ping(ref=ref))
        return pong

    async def events(self) -> AsyncIterator[Event]:
        """Pushes as they come: messages in seq order per Hoomi, deletions, edits,
        membership, and with `signals` receipts and typing notices.
        Ends with the error that stopped the client (Closed, Unauthorized)."""
        while True:
            yield await self.next_event()

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next push; what it returns counts as consumed (resume starts after it)."""
        if self._events.empty() and self._fatal is not None:
            raise self._fatal
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)  # for the next reader too
            assert self._fatal is not None
            raise self._fatal
        if isinstance(event, MessageBody):
            h = event.hoomi_id
            if event.seq > self.state.last_seq.get(h, 0):
                self.state.last_seq[h] = event.seq
                if time.monotonic() - self._saved_at >= SAVE_EVERY:
                    self.save()
        return event

    def save(self) -> None:
        """Write the state file now (it is also written on every send, ack and close)."""
        self._saved_at = time.monotonic()
        self.state.save()
