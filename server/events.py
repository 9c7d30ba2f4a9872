"""What replicas tell each other over the broker (broadcasts), and their byte layout.

Words: a *push* is a frame the hub sends a client unasked (`message`, `deleted`,
`membership`); a *broadcast* is what a replica publishes for the others (`Broadcast`,
`Control`); the SDK's `events()` yields the pushes a client received.

A message broadcast is `b"M" | hoomi_id (16 bytes) | seq (8 bytes, big-endian) | frame`,
where `frame` is the `message` push already encoded for clients: it is encoded once, by
the replica that committed it, and every replica forwards the same bytes to its sockets.
A deletion is the same with `b"D"`, and a message's new version (an edit or a
reencryption, the `edited` push) with `b"E"`: both follow their message on every socket
(Session.on_deletion holds either until its message went out).

Several messages of one Hoomi committed in the same batch are one broadcast: `b"P" |
hoomi_id | count (8 bytes)` followed, for each message in seq order, by `seq (8 bytes) |
length (4 bytes) | frame` (`pack_messages`). Pub/sub then costs a command and a read per
Hoomi and batch instead of per message (bench/RESULTS.md). A replica older than this
layout ignores the kind (as every replica ignores kinds it does not know): its sockets
get those messages from PostgreSQL instead, when the next broadcast shows the gap or at
the next reconcile (docs/operations.md, upgrades). Controls (membership
changes) are small msgpack maps on the control channel.

Signals (v1.1) are not messages and carry no place in the Hoomi's seq order: a read
receipt is `b"R" | hoomi_id | user_id (16 bytes) | seq (8 bytes) | frame` (the `receipt`
push; seq is the reader's read_seq), a typing notice the same with `b"T"` and seq 0.
They reach sockets through Hub._on_signal only, never a Sequencer; a replica that does
not know them reads a kind it ignores.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import msgpack

from hoomi_protocol import (
    Deleted,
    Edited,
    MessageBody,
    Receipt,
    Ref,
    TypingNotice,
    encode_body_map,
    encode_body_maps,
    encode_server,
    uuid_str,
)
from storage.records import EditedMessage, StoredMessage, WireMessage

_HEAD = struct.Struct(">c16sQ")
_ITEM = struct.Struct(">QI")
# A packed broadcast's frames: at most this many bytes (pub/sub buffers stay small).
PACK_MAX_BYTES = 256 * 1024
MESSAGE = b"M"
MESSAGES = b"P"
DELETED = b"D"
EDITED = b"E"
RECEIPT = b"R"
TYPING = b"T"
_SIGNAL = struct.Struct(">c16s16sQ")


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def message_body(m: StoredMessage) -> MessageBody:
    created = ms(m.created_at)
    updated = created if m.updated_at is None else ms(m.updated_at)
    if m.deleted_at is not None:
        return MessageBody(id=m.id, hoomi_id=m.hoomi_id, seq=m.seq, sender_id=m.sender_id,
                           content=None, nonce=None, session_id=None,
                           created_at=created, deleted=True, scheme=m.scheme,
                           updated_at=updated)
    return MessageBody(id=m.id, hoomi_id=m.hoomi_id, seq=m.seq, sender_id=m.sender_id,
                       content=m.content, nonce=m.nonce, session_id=m.session_id,
                       created_at=created, scheme=m.scheme, updated_at=updated)


def body_map(m: StoredMessage, hoomi: str) -> dict[str, Any]:
    """A message body in wire form, straight from the stored record (`hoomi` is its
    Hoomi's id as a string, made once per page): the keys and order of
    protocol/hoomi_protocol/codec.py `_body`, so a page or push built from it has the
    same bytes as one through `message_body` and `encode_server`, at a third of the cost
    per row (no frozen MessageBody, no dict filled key by key); tests/test_batching.py
    checks the bytes."""
    created = int(m.created_at.timestamp() * 1000)
    updated = (created if m.updated_at is None or m.updated_at is m.created_at
               else int(m.updated_at.timestamp() * 1000))
    sender = None if m.sender_id is None else uuid_str(m.sender_id)
    if m.deleted_at is not None:
        return {"id": str(m.id), "hoomi_id": hoomi, "seq": m.seq, "sender_id": sender,
                "deleted": True, "created_at": created, "scheme": m.scheme,
                "updated_at": updated}
    return {"id": str(m.id), "hoomi_id": hoomi, "seq": m.seq, "sender_id": sender,
            "content": m.content, "nonce": m.nonce, "session_id": m.session_id,
            "created_at": created, "scheme": m.scheme, "updated_at": updated}


def wire_body(m: WireMessage, hoomi: str) -> dict[str, Any]:
    """`body_map` of a row already in wire form (storage/messages.py `wire_history`):
    only the keys to arrange, nothing to convert."""
    if m.deleted:
        return {"id": m.id, "hoomi_id": hoomi, "seq": m.seq, "sender_id": m.sender_id,
                "deleted": True, "created_at": m.created_at, "scheme": m.scheme,
                "updated_at": m.updated_at}
    return {"id": m.id, "hoomi_id": hoomi, "seq": m.seq, "sender_id": m.sender_id,
            "content": m.content, "nonce": m.nonce, "session_id": m.session_id,
            "created_at": m.created_at, "scheme": m.scheme, "updated_at": m.updated_at}


def page_frame(ref: Ref, hoomi_id: UUID, messages: Sequence[StoredMessage | WireMessage],
               *, next_before: int | None = None, has_more: bool | None = None) -> bytes:
    """A `page` reply encoded straight from the rows, typed or in wire form (see
    `body_map`, `wire_body`): the same bytes either way."""
    hoomi = str(hoomi_id)
    bodies = [wire_body(m, hoomi) if isinstance(m, WireMessage) else body_map(m, hoomi)
              for m in messages]
    return encode_body_maps(ref, hoomi_id, bodies, next_before=next_before,
                            has_more=has_more)


def message_frame(m: StoredMessage) -> bytes:
    return encode_body_map(body_map(m, uuid_str(m.hoomi_id)))


def pack_message(hoomi_id: UUID, seq: int, frame: bytes) -> bytes:
    return _HEAD.pack(MESSAGE, hoomi_id.bytes, seq) + frame


def pack_messages(hoomi_id: UUID, items: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """Messages of one Hoomi, (seq, frame) in seq order, as few broadcasts as fit in
    PACK_MAX_BYTES each (a frame larger than that goes alone): a broadcast of one
    message keeps the `b"M"` layout."""
    out: list[bytes] = []
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for item in items:
        cost = _ITEM.size + len(item[1])
        if chunk and size + cost > PACK_MAX_BYTES:
            out.append(_pack_chunk(hoomi_id, chunk))
            chunk, size = [], 0
        chunk.append(item)
        size += cost
    if chunk:
        out.append(_pack_chunk(hoomi_id, chunk))
    return out


def _pack_chunk(hoomi_id: UUID, chunk: list[tuple[int, bytes]]) -> bytes:
    if len(chunk) == 1:
        return pack_message(hoomi_id, *chunk[0])
    parts = [_HEAD.pack(MESSAGES, hoomi_id.bytes, len(chunk))]
    for seq, frame in chunk:
        parts.append(_ITEM.pack(seq, len(frame)))
        parts.append(frame)
    return b"".join(parts)


def unpack_messages(payload: bytes) -> tuple[UUID, list[tuple[int, bytes]]]:
    """`pack_messages` read back: the Hoomi and its (seq, frame), in order; struct.error
    for a payload cut short."""
    _, hoomi, count = _HEAD.unpack_from(payload)
    items: list[tuple[int, bytes]] = []
    at = _HEAD.size
    for _ in range(count):
        seq, n = _ITEM.unpack_from(payload, at)
        at += _ITEM.size
        if at + n > len(payload):
            raise struct.error("a packed broadcast cut short")
        items.append((seq, payload[at:at + n]))
        at += n
    return UUID(bytes=hoomi), items


def pack_deleted(hoomi_id: UUID, message_id: UUID, seq: int) -> bytes:
    return _HEAD.pack(DELETED, hoomi_id.bytes, seq) + encode_server(
        Deleted(hoomi_id=hoomi_id, id=message_id, seq=seq))


def pack_edited(e: EditedMessage) -> bytes:
    return _HEAD.pack(EDITED, e.hoomi_id.bytes, e.seq) + encode_server(Edited(
        hoomi_id=e.hoomi_id, id=e.id, seq=e.seq, content=e.content, nonce=e.nonce,
        session_id=e.session_id, scheme=e.scheme, updated_at=ms(e.updated_at)))


@dataclass(frozen=True, slots=True)
class Broadcast:
    """One Hoomi's message, deletion or edit, as published: `frame` is the push, encoded
    once."""

    kind: bytes
    hoomi_id: UUID
    seq: int
    frame: bytes


def unpack(payload: bytes) -> Broadcast:
    kind, hoomi, seq = _HEAD.unpack_from(payload)
    return Broadcast(kind, UUID(bytes=hoomi), seq, payload[_HEAD.size:])


@dataclass(frozen=True, slots=True)
class Control:
    """A membership change: `joined` (with role), `left`, or `user_gone`."""

    kind: str
    user_id: UUID
    hoomi_id: UUID | None = None
    role: str | None = None


def pack_control(c: Control) -> bytes:
    return msgpack.packb({
        "k": c.kind, "u": c.user_id.bytes,
        "h": c.hoomi_id.bytes if c.hoomi_id else None, "r": c.role,
    })


def unpack_control(payload: bytes) -> Control:
    d = msgpack.unpackb(payload)
    return Control(d["k"], UUID(bytes=d["u"]), UUID(bytes=d["h"]) if d["h"] else None, d["r"])


@dataclass(frozen=True, slots=True)
class Signal:
    """A receipt or a typing notice, as published: `frame` is the push, encoded once."""

    kind: bytes  # RECEIPT or TYPING
    hoomi_id: UUID
    user_id: UUID
    seq: int
    frame: bytes


def pack_receipt(hoomi_id: UUID, user_id: UUID, seq: int) -> bytes:
    return _SIGNAL.pack(RECEIPT, hoomi_id.bytes, user_id.bytes, seq) + encode_server(
        Receipt(hoomi_id=hoomi_id, user_id=user_id, seq=seq))


def pack_typing(hoomi_id: UUID, user_id: UUID) -> bytes:
    return _SIGNAL.pack(TYPING, hoomi_id.bytes, user_id.bytes, 0) + encode_server(
        TypingNotice(hoomi_id=hoomi_id, user_id=user_id))


def is_signal(payload: bytes) -> bool:
    return payload[:1] in (RECEIPT, TYPING)


def unpack_signal(payload: bytes) -> Signal:
    kind, hoomi, user, seq = _SIGNAL.unpack_from(payload)
    return Signal(kind, UUID(bytes=hoomi), UUID(bytes=user), seq, payload[_SIGNAL.size:])
