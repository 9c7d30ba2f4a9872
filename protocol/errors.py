"""Error and close codes of protocol v1, and ProtocolError, the one exception the codec raises.

Every code here is documented once, in docs/protocol.md.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    SERVICE_RESTART = 1012
    BAD_FRAME = 4400
    UNAUTHORIZED = 4401
    TOO_SLOW = 4408


class ProtocolError(Exception):
    def __init__(
        self,
        code: ErrorCode,
        message: str,
        field: str | None = None,
        ref: str | int | None = None,
        close: CloseCode | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message
        self.ref = ref
        self.close = close

    def __str__(self) -> str:
        return self.message
