"""End-to-end encryption of message bodies: AES-256-GCM, on the client only.

Layout of what the server stores for one message:
    nonce    12 random bytes, fresh per message (os.urandom): with 2**32 messages under
             one key the chance of a repeat stays below 2**-32, the NIST bound
    content  AES-GCM(key, nonce, envelope, associated data) = ciphertext || 16-byte tag
    envelope 0x01 | client_msg_id (16) | body length (4, big-endian) | body | zero padding
             to a multiple of 32 bytes, so lengths leak only to within 32 bytes
    AD       b"hoomi/v1" | hoomi_id (16) | sender_id (16) | session_id (UTF-8)

What the associated data buys: a ciphertext cannot be replayed into another Hoomi, nor
passed off as another member's (the server, which assigns `sender_id`, cannot re-attribute
it), nor moved to another key session. The client_msg_id inside the envelope binds it to
one logical message, and readers recover it to match their own sends.
What it does not: `seq` is not bound, because the server assigns it after encryption; the
hub could reorder or withhold messages within a Hoomi. Readers see seq gaps, but the
order itself is not cryptographically protected. A message whose sender was deleted
(sender_id null) cannot be checked against its AD and is refused ("unknown_sender").
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .keys import GroupKey, Keyring

VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
PAD = 32
MAX_CONTENT = 65536
_HEADER = struct.Struct(">B16sI")
# The largest body whose padded envelope plus tag still fits in MAX_CONTENT.
MAX_PLAINTEXT = ((MAX_CONTENT - TAG_BYTES) // PAD) * PAD - _HEADER.size


class DecryptError(Exception):
    """A message that cannot be opened. `reason` is one of: unknown_session (no key for
    its session_id), tampered (the GCM check failed: wrong key, or content, nonce, Hoomi,
    sender or session altered), malformed (bad nonce or envelope), unknown_sender."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Sealed:
    content: bytes
    nonce: bytes
    session_id: str


@dataclass(frozen=True)
class Opened:
    plaintext: bytes = field(repr=False)
    client_msg_id: UUID


def _ad(hoomi_id: UUID, sender_id: UUID, session_id: str) -> bytes:
    return b"hoomi/v1" + hoomi_id.bytes + sender_id.bytes + session_id.encode("utf-8")


def encrypt(key: GroupKey, hoomi_id: UUID, sender_id: UUID, client_msg_id: UUID,
            plaintext: bytes) -> Sealed:
    if len(plaintext) > MAX_PLAINTEXT:
        raise ValueError(f"plaintext: at most {MAX_PLAINTEXT} bytes")
    envelope = _HEADER.pack(VERSION, client_msg_id.bytes, len(plaintext)) + plaintext
    envelope += b"\x00" * (-len(envelope) % PAD)
    nonce = os.urandom(NONCE_BYTES)
    content = AESGCM(key.key).encrypt(nonce, envelope, _ad(hoomi_id, sender_id, key.session_id))
    return Sealed(content, nonce, key.session_id)


def decrypt(keys: Keyring | GroupKey, hoomi_id: UUID, sender_id: UUID | None, content: bytes,
            nonce: bytes, session_id: str) -> Opened:
    if sender_id is None:
        raise DecryptError("unknown_sender")
    if isinstance(keys, GroupKey):
        key = keys if keys.session_id == session_id else None
    else:
        key = keys.get(hoomi_id, session_id)
    if key is None:
        raise DecryptError("unknown_session")
    if len(nonce) != NONCE_BYTES or len(content) < TAG_BYTES:
        raise DecryptError("malformed")
    try:
        envelope = AESGCM(key.key).decrypt(nonce, content, _ad(hoomi_id, sender_id, session_id))
    except InvalidTag:
        raise DecryptError("tampered") from None
    if len(envelope) < _HEADER.size:
        raise DecryptError("malformed")
    version, cmid, length = _HEADER.unpack_from(envelope)
    if version != VERSION or _HEADER.size + length > len(envelope):
        raise DecryptError("malformed")
    return Opened(envelope[_HEADER.size:_HEADER.size + length], UUID(bytes=cmid))
