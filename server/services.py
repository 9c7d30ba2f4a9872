"""What the lifespan builds and every handler uses: hung on `app.state.services`."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from protocol import Limits
from storage.writer import BatchWriter

from .broker import Broker
from .config import Settings
from .hub import Hub
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
    # Set when SIGTERM arrives: new sockets are refused, open ones closed with 1012.
    draining: bool = False
    sockets: set[object] = field(default_factory=set)
