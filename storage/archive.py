"""The message archive: old messages' ciphertext in immutable segment objects (SPEC §7.1).

An archived message keeps its row in `messages` (ids, seq, sender, session, times) with
`content` and `nonce` NULL and `content_len` set; its ciphertext and nonce live in one
segment object of its Hoomi, in object storage (HOOMI_ARCHIVE_URL: `file:///dir` or
`s3://bucket/prefix`, through obstore). `message_segments` says which object holds which
seq range; `hoomis.archived_upto` how far each Hoomi is archived.

Segment format, version 1 (big-endian; docs/storage.md has the same table):

    header   b"HOOMISG1" | hoomi_id (16) | first_seq (u64) | last_seq (u64) | count (u32)
    entry    seq (u64) | message id (16) | nonce (12) | length (u32) | ciphertext
    trailer  sha256 of everything before it (32)

Entries are in ascending seq within [first_seq, last_seq]; tombstones and purged seqs
are absent. `message_segments.checksum` is the sha256 of the whole object: a reader
checks both before using a segment. Objects are never modified: a rewrite writes a new
key.

Order of operations (crash-safe at every step; see docs/storage.md):

1. record the new key in `archive_orphans` (committed): no object exists that the
   database does not know of;
2. write the object; 3. read it back and verify it against the rows;
4. one transaction: lock the rows, check they are unchanged, insert the segment row,
   clear content/nonce (content_len kept), advance `archived_upto`, drop the orphan row.

A crash before 4 leaves the rows as they were and an orphan the next pass deletes. A
deletion for everyone or a purge of an archived message marks its segment
`erase_pending`; the next erasure tick rewrites the segment without it (steps 1 to 4,
with the segment row switched to the new key in 4, which makes the old key an orphan),
then deletes the old object.

Reads: `fill(conn, rows)` puts the content and nonce back into archived rows, from a
bounded in-memory cache of segments (read-through); if the store cannot be read the
page fails with `unavailable`, never with missing or wrong data.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg
import obstore
import obstore.exceptions
from obstore.store import LocalStore, S3Store

from . import audit
from .audit import Actor
from .errors import StorageError, unavailable
from .records import StoredMessage

_log = logging.getLogger(__name__)

_LOCK_KEY = 0x686F6F6D69617263  # "hoomiarc": one archive pass at a time, over all replicas

MAGIC = b"HOOMISG1"
_HEADER = struct.Struct(">8s16sQQI")
_ENTRY = struct.Struct(">Q16s12sI")
_TRAILER = 32

SEGMENT_MAX_MESSAGES = 1000
SEGMENT_MAX_BYTES = 4 << 20

# Test hook: SIGKILL this process right after the named step (tests/test_archive.py).
_KILL_AT = "HOOMI_ARCHIVE_KILL_AT"


class SegmentError(ValueError):
    """A segment object that is not what its row says (corrupt, truncated, another one)."""


class Entry(NamedTuple):
    seq: int
    id: UUID
    nonce: bytes
    content: bytes


class Segment(NamedTuple):
    hoomi_id: UUID
    first_seq: int
    last_seq: int
    entries: dict[int, Entry]
    size: int


# -- the format -----------------------------------------------------------------------------

def encode(hoomi_id: UUID, first_seq: int, last_seq: int, entries: Sequence[Entry]) -> bytes:
    parts = [_HEADER.pack(MAGIC, hoomi_id.bytes, first_seq, last_seq, len(entries))]
    for e in entries:
        parts.append(_ENTRY.pack(e.seq, e.id.bytes, e.nonce, len(e.content)))
        parts.append(e.content)
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes, checksum: str | None = None) -> Segment:
    """Parse and verify a segment; `checksum`: the sha256 hex its row records."""
    if checksum is not None and hashlib.sha256(blob).hexdigest() != checksum:
        raise SegmentError("checksum differs from the segment's row")
    if len(blob) < _HEADER.size + _TRAILER:
        raise SegmentError("truncated segment")
    body, trailer = blob[:-_TRAILER], blob[-_TRAILER:]
    if hashlib.sha256(body).digest() != trailer:
        raise SegmentError("trailer checksum mismatch")
    magic, hoomi, first, last, count = _HEADER.unpack_from(body, 0)
    if magic != MAGIC:
        raise SegmentError("not a Hoomi segment (magic)")
    pos, entries, prev = _HEADER.size, {}, first - 1
    for _ in range(count):
        seq, mid, nonce, length = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        if not prev < seq <= last or pos + length > len(body):
            raise SegmentError("entry out of range")
        entries[seq] = Entry(seq, UUID(bytes=mid), nonce, body[pos:pos + length])
        pos += length
        prev = seq
    if pos != len(body):
        raise SegmentError("trailing bytes after the entries")
    return Segment(UUID(bytes=hoomi), first, last, entries, len(blob))


# -- the object store -----------------------------------------------------------------------

def open_store(url: str) -> Any:
    """An obstore store for `file:///dir` or `s3://bucket/prefix` (AWS_* from the env)."""
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/"):
            raise ValueError(f"{url!r}: file:// needs an absolute path (file:///dir)")
        os.makedirs(path, exist_ok=True)
        return LocalStore(path, mkdir=True)
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{url!r}: no bucket")
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        # Per request: a segment is at most 4 MiB.
        client: dict[str, Any] = {"connect_timeout": "3s", "timeout": "10s"}
        if endpoint.startswith("http://"):
            client["allow_http"] = True
        # A store that is down fails a page in seconds, not after minutes of retries.
        retry: dict[str, Any] = {"max_retries": 2, "retry_timeout": timedelta(seconds=5)}
        return S3Store(bucket, prefix=prefix.strip("/") or None,
                       client_options=client, retry_config=retry)  # type: ignore[arg-type]
    raise ValueError(f"{url!r} is not file:///dir or s3://bucket/prefix")


class _Cache:
    """Parsed segments by object key, least recently used first out, bounded in bytes.
    Keys are never reused (objects are immutable), so an entry is never stale."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, Segment] = OrderedDict()

    def get(self, key: str) -> Segment | None:
        seg = self._items.get(key)
        if seg is not None:
            self._items.move_to_end(key)
        return seg

    def put(self, key: str, seg: Segment) -> None:
        if seg.size > self.max_bytes or key in self._items:
            return
        self._items[key] = seg
        self.bytes += seg.size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def keys(self) -> list[str]:
        return list(self._items)

    def drop(self, key: str) -> None:
        seg = self._items.pop(key, None)
        if seg is not None:
            self.bytes -= seg.size


