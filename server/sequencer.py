"""The one ordering rule of a stream of seqs (a Hoomi's messages), pure and synchronous.

Both the Hub's feed per Hoomi (server/hub.py) and a session's cursor per Hoomi
(server/session.py) keep one `Sequencer`; it decides what may be pushed, what is held,
and which seqs must be read from PostgreSQL. It does no I/O: the caller reads the gap it
names and hands the rows to `fill`.

Invariants:
1. What `start`, `offer` and `fill` return is in strictly ascending seq, each seq
   `delivered + 1` at the time it is returned or past a purged range (3): no gap a later
   read could fill, no repeat, nothing at or below `delivered` ever again.
2. A seq above `delivered + 1` is held (at most `max_held`; past it dropped, the read
   fills it) and `gap()` names the range to read: every seq at or below `known` is
   committed (seqs commit in order, and a seq is only known once committed).
3. `fill(rows, upto)`: the rows read for (`delivered`, `upto`]. A seq of that range that
   is not among them was purged by retention (or the Hoomi deleted) and is skipped,
   never waited for. The caller takes `upto` from `gap()` BEFORE reading, so a seq that
   became known during the read is not mistaken for a purged one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Sequencer(Generic[T]):
    __slots__ = ("delivered", "known", "held", "max_held", "started")

    def __init__(self, delivered: int = 0, *, started: bool = True,
                 max_held: int | None = None) -> None:
        self.delivered = delivered  # the last seq returned (or skipped as purged)
        self.known = delivered  # the highest seq known to be committed
        self.held: dict[int, T] = {}  # seq -> frame, for seqs above delivered + 1
        self.max_held = max_held
        # Not started: the stream's edge is not read yet; everything offered is held.
        self.started = started

    def start(self, delivered: int) -> list[tuple[int, T]]:
        """The edge once read: everything up to `delivered` is had (or not wanted)."""
        self.started = True
        self.delivered = max(self.delivered, delivered)
        self.known = max(self.known, self.delivered)
        return self._drain()

    def expect(self, seq: int) -> None:
        """`seq` is committed (a reconcile's last_seq, a feed's delivered): read up to it."""
        self.known = max(self.known, seq)

    def offer(self, seq: int, frame: T) -> list[tuple[int, T]]:
        """A pushed seq: what may now be pushed, in order (often just this one)."""
        if seq <= self.delivered:
            return []  # a duplicate or a late echo
        self.known = max(self.known, seq)
        if self.started and seq == self.delivered + 1 and not self.held:
            self.delivered = seq  # the common case: in order
            return [(seq, frame)]
        if self.max_held is None or len(self.held) < self.max_held or seq in self.held:
            self.held[seq] = frame
        return self._drain() if self.started else []

    def gap(self) -> tuple[int, int] | None:
        """(after, upto): the seqs to read from PostgreSQL before what is held can go
        out; None when nothing is missing (or the edge is not read yet)."""
        if not self.started or self.known <= self.delivered:
            return None
        return self.delivered, self.known

    def fill(self, rows: Iterable[tuple[int, T]], upto: int) -> list[tuple[int, T]]:
        """The rows read for (delivered, upto], ascending: what may now be pushed. Seqs of
        that range that are not among them were purged: skipped (invariant 3)."""
        found = {seq: frame for seq, frame in rows if self.delivered < seq <= upto}
        for seq in [s for s in self.held if s <= upto]:
            found[seq] = self.held.pop(seq)  # pushed, so it exists: never skipped
        out: list[tuple[int, T]] = []
        for seq in sorted(found):
            if seq > self.delivered:
                self.delivered = seq  # a jump from the last one: purged seqs, skipped
                out.append((seq, found[seq]))
        self.delivered = max(self.delivered, upto)  # the rest of the range is gone
        self.known = max(self.known, self.delivered)
        return out + self._drain()

    def _drain(self) -> list[tuple[int, T]]:
        held = self.held
        if not held:
            return []
        for seq in [s for s in held if s <= self.delivered]:
            del held[seq]
        out: list[tuple[int, T]] = []
        while self.delivered + 1 in held:
            self.delivered += 1
            out.append((self.delivered, held.pop(self.delivered)))
        return out
