"""msgpack encoding and validation of protocol v1 frames: the one codec, both directions.

Invariant: `decode_client` is where untrusted bytes enter the hub. Whatever it is given,
it returns a fully validated frame or raises ProtocolError, never another exception, and
it never lets msgpack allocate much beyond the frame's own size. It reads `ref` before
any other field, so the error about a readable request echoes that request's ref.

`encode_server` writes one msgpack map whose first key is `type`. Its hot path is the
`message` push, encoded once per message per replica and then reused for every socket.
`encode_client` and `decode_server` serve the reference client and the tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar, assert_never
from uuid import UUID, SafeUUID

import msgpack

from .errors import CloseCode, ErrorCode, ProtocolError
from .frames import (
    Ack,
    ClientFrame,
    Delete,
    Deleted,
    Edit,
    EditAck,
    Edited,
    Error,
    Hello,
    History,
    HoomiState,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    Presence,
    PresenceReply,
    Read,
    ReadAck,
    Receipt,
    Reencrypt,
    ReencryptAck,
    ReencryptItem,
    Ref,
    Search,
    Send,
    ServerFrame,
    Sync,
    Typing,
    TypingNotice,
    Welcome,
)
from .limits import DEFAULT_LIMITS, Limits

INT64_MAX = 2**63 - 1

# Exactly what str(UUID(x)) produces, so a match is canonical by construction.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# One packer for the process. The C Packer packs str, bytes, int, bool, None, list and
# dict without running Python code, so under the GIL calls cannot interleave; it resets
# its buffer after an error. Reusing it saves allocating a buffer for every frame.
_pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True).pack

_T = TypeVar("_T")


_set_slot = object.__setattr__
_UNKNOWN = SafeUUID.unknown


def _parse_uuid(raw: str) -> UUID | None:
    """The UUID of a canonical string, else None: what UUID(raw) makes (its int, is_safe
    unknown), built without UUID.__init__'s clean-up of prefixes, braces and case, which a
    canonical string does not need (1.0 -> 0.45 µs)."""
    if _CANONICAL_UUID.fullmatch(raw) is None:
        return None
    value = UUID.__new__(UUID)
    _set_slot(value, "int", int(raw.replace("-", ""), 16))
    _set_slot(value, "is_safe", _UNKNOWN)
    return value


# Hoomi and sender ids repeat from frame to frame: caching their strings and parsed
# values saves ~0.4 µs (str) and ~1 µs (parse) per id. Message ids never repeat, so they
# bypass the caches rather than evict the ids that do.
uuid_str = lru_cache(maxsize=4096)(str)
_parse_hoomi_id = lru_cache(maxsize=4096)(_parse_uuid)


# == client → server: decoding untrusted bytes ================================================

def _invalid(field: str, message: str, ref: Ref) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, f"{field}: {message}", field, ref)


# Every key any client frame reads. Only these keys' values are built into Python objects;
# the value of any other key is skipped by msgpack without allocating anything, so an
# unknown key costs parse time bounded by the frame's size and nothing else.
_KNOWN_KEYS = frozenset({
    "type", "ref", "token", "resume", "hoomi_id", "client_msg_id", "content", "nonce",
    "session_id", "before", "after", "limit", "id", "scheme", "tokens", "items",
    "scheme_below", "seq", "features",
})
# The keys of one `reencrypt` item.
_ITEM_KEYS = frozenset({"id", "old_nonce", "content", "nonce", "session_id", "scheme",
                        "tokens"})
# The only arrays a client frame holds: built under these keys only, within these bounds
# (any longer array is skipped element by element, unbuilt, and reported `invalid`).
_ARRAY_CAP = {"tokens": DEFAULT_LIMITS.max_search_tokens_per_message,
              "items": DEFAULT_LIMITS.max_reencrypt_items,
              "features": DEFAULT_LIMITS.max_features}
# First bytes of msgpack array and map headers (fixarray, array16/32, fixmap, map16/32).
_MAPS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_CONTAINER = _MAPS | frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


class _Unread:
    """Stands for a known key's value that was skipped, not built: an array, or a map
    where no map belongs. Its type matches no field, so validation reports that field as
    `invalid` (with the request's ref) instead of closing the socket."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<container>"


_UNREAD = _Unread()


def _scalar(u: msgpack.Unpacker, data: bytes) -> Any:
    """The next value if it is not an array or map; otherwise skip it, return _UNREAD.

    msgpack allocates an array's slots from its header before reading its items, so a
    frame of nested array headers could claim gigabytes; arrays are never built here."""
    if data[u.tell()] in _CONTAINER:
        u.skip()
        return _UNREAD
    return u.unpack()


def _array(u: msgpack.Unpacker, data: bytes, key: str) -> Any:
    """`tokens` (bins) or `items` (maps) under the careful walk: a list of at most
    _ARRAY_CAP[key] elements, or _UNREAD (skipped unbuilt) when longer."""
    n = u.read_array_header()
    if n > _ARRAY_CAP[key]:
        for _ in range(n):  # each skip consumes at least one byte of the frame
            u.skip()
        return _UNREAD
    if key != "items":  # tokens (bins), features (strings)
        return [_scalar(u, data) for _ in range(n)]
    return [_item(u, data) for _ in range(n)]


def _item(u: msgpack.Unpacker, data: bytes) -> Any:
    if data[u.tell()] not in _MAPS:
        u.skip()
        return _UNREAD
    item: dict[Any, Any] = {}
    for _ in range(u.read_map_header()):
        key = _scalar(u, data)
        if type(key) is not str or key not in _ITEM_KEYS:
            u.skip()
        elif key == "tokens" and data[u.tell()] in _CONTAINER and data[u.tell()] not in _MAPS:
            item[key] = _array(u, data, key)
        else:
            item[key] = _scalar(u, data)
    return item


def _unpack_client(data: bytes, limits: Limits) -> dict[Any, Any]:
    """The frame's top-level map: what it holds under the keys a client frame reads.

    Two paths, one result. Frames without a non-empty array (every frame this protocol
    defines) take msgpack's C decoder in one call: maps are not presized from their
    headers, so nothing it builds exceeds a small multiple of the frame. Any other frame
    is walked key by key: values of unknown keys are skipped unbuilt (any length, up to
    msgpack's nesting limit of 1024 levels), and a known key holding an array (or a map,
    other than `resume`) is recorded as _UNREAD, which its field's check reports as
    `invalid`. Strings, bins and maps longer than the frame cannot be read from it."""
    size = limits.max_frame_bytes
    try:  # the fast path, for every frame that holds no non-empty array
        fast = msgpack.unpackb(data, raw=False, strict_map_key=False, max_str_len=size,
                               max_bin_len=size, max_ext_len=size, max_map_len=size,
                               max_array_len=0)
    except Exception:  # any failure: the careful walk below decides
        fast = None
    if type(fast) is dict:
        return fast
    if not data or data[0] not in _MAPS:
        raise ProtocolError(ErrorCode.INVALID, "frame: must be a msgpack map", "frame",
                            close=CloseCode.BAD_FRAME)
    u = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1),
                         max_str_len=size, max_bin_len=size, max_ext_len=size,
                         max_map_len=size, max_array_len=size)
    try:
        u.feed(data)
        m: dict[Any, Any] = {}
        for _ in range(u.read_map_header()):
            key = _scalar(u, data)
            if type(key) is not str or key not in _KNOWN_KEYS:
                u.skip()
            elif key == "resume" and data[u.tell()] in _MAPS:
                resume: dict[Any, Any] = {}
                for _ in range(u.read_map_header()):
                    hoomi = _scalar(u, data)
                    resume[hoomi] = _scalar(u, data)
                m[key] = resume
            elif key in _ARRAY_CAP and data[u.tell()] in _CONTAINER \
                    and data[u.tell()] not in _MAPS:
                m[key] = _array(u, data, key)
            else:
                m[key] = _scalar(u, data)
        if u.tell() != len(data):
            raise msgpack.ExtraData(m, data[u.tell():])
        return m
    # msgpack documents that unpacking may raise exceptions outside its own hierarchy
    # (ValueError, TypeError, IndexError past the end, StackError, ...): all of them mean
    # the bytes are not one msgpack map we can read.
    except Exception as exc:
        raise ProtocolError(ErrorCode.INVALID, f"frame: not msgpack ({type(exc).__name__})",
                            "frame", close=CloseCode.BAD_FRAME) from None


