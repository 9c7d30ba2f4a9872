"""Typed rows that storage hands to the rest of the hub."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, NamedTuple, TypeVar
from uuid import UUID


class AppendRequest(NamedTuple):
    hoomi_id: UUID
    sender_id: UUID
    client_msg_id: UUID
    content: bytes
    nonce: bytes
    session_id: str
    # The client's encryption scheme version (1-255; SPEC §7.2, `send.scheme`).
    scheme: int = 1
    # Blind-index search tokens (each 8-32 bytes, at most 64), stored with the message.
    tokens: tuple[bytes, ...] = ()


class AppendResult(NamedTuple):
    id: UUID
    hoomi_id: UUID
    seq: int
    created_at: datetime
    # True when this (sender, client_msg_id) was already stored: nothing new was written.
    duplicate: bool


class StoredMessage(NamedTuple):
    id: UUID
    hoomi_id: UUID
    seq: int
    sender_id: UUID | None
    content: bytes | None  # None on a tombstone
    nonce: bytes | None
    session_id: str | None
    created_at: datetime
    deleted_at: datetime | None
    scheme: int = 1
    # The last change (edit, reencryption, deletion); created_at for an unchanged message.
    updated_at: datetime | None = None


class WireMessage(NamedTuple):
    """A stored message as clients see it (SPEC §7.2 message body, without its Hoomi's
    id, which the page carries): ids as canonical strings, times as milliseconds since
    the epoch. PostgreSQL converts them (storage/messages.py `_WIRE`), so a page goes out
    with no per-row conversion in Python; the transports only arrange the fields."""

    id: str
    seq: int
    sender_id: str | None
    content: bytes | None  # None on a tombstone
    nonce: bytes | None
    session_id: str | None
    created_at: int
    deleted: bool
    scheme: int
    updated_at: int  # created_at for an unchanged message


M = TypeVar("M", StoredMessage, WireMessage)


class HistoryPage(NamedTuple, Generic[M]):
    messages: list[M]
    # history: the `before` for the next older page, None when the oldest is reached.
    next_before: int | None


class SyncPage(NamedTuple, Generic[M]):
    messages: list[M]  # ascending seq
    has_more: bool


class HoomiSummary(NamedTuple):
    hoomi_id: UUID
    last_seq: int
    role: str
    read_seq: int = 0  # how far this user has read it (the `read` signal)


class Member(NamedTuple):
    user_id: UUID
    role: str


class HoomiOverview(NamedTuple):
    hoomi_id: UUID
    members: list[Member]
    last_seq: int
    retention_seconds: int | None
    messages: int  # rows stored, tombstones included
    archived_upto: int | None  # every message up to this seq is archived; None: none


class DeletedMessage(NamedTuple):
    id: UUID
    hoomi_id: UUID
    seq: int
    # False when the message was already a tombstone: nothing changed, nothing to fan out.
    changed: bool


class EditedMessage(NamedTuple):
    """A message's new version after an edit or a reencryption: what the `edited` push
    carries (SPEC §7.2)."""

    id: UUID
    hoomi_id: UUID
    seq: int
    content: bytes
    nonce: bytes
    session_id: str
    scheme: int
    updated_at: datetime


class Reencrypted(NamedTuple):
    """The outcome of one `reencrypt` call."""

    updated: list[EditedMessage]
    skipped: list[UUID]  # stored nonce no longer old_nonce, scheme not higher, or gone


class SearchPage(NamedTuple):
    messages: list[StoredMessage]  # newest first
    next_before: int | None
