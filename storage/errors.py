"""Storage failures as values carrying the protocol's error codes.

The server turns a StorageError into one `error` frame or one HTTP response; storage
never formats either.
"""

from __future__ import annotations

from protocol.errors import ErrorCode


class StorageError(Exception):
    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def not_found(what: str, field: str | None = None) -> StorageError:
    return StorageError(ErrorCode.NOT_FOUND, f"{what} not found", field)


def forbidden(message: str) -> StorageError:
    return StorageError(ErrorCode.FORBIDDEN, message)


def unavailable(
    message: str = "storage unavailable, retry with the same client_msg_id",
) -> StorageError:
    return StorageError(ErrorCode.UNAVAILABLE, message)