def _read_ref(m: dict[Any, Any], limits: Limits) -> Ref:
    ref = m.get("ref")
    if ref is None:
        return None
    if type(ref) is str:
        if len(ref) > limits.max_ref_chars:
            raise _invalid("ref", f"at most {limits.max_ref_chars} characters", None)
        return ref
    if type(ref) is int:
        if ref > INT64_MAX:  # msgpack ints span int64 min to uint64 max
            raise _invalid("ref", "an integer ref must fit in 64 bits", None)
        return ref
    raise _invalid("ref", "must be a string or an integer", None)


def _uuid(m: dict[Any, Any], field: str, ref: Ref,
          parse: Callable[[str], UUID | None] = _parse_uuid) -> UUID:
    raw = m.get(field)
    if raw is None:
        raise _invalid(field, "required", ref)
    return _uuid_value(raw, field, ref, parse)


def _hoomi_id(m: dict[Any, Any], ref: Ref) -> UUID:
    return _uuid(m, "hoomi_id", ref, _parse_hoomi_id)


def _uuid_value(raw: object, field: str, ref: Ref,
                parse: Callable[[str], UUID | None] = _parse_uuid) -> UUID:
    value = parse(raw) if type(raw) is str and len(raw) == 36 else None
    if value is None:
        raise _invalid(field, "must be a canonical lowercase UUID string", ref)
    return value


def _int(m: dict[Any, Any], field: str, ref: Ref, lo: int, default: int | None) -> int | None:
    raw = m.get(field)
    if raw is None:
        return default
    if type(raw) is not int:  # also rejects bool
        raise _invalid(field, "must be an integer", ref)
    if not lo <= raw <= INT64_MAX:
        raise _invalid(field, f"must be at least {lo}" if raw < lo else "too large", ref)
    return raw


def _limit(m: dict[Any, Any], ref: Ref, limits: Limits) -> int:
    raw = m.get("limit")
    if raw is None:
        return limits.default_page_limit
    if type(raw) is not int or not 1 <= raw <= limits.max_page_limit:
        raise _invalid("limit", f"must be an integer from 1 to {limits.max_page_limit}", ref)
    return raw


