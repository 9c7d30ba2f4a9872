"""End-to-end encryption of message bodies: AES-256-GCM, on the client only.

The hub stores, per message, `content`, `nonce` and `session_id`, and learns nothing
else: no key, no plaintext, the body's length only to within 32 bytes.

    nonce     12 bytes from os.urandom, fresh per message. Random 96-bit nonces keep
              the chance of any repeat under one key below 2**-32 up to 2**32 messages
              (NIST SP 800-38D's bound); rotate the key (a new session) well before.
    content   AES-256-GCM(key, nonce, envelope, AD) = ciphertext || 16-byte tag
    envelope  0x01 (version, 1) | client_msg_id (16) | sender_id (16)
              | body length (4, unsigned big-endian) | body | zero bytes up to a
              multiple of 32. Padding: "ok" and "on my way" seal to the same size, so
              short replies are not told apart by length; it costs at most 31 bytes.
    AD        b"hoomi/v1" | hoomi_id (16) | session_id (UTF-8, at the end so the layout
              stays unambiguous)

What is authenticated, and what it buys against the server (or anyone on the path):
- hoomi_id (AD): a ciphertext cannot be replayed into another Hoomi.
- sender_id (envelope, compared with the sender the server reports): a message cannot
  be passed off as another member's. It sits inside the envelope rather than in the AD
  so that a message whose sender was deleted (the server then reports sender_id null,
  and keeps the message) still opens: decrypt(sender_id=None) checks everything else
  and leaves the sender unattributed. Such a message is vouched for by the group key
  alone, as every message is against the other key holders: a group key proves "a
  member wrote this", never which one; only the authenticated hub ties a sender to it.
- client_msg_id (envelope): binds the ciphertext to one logical message and lets a
  reader, who is not told client_msg_id by the hub, match its own sends and spot a
  replayed copy (same sender and client_msg_id under a new seq: HoomiClient.open
  refuses it as "replayed").
- session_id (AD): a ciphertext cannot be relabelled to another key's session.

What it does not protect: `seq` is not bound, because the hub assigns it after the
client has encrypted (and a retried send may race its original). The hub can therefore
reorder, withhold or duplicate messages within a Hoomi: readers detect gaps and
duplicates from seq and client_msg_id, but the order itself is not cryptographically
guaranteed. Timing, sizes to 32 bytes, and who talks to whom stay visible to the hub.

Schemes (the `scheme` each message carries, SPEC §7.2; the hub stores it and never
reads it). A client encrypts with the scheme it is configured for and opens any it
knows; the scheme is bound into the AD, so the hub cannot relabel a message's scheme:
    1  the envelope above (version byte 1), AD prefix b"hoomi/v1".
    2  AD prefix b"hoomi/v2"; envelope 0x02 | flags (1) | client_msg_id | sender_id |
       body length | body | padding, where flags bit 0 says the body is raw DEFLATE
       (zlib, wbits -15, what browsers' DecompressionStream("deflate-raw") reads) of the
       plaintext. The client compresses a plaintext of COMPRESS_ABOVE bytes or more, and
       keeps the compressed body only if it seals smaller (bench/compression.py and
       docs/encryption.md give the numbers and the length-leak caveat). A compressed
       body never inflates past MAX_INFLATED bytes ("malformed" otherwise).

Errors are values: DecryptError.reason is "unknown_session", "tampered" or "malformed"
(and "replayed", from HoomiClient.open), and DecryptError.summary says it for a person:
a tag failure is "wrong key or tampered", since AES-GCM cannot tell them apart;
no message of any exception here holds key bytes or plaintext.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hoomi_protocol.limits import DEFAULT_LIMITS

from .keys import GroupKey, Keyring

VERSION = 1
AD_PREFIX = b"hoomi/v1"
SCHEMES = (1, 2)  # what this client can seal and open
LATEST_SCHEME = 2
COMPRESS_ABOVE = 256  # bytes of plaintext; below, compression saves nothing (measured)
MAX_INFLATED = 1 << 20  # a compressed body opens to at most 1 MiB
_HEADER_V2 = struct.Struct(">BB16s16sI")  # version 2, flags, cmid, sender, body length
_DEFLATED = 0x01
NONCE_BYTES = 12  # GCM's native nonce size; the hub requires exactly this
TAG_BYTES = 16
PAD_TO = 32
MAX_CONTENT = DEFAULT_LIMITS.max_content_bytes  # the hub's default limit, 65536
_HEADER = struct.Struct(">B16s16sI")  # version, client_msg_id, sender_id, body length
HEADER_BYTES = _HEADER.size  # 37
# The largest body whose padded envelope plus the tag still fits in MAX_CONTENT:
# (65536 - 16) // 32 * 32 = 65504 bytes of envelope, less the 37-byte header.
MAX_PLAINTEXT = (MAX_CONTENT - TAG_BYTES) // PAD_TO * PAD_TO - HEADER_BYTES


def max_plaintext(max_content: int) -> int:
    """The largest body whose sealed content fits a hub's content limit (the hub says
    its limit in `welcome`; MAX_PLAINTEXT is this for the default)."""
    return max(0, (max_content - TAG_BYTES) // PAD_TO * PAD_TO - HEADER_BYTES)

Reason = Literal["unknown_session", "tampered", "malformed", "replayed"]


class DecryptError(Exception):
    """A message that cannot be opened. `reason`:
    - unknown_session: no key for its (Hoomi, session_id): the reader lacks that key;
    - tampered: authentication failed: a wrong key under that session_id, content or
      nonce altered, another Hoomi or session, or a sender other than the one who
      sealed it. AES-GCM's tag cannot tell a wrong key from altered bytes, so for a tag
      failure `summary` says "wrong key or tampered";
    - malformed: a nonce that is not 12 bytes, content shorter than the tag, or an
      envelope that authenticates but does not parse (an unknown version, say);
    - replayed (from HoomiClient.open only): an authentic message already seen at a
      lower seq of the same Hoomi, served again by the hub under a new seq.
    `summary` is the same in words for a person (what the reference chat shows).
    """

    def __init__(self, reason: Reason, detail: str = "", summary: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: Reason = reason
        self.summary: str = summary or str(self)


@dataclass(frozen=True)
class Sealed:
    """What `send` carries: content (ciphertext and tag), nonce, session_id, scheme."""

    content: bytes
    nonce: bytes
    session_id: str
    scheme: int = 1


@dataclass(frozen=True)
class Opened:
    """An authenticated message: its body, the client_msg_id its sender chose, and the
    sender sealed inside it (what identifies a replayed copy even when the hub reports
    the sender as deleted)."""

    plaintext: bytes = field(repr=False)
    client_msg_id: UUID
    sealed_by: UUID


def _associated_data(hoomi_id: UUID, session_id: str, scheme: int = 1) -> bytes:
    return b"hoomi/v%d" % scheme + hoomi_id.bytes + session_id.encode("utf-8")


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data, MAX_INFLATED)
    except zlib.error:
        raise DecryptError("malformed", "compressed body does not inflate") from None
    if d.unconsumed_tail or not d.eof:
        raise DecryptError("malformed", f"compressed body over {MAX_INFLATED} bytes or cut")
    return out


def _padded(size: int) -> int:
    return size + (-size % PAD_TO)


def encrypt(key: GroupKey, hoomi_id: UUID, sender_id: UUID, client_msg_id: UUID,
            plaintext: bytes, max_content: int = MAX_CONTENT, *, scheme: int = 1,
            nonce: bytes | None = None) -> Sealed:
    """Seal a body with the given key (normally `Keyring.current(hoomi_id)`) for one
    Hoomi, as sent by `sender_id` under `client_msg_id`, in `scheme` (1 or 2, see the
    module's docstring). ValueError if the sealed content would exceed `max_content`
    (the hub's limit, 64 KiB by default: MAX_PLAINTEXT). `nonce` is for tests and
    known-answer vectors only: a fresh random one is drawn otherwise."""
    if not isinstance(plaintext, bytes):
        raise TypeError("plaintext: bytes expected")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: this client seals schemes {SCHEMES}, not {scheme}")
    body, flags = plaintext, 0
    if scheme == 2 and len(plaintext) >= COMPRESS_ABOVE:
        packed = _deflate(plaintext)
        if _padded(_HEADER_V2.size + len(packed)) < _padded(_HEADER_V2.size + len(plaintext)):
            body, flags = packed, _DEFLATED
    head = HEADER_BYTES if scheme == 1 else _HEADER_V2.size
    limit = (max_content - TAG_BYTES) // PAD_TO * PAD_TO - head
    if len(body) > limit:
        raise ValueError(f"plaintext: at most {max(0, limit)} bytes, so that the content "
                         f"fits the hub's {max_content}; got {len(plaintext)}")
    if scheme == 1:
        header = _HEADER.pack(VERSION, client_msg_id.bytes, sender_id.bytes, len(body))
    else:
        header = _HEADER_V2.pack(2, flags, client_msg_id.bytes, sender_id.bytes, len(body))
    size = len(header) + len(body)
    envelope = header + body + bytes(_padded(size) - size)
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    content = AESGCM(key.key).encrypt(nonce, envelope,
                                      _associated_data(hoomi_id, key.session_id, scheme))
    return Sealed(content, nonce, key.session_id, scheme)


def decrypt(keys: Keyring | GroupKey, hoomi_id: UUID, sender_id: UUID | None,
            content: bytes, nonce: bytes, session_id: str, scheme: int = 1) -> Opened:
    """Open a message as the hub delivered it, or raise DecryptError; never returns
    unauthenticated bytes.

    `sender_id` is the sender the hub reports: when given, it must be the one who sealed
    the message ("tampered" otherwise). None (the sender's account was deleted) opens
    the message without attributing it to anyone.
    """
    if isinstance(keys, GroupKey):
        key = keys if keys.session_id == session_id else None
    else:
        key = keys.get(hoomi_id, session_id)
    if key is None:
        raise DecryptError("unknown_session",
                           f"no key for session {session_id!r} of hoomi {hoomi_id}",
                           f"no key for this message's key id {session_id!r}")
    if len(nonce) != NONCE_BYTES:
        raise DecryptError("malformed", f"nonce is {len(nonce)} bytes, not {NONCE_BYTES}")
    if len(content) < TAG_BYTES:
        raise DecryptError("malformed", f"content is shorter than the {TAG_BYTES}-byte tag")
    if scheme not in SCHEMES:
        raise DecryptError("malformed", f"scheme {scheme} is unknown to this client",
                           f"sealed with scheme {scheme}, newer than this client")
    try:
        envelope = AESGCM(key.key).decrypt(nonce, content,
                                           _associated_data(hoomi_id, session_id, scheme))
    except InvalidTag:
        # A key of the right name but other bytes fails exactly as altered content does:
        # GCM is not key-committing, and the format carries no key check value.
        raise DecryptError("tampered", "authentication failed: a wrong key under this "
                           "session, or altered content, nonce, hoomi or session",
                           "wrong key or tampered") from None
    # Authentic from here on: a key holder wrote it. Still parse strictly, so that only
    # the one encoding encrypt() produces is accepted.
    head = HEADER_BYTES if scheme == 1 else _HEADER_V2.size
    if len(envelope) < head:
        raise DecryptError("malformed", "envelope shorter than its header")
    flags = 0
    if scheme == 1:
        version, raw_cmid, raw_sender, length = _HEADER.unpack_from(envelope)
    else:
        version, flags, raw_cmid, raw_sender, length = _HEADER_V2.unpack_from(envelope)
    if version != scheme or flags & ~_DEFLATED:
        raise DecryptError("malformed", f"envelope version {version} or flags {flags}")
    end = head + length
    if len(envelope) != _padded(end) or any(envelope[end:]):
        raise DecryptError("malformed", "envelope length or padding")
    if sender_id is not None and raw_sender != sender_id.bytes:
        raise DecryptError("tampered", "sealed by another sender",
                           "tampered: sealed by another sender than the hub reports")
    body = envelope[head:end]
    if flags & _DEFLATED:
        body = _inflate(body)
    return Opened(body, UUID(bytes=raw_cmid), UUID(bytes=raw_sender))
