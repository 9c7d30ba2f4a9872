"""Loopback ports and readiness polls, for the servers of server.testing."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; someone may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(check: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen | None = None) -> None:
    """Poll `check()` (an OSError counts as not yet) until true; fail after `timeout` s,
    or as soon as `proc` exits, naming `what`."""
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


async def until_ok(url: str, timeout: float, why: Callable[[], str] = str) -> None:
    """Poll `url` until it answers 200; fail after `timeout` s with `why()` (a log, say)."""
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
