"""A lean HTTP/1.1 client for load generation: what bench.history reads HTTP pages with.

Like bench/wsload.py for WebSockets: the load generator shares the machine's two cores
with the server it measures. httpx spent about 860 µs of CPU per history page here, twice
the hub's own cost for that page, so the HTTP run measured the client. This one keeps one
connection alive and does per request what HTTP/1.1 needs and no more:

- `asyncio.Protocol` callbacks; one request in flight per connection (no pipelining);
- a response is its status line, its headers and a `Content-Length` body.

Chunked responses, `Connection: close`, redirects, TLS and compression are not spoken: a
server that answers with any of them ends the connection (`error` says why). Not a
general client: bench only.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class HttpError(ConnectionError):
    pass


def read_head(buf: bytearray) -> tuple[str, dict[str, str]] | None:
    """A response's status line and headers (names lower-cased), taken off the front of
    `buf` once they are whole; None while they are not (bench/wsload.py reads its
    upgrade's response with it too)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    return lines[0], {k.strip().lower(): v.strip()
                      for k, _, v in (line.partition(":") for line in lines[1:])}


class LeanHttp(asyncio.Protocol):
    """One kept-alive connection: `get` sends a request and returns (status, body)."""

    def __init__(self, host: str, headers: dict[str, str]) -> None:
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, **headers}.items())
        self._buf = bytearray()
        self._want = -1  # the body's length once the head is read, else -1
        self._status = 0
        self._reply: asyncio.Future[tuple[int, bytes]] | None = None
        self._transport: asyncio.Transport | None = None
        self.error: HttpError | None = None

    async def get(self, target: str) -> tuple[int, bytes]:
        """GET `target` (a path with its query): the response's status and body."""
        if self._transport is None or self.error is not None:
            raise self.error or HttpError("not connected")
        if self._reply is not None:
            raise HttpError("one request at a time")
        self._reply = asyncio.get_running_loop().create_future()
        self._transport.write(f"GET {target} HTTP/1.1\r\n{self._head}\r\n".encode())
        try:
            return await self._reply
        finally:
            self._reply = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(str(exc) if exc else "connection closed by the server")

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._want < 0:
            head = read_head(buf)
            if head is None:
                return
            status, headers = head
            version, _, rest = status.partition(" ")
            if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
                self._fail(f"not an HTTP/1.1 response: {status!r}")
                return
            length = headers.get("content-length", "")
            if headers.get("connection", "").lower() == "close" or not length.isdigit():
                self._fail(f"not a kept-alive Content-Length response: {status!r}, "
                           f"headers {sorted(headers)}")
                return
            self._status, self._want = int(rest[:3]), int(length)
        if len(buf) < self._want:
            return
        if len(buf) > self._want:
            self._fail("bytes after the response (one request at a time)")
            return
        body = bytes(buf)
        buf.clear()
        self._want = -1
        if self._reply is None or self._reply.done():
            self._fail("a response nobody asked for")
            return
        self._reply.set_result((self._status, body))

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = HttpError(why)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(self.error)
        if self._transport is not None:
            self._transport.abort()


async def connect(url: str, headers: dict[str, str] | None = None) -> LeanHttp:
    """A kept-alive connection to `url`'s host (http only); `headers` go with every
    request."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"http://host:port only: {url}")
    port = parts.port or 80
    host = f"{parts.hostname}:{port}"
    _, conn = await asyncio.get_running_loop().create_connection(
        lambda: LeanHttp(host, headers or {}), parts.hostname, port)
    return conn
