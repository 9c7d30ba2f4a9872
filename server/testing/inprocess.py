"""A hub replica inside the test's own event loop: `hoomi serve`'s uvicorn server
(`server.cli.hub_server`: the same Config, protocols, limits, proxy headers and drain),
run as a task on a real loopback port, against real PostgreSQL and Valkey.

`InProcessReplica` has `Replica`'s interface (`name`, `port`, `env`, `http`, `ws`,
`output()`), with `start()` and `stop()` as coroutines. It is the tier for behaviour:
starting one costs a lifespan (pools, migrate check, broker), not an interpreter and
its imports. What it cannot do is what needs a process: SIGKILL, SIGTERM's drain, signal
dispositions, stdout, RSS or file descriptors per replica; those tests keep
`server.testing.replica.Replica`.

What two replicas in one process could share, and how it is kept apart:
- settings: read from this replica's `env` (os.environ plus its own variables, as a
  subprocess would inherit them) by `config.load(env)`; os.environ is never written;
- signals: uvicorn installs no SIGINT/SIGTERM handler (`signals=False`);
- logging: no `logs.configure` (the root logger stays pytest's); records logged while
  this replica's tasks run are kept for `output()`, told apart by a context variable
  that every task and transport callback of the server inherits. The level is the
  process's (warning, as `Replica` runs with HOOMI_LOG_LEVEL=warning): a test that needs
  info lines, or the JSON format, runs a subprocess;
- metrics: each app has its own Prometheus registry (server/metrics.py);
- the archive reader (`storage.archive.configure`) is process state: a replica with
  HOOMI_ARCHIVE_URL is refused here, run it as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
from typing import Any

from server import config
from server.app import create_app
from server.cli import hub_server
from server.testing.replica import ReplicaBase

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0

_current: contextvars.ContextVar[InProcessReplica | None] = contextvars.ContextVar(
    "hoomi_inprocess_replica", default=None)


class _PerReplica(logging.Handler):
    """Hands each record to the replica whose task logged it (none: dropped here; pytest's
    own capture still sees every record)."""

    def emit(self, record: logging.LogRecord) -> None:
        replica = _current.get()
        if replica is not None:
            replica._lines.append(self.format(record))


_handler = _PerReplica()
_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


class InProcessReplica(ReplicaBase):
    def __init__(self, dsn: str, redis_url: str | None, name: str = "r",
                 **extra_env: str) -> None:
        if "HOOMI_ARCHIVE_URL" in extra_env:
            raise ValueError("HOOMI_ARCHIVE_URL configures a process-wide archive reader: "
                             "run that replica as a subprocess (server.testing.replica)")
        super().__init__(dsn, redis_url, name, extra_env)
        self.server: Any = None  # the uvicorn.Server while running
        self._task: asyncio.Task[None] | None = None
        self._lines: list[str] = []

    @property
    def services(self) -> Any:
        """The running app's `Services` (server/services.py), for assertions on state."""
        return self.server.config.app.state.services

    async def start(self) -> InProcessReplica:
        """Serve on `port` (the same one again after a `stop()`); returns once the lifespan
        has started and the port listens, or raises with the replica's log."""
        if self._task is not None:
            raise RuntimeError(f"replica {self.name} is already running")
        settings = config.load(self.env)
        self.server = hub_server(settings, create_app(settings), log_config=None,
                                 banner=False, signals=False)
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
        # (with proto 0, every response's body waited ~40 ms for a delayed ACK).
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(2048)
        listener.setblocking(False)
        _install_handler()
        ctx = contextvars.copy_context()
        ctx.run(_current.set, self)
        self._task = asyncio.get_running_loop().create_task(
            self._serve(listener), name=f"replica {self.name}", context=ctx)
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not self.server.started:
            if self._task.done() or asyncio.get_running_loop().time() > deadline:
                failed = self._task
                self._task = None
                failed.cancel()
                why = "exited" if failed.done() else f"not started after {START_TIMEOUT_S} s"
                raise RuntimeError(f"replica {self.name} {why}:\n{self.output()}")
            await asyncio.sleep(0.01)
        return self

    async def _serve(self, listener: socket.socket) -> None:
        try:
            await self.server.serve(sockets=[listener])
        except SystemExit as exc:  # uvicorn's way to say the lifespan failed to start
            logging.getLogger("hoomi").error("replica %s: start-up failed (exit %s)",
                                            self.name, exc.code)
        finally:
            listener.close()

    async def stop(self) -> None:
        """What SIGTERM does to `hoomi serve`: stop accepting, flush the writer, close
        sockets 1012, end the lifespan. Returns when the port is closed."""
        task, self._task = self._task, None
        if task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"replica {self.name} did not stop in {STOP_TIMEOUT_S} s:\n"
                               f"{self.output()}") from None

    def output(self) -> str:
        """What this replica logged (level warning and up)."""
        return "\n".join(self._lines)


def _install_handler() -> None:
    root = logging.getLogger()
    if _handler not in root.handlers:
        root.addHandler(_handler)