def _text(m: dict[Any, Any], field: str, ref: Ref, max_chars: int) -> str:
    raw = m.get(field)
    if raw is None:
        raise _invalid(field, "required", ref)
    if type(raw) is not str:
        raise _invalid(field, "must be a string", ref)
    if not raw:
        raise _invalid(field, "must not be empty", ref)
    if len(raw) > max_chars:
        raise _invalid(field, f"at most {max_chars} characters", ref)
    if "\x00" in raw:  # PostgreSQL text cannot hold NUL
        raise _invalid(field, "must not contain NUL", ref)
    return raw


def _bin(m: dict[Any, Any], field: str, ref: Ref) -> bytes:
    raw = m.get(field)
    if raw is None:
        raise _invalid(field, "required", ref)
    if type(raw) is not bytes:
        raise _invalid(field, "must be msgpack bin", ref)
    return raw


def _content(m: dict[Any, Any], ref: Ref, limits: Limits, name: str = "content") -> bytes:
    content = _bin(m, "content", ref) if name == "content" else _item_bin(m, name, "content",
                                                                         ref)
    if len(content) > limits.max_content_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"{name}: at most {limits.max_content_bytes} bytes",
                            name.split("[")[0], ref)
    if len(content) < limits.min_content_bytes:
        raise ProtocolError(ErrorCode.INVALID, f"{name}: at least {limits.min_content_bytes} "
                            "bytes (the GCM tag)", name.split("[")[0], ref)
    return content


def _nonce(m: dict[Any, Any], ref: Ref, limits: Limits, name: str = "nonce",
           key: str = "nonce") -> bytes:
    nonce = _bin(m, key, ref) if name == key else _item_bin(m, name, key, ref)
    if len(nonce) != limits.nonce_bytes:
        raise ProtocolError(ErrorCode.INVALID, f"{name}: must be exactly {limits.nonce_bytes} "
                            "bytes", name.split("[")[0], ref)
    return nonce


def _item_bin(m: dict[Any, Any], name: str, key: str, ref: Ref) -> bytes:
    raw = m.get(key)
    if type(raw) is not bytes:
        why = "required" if raw is None else "must be msgpack bin"
        raise ProtocolError(ErrorCode.INVALID, f"{name}: {why}", "items", ref)
    return raw


def _scheme(m: dict[Any, Any], ref: Ref, limits: Limits, field: str = "scheme",
            default: int | None = 1) -> int:
    raw = m.get("scheme")
    if raw is None and default is not None:
        return default
    if type(raw) is not int or not 1 <= raw <= limits.max_scheme:
        raise ProtocolError(ErrorCode.INVALID, f"{field}: must be an integer from 1 to "
                            f"{limits.max_scheme}", field.split("[")[0], ref)
    return raw


def _tokens(m: dict[Any, Any], ref: Ref, limits: Limits, most: int, *, least: int = 0,
            field: str = "tokens") -> tuple[bytes, ...] | None:
    """The `tokens` list (None when absent): `least` to `most` bins of 8-32 bytes."""
    raw = m.get("tokens")
    if raw is None and least == 0:
        return None
    lo, hi = limits.search_token_bytes
    if type(raw) is not list or not least <= len(raw) <= most or not all(
            type(t) is bytes and lo <= len(t) <= hi for t in raw):
        raise ProtocolError(ErrorCode.INVALID, f"{field}: a list of {least} to {most} bins of "
                            f"{lo}-{hi} bytes", field.split("[")[0], ref)
    return tuple(raw)


def _hello(m: dict[Any, Any], ref: Ref, limits: Limits) -> Hello:
    token = _text(m, "token", ref, limits.max_token_chars)
    raw = m.get("resume")
    resume: dict[UUID, int] = {}
    if raw is not None:
        if type(raw) is not dict:
            raise _invalid("resume", "must be a map of hoomi_id to last seq seen", ref)
        if len(raw) > limits.max_resume_hoomis:
            raise _invalid("resume", f"at most {limits.max_resume_hoomis} hoomis", ref)
        for key, seq in raw.items():
            hoomi_id = _uuid_value(key, "resume", ref)
            if type(seq) is not int or not 0 <= seq <= INT64_MAX:
                raise _invalid("resume", "last seqs must be non-negative integers", ref)
            resume[hoomi_id] = seq
    return Hello(token=token, resume=resume, features=_features(m, ref, limits), ref=ref)


def _features(m: dict[Any, Any], ref: Ref, limits: Limits) -> tuple[str, ...]:
    """hello `features` (v1.1): names the hub may not know (it accepts those it does)."""
    raw = m.get("features")
    if raw is None:
        return ()
    n = limits.max_feature_chars
    if type(raw) is not list or len(raw) > limits.max_features or not all(
            type(f) is str and 0 < len(f) <= n for f in raw):
        raise _invalid("features", f"a list of at most {limits.max_features} strings of 1 "
                       f"to {n} characters", ref)
    return tuple(raw)


