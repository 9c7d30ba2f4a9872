"""The Starlette application factory. Nothing connects at import time: the lifespan opens
the database (embedded if no DATABASE_URL), migrates, starts the broker, the hub and the
writer, and on shutdown closes them in reverse order, flushing the writer first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from prometheus_client.core import CounterMetricFamily
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route, WebSocketRoute, get_route_path
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from hoomi_protocol import Limits
from storage import archive
from storage.backup_store import Outcome, backup_forever
from storage.db import WalClock, create_pool
from storage.embedded import start_embedded
from storage.erasure import erase_forever
from storage.migrate import migrate
from storage.retention import purge_expired
from storage.writer import BatchWriter

from . import api, errors, openapi, operator_api, ws
from .broker import Broker, ClusterBroker, LocalBroker, RedisBroker
from .config import Settings
from .hub import Hub
from .metrics import Metrics
from .services import Services

_log = logging.getLogger(__name__)


class _HubApp(Starlette):
    """Starlette, except that the socket (`/v1/ws`) goes straight to its endpoint: the
    router, the exception and error middlewares add nothing to a WebSocket the endpoint
    already handles whole, yet each keeps a frame alive for the socket's life (about
    4 KiB of an idle socket's memory, bench/socket_memory.py). The route stays declared
    (the OpenAPI document and url_for see it)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and get_route_path(scope) == "/v1/ws":
            scope["app"] = self
            await ws.endpoint(WebSocket(scope, receive, send))
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        embedded = None
        dsn = settings.database_url
        if dsn is None:
            embedded = await asyncio.to_thread(start_embedded, settings.data_dir)
            dsn = embedded.dsn
        pool = await create_pool(dsn, max_size=settings.db_pool_size)
        # The read standby: no connection at start (min_size 0), so a standby that is down
        # delays nothing; pages go to the primary until it answers (actions._read_page).
        read_pool = (await create_pool(settings.read_database_url, min_size=0,
                                       max_size=settings.db_pool_size)
                     if settings.read_database_url else None)
        async with pool.acquire() as conn:
            applied = await migrate(conn, partitions=settings.message_partitions)
        if applied:
            _log.info("applied migrations %s", applied)
        metrics = Metrics()
        broker: Broker = LocalBroker()
        if settings.redis_url:
            broker = (ClusterBroker(settings.redis_url) if settings.redis_mode == "cluster"
                      else RedisBroker(settings.redis_url))
        hub = Hub(pool, broker, gap_grace=settings.gap_grace_ms / 1000,
                  on_gap_fill=metrics.gap_fills.inc, presence_ttl=settings.presence_ttl_s)
        writer = BatchWriter(
            pool,
            max_batch=settings.batch_max_size,
            max_delay=settings.batch_max_delay_ms / 1000,
            max_content_bytes=settings.max_content_bytes,
            max_queued_bytes=int(settings.writer_queue_mb * (1 << 20)),
            observer=metrics.observe_batch,
            on_commit=hub.committed,
        )
        metrics.writer_queue.set_function(lambda: writer.queued)
        metrics.writer_queue_bytes.set_function(lambda: writer.queued_bytes)
        await hub.start()
        writer.start()
        reconcile = asyncio.get_running_loop().create_task(
            hub.reconcile_forever(settings.reconcile_interval_s))
        purging = asyncio.get_running_loop().create_task(
            purge_forever(pool, settings.purge_interval_s))
        erasing = asyncio.get_running_loop().create_task(
            erase_forever(pool, settings.erase_interval_s, settings.erase_rewrite_s))
        archiving = None
        if settings.archive_url:
            arc = archive.Archive(
                settings.archive_url, cache_bytes=int(settings.archive_cache_mb * (1 << 20)),
                on_read=metrics.archive_read_seconds.observe,
                on_archived=lambda n, s: observe_archived(metrics, n, s))
            archive.configure(arc)
            archiving = asyncio.get_running_loop().create_task(archive.archive_forever(
                pool, arc, settings.archive_after_s, settings.archive_interval_s))
        backing_up = None
        if settings.backup_url:
            backing_up = asyncio.get_running_loop().create_task(backup_forever(
                pool, dsn, settings.backup_url, settings.backup_interval_s,
                settings.backup_keep, on_outcome=lambda o: observe_backup(metrics, o),
                on_failure=metrics.backup_failures.inc))
        services = Services(
            settings=settings,
            limits=Limits(max_content_bytes=settings.max_content_bytes),
            pool=pool, writer=writer, broker=broker, hub=hub, metrics=metrics,
            read_pool=read_pool, wal_clock=WalClock(pool) if read_pool is not None else None,
        )
        app.state.services = services
        metrics.registry.register(_PageReads(services))
        try:
            yield
        finally:
            await drain(services)
            reconcile.cancel()
            purging.cancel()
            erasing.cancel()
            if archiving is not None:
                archiving.cancel()
            if backing_up is not None:
                backing_up.cancel()
            await hub.close()
            if read_pool is not None:
                await read_pool.close()
            await pool.close()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)

    middleware = []
    if settings.cors_origins:
        # Browser clients on other origins may call the HTTP API with their bearer token.
        # No cookies are involved, so credentials stay off. (The WebSocket is not subject
        # to CORS, and carries its token in `hello`, not in a cookie.)
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "PUT", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"], max_age=600))
    return _HubApp(
        routes=[*api.routes, *operator_api.routes,
                Route("/openapi.json", openapi.openapi_json),
                WebSocketRoute("/v1/ws", ws.endpoint),
                Mount("/chat", app=chat_page(), name="chat")],
        exception_handlers=errors.exception_handlers,
        middleware=middleware,
        lifespan=lifespan,
    )