class Archive:
    def __init__(self, url: str, *, cache_bytes: int = 64 << 20,
                 on_read: Callable[[float], None] | None = None,
                 on_archived: Callable[[int, int], None] | None = None) -> None:
        self.url = url
        self.store = open_store(url)
        # file://: obstore writes a temp file and renames it but does not promise an
        # fsync; the pass clears the rows' content right after, so the object must be
        # on disk first (a power loss, not only a killed process).
        self.local_root = url[len("file://"):] if url.startswith("file://") else None
        self.cache = _Cache(cache_bytes)
        self.on_read = on_read  # seconds to fetch and verify one segment (cache miss)
        self.on_archived = on_archived  # (messages, segments) archived by this process

    async def put(self, key: str, blob: bytes) -> None:
        await obstore.put_async(self.store, key, blob)
        if self.local_root is not None:
            await asyncio.to_thread(_fsync_path, self.local_root, key)

    async def get_bytes(self, key: str) -> bytes:
        result = await obstore.get_async(self.store, key)
        return bytes(await result.bytes_async())

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self.store, key)
        except FileNotFoundError:
            pass

    async def segment(self, key: str, checksum: str) -> Segment:
        """The parsed, verified segment: from the cache, else read through."""
        seg = self.cache.get(key)
        if seg is not None:
            return seg
        started = time.perf_counter()
        seg = decode(await self.get_bytes(key), checksum)
        if self.on_read is not None:
            self.on_read(time.perf_counter() - started)
        self.cache.put(key, seg)
        return seg


def _fsync_path(root: str, key: str) -> None:
    """The file's bytes, its directory entry (the rename) and its Hoomi's directory's
    entry (made for the Hoomi's first segment), on disk."""
    path = os.path.join(root, key)
    for target in (path, os.path.dirname(path), root):
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_archive: Archive | None = None


def configure(archive: Archive | None) -> None:
    """Set the archive this process reads archived messages from (app start, CLI)."""
    global _archive
    _archive = archive


def current() -> Archive | None:
    return _archive