def _send(m: dict[Any, Any], ref: Ref, limits: Limits) -> Send:
    """A `send`: every field checked in one pass when all are well formed (the frame of
    every message), else field by field, in order, for the first one's error."""
    hoomi = m.get("hoomi_id")
    cmid = m.get("client_msg_id")
    content = m.get("content")
    nonce = m.get("nonce")
    session_id = m.get("session_id")
    scheme = m.get("scheme", 1)
    if (type(hoomi) is str and type(cmid) is str and type(content) is bytes
            and type(nonce) is bytes and type(session_id) is str and type(scheme) is int
            and "tokens" not in m and len(hoomi) == 36 and len(cmid) == 36
            and limits.min_content_bytes <= len(content) <= limits.max_content_bytes
            and len(nonce) == limits.nonce_bytes
            and 0 < len(session_id) <= limits.max_session_id_chars
            and "\x00" not in session_id and 1 <= scheme <= limits.max_scheme):
        hoomi_id = _parse_hoomi_id(hoomi)
        client_msg_id = _parse_uuid(cmid)
        if hoomi_id is not None and client_msg_id is not None:
            return Send(hoomi_id, client_msg_id, content, nonce, session_id, scheme, (), ref)
    return _send_checked(m, ref, limits)


def _send_checked(m: dict[Any, Any], ref: Ref, limits: Limits) -> Send:
    hoomi_id = _hoomi_id(m, ref)
    client_msg_id = _uuid(m, "client_msg_id", ref)
    content = _content(m, ref, limits)
    nonce = _nonce(m, ref, limits)
    session_id = _text(m, "session_id", ref, limits.max_session_id_chars)
    scheme = _scheme(m, ref, limits)
    tokens = _tokens(m, ref, limits, limits.max_search_tokens_per_message) or ()
    return Send(hoomi_id=hoomi_id, client_msg_id=client_msg_id, content=content, nonce=nonce,
                session_id=session_id, scheme=scheme, tokens=tokens, ref=ref)


def _scheme_below(m: dict[Any, Any], ref: Ref, limits: Limits) -> int | None:
    value = _int(m, "scheme_below", ref, 1, None)
    if value is not None and value > limits.max_scheme + 1:
        raise _invalid("scheme_below", f"at most {limits.max_scheme + 1}", ref)
    return value


def _history(m: dict[Any, Any], ref: Ref, limits: Limits) -> History:
    hoomi_id = _hoomi_id(m, ref)
    before = _int(m, "before", ref, 1, None)
    return History(hoomi_id=hoomi_id, before=before, limit=_limit(m, ref, limits),
                   scheme_below=_scheme_below(m, ref, limits), ref=ref)


def _sync(m: dict[Any, Any], ref: Ref, limits: Limits) -> Sync:
    hoomi_id = _hoomi_id(m, ref)
    after = _int(m, "after", ref, 0, None)
    if after is None:
        raise _invalid("after", "required", ref)
    return Sync(hoomi_id=hoomi_id, after=after, limit=_limit(m, ref, limits),
                scheme_below=_scheme_below(m, ref, limits), ref=ref)


def _edit(m: dict[Any, Any], ref: Ref, limits: Limits) -> Edit:
    hoomi_id = _hoomi_id(m, ref)
    message_id = _uuid(m, "id", ref)
    content = _content(m, ref, limits)
    nonce = _nonce(m, ref, limits)
    session_id = _text(m, "session_id", ref, limits.max_session_id_chars)
    return Edit(hoomi_id=hoomi_id, id=message_id, content=content, nonce=nonce,
                session_id=session_id, scheme=_scheme(m, ref, limits),
                tokens=_tokens(m, ref, limits, limits.max_search_tokens_per_message) or (),
                ref=ref)


def _reencrypt(m: dict[Any, Any], ref: Ref, limits: Limits) -> Reencrypt:
    hoomi_id = _hoomi_id(m, ref)
    raw = m.get("items")
    if type(raw) is not list or not 1 <= len(raw) <= limits.max_reencrypt_items:
        raise _invalid("items", f"a list of 1 to {limits.max_reencrypt_items} maps", ref)
    items: list[ReencryptItem] = []
    for i, it in enumerate(raw):
        name = f"items[{i}]"
        if type(it) is not dict:
            raise _invalid("items", f"{name}: must be a map", ref)
        raw_id = it.get("id")
        item_id = _parse_uuid(raw_id) if type(raw_id) is str and len(raw_id) == 36 else None
        if item_id is None:
            raise _invalid("items", f"{name}.id: must be a canonical lowercase UUID string", ref)
        session_id = it.get("session_id")
        if type(session_id) is not str or not 0 < len(session_id) <= \
                limits.max_session_id_chars or "\x00" in session_id:
            raise _invalid("items", f"{name}.session_id: a string of 1 to "
                           f"{limits.max_session_id_chars} characters without NUL", ref)
        items.append(ReencryptItem(
            id=item_id, old_nonce=_nonce(it, ref, limits, f"{name}.old_nonce", "old_nonce"),
            content=_content(it, ref, limits, f"{name}.content"),
            nonce=_nonce(it, ref, limits, f"{name}.nonce"), session_id=session_id,
            scheme=_scheme(it, ref, limits, f"{name}.scheme", None),
            tokens=_tokens(it, ref, limits, limits.max_search_tokens_per_message,
                           field=f"{name}.tokens")))
    return Reencrypt(hoomi_id=hoomi_id, items=tuple(items), ref=ref)


