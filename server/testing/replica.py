"""Real hub replicas for the tests and benchmarks: each is `hoomi serve` in its own
process on a loopback port, configured only through the environment, exactly as an
operator would run it; its output goes to a log file (`output()`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from server.testing.loopback import free_port, wait_ready

JWT_SECRET = "test-secret-for-hoomi-hub-tests-only-0123456789"
ADMIN_TOKEN = "test-operator-token"
# The checkout: replicas run from it, and the tests read its files.
ROOT = Path(__file__).resolve().parents[2]


def replica_env(dsn: str, redis_url: str | None, port: int,
                extra_env: dict[str, str]) -> dict[str, str]:
    """A test replica's settings, as `hoomi serve` reads them from its environment: this
    process's, then the database, the test secrets, loopback on `port`, then `extra_env`.
    Without `redis_url`, the in-process broker (one replica)."""
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "HOOMI_JWT_SECRET": JWT_SECRET,
        "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
        "HOOMI_HOST": "127.0.0.1",
        "HOOMI_PORT": str(port),
        "HOOMI_LOG_LEVEL": "warning",
        **extra_env,
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    else:
        env.pop("REDIS_URL", None)
    return env


class ReplicaBase:
    """What a test replica is, run as a process (Replica) or in the test's event loop
    (server/testing/inprocess.py): a name, a free loopback port, its environment."""

    def __init__(self, dsn: str, redis_url: str | None, name: str,
                 extra_env: dict[str, str]) -> None:
        self.port = free_port()
        self.name = name
        self.env = replica_env(dsn, redis_url, self.port, extra_env)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"


class Replica(ReplicaBase):
    def __init__(self, dsn: str, redis_url: str | None, name: str = "r",
                 **extra_env: str) -> None:
        super().__init__(dsn, redis_url, name, extra_env)
        self.proc: subprocess.Popen | None = None
        fd, log = tempfile.mkstemp(prefix=f"hoomi-{name}-", suffix=".log")
        os.close(fd)  # each start appends to it through a handle of its own
        self.log = Path(log)

    def start(self) -> Replica:
        """Run it and return once /healthz answers 200."""
        self.spawn()
        wait_ready(self._healthy, 30, f"replica {self.name}", self.proc)
        return self

    def spawn(self, **popen: Any) -> subprocess.Popen[bytes]:
        """Run it and return at once (`popen`: more subprocess.Popen arguments); its output
        is appended to the log."""
        with open(self.log, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, **popen,
            )
        return self.proc

    def _healthy(self) -> bool:
        with urllib.request.urlopen(self.http + "/healthz", timeout=1) as r:
            return r.status == 200

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; what was acked must survive anyway."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
