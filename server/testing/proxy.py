"""A TCP proxy on loopback, in the test's event loop, in front of PostgreSQL or Valkey, to
inject connectivity faults without touching the server behind it (the idea of asyncpg's
test fuzzer proxy): the hub connects to the proxy's port, and the test

- `drop()`s every connection through it (both ends reset at once, as when a network or a
  server's host goes away; the server behind keeps running),
- `refuse()`s new connections (the port stops listening: connect fails with
  ECONNREFUSED, as for a server that is down), together `cut()`,
- `resume()`s: listens on the same port again and forwards as before.

Each fault takes effect before the call returns, so a test awaits the hub's reaction
(an `unavailable` error, `/readyz` going 503 then 200) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class FaultProxy:
    __slots__ = ("target", "port", "_server", "_links", "accepted")

    def __init__(self, target: tuple[str, int] | str) -> None:
        """`target`: (host, port), or the path of a Unix socket (the embedded PostgreSQL
        listens on one only; the proxy still listens on TCP loopback)."""
        self.target = target
        self.port = 0  # chosen by start()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self.accepted = 0  # connections forwarded since start

    @classmethod
    def in_front_of(cls, url: str) -> FaultProxy:
        """A proxy (not started) for the server a postgresql:// or redis:// URL names,
        including libpq's `?host=/socket/dir`."""
        parts = urlsplit(url)
        socket_dir = dict(parse_qsl(parts.query)).get("host", "")
        if socket_dir.startswith("/"):
            return cls(f"{socket_dir}/.s.PGSQL.{parts.port or 5432}")
        if parts.hostname is None or parts.port is None:
            raise ValueError("the URL must name a host and a port")
        return cls((parts.hostname, parts.port))

    def url(self, url: str) -> str:
        """`url` (postgresql://... or redis://...) pointed at the proxy instead."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (f"{userinfo}@" if "@" in parts.netloc else "") + f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    async def start(self) -> FaultProxy:
        # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on the accepted sockets.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)
        return self

    async def refuse(self) -> None:
        """Stop listening: new connections are refused. Open ones go on (see `drop`)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def drop(self) -> None:
        """Reset every open connection, on both sides; the resets are sent on return."""
        links, self._links = self._links, set()
        for link in links:
            link.abort()
        await asyncio.sleep(0)  # the transports close their sockets in the next callback

    async def cut(self) -> None:
        """The server is unreachable: refuse new connections and drop the open ones."""
        await self.refuse()
        await self.drop()

    async def resume(self) -> None:
        """Listen on the same port again."""
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                server_r, server_w = await asyncio.open_unix_connection(self.target)
            else:
                server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(client_w)  # the server behind is down: so is the proxy, for this one
            return
        link = _Link(client_w, server_w)
        self._links.add(link)
        self.accepted += 1
        try:
            await asyncio.gather(_pump(client_r, server_w), _pump(server_r, client_w))
        finally:
            self._links.discard(link)
            link.abort()


class _Link:
    __slots__ = ("ends",)

    def __init__(self, *ends: asyncio.StreamWriter) -> None:
        self.ends = ends

    def abort(self) -> None:
        for end in self.ends:
            _abort(end)


def _abort(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER 0 makes close() send a reset, not a FIN: the peer's next read or write
    # fails at once, as when the other side's host is gone.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (half-close), or until either side fails."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        return
