"""Error and close codes of protocol v1, and ProtocolError, the one exception the codec raises.

Invariant: every code a client can see is a member of ErrorCode or CloseCode, and each is
documented once, in docs/protocol.md (tests/test_readme.py checks that).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The `code` of an `error` frame (and of an HTTP error body)."""

    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"  # not a member, or not allowed to delete that message
    NOT_FOUND = "not_found"
    INVALID = "invalid"  # a bad field; the message starts with its name
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # storage or broker down: retry with the same client_msg_id


class CloseCode(enum.IntEnum):
    """WebSocket close codes the hub uses."""

    NORMAL = 1000
    SERVICE_RESTART = 1012  # replica shutting down: reconnect elsewhere and resume
    TRY_AGAIN_LATER = 1013  # too many sockets for this user (a full replica answers 503)
    BAD_FRAME = 4400  # a frame that is not a msgpack map
    UNAUTHORIZED = 4401  # no valid hello (or none in time), or the user was deleted
    TOO_SLOW = 4408  # the socket's push queue overflowed


class ProtocolError(Exception):
    """A request the hub cannot accept, as a value: turned into one `error` frame.

    `field` names the offending field (the message starts with it), `ref` is the
    request's ref when it could be read, and `close` is set when the connection must be
    closed after the error frame (a frame that is not a msgpack map).
    """

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

    def __repr__(self) -> str:
        return (f"ProtocolError({self.code.value!r}, {self.message!r}, field={self.field!r}, "
                f"ref={self.ref!r}, close={self.close!r})")