def _search(m: dict[Any, Any], ref: Ref, limits: Limits) -> Search:
    hoomi_id = _hoomi_id(m, ref)
    tokens = _tokens(m, ref, limits, limits.max_search_tokens_per_query, least=1)
    assert tokens is not None
    return Search(hoomi_id=hoomi_id, tokens=tokens, before=_int(m, "before", ref, 1, None),
                  limit=_limit(m, ref, limits), ref=ref)


def _delete(m: dict[Any, Any], ref: Ref, limits: Limits) -> Delete:
    return Delete(hoomi_id=_hoomi_id(m, ref), id=_uuid(m, "id", ref), ref=ref)


def _ping(m: dict[Any, Any], ref: Ref, limits: Limits) -> Ping:
    return Ping(ref=ref)


def _read(m: dict[Any, Any], ref: Ref, limits: Limits) -> Read:
    hoomi_id = _hoomi_id(m, ref)
    seq = _int(m, "seq", ref, 0, None)
    if seq is None:
        raise _invalid("seq", "required", ref)
    return Read(hoomi_id=hoomi_id, seq=seq, ref=ref)


def _typing(m: dict[Any, Any], ref: Ref, limits: Limits) -> Typing:
    return Typing(hoomi_id=_hoomi_id(m, ref), ref=ref)


def _presence(m: dict[Any, Any], ref: Ref, limits: Limits) -> Presence:
    return Presence(hoomi_id=_hoomi_id(m, ref), ref=ref)


_CLIENT_DECODERS: dict[str, Callable[[dict[Any, Any], Ref, Limits], ClientFrame]] = {
    "send": _send, "hello": _hello, "history": _history, "sync": _sync, "delete": _delete,
    "ping": _ping, "edit": _edit, "reencrypt": _reencrypt, "search": _search,
    "read": _read, "typing": _typing, "presence": _presence,
}
_TYPE_EXPECTED = "must be one of " + ", ".join(sorted(_CLIENT_DECODERS))


def decode_client(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ClientFrame:
    """One client frame from bytes, validated; ProtocolError for anything else.

    The error has `close=BAD_FRAME` when the bytes are not one msgpack map; otherwise
    the connection stays usable and the error carries the request's ref if readable.
    """
    if len(data) > limits.max_frame_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"frame: at most {limits.max_frame_bytes} bytes", "frame")
    m = _unpack_client(data, limits)
    ref = _read_ref(m, limits)
    kind = m.get("type")
    decode = _CLIENT_DECODERS.get(kind) if type(kind) is str else None
    if decode is None:
        raise _invalid("type", "required" if kind is None else _TYPE_EXPECTED, ref)
    return decode(m, ref, limits)


def client_frame(kind: str, m: dict[Any, Any],
                 limits: Limits = DEFAULT_LIMITS) -> ClientFrame:
    """A client frame of `kind` from a map already decoded (the HTTP API's JSON body with
    its base64 fields made bytes), with exactly `decode_client`'s checks and errors: each
    rule of a frame is written once. KeyError for a `kind` that is not a client frame."""
    return _CLIENT_DECODERS[kind](m, None, limits)


def encode_client(frame: ClientFrame) -> bytes:
    """For the reference client and tests: one client frame to bytes."""
    m: dict[str, Any]
    if isinstance(frame, Send):
        m = {"type": "send", "hoomi_id": uuid_str(frame.hoomi_id),
             "client_msg_id": str(frame.client_msg_id), "content": frame.content,
             "nonce": frame.nonce, "session_id": frame.session_id}
        _v11(m, frame.scheme, frame.tokens)
    elif isinstance(frame, Hello):
        m = {"type": "hello", "token": frame.token}
        if frame.resume:
            m["resume"] = {str(k): v for k, v in frame.resume.items()}
        if frame.features:
            m["features"] = list(frame.features)
    elif isinstance(frame, History):
        m = {"type": "history", "hoomi_id": str(frame.hoomi_id), "limit": frame.limit}
        if frame.before is not None:
            m["before"] = frame.before
        if frame.scheme_below is not None:
            m["scheme_below"] = frame.scheme_below
    elif isinstance(frame, Sync):
        m = {"type": "sync", "hoomi_id": str(frame.hoomi_id), "after": frame.after,
             "limit": frame.limit}
        if frame.scheme_below is not None:
            m["scheme_below"] = frame.scheme_below
    elif isinstance(frame, Edit):
        m = {"type": "edit", "hoomi_id": str(frame.hoomi_id), "id": str(frame.id),
             "content": frame.content, "nonce": frame.nonce, "session_id": frame.session_id}
        _v11(m, frame.scheme, frame.tokens)
    elif isinstance(frame, Reencrypt):
        m = {"type": "reencrypt", "hoomi_id": str(frame.hoomi_id), "items": [
            _item_map(it) for it in frame.items]}
    elif isinstance(frame, Search):
        m = {"type": "search", "hoomi_id": str(frame.hoomi_id), "tokens": list(frame.tokens),
             "limit": frame.limit}
        if frame.before is not None:
            m["before"] = frame.before
    elif isinstance(frame, Delete):
        m = {"type": "delete", "hoomi_id": str(frame.hoomi_id), "id": str(frame.id)}
    elif isinstance(frame, Ping):
        m = {"type": "ping"}
    elif isinstance(frame, Read):
        m = {"type": "read", "hoomi_id": str(frame.hoomi_id), "seq": frame.seq}
    elif isinstance(frame, Typing):
        m = {"type": "typing", "hoomi_id": str(frame.hoomi_id)}
    elif isinstance(frame, Presence):
        m = {"type": "presence", "hoomi_id": str(frame.hoomi_id)}
    else:
        assert_never(frame)
    if frame.ref is not None:
        m["ref"] = frame.ref
    return _pack(m)


