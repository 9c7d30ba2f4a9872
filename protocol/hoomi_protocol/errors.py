"""Error and close codes of protocol v1, and the one error base every layer raises.

    HoomiError(code, message, field, retry_after_ms)   a request refused, as a value
    ├── ProtocolError (+ ref, close)     the codec: a frame that cannot be accepted
    ├── storage.errors.StorageError      a store: not found, forbidden, unavailable
    └── server.auth.AuthError            a token refused

server/errors.py maps a HoomiError once: to an `error` frame on the socket and to an HTTP
status with a JSON body; `CloseCode.reconnect` says what a client does after a close.

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

    @property
    def temporary(self) -> bool:
        """Asking again later, unchanged, may succeed (after `retry_after_ms`)."""
        return self in (ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE)


class Reconnect(enum.Enum):
    """What a client does once the socket is closed with a given code."""

    RESUME = "resume"  # reconnect with backoff (another replica if any) and resume
    NEW_TOKEN = "new_token"  # reconnect only with a fresh token: the one it had is refused
    NEVER = "never"  # a bug on the client's side: reconnecting repeats it


class CloseCode(enum.IntEnum):
    """WebSocket close codes of protocol v1, each with its reconnect policy (`reconnect`)."""

    NORMAL = 1000
    POLICY_VIOLATION = 1008  # too many ping/pong frames (server/transport.py)
    MESSAGE_TOO_BIG = 1009  # a frame over the size limit (either side may close with it)
    SERVICE_RESTART = 1012  # replica shutting down: reconnect elsewhere and resume
    TRY_AGAIN_LATER = 1013  # too many sockets for this user (a full replica answers 503)
    BAD_FRAME = 4400  # a frame that is not a msgpack map
    UNAUTHORIZED = 4401  # no valid hello (or none in time), or the user was deleted
    TOO_SLOW = 4408  # the socket's push queue overflowed

    @property
    def reconnect(self) -> Reconnect:
        return _RECONNECT.get(self, Reconnect.RESUME)

    @classmethod
    def of(cls, code: int | None) -> CloseCode | None:
        """The member for a received close code, None for one this protocol does not use."""
        try:
            return None if code is None else cls(code)
        except ValueError:
            return None


_RECONNECT = {
    CloseCode.UNAUTHORIZED: Reconnect.NEW_TOKEN,
    CloseCode.BAD_FRAME: Reconnect.NEVER,
    CloseCode.POLICY_VIOLATION: Reconnect.NEVER,
}


class HoomiError(Exception):
    """A request refused, as a value: turned into one `error` frame or one HTTP response.

    `field` names the offending field (the message starts with it); `retry_after_ms`, for
    temporary codes, says when to ask again (None: the mapping's default).
    """

    def __init__(self, code: ErrorCode, message: str, field: str | None = None,
                 retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        return self.message


class ProtocolError(HoomiError):
    """What the codec raises: `ref` is the request's ref when it could be read, and
    `close` is set when the connection must be closed after the error frame (a frame
    that is not a msgpack map)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        field: str | None = None,
        ref: str | int | None = None,
        close: CloseCode | None = None,
    ) -> None:
        super().__init__(code, message, field)
        self.ref = ref
        self.close = close

    def __repr__(self) -> str:
        return (f"ProtocolError({self.code.value!r}, {self.message!r}, field={self.field!r}, "
                f"ref={self.ref!r}, close={self.close!r})")
