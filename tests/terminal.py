"""A process on a pseudo-terminal, for the tests that drive `hoomi chat` and the README's
quick start as a person would: type lines, wait for text on the screen."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

from server.testing.replica import ROOT


class Terminal:
    """A process on a pseudo-terminal: type lines, wait for text on the screen."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.master, slave = pty.openpty()
        # Its own process group, so close() also ends what it started (a shell's children).
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     cwd=cwd, close_fds=True, start_new_session=True)
        os.close(slave)
        os.set_blocking(self.master, False)
        self.screen = ""

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    async def expect(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on screen:\n{self.screen}")
            try:
                self.screen += os.read(self.master, 65536).decode(errors="replace")
            except BlockingIOError:
                await asyncio.sleep(0.02)
            except OSError:  # the process ended
                await asyncio.sleep(0.02)
        return self.screen

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has ended already
            pass
        self.proc.wait(10)
        os.close(self.master)
