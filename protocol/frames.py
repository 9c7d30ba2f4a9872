"""Protocol v1 frames as typed, immutable values. Field names are the wire names."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from .errors import ErrorCode

Ref = str | int | None


# -- client → server -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    token: str
    resume: dict[UUID, int] = field(default_factory=dict)
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Send:
    hoomi_id: UUID
    client_msg_id: UUID
    content: bytes
    nonce: bytes
    session_id: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class History:
    hoomi_id: UUID
    before: int | None = None
    limit: int = 50
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Sync:
    hoomi_id: UUID
    after: int = 0
    limit: int = 50
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Delete:
    hoomi_id: UUID
    id: UUID
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref = None


ClientFrame = Hello | Send | History | Sync | Delete | Ping


# -- server → client -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HoomiState:
    hoomi_id: UUID
    last_seq: int
    role: str


@dataclass(frozen=True, slots=True)
class Welcome:
    user_id: UUID
    hoomis: list[HoomiState]
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Ack:
    id: UUID
    hoomi_id: UUID
    seq: int
    created_at: int  # ms since the Unix epoch
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class MessageBody:
    """A stored message: the `message` push, and each element of a `page`.

    A tombstone (deleted for everyone) has `deleted=True` and no content, nonce or
    session_id.
    """

    id: UUID
    hoomi_id: UUID
    seq: int
    sender_id: UUID | None
    content: bytes | None
    nonce: bytes | None
    session_id: str | None
    created_at: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    hoomi_id: UUID
    messages: list[MessageBody]
    next_before: int | None = None  # history pages
    has_more: bool | None = None  # sync pages (then next_before is not sent)
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Deleted:
    hoomi_id: UUID
    id: UUID
    seq: int


@dataclass(frozen=True, slots=True)
class Membership:
    hoomi_id: UUID
    state: str  # "joined" | "left"


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str
    ref: Ref = None
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    ref: Ref = None


ServerFrame = Welcome | Ack | MessageBody | Page | Deleted | Membership | Error | Pong
