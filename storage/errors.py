"""Storage failures as values carrying the protocol's error codes.

The server turns a StorageError (a protocol.HoomiError) into one `error` frame or one HTTP
response (server/errors.py); storage never formats either.
"""

from __future__ import annotations

import asyncpg

from hoomi_protocol.errors import ErrorCode, HoomiError


class StorageError(HoomiError):
    """A store refused or could not do the work: not found, forbidden, unavailable."""


# SQLSTATE classes that mean "the database is not there for us right now": connection
# exception, insufficient resources, object not in prerequisite state (a database not
# accepting connections), operator intervention (shutdown), system error.
_OUTAGE_CLASSES = ("08", "53", "55", "57", "58")


def is_outage(exc: BaseException) -> bool:
    """True for failures of the database itself, not of one statement: `unavailable`."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in _OUTAGE_CLASSES


def not_found(what: str, field: str | None = None) -> StorageError:
    return StorageError(ErrorCode.NOT_FOUND, f"{what} not found", field)


def forbidden(message: str) -> StorageError:
    return StorageError(ErrorCode.FORBIDDEN, message)


def unavailable(
    message: str = "storage unavailable, retry with the same client_msg_id",
) -> StorageError:
    return StorageError(ErrorCode.UNAVAILABLE, message)
