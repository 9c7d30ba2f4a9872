"""Time-ordered UUIDs (RFC 9562 version 7) for message ids.

Random UUIDv4 primary keys scatter inserts across the whole btree; v7 ids start with a
millisecond timestamp, so new rows land on the right-most index pages. Within one
millisecond a 12-bit counter (rand_a) keeps ids made by this process increasing.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    """A new UUIDv7, strictly increasing among the ids this process makes."""
    return uuid7s(1)[0]


def uuid7s(n: int) -> list[uuid.UUID]:
    """`n` new UUIDv7s in increasing order, with one clock read and one urandom call for
    all of them (the writer makes one per stored message, inside its transaction)."""
    global _last_ms, _counter
    ids: list[uuid.UUID] = []
    if n <= 0:
        return ids
    rand = os.urandom(8 * n + 2)
    with _lock:
        now = time.time_ns() // 1_000_000
        if now > _last_ms:
            _last_ms = now
            # Start low in the 12-bit counter to leave room to count within this ms.
            _counter = (int.from_bytes(rand[-2:], "big") & 0x3FF) - 1
        for k in range(n):
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            rand_b = int.from_bytes(rand[8 * k:8 * k + 8], "big") & _RAND_B_MASK
            value = ((_last_ms & _MS_MASK) << 80) | _VERSION | (_counter << 64) | _VARIANT
            ids.append(uuid.UUID(int=value | rand_b))
    return ids


_MS_MASK = (1 << 48) - 1
_VERSION = 0x7 << 76
_VARIANT = 0b10 << 62
_RAND_B_MASK = (1 << 62) - 1
