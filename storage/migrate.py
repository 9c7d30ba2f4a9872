"""Versioned SQL migrations, applied once each, in order, under an advisory lock.

Files are `migrations/NNNN_name.sql`. Every replica runs `migrate` at start-up; the
advisory lock makes concurrent start-ups wait for one another instead of racing, and
the checksum column refuses a database whose applied migration was edited afterwards.

Install-time parameters. A migration may read `current_setting('hoomi.<name>')`:
`migrate` sets each of `_parameters(...)` for the migration's transaction only, so the
file (and its checksum) stays the same on every install while the value comes from the
configuration. Migration 0004 reads `hoomi.message_partitions` (HOOMI_MESSAGE_PARTITIONS)
and records it in `hub_settings`; a later `migrate` naming another count is refused.

Long data moves. A migration that must move many rows does not do it in its own
transaction: it creates the new structure and a resumable job the database drives by
itself (for 0004: the `messages_copy` row, the trigger that mirrors later writes, and the
functions `hoomi_copy_messages(n)` and `hoomi_finish_messages_copy()`). `migrate(copy=True)`
(`hoomi migrate`) then runs the job in batches, one transaction each, reporting progress;
interrupted, it resumes from the last committed batch. `migrate()` without `copy`, as run
by a replica at start-up, raises `MigrationPending` while a job is unfinished: the new
release refuses to start until `hoomi migrate` has finished, while replicas of the
previous release go on serving on the old table (the trigger keeps the copy complete).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg

_log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every replica ("hoomimig").
_LOCK_KEY = 0x686F6F6D696D6967
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    pass


class MigrationPending(MigrationError):
    """A data move is unfinished: run `hoomi migrate`."""


DEFAULT_MESSAGE_PARTITIONS = 16
COPY_BATCH = 10_000

# (rows copied so far, rows to copy, seconds since this run started)
Progress = Callable[[int, int, float], None]


def available() -> list[Migration]:
    """The migrations shipped with this package, in version order."""
    found: list[Migration] = []
    for entry in resources.files("storage.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must be 1..N without gaps, got {versions}")
    return found


async def migrate(
    conn: asyncpg.Connection,
    *,
    partitions: int | None = None,
    copy: bool = False,
    batch: int = COPY_BATCH,
    progress: Progress | None = None,
    target: int | None = None,
) -> list[int]:
    """Apply every pending migration; return the versions applied by this call.

    `partitions`: HOOMI_MESSAGE_PARTITIONS; used at install, then checked against the
    recorded count (None: not checked, the default used at install). `copy`: run an
    unfinished data move now (else `MigrationPending` is raised), calling `progress`
    after each batch. `target`: stop after that version (tests and bench baselines
    build an older schema with it).
    """
    applied_now = await _apply(conn, partitions, target)
    if partitions is not None:
        await _check_partitions(conn, partitions)
    state = await _copy_state(conn)
    if state is not None:
        if not copy:
            copied, total = state
            raise MigrationPending(
                "messages are being moved to the partitioned table (migration 0004; "
                f"{copied} of about {total} copied): run `hoomi migrate` to finish the "
                "move; the hub starts once it is done")
        await copy_messages(conn, batch=batch, progress=progress)
    return applied_now


async def _apply(
    conn: asyncpg.Connection, partitions: int | None, target: int | None
) -> list[int]:
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     INTEGER PRIMARY KEY,
                name        TEXT NOT NULL,
                checksum    TEXT NOT NULL,
                applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        done = {r["version"]: r["checksum"] for r in rows}
        for migration in available():
            if target is not None and migration.version > target:
                break
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed "
                        "after it was applied; write a new migration instead"
                    )
                continue
            async with conn.transaction():
                for name, value in _parameters(partitions).items():
                    await conn.execute("SELECT set_config($1, $2, true)", name, value)
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.version)
        unknown = sorted(set(done) - {m.version for m in available()})
        if unknown:
            # A newer replica got here first (rolling upgrade); migrations are additive,
            # so an older replica may keep serving, but say so.
            _log.warning("database has migrations newer than this hub: %s", unknown)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


def _parameters(partitions: int | None) -> dict[str, str]:
    """Install-time values a migration may read with current_setting()."""
    count = DEFAULT_MESSAGE_PARTITIONS if partitions is None else partitions
    return {"hoomi.message_partitions": str(count)}


async def _check_partitions(conn: asyncpg.Connection, partitions: int) -> None:
    if await conn.fetchval("SELECT to_regclass('hub_settings') IS NULL"):
        return  # stopped before 0004 (`target`)
    recorded = await conn.fetchval(
        "SELECT value FROM hub_settings WHERE name = 'message_partitions'")
    if recorded is not None and int(recorded) != partitions:
        raise MigrationError(
            f"HOOMI_MESSAGE_PARTITIONS is {partitions}, but this database's messages table "
            f"was created with {recorded} partitions; the count is fixed at install: set "
            f"HOOMI_MESSAGE_PARTITIONS={recorded} (changing it means moving every message, "
            "see docs/scaling.md)")


async def _copy_state(conn: asyncpg.Connection) -> tuple[int, int] | None:
    """(copied, total) of an unfinished move of messages, None if there is none."""
    if await conn.fetchval("SELECT to_regclass('messages_copy') IS NULL"):
        return None
    row = await conn.fetchrow(
        "SELECT copied, total FROM messages_copy WHERE finished_at IS NULL")
    return None if row is None else (row["copied"], row["total"])


async def copy_messages(
    conn: asyncpg.Connection, *, batch: int = COPY_BATCH, progress: Progress | None = None,
    max_batches: int | None = None, finish: bool = True,
) -> bool:
    """Drive migration 0004's copy to its end; True if this call did the swap.

    Each batch is its own transaction, so an interrupted run loses at most the batch in
    flight and the next run resumes after the last committed one. `max_batches` stops
    early (tests interrupt a copy with it); `finish=False` copies but leaves the swap to a
    later call.
    """
    started = time.perf_counter()
    done = 0
    while True:
        state = await _copy_state(conn)
        if state is None:
            return False  # finished, here or by another `hoomi migrate`
        if max_batches is not None and done >= max_batches:
            return False
        n = await conn.fetchval("SELECT hoomi_copy_messages($1)", batch)
        done += 1
        copied, total = await _copy_state(conn) or state
        if progress is not None:
            progress(copied, max(total, copied), time.perf_counter() - started)
        if n == 0:
            break
    if not finish:
        return False
    swapped = bool(await conn.fetchval("SELECT hoomi_finish_messages_copy()"))
    if swapped:
        _log.info("messages moved to the partitioned table in %.1f s",
                  time.perf_counter() - started)
    return swapped