def _v11(m: dict[str, Any], scheme: int, tokens: tuple[bytes, ...]) -> None:
    """The v1.1 keys of a send or edit, only when they say something (a v1 frame else)."""
    if scheme != 1:
        m["scheme"] = scheme
    if tokens:
        m["tokens"] = list(tokens)


def _item_map(it: ReencryptItem) -> dict[str, Any]:
    m: dict[str, Any] = {"id": str(it.id), "old_nonce": it.old_nonce, "content": it.content,
                         "nonce": it.nonce, "session_id": it.session_id, "scheme": it.scheme}
    if it.tokens is not None:
        m["tokens"] = list(it.tokens)
    return m


# == server → client ==========================================================================

def _body(b: MessageBody, m: dict[str, Any]) -> dict[str, Any]:
    """Adds a message body's keys to m; a tombstone gets `deleted` and no content keys."""
    m["id"] = str(b.id)
    m["hoomi_id"] = uuid_str(b.hoomi_id)
    m["seq"] = b.seq
    m["sender_id"] = None if b.sender_id is None else uuid_str(b.sender_id)
    if b.deleted:
        m["deleted"] = True
    else:
        m["content"] = b.content
        m["nonce"] = b.nonce
        m["session_id"] = b.session_id
    m["created_at"] = b.created_at
    m["scheme"] = b.scheme
    if b.updated_at is not None:
        m["updated_at"] = b.updated_at
    return m


def encode_ack(ref: Ref, message_id: UUID, hoomi_id: UUID, seq: int, created_at: int,
               ) -> bytes:
    """The `ack` of a `send`: the bytes of `encode_server(Ack(...))`, without the frame
    object (one per message on the hub's hot path)."""
    if ref is None:
        return _pack({"type": "ack", "id": str(message_id), "hoomi_id": uuid_str(hoomi_id),
                      "seq": seq, "created_at": created_at})
    return _pack({"type": "ack", "ref": ref, "id": str(message_id),
                  "hoomi_id": uuid_str(hoomi_id), "seq": seq, "created_at": created_at})


def _head(kind: str, ref: Ref) -> dict[str, Any]:
    return {"type": kind} if ref is None else {"type": kind, "ref": ref}


def encode_server(frame: ServerFrame) -> bytes:
    """One server frame to bytes: a msgpack map whose first key is `type`, `ref` omitted
    when None, UUIDs as canonical strings, bytes as bin."""
    if isinstance(frame, MessageBody):  # the hot path first
        return _pack(_body(frame, {"type": "message"}))
    m: dict[str, Any]
    if isinstance(frame, Ack):
        m = _head("ack", frame.ref)
        m["id"] = str(frame.id)
        m["hoomi_id"] = uuid_str(frame.hoomi_id)
        m["seq"] = frame.seq
        m["created_at"] = frame.created_at
    elif isinstance(frame, Page):
        m = _head("page", frame.ref)
        m["hoomi_id"] = uuid_str(frame.hoomi_id)
        m["messages"] = [_body(b, {}) for b in frame.messages]
        if frame.has_more is None:
            m["next_before"] = frame.next_before
        else:
            m["has_more"] = frame.has_more
    elif isinstance(frame, Welcome):
        m = _head("welcome", frame.ref)
        m["user_id"] = str(frame.user_id)
        m["hoomis"] = [{"hoomi_id": uuid_str(h.hoomi_id), "last_seq": h.last_seq,
                        "role": h.role, "read_seq": h.read_seq} for h in frame.hoomis]
        if frame.max_content_bytes is not None:
            m["max_content_bytes"] = frame.max_content_bytes
        if frame.features is not None:
            m["features"] = frame.features
    elif isinstance(frame, Deleted):
        m = {"type": "deleted", "hoomi_id": uuid_str(frame.hoomi_id), "id": str(frame.id),
             "seq": frame.seq}
    elif isinstance(frame, Membership):
        m = {"type": "membership", "hoomi_id": uuid_str(frame.hoomi_id),
             "state": frame.state}
    elif isinstance(frame, Error):
        m = _head("error", frame.ref)
        m["code"] = frame.code.value
        m["message"] = frame.message
        if frame.retry_after_ms is not None:
            m["retry_after_ms"] = frame.retry_after_ms
    elif isinstance(frame, Pong):
        m = _head("pong", frame.ref)
    elif isinstance(frame, Edited):
        m = {"type": "edited", "hoomi_id": uuid_str(frame.hoomi_id), "id": str(frame.id),
             "seq": frame.seq, "content": frame.content, "nonce": frame.nonce,
             "session_id": frame.session_id, "scheme": frame.scheme,
             "updated_at": frame.updated_at}
    elif isinstance(frame, EditAck):
        m = _head("ack", frame.ref)
        m["id"] = str(frame.id)
        m["hoomi_id"] = uuid_str(frame.hoomi_id)
        m["seq"] = frame.seq
        m["updated_at"] = frame.updated_at
    elif isinstance(frame, ReencryptAck):
        m = _head("ack", frame.ref)
        m["hoomi_id"] = uuid_str(frame.hoomi_id)
        m["updated"] = frame.updated
        m["skipped"] = [str(i) for i in frame.skipped]
    elif isinstance(frame, ReadAck):
        m = _head("ack", frame.ref)
        m["hoomi_id"] = uuid_str(frame.hoomi_id)
        m["seq"] = frame.seq
    elif isinstance(frame, Receipt):
        m = {"type": "receipt", "hoomi_id": uuid_str(frame.hoomi_id),
             "user_id": uuid_str(frame.user_id), "seq": frame.seq}
    elif isinstance(frame, TypingNotice):
        m = {"type": "typing", "hoomi_id": uuid_str(frame.hoomi_id),
             "user_id": uuid_str(frame.user_id)}
    elif isinstance(frame, PresenceReply):
        m = _head("presence", frame.ref)
        m["hoomi_id"] = uuid_str(frame.hoomi_id)
        m["user_ids"] = [uuid_str(u) for u in frame.user_ids]
    else:
        assert_never(frame)
    return _pack(m)