# The web chat page (client/web/dist, built from client/web/page by `make web`; docs/browser.md).
# Static files only: the token and keys are typed into the page and never reach the hub's
# storage. Scripts and styles from this origin only (no inline code, no CDN); the page's
# WebSocket may go to any ws:/wss: URL the user gives (other replicas); nothing may frame it.
CHAT_DIST = Path("client") / "web" / "dist"
CHAT_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
CHAT_HEADERS = [(b"content-security-policy", CHAT_CSP.encode()),
                (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                (b"cross-origin-opener-policy", b"same-origin"), (b"cache-control", b"no-cache")]


def chat_dir() -> Path:
    """The page beside the source tree (editable install, `make run`), else under the
    working directory (the Docker image installs the packages and keeps the tree in /app)."""
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (base / CHAT_DIST / "index.html").is_file():
            return base / CHAT_DIST
    return Path(__file__).resolve().parent.parent / CHAT_DIST


def chat_page() -> ASGIApp:
    """The page's static files, each response with CHAT_HEADERS (404s are JSON, as any)."""
    files = StaticFiles(directory=chat_dir(), html=True, check_dir=False)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *CHAT_HEADERS]
            await send(message)
        await files(scope, receive, send_with_headers)
    return app


async def purge_forever(pool: asyncpg.Pool, interval: float) -> None:
    """Apply each Hoomi's retention every `interval` seconds (one replica at a time)."""
    while True:
        await asyncio.sleep(interval)
        try:
            purged = await purge_expired(pool)
            if purged:
                _log.info("retention purged %d messages", purged)
        except Exception as exc:
            _log.warning("retention purge failed: %s", exc)


class _PageReads:
    """hoomi_page_reads_total{server}: pages read on the standby or the primary
    (server/actions.py `_read_page` counts them on Services)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "hoomi_page_reads", "History, sync and search pages read, by server "
            "(standby, primary)", labels=["server"])
        for server, n in self._services.page_reads.items():
            family.add_metric([server], n)
        yield family


def observe_archived(metrics: Metrics, messages: int, segments: int) -> None:
    metrics.archived_messages.inc(messages)
    metrics.archive_segments.inc(segments)


def observe_backup(metrics: Metrics, outcome: Outcome) -> None:
    if outcome.newest is not None:
        metrics.backup_last_success.set(outcome.newest.created)
    if outcome.made is not None:
        metrics.backups.inc()
        metrics.backup_seconds.set(outcome.seconds)
        metrics.backup_bytes.set(outcome.made.size)


async def drain(services: Services) -> None:
    """Graceful stop: refuse new sockets, commit and ack queued sends, close with 1012."""
    if services.draining:
        return
    services.draining = True
    await services.writer.close()
    # Give the acks just resolved a moment to reach their sockets' queues and the wire.
    await asyncio.sleep(0.05)
    for sock in services.hub.all_sockets():
        sock.close(1012, "replica shutting down; reconnect elsewhere")
    await asyncio.sleep(0.1)