# -- reads: put archived content back --------------------------------------------------------

_SEGMENTS_FOR = """
SELECT first_seq, last_seq, object_key, checksum FROM message_segments
WHERE hoomi_id = $1 AND first_seq <= $3 AND last_seq >= $2
ORDER BY first_seq
"""


def is_archived(m: StoredMessage) -> bool:
    return m.content is None and m.deleted_at is None


async def fill(conn: asyncpg.Connection | asyncpg.Pool,
               rows: list[StoredMessage]) -> list[StoredMessage]:
    """`rows` with every archived message's content and nonce put back from its segment.

    Raises `unavailable` when a segment cannot be read (store down, object missing or
    corrupt): a page never goes out with a message missing or wrong.
    """
    wanted: dict[UUID, set[int]] = {}
    for m in rows:
        if is_archived(m):
            wanted.setdefault(m.hoomi_id, set()).add(m.seq)
    if not wanted:
        return rows
    archive = _archive
    if archive is None:
        raise unavailable("archived messages cannot be read: no HOOMI_ARCHIVE_URL here")
    found: dict[tuple[UUID, int], Entry] = {}
    for hoomi_id, seqs in wanted.items():
        for attempt in (1, 2):
            try:
                found.update(await _read(conn, archive, hoomi_id, seqs))
                break
            except (FileNotFoundError, KeyError) as exc:
                # A rewrite may have swapped the segment between our two reads: look
                # its row up again once.
                if attempt == 2:
                    _log.error("archived messages of hoomi %s missing: %s", hoomi_id, exc)
                    raise unavailable("archived message missing from the archive") from exc
            except StorageError:
                raise
            except Exception as exc:
                _log.warning("archive read failed (hoomi %s): %s: %s", hoomi_id,
                             type(exc).__name__, exc)
                raise unavailable("the message archive is unavailable, retry later") from exc
    out = []
    for m in rows:
        if is_archived(m):
            e = found[(m.hoomi_id, m.seq)]
            if e.id != m.id:
                raise unavailable("archive segment does not match its rows")
            m = m._replace(content=e.content, nonce=e.nonce)
        out.append(m)
    return out


async def _read(conn: asyncpg.Connection | asyncpg.Pool, archive: Archive, hoomi_id: UUID,
                seqs: set[int]) -> dict[tuple[UUID, int], Entry]:
    segs = await conn.fetch(_SEGMENTS_FOR, hoomi_id, min(seqs), max(seqs))
    found: dict[tuple[UUID, int], Entry] = {}
    left = set(seqs)
    for s in segs:
        inside = {q for q in left if s["first_seq"] <= q <= s["last_seq"]}
        if not inside:
            continue
        try:
            seg = await archive.segment(s["object_key"], s["checksum"])
        except FileNotFoundError:
            # After a database restore the row may name an object since rewritten (an
            # erasure) under a newer key: the newest object of the same range holds
            # every message of it that was not erased.
            found_new = await replacement(archive, hoomi_id, s["first_seq"], s["last_seq"])
            if found_new is None:
                raise
            seg = found_new[1]
        for q in inside:
            found[(hoomi_id, q)] = seg.entries[q]  # KeyError: rewritten meanwhile
        left -= inside
    if left:
        raise KeyError(f"seqs {sorted(left)[:5]} in no segment")
    return found


def _range_name(first: int, last: int) -> str:
    return f"{first:020d}-{last:020d}-"


async def replacement(archive: Archive, hoomi_id: UUID, first: int, last: int
                      ) -> tuple[str, Segment, bytes] | None:
    """The newest object written for this Hoomi's seq range (keys carry the range), as
    (key, parsed segment, bytes); None if there is none."""
    metas = await obstore.list(archive.store, f"{hoomi_id}/").collect_async()
    name = _range_name(first, last)
    for meta in sorted(metas, key=lambda m: m["last_modified"], reverse=True):
        if not meta["path"].rsplit("/", 1)[-1].startswith(name):
            continue
        blob = await archive.get_bytes(meta["path"])
        try:
            seg = decode(blob)
        except SegmentError:
            continue
        if (seg.hoomi_id, seg.first_seq, seg.last_seq) == (hoomi_id, first, last):
            archive.cache.put(meta["path"], seg)
            return meta["path"], seg, blob
    return None


# -- the archive pass ------------------------------------------------------------------------

