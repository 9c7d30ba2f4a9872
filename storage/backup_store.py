"""Backups to a destination URL: a directory (`file:///dir`) or S3 (`s3://bucket/prefix`).

A backup at a destination is two objects side by side:

- `hoomi-<UTC time, ms>Z.dump`: the `pg_dump --format=custom` archive (storage/backup.py);
- `hoomi-<same>.dump.json`: its manifest (name, size, sha256, created_at, the migrations
  applied, pg_dump's version, how many tables it holds).

A backup counts only once its manifest exists, and the manifest is written only after
the backup was verified: its table of contents read back (`pg_restore --list` on the
finished local file), then the stored bytes compared with the local file's size and
sha256 (in a directory the file itself, read back after fsync; on S3 the object, read
back in full after the upload). A dump with no manifest (an upload cut off, a replica
killed) is never restored, and goes at the next pruning. Pruning keeps the newest `keep`
verified backups and runs only after a new one was verified, so a failing backup never
costs an old one.

A restore from a URL takes the newest verified backup (or the one the URL names),
checks the size and sha256 of the bytes it got against the manifest, then restores.

Every file written here is 0600 and every directory made here 0700: a backup holds
every user id and membership. S3 takes its endpoint and credentials from the standard
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION; objects are
private unless the bucket's own policy says otherwise.

Scheduled backups (`backup_forever`): every replica checks every
min(HOOMI_BACKUP_INTERVAL_S, 60 s); one at a time (a PostgreSQL advisory lock, held
through the whole backup) it looks at the newest verified backup at the destination and
makes one if that is HOOMI_BACKUP_INTERVAL_S old or more. The lock and the manifest,
written before the lock is let go, mean that two replicas never both back up in one
interval, and that a `hoomi backup URL` run by hand counts as the interval's backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import asyncpg

from .backup import BackupError, dump, pg_tool

_log = logging.getLogger(__name__)

_LOCK_KEY = 0x686F6F6D69626B70  # "hoomibkp"
_NAME = re.compile(r"^hoomi-(\d{8}T\d{9}Z)\.dump$")
MANIFEST = ".json"  # a manifest's name is its dump's name plus this
_CHUNK = 8 << 20
# After a failed scheduled backup this replica waits this long (at most the interval)
# before trying again, so a destination that is down is not hammered with full dumps.
_RETRY_S = 300.0


def is_url(target: str) -> bool:
    return target.startswith(("file://", "s3://"))


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str  # the dump's object name, e.g. hoomi-20261201T120000123Z.dump
    size: int
    sha256: str
    created_at: str  # ISO 8601, UTC: just before pg_dump took its snapshot
    migrations: tuple[int, ...]  # schema_migrations versions in the backup
    pg_dump_version: str
    tables: int  # tables whose data it holds

    @property
    def created(self) -> float:
        return datetime.fromisoformat(self.created_at).timestamp()

    @property
    def schema_version(self) -> int:
        return max(self.migrations, default=0)

    def to_json(self) -> bytes:
        body = asdict(self)
        body["migrations"] = list(self.migrations)
        body["schema_version"] = self.schema_version
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            body = json.loads(raw)
            m = cls(name=str(body["name"]), size=int(body["size"]),
                    sha256=str(body["sha256"]), created_at=str(body["created_at"]),
                    migrations=tuple(int(v) for v in body["migrations"]),
                    pg_dump_version=str(body["pg_dump_version"]), tables=int(body["tables"]))
            m.created  # noqa: B018 (a bad timestamp fails here, not later)
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"unreadable manifest: {exc}") from None
        if not _NAME.match(m.name) or not re.fullmatch(r"[0-9a-f]{64}", m.sha256):
            raise BackupError(f"unreadable manifest for {m.name!r}")
        return m


def backup_name(at: datetime) -> str:
    at = at.astimezone(UTC)
    return f"hoomi-{at:%Y%m%dT%H%M%S}{at.microsecond // 1000:03d}Z.dump"


def file_digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a local file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def part_size(size: int) -> int:
    """Multipart part size for an upload of `size` bytes: 5 MiB (S3's minimum), larger
    when needed to stay under S3's 10 000 parts (5 MiB parts would cap a dump at 48 GiB)."""
    return max(5 << 20, -(-size // 9_000))


def _create_private(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    return fd


class Destination(Protocol):
    url: str

    def staging(self) -> Any:
        """A context manager yielding the local directory pg_dump writes into."""

    def upload(self, name: str, path: Path, size: int, sha256: str,
               stop: threading.Event) -> None:
        """Store the finished local file as `name`, then read it back and compare:
        BackupError (and nothing stored under `name`) if it differs, or if `stop` was
        set meanwhile."""

    def discard(self, name: str) -> None:
        """Remove what an unfinished backup left under `name` (best effort)."""

    def write_manifest(self, manifest: Manifest) -> None: ...

    def names(self) -> list[str]:
        """Every object name directly under the destination."""

    def read(self, name: str) -> bytes: ...

    def delete(self, name: str) -> None: ...

    def fetch(self, manifest: Manifest, workdir: Path) -> Path:
        """A local file holding the backup's bytes (downloaded into `workdir` if
        needed), checked against the manifest's size and sha256."""


class DirDestination:
    """`file:///dir`: the dump is written straight into the directory (as
    `.partial`, linked to its name when done, storage/backup.py)."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root

    def _ensure(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise BackupError(f"{self.url}: cannot make {self.root}: {exc.strerror}") from None

    @contextmanager
    def staging(self) -> Iterator[Path]:
        self._ensure()
        yield self.root

    def upload(self, name: str, path: Path, size: int, sha256: str,
               stop: threading.Event) -> None:
        # The file is the stored object: its size and sha256 were just read back from
        # disk after pg_dump's fsync. Nothing to copy.
        if path != self.root / name:
            raise BackupError(f"{path} is not in {self.root}")

    def discard(self, name: str) -> None:
        self.delete(name)

    def write_manifest(self, manifest: Manifest) -> None:
        final = self.root / (manifest.name + MANIFEST)
        partial = final.with_name(final.name + ".partial")
        try:
            fd = _create_private(partial)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(manifest.to_json())
                    f.flush()
                    os.fsync(f.fileno())
                os.link(partial, final)
            finally:
                partial.unlink(missing_ok=True)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the manifest's name is durable before it counts
            finally:
                os.close(dir_fd)
        except FileExistsError:
            raise BackupError(f"{final} exists") from None
        except OSError as exc:
            raise BackupError(f"cannot write {final}: {exc.strerror}") from None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        try:
            return [e.name for e in os.scandir(self.root) if e.is_file()]
        except OSError as exc:
            raise BackupError(f"{self.url}: cannot list {self.root}: {exc.strerror}") from None

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def fetch(self, manifest: Manifest, workdir: Path) -> Path:
        path = self.root / manifest.name
        if not path.is_file():
            raise BackupError(f"{path}: the manifest is there but the backup is not")
        _check(manifest, *file_digest(path))
        return path


class S3Destination:
    """`s3://bucket/prefix`, through obstore: multipart uploads for large dumps."""

    def __init__(self, url: str, bucket: str, prefix: str) -> None:
        from obstore.store import S3Store

        self.url = url
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options = {"allow_http": True} if endpoint and endpoint.startswith("http://") else {}
        try:
            self.store = S3Store(bucket, prefix=prefix or None,
                                 client_options=options or None)  # type: ignore[arg-type]
        except Exception as exc:
            raise BackupError(f"{url}: {exc}") from None

    @contextmanager
    def staging(self) -> Iterator[Path]:
        # mkdtemp makes it 0700. TMPDIR decides where (it must hold one dump).
        work = Path(tempfile.mkdtemp(prefix="hoomi-backup-"))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def upload(self, name: str, path: Path, size: int, sha256: str,
               stop: threading.Event) -> None:
        import obstore

        try:
            obstore.put(self.store, name, path, chunk_size=part_size(size))
            if stop.is_set():
                raise BackupError(f"{name} not counted: the hub is shutting down")
            meta = obstore.head(self.store, name)
            if meta["size"] != size:
                raise BackupError(f"{name}: stored {meta['size']} bytes, wrote {size}")
            got_size, got_sha = self._digest(name)
        except BackupError:
            self._forget(name)
            raise
        except Exception as exc:
            self._forget(name)
            raise BackupError(f"upload of {name} to {self.url} failed: {exc}") from None
        if (got_size, got_sha) != (size, sha256):
            self._forget(name)
            raise BackupError(f"{name}: the object read back differs from the dump "
                              f"({got_size} bytes, sha256 {got_sha[:12]}…)")

    def _digest(self, name: str) -> tuple[int, str]:
        import obstore

        h = hashlib.sha256()
        size = 0
        for chunk in obstore.get(self.store, name).stream(min_chunk_size=_CHUNK):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()

    def discard(self, name: str) -> None:
        self._forget(name)

    def _forget(self, name: str) -> None:
        try:
            self.delete(name)
        except Exception as exc:  # the next pruning removes it
            _log.warning("could not remove unverified %s: %s", name, exc)

    def write_manifest(self, manifest: Manifest) -> None:
        self._call("write", manifest.name + MANIFEST, lambda o: o.put(
            self.store, manifest.name + MANIFEST, manifest.to_json(), use_multipart=False))

    def names(self) -> list[str]:
        listing = self._call("list", "", lambda o: o.list_with_delimiter(self.store))
        return [obj["path"].rpartition("/")[2] for obj in listing["objects"]]

    def read(self, name: str) -> bytes:
        return bytes(self._call("read", name, lambda o: o.get(self.store, name).bytes()))

    def delete(self, name: str) -> None:
        self._call("delete", name, lambda o: o.delete(self.store, name))

    def fetch(self, manifest: Manifest, workdir: Path) -> Path:
        import obstore
        from obstore.exceptions import NotFoundError

        path = workdir / manifest.name
        fd = _create_private(path)
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in obstore.get(self.store, manifest.name).stream(
                        min_chunk_size=_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        except NotFoundError:
            raise BackupError(f"{self.url}/{manifest.name}: the manifest is there but the "
                              "backup is not") from None
        except Exception as exc:
            raise BackupError(f"download of {manifest.name} failed: {exc}") from None
        _check(manifest, size, h.hexdigest())
        return path

    def _call(self, what: str, name: str, fn: Callable[[Any], Any]) -> Any:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return fn(obstore)
        except (FileNotFoundError, NotFoundError):
            raise FileNotFoundError(f"{self.url}/{name}") from None
        except Exception as exc:
            raise BackupError(f"{what} {self.url}/{name} failed: {exc}") from None


def _check(manifest: Manifest, size: int, sha256: str) -> None:
    if size != manifest.size or sha256 != manifest.sha256:
        raise BackupError(f"{manifest.name} does not match its manifest ({size} bytes, "
                          f"sha256 {sha256[:12]}… instead of {manifest.size} bytes, "
                          f"{manifest.sha256[:12]}…): not restoring it")


def open_destination(url: str) -> Destination:
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise BackupError(f"{url}: expected file:///absolute/dir")
        return DirDestination(url, Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise BackupError(f"{url}: expected s3://bucket/prefix")
        return S3Destination(url, parts.netloc, parts.path.strip("/"))
    raise BackupError(f"{url}: a backup destination is file:///dir or s3://bucket/prefix")


def split_named(url: str) -> tuple[str, str | None]:
    """`…/hoomi-<time>.dump` names one backup: (its destination, its name)."""
    head, _, last = url.rstrip("/").rpartition("/")
    if _NAME.match(last) and "://" in head:
        return head, last
    return url, None


def verified(dest: Destination) -> list[Manifest]:
    """The backups at `dest` whose manifest is there and readable, newest first."""
    found: list[Manifest] = []
    for name in sorted(dest.names(), reverse=True):
        if not (name.endswith(MANIFEST) and _NAME.match(name[:-len(MANIFEST)])):
            continue
        try:
            m = Manifest.from_json(dest.read(name))
        except (BackupError, FileNotFoundError) as exc:  # pruned meanwhile, or damaged
            _log.warning("%s/%s skipped: %s", dest.url, name, exc)
            continue
        if m.name + MANIFEST == name:
            found.append(m)
    return found


def prune(dest: Destination, keep: int) -> list[str]:
    """Keep the newest `keep` verified backups; delete older ones (manifest first, so a
    half-deleted backup is never counted) and dumps left without a manifest by an
    interrupted backup older than the newest verified one. Returns the dumps deleted."""
    kept = verified(dest)
    gone: list[str] = []
    for m in kept[keep:]:
        dest.delete(m.name + MANIFEST)
        dest.delete(m.name)
        gone.append(m.name)
    if kept:
        newest = kept[0].name
        counted = {m.name for m in kept}
        for name in dest.names():
            base = name.removesuffix(".partial")
            if _NAME.match(base) and base < newest and base not in counted:
                dest.delete(name)
                gone.append(name)
    return gone


_pg_dump_version: str | None = None


def pg_dump_version() -> str:
    global _pg_dump_version
    if _pg_dump_version is None:
        out = subprocess.run([str(pg_tool("pg_dump")), "--version"], capture_output=True,
                             text=True, check=True).stdout
        _pg_dump_version = out.strip()
    return _pg_dump_version


def backup_to(dest: Destination, dsn: str, keep: int, migrations: tuple[int, ...],
              stop: threading.Event | None = None) -> tuple[Manifest, list[str]]:
    """Make one verified backup at `dest`, then prune to `keep`. Blocking (pg_dump, the
    upload): call it from a thread. Returns the manifest and the dumps pruned. Once
    `stop` is set (from another thread), pg_dump is ended and no manifest is written."""
    stop = stop or threading.Event()
    started = datetime.now(UTC)
    name = backup_name(started)
    with dest.staging() as stage:
        info = dump(dsn, stage / name, stop)  # the table of contents is read back here
        try:
            size, sha256 = file_digest(info.path)
            if not stop.is_set():
                dest.upload(name, info.path, size, sha256, stop)
            manifest = Manifest(name=name, size=size, sha256=sha256,
                                created_at=started.isoformat(), migrations=migrations,
                                pg_dump_version=pg_dump_version(), tables=info.tables)
            if stop.is_set():
                raise BackupError(f"{name} not counted: the hub is shutting down")
        except BaseException:
            dest.discard(name)
            raise
        dest.write_manifest(manifest)
    return manifest, prune(dest, keep)


async def _migrations(conn: asyncpg.Connection) -> tuple[int, ...]:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return ()  # a database no hub has migrated yet
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return tuple(r["version"] for r in rows)


@dataclass(frozen=True, slots=True)
class Outcome:
    newest: Manifest | None  # the newest verified backup at the destination now
    made: Manifest | None  # the one made by this call, if any
    pruned: list[str]
    seconds: float


async def backup_once(conn: asyncpg.Connection, dsn: str, url: str, keep: int, *,
                      due_after: float | None = None) -> Outcome | None:
    """One backup to `url` under the backup lock, which `conn` holds meanwhile.

    `due_after` None (by hand): wait for the lock, always back up. Otherwise (the
    schedule): None if another replica holds the lock; back up only if the newest
    verified backup is `due_after` seconds old or more.
    """
    dest = open_destination(url)
    if due_after is None:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        return None
    try:
        started = time.monotonic()
        if due_after is not None:
            done = await asyncio.to_thread(verified, dest)
            if done and time.time() - done[0].created < due_after:
                return Outcome(done[0], None, [], 0.0)
        migrations = await _migrations(conn)
        stop = threading.Event()
        work = asyncio.ensure_future(
            asyncio.to_thread(backup_to, dest, dsn, keep, migrations, stop))
        try:
            made, pruned = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The replica is stopping: end pg_dump, and hold the lock until the thread
            # is done, so no other replica starts while this one still writes.
            stop.set()
            with contextlib.suppress(Exception):
                await work
            raise
        return Outcome(made, made, pruned, time.monotonic() - started)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def backup_forever(pool: asyncpg.Pool, dsn: str, url: str, interval: float,
                         keep: int, *, on_outcome: Callable[[Outcome], None],
                         on_failure: Callable[[], None], check_every: float = 60.0) -> None:
    """The schedule: every min(interval, check_every) seconds, back up if one is due
    (see the module docstring). Runs until cancelled."""
    period = min(interval, check_every)
    retry_at = 0.0
    while True:
        await asyncio.sleep(period)
        if time.monotonic() < retry_at:
            continue
        try:
            async with pool.acquire() as conn:
                outcome = await backup_once(conn, dsn, url, keep, due_after=interval)
        except Exception as exc:
            on_failure()
            retry_at = time.monotonic() + min(interval, _RETRY_S)
            _log.error("scheduled backup to %s failed: %s", url, exc)
            continue
        if outcome is None:
            continue
        on_outcome(outcome)
        if outcome.made is not None:
            _log.info("backup %s/%s: %d bytes in %.1f s%s", url, outcome.made.name,
                      outcome.made.size, outcome.seconds,
                      f"; pruned {len(outcome.pruned)}" if outcome.pruned else "")


def fetch(url: str, workdir: Path) -> tuple[Path, Manifest]:
    """The newest verified backup at `url` (or the one it names), as a checked local
    file (in `workdir` if it had to be downloaded). Blocking."""
    base, name = split_named(url)
    dest = open_destination(base)
    if name is None:
        found = verified(dest)
        if not found:
            raise BackupError(f"{url}: no verified backup there")
        manifest = found[0]
    else:
        try:
            manifest = Manifest.from_json(dest.read(name + MANIFEST))
        except FileNotFoundError:
            raise BackupError(f"{url}: no such verified backup (no manifest)") from None
    return dest.fetch(manifest, workdir), manifest


def restore_from(url: str, dsn: str) -> tuple[int, Manifest]:
    """Replace the database at `dsn` with the newest verified backup at `url` (or the one
    it names): refused while a hub is connected, or if the backup's schema is newer than
    this release's; downloaded into a private temporary directory, its size and sha256
    checked against the manifest, then restored in one transaction. Blocking."""
    from .backup import hubs_connected, restore
    from .migrate import available

    running = asyncio.run(hubs_connected(dsn))
    if running:
        raise BackupError(f"{running} hub connection(s) open on this database: stop every "
                          "replica before restoring")
    with tempfile.TemporaryDirectory(prefix="hoomi-restore-") as work:  # 0700
        path, manifest = fetch(url, Path(work))
        known = max((m.version for m in available()), default=0)
        if manifest.schema_version > known:
            raise BackupError(f"{manifest.name} has schema version {manifest.schema_version}; "
                              f"this release knows up to {known}: restore it with a newer "
                              "hoomi")
        return restore(dsn, path), manifest