# The server is trusted more than clients: decode_server checks each field's type and
# shape (so garbage raises ProtocolError), not the limits.

def _malformed(field: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, f"{field}: {message}", field)


def _get(m: dict[str, Any], field: str, kind: type[_T]) -> _T:
    value = m.get(field)
    if type(value) is not kind:
        raise _malformed(field, f"expected {kind.__name__}")
    return value


def _get_opt(m: dict[str, Any], field: str, kind: type[_T]) -> _T | None:
    value = m.get(field)
    if value is not None and type(value) is not kind:
        raise _malformed(field, f"expected {kind.__name__} or nil")
    return value


def _get_uuid(m: dict[str, Any], field: str) -> UUID:
    value = _parse_uuid(_get(m, field, str))
    if value is None:
        raise _malformed(field, "expected a canonical UUID string")
    return value


def _get_map(value: object, field: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _malformed(field, "expected a map")
    return value


def _get_ref(m: dict[str, Any]) -> Ref:
    ref = m.get("ref")
    if ref is not None and type(ref) is not str and type(ref) is not int:
        raise _malformed("ref", "expected a string or an integer")
    return ref


def _body_from(m: dict[str, Any]) -> MessageBody:
    deleted = m.get("deleted", False)
    if type(deleted) is not bool:
        raise _malformed("deleted", "expected bool")
    sender = _get_opt(m, "sender_id", str)
    return MessageBody(
        id=_get_uuid(m, "id"), hoomi_id=_get_uuid(m, "hoomi_id"), seq=_get(m, "seq", int),
        sender_id=None if sender is None else _get_uuid(m, "sender_id"),
        content=None if deleted else _get(m, "content", bytes),
        nonce=None if deleted else _get(m, "nonce", bytes),
        session_id=None if deleted else _get(m, "session_id", str),
        created_at=_get(m, "created_at", int), deleted=deleted,
        scheme=_get_opt(m, "scheme", int) or 1, updated_at=_get_opt(m, "updated_at", int),
    )


def _page_from(m: dict[str, Any], ref: Ref) -> Page:
    bodies = [_body_from(_get_map(b, "messages")) for b in _get(m, "messages", list)]
    if "has_more" in m:
        return Page(hoomi_id=_get_uuid(m, "hoomi_id"), messages=bodies,
                    has_more=_get(m, "has_more", bool), ref=ref)
    return Page(hoomi_id=_get_uuid(m, "hoomi_id"), messages=bodies,
                next_before=_get_opt(m, "next_before", int), ref=ref)


def _welcome_from(m: dict[str, Any], ref: Ref) -> Welcome:
    hoomis = []
    for raw in _get(m, "hoomis", list):
        h = _get_map(raw, "hoomis")
        hoomis.append(HoomiState(hoomi_id=_get_uuid(h, "hoomi_id"),
                                 last_seq=_get(h, "last_seq", int), role=_get(h, "role", str),
                                 read_seq=_get_opt(h, "read_seq", int) or 0))
    features = _get_opt(m, "features", list)
    if features is not None and not all(type(f) is str for f in features):
        raise _malformed("features", "expected strings")
    return Welcome(user_id=_get_uuid(m, "user_id"), hoomis=hoomis, ref=ref,
                   max_content_bytes=_get_opt(m, "max_content_bytes", int),
                   features=features)


def _error_from(m: dict[str, Any], ref: Ref) -> Error:
    try:
        code = ErrorCode(_get(m, "code", str))
    except ValueError:
        raise _malformed("code", "unknown error code") from None
    return Error(code=code, message=_get(m, "message", str), ref=ref,
                 retry_after_ms=_get_opt(m, "retry_after_ms", int))


def encode_body_maps(ref: Ref, hoomi_id: UUID, bodies: list[dict[str, Any]], *,
                     next_before: int | None = None, has_more: bool | None = None) -> bytes:
    """A `page` whose message bodies are already maps in wire form (the keys `_body`
    writes, in its order; the server builds them straight from stored rows): the same
    bytes as `encode_server(Page(...))` without a MessageBody per row. With `has_more`
    None, `next_before` is written (a history or search page), else `has_more` (sync)."""
    m = _head("page", ref)
    m["hoomi_id"] = uuid_str(hoomi_id)
    m["messages"] = bodies
    if has_more is None:
        m["next_before"] = next_before
    else:
        m["has_more"] = has_more
    return _pack(m)


def encode_body_map(body: dict[str, Any]) -> bytes:
    """A `message` push from a body map in wire form (see `encode_body_maps`)."""
    return _pack({"type": "message", **body})


def split_stream(data: bytes) -> list[bytes]:
    """SPEC 7.2 "batch": one WebSocket message holding consecutive msgpack maps (a msgpack
    stream), cut into one bytes per frame, each for `decode_server` (a v1 message is a
    stream of one). Objects are skipped, not built; ProtocolError (INVALID) for a
    truncated or empty stream."""
    if not data:
        raise _malformed("frame", "empty message")
    u = msgpack.Unpacker(max_buffer_size=len(data))
    u.feed(data)
    parts: list[bytes] = []
    start = 0
    try:
        while start < len(data):
            u.skip()
            end = u.tell()
            parts.append(data[start:end])
            start = end
    except Exception as exc:  # OutOfData (truncated), or bytes that are not msgpack
        raise _malformed("frame", f"not a msgpack stream ({type(exc).__name__})") from None
    return parts


def decode_server_stream(data: bytes) -> list[ServerFrame]:
    """Every server frame of one WebSocket message, in order (see `split_stream`)."""
    return [decode_server(part) for part in split_stream(data)]


def decode_server(data: bytes) -> ServerFrame:
    """For the reference client and tests: one server frame from bytes; ProtocolError
    (INVALID) for anything that is not a well-formed server frame."""
    try:
        # An array's slots are allocated from its header; an element of a server
        # frame's array takes at least 16 bytes, so this bound costs nothing legitimate.
        m = msgpack.unpackb(data, raw=False, max_array_len=len(data) // 16 + 1)
    except Exception as exc:  # see _unpack_client
        raise _malformed("frame", f"not msgpack ({type(exc).__name__})") from None
    m = _get_map(m, "frame")
    kind = m.get("type")
    if kind == "message":
        return _body_from(m)
    ref = _get_ref(m)
    if kind == "ack":
        if "updated" in m:
            skipped = []
            for raw in _get(m, "skipped", list):
                one = _parse_uuid(raw) if type(raw) is str else None
                if one is None:
                    raise _malformed("skipped", "expected canonical UUID strings")
                skipped.append(one)
            return ReencryptAck(hoomi_id=_get_uuid(m, "hoomi_id"),
                                updated=_get(m, "updated", int), skipped=skipped, ref=ref)
        if "id" not in m:
            return ReadAck(hoomi_id=_get_uuid(m, "hoomi_id"), seq=_get(m, "seq", int),
                           ref=ref)
        if "created_at" not in m and "updated_at" in m:
            return EditAck(id=_get_uuid(m, "id"), hoomi_id=_get_uuid(m, "hoomi_id"),
                           seq=_get(m, "seq", int), updated_at=_get(m, "updated_at", int),
                           ref=ref)
        return Ack(id=_get_uuid(m, "id"), hoomi_id=_get_uuid(m, "hoomi_id"),
                   seq=_get(m, "seq", int), created_at=_get(m, "created_at", int), ref=ref)
    if kind == "edited":
        return Edited(hoomi_id=_get_uuid(m, "hoomi_id"), id=_get_uuid(m, "id"),
                      seq=_get(m, "seq", int), content=_get(m, "content", bytes),
                      nonce=_get(m, "nonce", bytes), session_id=_get(m, "session_id", str),
                      scheme=_get(m, "scheme", int), updated_at=_get(m, "updated_at", int))
    if kind == "page":
        return _page_from(m, ref)
    if kind == "welcome":
        return _welcome_from(m, ref)
    if kind == "deleted":
        return Deleted(hoomi_id=_get_uuid(m, "hoomi_id"), id=_get_uuid(m, "id"),
                       seq=_get(m, "seq", int))
    if kind == "membership":
        return Membership(hoomi_id=_get_uuid(m, "hoomi_id"), state=_get(m, "state", str))
    if kind == "error":
        return _error_from(m, ref)
    if kind == "pong":
        return Pong(ref=ref)
    if kind == "receipt":
        return Receipt(hoomi_id=_get_uuid(m, "hoomi_id"), user_id=_get_uuid(m, "user_id"),
                       seq=_get(m, "seq", int))
    if kind == "typing":
        return TypingNotice(hoomi_id=_get_uuid(m, "hoomi_id"),
                            user_id=_get_uuid(m, "user_id"))
    if kind == "presence":
        users = []
        for raw in _get(m, "user_ids", list):
            one = _parse_uuid(raw) if type(raw) is str else None
            if one is None:
                raise _malformed("user_ids", "expected canonical UUID strings")
            users.append(one)
        return PresenceReply(hoomi_id=_get_uuid(m, "hoomi_id"), user_ids=users, ref=ref)
    raise _malformed("type", "unknown server frame type")
