"""What the lifespan builds and every handler uses: hung on `app.state.services`."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from hoomi_protocol import Limits
from storage.db import WalClock
from storage.writer import BatchWriter

from .auth import VerifiedTokens
from .broker import Broker
from .config import Settings
from .hub import Hub
from .limits import KeyedBuckets, KeyedCounter
from .metrics import Metrics


@dataclass
class Services:
    settings: Settings
    limits: Limits
    pool: asyncpg.Pool
    writer: BatchWriter
    broker: Broker
    hub: Hub
    metrics: Metrics
    # HOOMI_READ_DATABASE_URL: a standby for pages, used when it has replayed what the
    # page must show (server/actions.py `_read_page`); pages served by each, counted.
    read_pool: asyncpg.Pool | None = None
    wal_clock: WalClock | None = None
    page_reads: dict[str, int] = field(default_factory=lambda: {"standby": 0, "primary": 0})
    # After the standby failed, pages skip it until then (time.monotonic()).
    standby_retry_at: float = 0.0
    # Set when SIGTERM arrives: new sockets are refused, open ones closed with 1012.
    draining: bool = False
    # Abuse bounds shared by the socket and HTTP sides (issue 14), built from settings
    # in `__post_init__`: per client address and per user.
    hellos: KeyedBuckets = field(default_factory=lambda: KeyedBuckets(20.0, 100))
    auth_failures: KeyedBuckets = field(default_factory=lambda: KeyedBuckets(1.0, 20))
    http_requests: KeyedBuckets = field(default_factory=lambda: KeyedBuckets(50.0, 100))
    user_reads: KeyedCounter = field(default_factory=lambda: KeyedCounter(4))
    # Bearer tokens the HTTP API has verified, until their expiry (server/auth.py).
    verified_tokens: VerifiedTokens = field(default_factory=VerifiedTokens)

    def __post_init__(self) -> None:
        st = self.settings
        self.hellos = KeyedBuckets(st.hello_rate, st.hello_burst)
        self.auth_failures = KeyedBuckets(st.auth_failure_rate, st.auth_failure_burst)
        self.http_requests = KeyedBuckets(st.http_rate, st.http_burst)
        self.user_reads = KeyedCounter(st.user_max_reads)
