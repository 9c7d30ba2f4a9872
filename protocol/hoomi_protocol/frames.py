"""Protocol v1 frames as typed, immutable values; field names are the wire names.

Invariant: a frame that `decode_client` returns has already passed every check of
protocol/hoomi_protocol/limits.py, so code past the codec never re-validates fields. `ref` (the
request's correlation value: a string or an int64) is always the last field and
defaults to None; replies copy it from their request, pushes have none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from .errors import ErrorCode

Ref = str | int | None


# -- client → server -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    token: str
    resume: dict[UUID, int] = field(default_factory=dict)  # hoomi_id → last seq seen
    # What the client asks for beyond v1 (v1.1), e.g. "signals": receipt and typing pushes.
    features: tuple[str, ...] = ()
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Send:
    hoomi_id: UUID
    client_msg_id: UUID
    content: bytes  # ciphertext with its GCM tag
    nonce: bytes
    session_id: str
    scheme: int = 1  # the client's encryption scheme version, 1-255 (v1.1)
    tokens: tuple[bytes, ...] = ()  # blind-index search tokens, <= 64 of 8-32 bytes (v1.1)
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class History:
    hoomi_id: UUID
    before: int | None = None  # exclusive; None = from the newest
    limit: int = 50
    scheme_below: int | None = None  # only live messages with a lower scheme (v1.1)
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Sync:
    hoomi_id: UUID
    after: int = 0  # exclusive
    limit: int = 50
    scheme_below: int | None = None
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Edit:
    """A new version of one's own message (v1.1): the same seq, a new ciphertext."""

    hoomi_id: UUID
    id: UUID
    content: bytes
    nonce: bytes
    session_id: str
    scheme: int = 1
    tokens: tuple[bytes, ...] = ()  # the new version's tokens; the old ones go
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class ReencryptItem:
    id: UUID
    old_nonce: bytes  # the stored nonce this item replaces; another one: skipped
    content: bytes
    nonce: bytes
    session_id: str
    scheme: int
    tokens: tuple[bytes, ...] | None = None  # None: the message keeps its tokens


@dataclass(frozen=True, slots=True)
class Reencrypt:
    """A Hoomi admin's device moving messages to a newer scheme (v1.1), <= 100 items."""

    hoomi_id: UUID
    items: tuple[ReencryptItem, ...]
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Search:
    """Messages carrying every one of `tokens` (1-8), newest first (v1.1)."""

    hoomi_id: UUID
    tokens: tuple[bytes, ...]
    before: int | None = None
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


@dataclass(frozen=True, slots=True)
class Read:
    """Signals (v1.1): the member has read the Hoomi up to `seq` (never moves back)."""

    hoomi_id: UUID
    seq: int
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Typing:
    """Signals (v1.1): the member is typing; ephemeral, no reply."""

    hoomi_id: UUID
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Presence:
    """Signals (v1.1): which members have a live socket (replied with PresenceReply)."""

    hoomi_id: UUID
    ref: Ref = None


ClientFrame = (Hello | Send | History | Sync | Delete | Ping | Edit | Reencrypt | Search
               | Read | Typing | Presence)


# -- server → client -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HoomiState:
    hoomi_id: UUID
    last_seq: int
    role: str  # "admin" | "member"
    read_seq: int = 0  # how far this user has read (v1.1 signals; 0 from an older hub)


@dataclass(frozen=True, slots=True)
class Welcome:
    user_id: UUID
    hoomis: list[HoomiState]
    ref: Ref = None
    # The largest `content` this hub accepts (its HOOMI_MAX_CONTENT_BYTES), so a client
    # can refuse an oversized body before encrypting it. None: not said (an older hub);
    # assume the protocol's default.
    max_content_bytes: int | None = None
    # The hello's features this hub accepted (v1.1); None when the hello asked for none.
    features: list[str] | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    id: UUID
    hoomi_id: UUID
    seq: int
    created_at: int  # ms since the Unix epoch
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class EditAck:
    """The `ack` of an `edit`: the message keeps its seq."""

    id: UUID
    hoomi_id: UUID
    seq: int
    updated_at: int  # ms
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class ReencryptAck:
    """The `ack` of a `reencrypt`: how many were applied, which ids were skipped."""

    hoomi_id: UUID
    updated: int
    skipped: list[UUID]
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Edited:
    """Push: a message's new version (an edit or a reencryption)."""

    hoomi_id: UUID
    id: UUID
    seq: int
    content: bytes
    nonce: bytes
    session_id: str
    scheme: int
    updated_at: int  # ms


@dataclass(frozen=True, slots=True)
class MessageBody:
    """A stored message: the `message` push, and each element of a `page`.

    A tombstone (deleted for everyone) has `deleted=True` and None for content, nonce
    and session_id; on the wire those keys are absent. `sender_id` is None when the
    sender's account was deleted.
    """

    id: UUID
    hoomi_id: UUID
    seq: int
    sender_id: UUID | None
    content: bytes | None
    nonce: bytes | None
    session_id: str | None
    created_at: int  # ms since the Unix epoch
    deleted: bool = False
    scheme: int = 1  # the encryption scheme of `content` (v1.1; 1 for a v1 send)
    # ms of the last change (edit, reencryption, deletion); None only from an older hub.
    updated_at: int | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """The reply to `history` (newest first) or `sync` (ascending).

    A history page sets `next_before` (None when it reaches the oldest message) and
    leaves `has_more` None; a sync page sets `has_more`. The wire carries only the key
    that applies: `has_more` when it is not None, `next_before` otherwise.
    """

    hoomi_id: UUID
    messages: list[MessageBody]
    next_before: int | None = None
    has_more: bool | None = None
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
    message: str  # starts with the bad field's name when one is at fault
    ref: Ref = None
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class ReadAck:
    """The `ack` of a `read`: the read_seq stored (the greater of the old and the new,
    at most the Hoomi's last seq)."""

    hoomi_id: UUID
    seq: int
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """Push (sockets with the "signals" feature): `user_id` has read up to `seq`."""

    hoomi_id: UUID
    user_id: UUID
    seq: int


@dataclass(frozen=True, slots=True)
class TypingNotice:
    """Push `typing` (sockets with the "signals" feature): `user_id` is typing."""

    hoomi_id: UUID
    user_id: UUID


@dataclass(frozen=True, slots=True)
class PresenceReply:
    """The `presence` reply: the members with at least one live socket on any replica."""

    hoomi_id: UUID
    user_ids: list[UUID]
    ref: Ref = None


ServerFrame = (Welcome | Ack | MessageBody | Page | Deleted | Membership | Error | Pong
               | EditAck | ReencryptAck | Edited | ReadAck | Receipt | TypingNotice
               | PresenceReply)