@dataclass
class PassResult:
    messages: int = 0
    segments: int = 0
    rewritten: int = 0
    orphans_deleted: int = 0
    busy: bool = False  # another process holds the lock: nothing was done


Progress = Callable[[int, int, int, float], None]  # archived, due, segments, elapsed


def _step(name: str) -> None:
    if os.environ.get(_KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _key(hoomi_id: UUID, first: int, last: int) -> str:
    return f"{hoomi_id}/{_range_name(first, last)}{uuid.uuid4().hex[:12]}.seg"


class _Changed(Exception):
    """The rows changed (deleted, purged) between the segment's write and its commit."""


async def run_pass(pool: asyncpg.Pool, archive: Archive, older_than_s: float | None, *,
                   progress: Progress | None = None,
                   max_messages: int = SEGMENT_MAX_MESSAGES) -> PassResult:
    """One pass, if no other process runs one: delete orphan objects, rewrite segments
    with erased messages, then (with `older_than_s`) archive every message older."""
    result = PassResult()
    if await pool.fetchval("SELECT to_regclass('messages_partitioned') IS NOT NULL"):
        # Migration 0004's copy is unfinished: `messages` is still the old table, which
        # the previous release serves and the swap drops.
        raise RuntimeError("messages are being moved to the partitioned table: finish "
                           "`hoomi migrate` before archiving")
    async with pool.acquire() as lock:
        if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            result.busy = True
            return result
        try:
            result.orphans_deleted += await delete_orphans(pool, archive)
            result.rewritten += await _rewrite_pending(pool, archive)
            result.orphans_deleted += await delete_orphans(pool, archive)
            if older_than_s is not None:
                await _archive_old(pool, archive, older_than_s, result, progress,
                                   max_messages)
        finally:
            await lock.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return result


_DUE = """
SELECT h.id, coalesce(h.archived_upto, 0) AS upto FROM hoomis h
CROSS JOIN LATERAL (
  SELECT m.created_at FROM messages m
  WHERE m.hoomi_id = h.id AND m.seq > coalesce(h.archived_upto, 0)
  ORDER BY m.seq LIMIT 1
) f
WHERE f.created_at < $1
ORDER BY h.id
"""

_DUE_COUNT = """
SELECT count(*) FROM messages
WHERE content IS NOT NULL AND deleted_at IS NULL AND created_at < $1
"""

_NEXT = """
SELECT seq, id, content, nonce, created_at, deleted_at FROM messages
WHERE hoomi_id = $1 AND seq > $2 ORDER BY seq LIMIT $3
"""


async def _archive_old(pool: asyncpg.Pool, archive: Archive, older_than_s: float,
                       result: PassResult, progress: Progress | None,
                       max_messages: int) -> None:
    started = time.perf_counter()
    cutoff = await pool.fetchval("SELECT now() - make_interval(secs => $1)",
                                 float(older_than_s))
    due_total = await pool.fetchval(_DUE_COUNT, cutoff) if progress else 0
    for hoomi in await pool.fetch(_DUE, cutoff):
        upto = hoomi["upto"]
        while True:
            try:
                done = await _archive_next(pool, archive, hoomi["id"], upto, cutoff,
                                           max_messages)
            except _Changed:
                _log.info("hoomi %s changed while archiving; retried next pass", hoomi["id"])
                break
            if done is None:
                break
            upto, count = done
            if count:
                result.messages += count
                result.segments += 1
                if archive.on_archived is not None:
                    archive.on_archived(count, 1)
                if progress is not None:
                    progress(result.messages, due_total, result.segments,
                             time.perf_counter() - started)


async def _archive_next(pool: asyncpg.Pool, archive: Archive, hoomi_id: UUID, upto: int,
                        cutoff: Any, max_messages: int) -> tuple[int, int] | None:
    """Archive the next range of this Hoomi after `upto`; (new upto, messages) or None."""
    rows = await pool.fetch(_NEXT, hoomi_id, upto, max_messages)
    taken, size = [], 0
    for r in rows:
        if r["created_at"] >= cutoff:
            break
        size += len(r["content"] or b"")
        taken.append(r)
        if size >= SEGMENT_MAX_BYTES:
            break
    if not taken:
        return None
    first, last = upto + 1, taken[-1]["seq"]
    live = [Entry(r["seq"], r["id"], r["nonce"], r["content"])
            for r in taken if r["deleted_at"] is None and r["content"] is not None]
    if not live:  # only tombstones: nothing to write
        await pool.execute("UPDATE hoomis SET archived_upto = $2 WHERE id = $1", hoomi_id,
                           last)
        return last, 0
    key = _key(hoomi_id, first, last)
    blob = encode(hoomi_id, first, last, live)
    checksum = hashlib.sha256(blob).hexdigest()
    await pool.execute("INSERT INTO archive_orphans (hoomi_id, object_key) VALUES ($1, $2)",
                       hoomi_id, key)
    _step("recorded")
    await archive.put(key, blob)
    _step("written")
    back = decode(await archive.get_bytes(key), checksum)
    if (back.hoomi_id, back.first_seq, back.last_seq) != (hoomi_id, first, last) or \
            list(back.entries.values()) != live:
        raise SegmentError(f"segment {key} read back differs from what was written")
    _step("verified")
    seqs = [e.seq for e in live]
    async with pool.acquire() as conn, conn.transaction():
        now = {r["seq"]: r for r in await conn.fetch(
            "SELECT seq, content, nonce, deleted_at FROM messages "
            "WHERE hoomi_id = $1 AND seq = ANY($2::bigint[]) FOR UPDATE", hoomi_id, seqs)}
        for e in live:
            r = now.get(e.seq)
            if r is None or r["deleted_at"] is not None or r["content"] != e.content \
                    or r["nonce"] != e.nonce:
                raise _Changed()
        await conn.execute(
            "INSERT INTO message_segments (hoomi_id, first_seq, last_seq, object_key, "
            "checksum, size, messages) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            hoomi_id, first, last, key, checksum, len(blob), len(live))
        await conn.execute(
            "UPDATE messages SET content_len = octet_length(content), content = NULL, "
            "nonce = NULL WHERE hoomi_id = $1 AND seq = ANY($2::bigint[])", hoomi_id, seqs)
        await conn.execute("UPDATE hoomis SET archived_upto = $2 WHERE id = $1", hoomi_id,
                           last)
        await conn.execute("DELETE FROM archive_orphans WHERE hoomi_id = $1 "
                           "AND object_key = $2", hoomi_id, key)
    _step("committed")
    return last, len(live)


# -- erasure: orphans and rewrites -----------------------------------------------------------

_ORPHANS = """
SELECT o.hoomi_id, o.object_key FROM archive_orphans o
WHERE NOT EXISTS (SELECT 1 FROM message_segments s
                  WHERE s.hoomi_id = o.hoomi_id AND s.object_key = o.object_key)
ORDER BY o.since
"""


async def delete_orphans(pool: asyncpg.Pool, archive: Archive) -> int:
    """Delete every object no segment row points to (left by a crash, a rewrite or a
    deleted Hoomi), then its orphan row. Only under the pass's lock (an orphan row may
    be a write in flight otherwise)."""
    n = 0
    for r in await pool.fetch(_ORPHANS):
        await archive.delete(r["object_key"])
        await pool.execute("DELETE FROM archive_orphans WHERE hoomi_id = $1 "
                           "AND object_key = $2", r["hoomi_id"], r["object_key"])
        n += 1
    return n


_PENDING = """
SELECT hoomi_id, first_seq, last_seq, object_key, checksum FROM message_segments
WHERE erase_pending ORDER BY created_at
"""

# The archived (live, content elsewhere) messages of a segment's range, now.
_KEPT = """
SELECT seq FROM messages
WHERE hoomi_id = $1 AND seq BETWEEN $2 AND $3 AND content IS NULL AND deleted_at IS NULL
"""


async def _rewrite_pending(pool: asyncpg.Pool, archive: Archive) -> int:
    n = 0
    for s in await pool.fetch(_PENDING):
        try:
            await _rewrite(pool, archive, s)
            n += 1
        except _Changed:
            pass  # deleted again meanwhile: still pending, the next tick redoes it
        except (FileNotFoundError, SegmentError, obstore.exceptions.BaseError) as exc:
            # One segment that cannot be rewritten (its object missing after a restore:
            # `hoomi archive --check`; the store failing) must not hold the others back.
            _log.warning("archive: rewrite of %s failed: %s: %s", s["object_key"],
                         type(exc).__name__, exc)
    return n


async def _rewrite(pool: asyncpg.Pool, archive: Archive, s: asyncpg.Record) -> None:
    hoomi_id, first, last, old = s["hoomi_id"], s["first_seq"], s["last_seq"], s["object_key"]
    seg = decode(await archive.get_bytes(old), s["checksum"])
    kept_seqs = {r["seq"] for r in await pool.fetch(_KEPT, hoomi_id, first, last)}
    kept = [e for q, e in sorted(seg.entries.items()) if q in kept_seqs]
    new_key: str | None = None
    if len(kept) == len(seg.entries):  # nothing of it was erased (a purge nearby)
        pass
    elif kept:
        new_key = _key(hoomi_id, first, last)
        blob = encode(hoomi_id, first, last, kept)
        checksum = hashlib.sha256(blob).hexdigest()
        await pool.execute("INSERT INTO archive_orphans (hoomi_id, object_key) "
                           "VALUES ($1, $2)", hoomi_id, new_key)
        await archive.put(new_key, blob)
        if list(decode(await archive.get_bytes(new_key), checksum).entries.values()) != kept:
            raise SegmentError(f"segment {new_key} read back differs from what was written")
        _step("rewritten")
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(
                "SELECT object_key FROM message_segments WHERE hoomi_id = $1 "
                "AND first_seq = $2 FOR UPDATE", hoomi_id, first) != old:
            raise _Changed()
        if {r["seq"] for r in await conn.fetch(_KEPT, hoomi_id, first, last)} != kept_seqs:
            raise _Changed()
        if not kept:
            # The trigger makes the old key an orphan.
            await conn.execute("DELETE FROM message_segments WHERE hoomi_id = $1 "
                               "AND first_seq = $2", hoomi_id, first)
        elif new_key is None:
            await conn.execute("UPDATE message_segments SET erase_pending = false "
                               "WHERE hoomi_id = $1 AND first_seq = $2", hoomi_id, first)
        else:
            await conn.execute(
                "UPDATE message_segments SET object_key = $3, checksum = $4, size = $5, "
                "messages = $6, erase_pending = false, created_at = now() "
                "WHERE hoomi_id = $1 AND first_seq = $2",
                hoomi_id, first, new_key, checksum, len(blob), len(kept))
            await conn.execute("DELETE FROM archive_orphans WHERE hoomi_id = $1 "
                               "AND object_key = $2", hoomi_id, new_key)
    _step("swapped")
    if new_key is not None or not kept:  # the old key is an orphan now (the trigger)
        await archive.delete(old)
        await pool.execute("DELETE FROM archive_orphans WHERE hoomi_id = $1 "
                           "AND object_key = $2", hoomi_id, old)


# -- after a restore: rows that name objects since rewritten --------------------------------

@dataclass
class CheckResult:
    segments: int = 0
    missing: int = 0  # rows whose object is gone
    repaired: int = 0  # ... pointed at the rewritten object of the same range
    tombstoned: int = 0  # archived messages erased since the backup: now tombstones
    lost: int = 0  # no object at all for the range (see docs/storage.md)
    busy: bool = False


async def check(pool: asyncpg.Pool, archive: Archive) -> CheckResult:
    """Check that every segment row's object exists (`hoomi archive --check`, after a
    database restore). A row naming an object that was rewritten for an erasure after
    the backup is pointed at the newest object of its range; its archived messages that
    are not in it were erased since the backup, and become tombstones (audited), so the
    restore cannot bring erased messages back even as rows."""
    result = CheckResult()
    async with pool.acquire() as lock:
        if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            result.busy = True
            return result
        try:
            for s in await pool.fetch("SELECT hoomi_id, first_seq, last_seq, object_key "
                                      "FROM message_segments ORDER BY hoomi_id, first_seq"):
                result.segments += 1
                try:
                    await obstore.head_async(archive.store, s["object_key"])
                    continue
                except FileNotFoundError:
                    result.missing += 1
                found = await replacement(archive, s["hoomi_id"], s["first_seq"],
                                          s["last_seq"])
                if found is None:
                    _log.error("archive segment %s is missing and has no replacement",
                               s["object_key"])
                    result.lost += 1
                    continue
                result.tombstoned += await _repoint(pool, s, *found)
                result.repaired += 1
        finally:
            await lock.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return result


async def _repoint(pool: asyncpg.Pool, s: asyncpg.Record, key: str, seg: Segment,
                   blob: bytes) -> int:
    hoomi_id, first, last = s["hoomi_id"], s["first_seq"], s["last_seq"]
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT object_key FROM message_segments WHERE hoomi_id = $1 "
                               "AND first_seq = $2 FOR UPDATE", hoomi_id, first) \
                != s["object_key"]:
            return 0
        rows = await conn.fetch(
            "SELECT seq, id FROM messages WHERE hoomi_id = $1 AND seq BETWEEN $2 AND $3 "
            "AND content IS NULL AND deleted_at IS NULL FOR UPDATE", hoomi_id, first, last)
        gone = [r["seq"] for r in rows
                if r["seq"] not in seg.entries or seg.entries[r["seq"]].id != r["id"]]
        archived = {r["seq"] for r in rows}
        if gone:
            await conn.execute(
                "UPDATE messages SET deleted_at = now(), updated_at = now(), "
                "session_id = NULL, content_len = NULL "
                "WHERE hoomi_id = $1 AND seq = ANY($2::bigint[])", hoomi_id, gone)
            # Their search tokens go with them, as on any deletion (message_tokens).
            await conn.execute("DELETE FROM message_tokens WHERE hoomi_id = $1 "
                               "AND seq = ANY($2::bigint[])", hoomi_id, gone)
            await audit.record(conn, Actor.system(), "archive.erased_since_backup",
                               hoomi_id=hoomi_id,
                               details={"count": len(gone), "from_seq": min(gone),
                                        "to_seq": max(gone)})
        await conn.execute(
            "UPDATE message_segments SET object_key = $3, checksum = $4, size = $5, "
            "messages = $6, erase_pending = $7 WHERE hoomi_id = $1 AND first_seq = $2",
            hoomi_id, first, key, hashlib.sha256(blob).hexdigest(), len(blob),
            len(seg.entries), any(q not in archived for q in seg.entries))
    return len(gone)


# -- marking segments from deletions and purges ----------------------------------------------

async def mark_erased(conn: asyncpg.Connection, hoomi_id: UUID, lo: int, hi: int) -> None:
    """In the deleting transaction: the segments of this Hoomi overlapping [lo, hi] hold
    erased content and must be rewritten (within one erasure tick)."""
    await conn.execute(
        "UPDATE message_segments SET erase_pending = true "
        "WHERE hoomi_id = $1 AND first_seq <= $3 AND last_seq >= $2 AND NOT erase_pending",
        hoomi_id, lo, hi)


async def prune_cache(pool: asyncpg.Pool, archive: Archive) -> int:
    """Drop cached segments no row points to any more (rewritten or dropped for an
    erasure, by whichever replica): erased ciphertext leaves every replica's memory
    within one tick, not only the store. Returns how many were dropped."""
    keys = archive.cache.keys()
    if not keys:
        return 0
    live = {r["object_key"] for r in await pool.fetch(
        "SELECT object_key FROM message_segments WHERE object_key = ANY($1::text[])", keys)}
    gone = [k for k in keys if k not in live]
    for k in gone:
        archive.cache.drop(k)
    return len(gone)


# -- the background loop ---------------------------------------------------------------------

ERASE_TICK_S = 60.0


async def archive_forever(pool: asyncpg.Pool, archive: Archive, after_s: float | None,
                          interval: float) -> None:
    """Every min(interval, 60 s): delete orphans and rewrite segments with erased
    messages; every `interval`: also archive messages older than `after_s`. One replica
    at a time (the pass's advisory lock)."""
    tick = min(interval, ERASE_TICK_S)
    last_archive = time.monotonic()
    while True:
        await asyncio.sleep(tick)
        due = after_s is not None and time.monotonic() - last_archive >= interval - 0.001
        try:
            await prune_cache(pool, archive)
            result = await run_pass(pool, archive, after_s if due else None)
            if due and not result.busy:
                last_archive = time.monotonic()
            if result.messages or result.rewritten or result.orphans_deleted:
                _log.info("archive: %d messages in %d segments, %d rewritten, %d objects "
                          "deleted", result.messages, result.segments, result.rewritten,
                          result.orphans_deleted)
        except Exception as exc:
            _log.warning("archive pass failed: %s: %s", type(exc).__name__, exc)
