"""Scheduled backups (HOOMI_BACKUP_URL): real replicas on one database, one backup per
interval whichever replica makes it, and the metrics an operator alerts on."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from server.testing.replica import Replica
from storage.backup_store import Manifest


def metric(replica: Replica, name: str) -> float:
    with urllib.request.urlopen(replica.http + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found[1])


async def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not after {timeout} s")


async def test_two_replicas_make_one_backup_per_interval_between_them(dsn, tmp_path: Path):
    root = tmp_path / "backups"
    env = {"HOOMI_BACKUP_URL": f"file://{root}", "HOOMI_BACKUP_INTERVAL_S": "1",
           "HOOMI_BACKUP_KEEP": "50"}
    replicas = [Replica(dsn, None, name=n, **env) for n in ("a", "b")]
    try:
        for r in replicas:
            r.start()

        def manifests() -> list[Manifest]:
            return sorted((Manifest.from_json(p.read_bytes())
                           for p in root.glob("hoomi-*.dump.json")), key=lambda m: m.name)

        await wait_for(lambda: len(manifests()) >= 4, 60, "4 scheduled backups")
        for r in replicas:
            r.stop()
        made = manifests()
        # The advisory lock and the "newest backup" check: never two in one interval.
        gaps = [b.created - a.created for a, b in zip(made, made[1:], strict=False)]
        assert min(gaps) >= 1.0, gaps
        for m in made:
            assert (root / m.name).stat().st_mode & 0o777 == 0o600
    finally:
        for r in replicas:
            r.stop()


async def test_metrics_report_the_newest_backup_and_failures(dsn, tmp_path: Path):
    root = tmp_path / "backups"
    good = Replica(dsn, None, name="good", HOOMI_BACKUP_URL=f"file://{root}",
                   HOOMI_BACKUP_INTERVAL_S="1", HOOMI_BACKUP_KEEP="2")
    # A destination that cannot be written: the backup fails, the replica serves on.
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the backup directory should be")
    bad = Replica(dsn, None, name="bad", HOOMI_BACKUP_URL=f"file://{blocked}/backups",
                  HOOMI_BACKUP_INTERVAL_S="1")
    try:
        good.start()
        bad.start()
        made = await wait_for(lambda: metric(good, "hoomi_backups_total") >= 3, 60,
                              "3 backups on the good replica")
        assert made
        last = metric(good, "hoomi_backup_last_success_timestamp_seconds")
        created = [Manifest.from_json(p.read_bytes()).created
                   for p in root.glob("hoomi-*.dump.json")]
        assert any(abs(c - last) < 0.001 for c in created), (last, created)
        assert metric(good, "hoomi_backup_size_bytes") > 0
        assert metric(good, "hoomi_backup_failures_total") == 0
        assert len(list(root.iterdir())) == 4  # KEEP=2: two dumps, two manifests
        await wait_for(lambda: metric(bad, "hoomi_backup_failures_total") >= 1, 30,
                       "a failed backup counted")
        assert metric(bad, "hoomi_backups_total") == 0
        assert "scheduled backup to" in bad.output()
        assert bad._healthy()
    finally:
        good.stop()
        bad.stop()


def _pg_dump_writing_into(root: Path) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pg_dump" in argv[0] and any(str(root).encode() in a for a in argv):
                return True
    return False


async def test_a_backup_stopped_midway_leaves_nothing_counted_and_the_lock_free(
        dsn, tmp_path: Path):
    from storage.backup_store import _LOCK_KEY, backup_once

    root = tmp_path / "backups"
    conn = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    try:
        # pg_dump waits for this lock (it locks every table it dumps): it is running,
        # and stays so until cancelled.
        blocker = other.transaction()
        await blocker.start()
        await other.execute("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(backup_once(conn, dsn, f"file://{root}", 2))
        await wait_for(lambda: _pg_dump_writing_into(root), 30, "pg_dump running")
        task.cancel()  # what the replica's lifespan does on SIGTERM
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _pg_dump_writing_into(root)  # ended, not left running
        await blocker.rollback()
        assert list(root.iterdir()) == []  # no dump, no .partial, no manifest
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY)
    finally:
        await conn.close()
        await other.close()


def test_backup_settings_are_checked():
    from server import config

    base = {"DATABASE_URL": "postgresql://h/db", "HOOMI_JWT_SECRET": "s",
            "HOOMI_ADMIN_TOKEN": "t"}
    default = config.load(base)
    assert (default.backup_url, default.backup_interval_s, default.backup_keep) \
        == (None, 86400.0, 7)
    for name, bad in (("HOOMI_BACKUP_URL", "ftp://host/dir"), ("HOOMI_BACKUP_URL", "/srv/b"),
                      ("HOOMI_BACKUP_KEEP", "0"), ("HOOMI_BACKUP_INTERVAL_S", "0.5")):
        with pytest.raises(config.ConfigError, match=name):
            config.load({**base, name: bad})
    s3 = config.load({**base, "HOOMI_BACKUP_URL": "s3://bucket/hub", "HOOMI_BACKUP_KEEP": "3"})
    assert (s3.backup_url, s3.backup_keep) == ("s3://bucket/hub", 3)
