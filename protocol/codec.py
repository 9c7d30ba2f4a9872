"""msgpack encoding and validation of protocol v1 frames.

`decode_client` is where untrusted bytes enter the hub: anything it is given either
becomes a valid typed frame or raises ProtocolError, never another exception. It reads
`ref` first, so an error about a readable request echoes the request's ref.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

import msgpack

from .errors import CloseCode, ErrorCode, ProtocolError
from .frames import (
    Ack,
    ClientFrame,
    Delete,
    Deleted,
    Error,
    Hello,
    History,
    HoomiState,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    Ref,
    Send,
    ServerFrame,
    Sync,
    Welcome,
)
from .limits import DEFAULT_LIMITS, Limits

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _invalid(field: str, message: str, ref: Ref = None) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, f"{field}: {message}", field, ref)


def _unpack(data: bytes, limits: Limits, max_len: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=max(limits.max_resume_hoomis, limits.max_page_limit) + 16,
            max_map_len=limits.max_resume_hoomis + 16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many kinds; all mean "not a frame"
        raise ProtocolError(ErrorCode.INVALID, f"frame: not msgpack ({type(exc).__name__})",
                            "frame", close=CloseCode.BAD_FRAME) from None


# -- field readers ---------------------------------------------------------------------------

def _read_ref(m: dict[Any, Any], limits: Limits) -> Ref:
    ref = m.get("ref")
    if ref is None:
        return None
    if isinstance(ref, str) and not isinstance(ref, bool):
        if len(ref) > limits.max_ref_chars:
            raise _invalid("ref", f"at most {limits.max_ref_chars} characters")
        return ref
    if type(ref) is int:
        if not INT64_MIN <= ref <= INT64_MAX:
            raise _invalid("ref", "integer out of range")
        return ref
    raise _invalid("ref", "must be a string or an integer")


def _uuid(m: dict[Any, Any], field: str, ref: Ref) -> UUID:
    raw = m.get(field)
    if raw is None:
        raise _invalid(field, "required", ref)
    return _uuid_value(raw, field, ref)


def _uuid_value(raw: Any, field: str, ref: Ref) -> UUID:
    if not isinstance(raw, str) or len(raw) != 36:
        raise _invalid(field, "must be a canonical lowercase UUID string", ref)
    try:
        value = UUID(raw)
    except ValueError:
        raise _invalid(field, "must be a canonical lowercase UUID string", ref) from None
    if str(value) != raw:
        raise _invalid(field, "must be a canonical lowercase UUID string", ref)
    return value


def _int(m: dict[Any, Any], field: str, ref: Ref, lo: int, hi: int, default: int | None = None,
         required: bool = False) -> int | None:
    raw = m.get(field)
    if raw is None:
        if required:
            raise _invalid(field, "required", ref)
        return default
    if type(raw) is not int:
        raise _invalid(field, "must be an integer", ref)
    if not lo <= raw <= hi:
        raise _invalid(field, f"must be between {lo} and {hi}", ref)
    return raw


def _limit(m: dict[Any, Any], ref: Ref, limits: Limits) -> int:
    value = _int(m, "limit", ref, 1, limits.max_page_limit, limits.default_page_limit)
    assert value is not None
    return value


def _str(m: dict[Any, Any], field: str, ref: Ref, max_chars: int) -> str:
    raw = m.get(field)
    if raw is None:
        raise _invalid(field, "required", ref)
    if not isinstance(raw, str):
        raise _invalid(field, "must be a string", ref)
    if not raw:
        raise _invalid(field, "must not be empty", ref)
    if len(raw) > max_chars:
        raise _invalid(field, f"at most {max_chars} characters", ref)
    if "\x00" in raw:
        raise _invalid(field, "must not contain NUL", ref)
    return raw


def _bin(m: dict[Any, Any], field: str, ref: Ref) -> bytes:
    raw = m.get(field)
    if raw is None:
        raise _invalid(field, "required", ref)
    if not isinstance(raw, bytes):
        raise _invalid(field, "must be msgpack bin", ref)
    return raw


# -- client frames ---------------------------------------------------------------------------

def _hello(m: dict[Any, Any], ref: Ref, limits: Limits) -> Hello:
    token = _str(m, "token", ref, limits.max_token_chars)
    raw = m.get("resume")
    resume: dict[UUID, int] = {}
    if raw is not None:
        if not isinstance(raw, dict):
            raise _invalid("resume", "must be a map of hoomi_id to last seq seen", ref)
        if len(raw) > limits.max_resume_hoomis:
            raise _invalid("resume", f"at most {limits.max_resume_hoomis} hoomis", ref)
        for k, v in raw.items():
            hoomi = _uuid_value(k, "resume", ref)
            if type(v) is not int or not 0 <= v <= INT64_MAX:
                raise _invalid("resume", "seqs must be non-negative integers", ref)
            resume[hoomi] = v
    return Hello(token=token, resume=resume, ref=ref)


def _send(m: dict[Any, Any], ref: Ref, limits: Limits) -> Send:
    hoomi_id = _uuid(m, "hoomi_id", ref)
    client_msg_id = _uuid(m, "client_msg_id", ref)
    content = _bin(m, "content", ref)
    if len(content) > limits.max_content_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"content: at most {limits.max_content_bytes} bytes", "content", ref)
    if len(content) < limits.min_content_bytes:
        raise _invalid("content", f"at least {limits.min_content_bytes} bytes (the GCM tag)",
                       ref)
    nonce = _bin(m, "nonce", ref)
    if len(nonce) != limits.nonce_bytes:
        raise _invalid("nonce", f"must be exactly {limits.nonce_bytes} bytes", ref)
    session_id = _str(m, "session_id", ref, limits.max_session_id_chars)
    return Send(hoomi_id=hoomi_id, client_msg_id=client_msg_id, content=content, nonce=nonce,
                session_id=session_id, ref=ref)


def _history(m: dict[Any, Any], ref: Ref, limits: Limits) -> History:
    hoomi_id = _uuid(m, "hoomi_id", ref)
    before = _int(m, "before", ref, 1, INT64_MAX)
    return History(hoomi_id=hoomi_id, before=before, limit=_limit(m, ref, limits), ref=ref)


def _sync(m: dict[Any, Any], ref: Ref, limits: Limits) -> Sync:
    hoomi_id = _uuid(m, "hoomi_id", ref)
    after = _int(m, "after", ref, 0, INT64_MAX, required=True)
    assert after is not None
    return Sync(hoomi_id=hoomi_id, after=after, limit=_limit(m, ref, limits), ref=ref)


def _delete(m: dict[Any, Any], ref: Ref, limits: Limits) -> Delete:
    return Delete(hoomi_id=_uuid(m, "hoomi_id", ref), id=_uuid(m, "id", ref), ref=ref)


def _ping(m: dict[Any, Any], ref: Ref, limits: Limits) -> Ping:
    return Ping(ref=ref)


_CLIENT: dict[str, Callable[[dict[Any, Any], Ref, Limits], ClientFrame]] = {
    "hello": _hello, "send": _send, "history": _history, "sync": _sync, "delete": _delete,
    "ping": _ping,
}


def decode_client(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ClientFrame:
    """One client frame from bytes, validated; ProtocolError for anything else."""
    if len(data) > limits.max_frame_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"frame: larger than {limits.max_frame_bytes} bytes", "frame")
    m = _unpack(data, limits, limits.max_frame_bytes)
    if not isinstance(m, dict):
        raise ProtocolError(ErrorCode.INVALID, "frame: must be a msgpack map", "frame",
                            close=CloseCode.BAD_FRAME)
    ref = _read_ref(m, limits)
    kind = m.get("type")
    parse = _CLIENT.get(kind) if isinstance(kind, str) else None
    if parse is None:
        raise _invalid("type", "unknown or missing frame type", ref)
    return parse(m, ref, limits)


def encode_client(frame: ClientFrame) -> bytes:
    """For the reference client and tests: one client frame to bytes."""
    m: dict[str, Any]
    if isinstance(frame, Hello):
        m = {"type": "hello", "token": frame.token}
        if frame.resume:
            m["resume"] = {str(k): v for k, v in frame.resume.items()}
    elif isinstance(frame, Send):
        m = {"type": "send", "hoomi_id": str(frame.hoomi_id),
             "client_msg_id": str(frame.client_msg_id), "content": frame.content,
             "nonce": frame.nonce, "session_id": frame.session_id}
    elif isinstance(frame, History):
        m = {"type": "history", "hoomi_id": str(frame.hoomi_id), "limit": frame.limit}
        if frame.before is not None:
            m["before"] = frame.before
    elif isinstance(frame, Sync):
        m = {"type": "sync", "hoomi_id": str(frame.hoomi_id), "after": frame.after,
             "limit": frame.limit}
    elif isinstance(frame, Delete):
        m = {"type": "delete", "hoomi_id": str(frame.hoomi_id), "id": str(frame.id)}
    else:
        m = {"type": "ping"}
    if frame.ref is not None:
        m["ref"] = frame.ref
    return msgpack.packb(m, use_bin_type=True)  # type: ignore[no-any-return]


# -- server frames ---------------------------------------------------------------------------

def _body(b: MessageBody) -> dict[str, Any]:
    m: dict[str, Any] = {
        "id": str(b.id), "hoomi_id": str(b.hoomi_id), "seq": b.seq,
        "sender_id": str(b.sender_id) if b.sender_id is not None else None,
        "created_at": b.created_at,
    }
    if b.deleted:
        m["deleted"] = True
    else:
        m["content"] = b.content
        m["nonce"] = b.nonce
        m["session_id"] = b.session_id
    return m


def encode_server(frame: ServerFrame) -> bytes:
    """One server frame to bytes: a msgpack map whose first key is `type`."""
    m: dict[str, Any]
    ref: Ref = None
    if isinstance(frame, MessageBody):
        m = {"type": "message", **_body(frame)}
    elif isinstance(frame, Ack):
        m = {"type": "ack", "id": str(frame.id), "hoomi_id": str(frame.hoomi_id),
             "seq": frame.seq, "created_at": frame.created_at}
        ref = frame.ref
    elif isinstance(frame, Page):
        m = {"type": "page", "hoomi_id": str(frame.hoomi_id),
             "messages": [_body(b) for b in frame.messages]}
        if frame.has_more is None:
            m["next_before"] = frame.next_before
        else:
            m["has_more"] = frame.has_more
        ref = frame.ref
    elif isinstance(frame, Welcome):
        m = {"type": "welcome", "user_id": str(frame.user_id), "hoomis": [
            {"hoomi_id": str(h.hoomi_id), "last_seq": h.last_seq, "role": h.role}
            for h in frame.hoomis]}
        ref = frame.ref
    elif isinstance(frame, Deleted):
        m = {"type": "deleted", "hoomi_id": str(frame.hoomi_id), "id": str(frame.id),
             "seq": frame.seq}
    elif isinstance(frame, Membership):
        m = {"type": "membership", "hoomi_id": str(frame.hoomi_id), "state": frame.state}
    elif isinstance(frame, Error):
        m = {"type": "error", "code": frame.code.value, "message": frame.message}
        if frame.retry_after_ms is not None:
            m["retry_after_ms"] = frame.retry_after_ms
        ref = frame.ref
    else:
        m = {"type": "pong"}
        ref = frame.ref
    if ref is not None:
        m["ref"] = ref
    return msgpack.packb(m, use_bin_type=True)  # type: ignore[no-any-return]


def _opt_uuid(raw: Any) -> UUID | None:
    return None if raw is None else UUID(raw)


def _body_from(m: dict[str, Any]) -> MessageBody:
    deleted = bool(m.get("deleted", False))
    return MessageBody(
        id=UUID(m["id"]), hoomi_id=UUID(m["hoomi_id"]), seq=int(m["seq"]),
        sender_id=_opt_uuid(m.get("sender_id")),
        content=None if deleted else bytes(m["content"]),
        nonce=None if deleted else bytes(m["nonce"]),
        session_id=None if deleted else str(m["session_id"]),
        created_at=int(m["created_at"]), deleted=deleted,
    )


def decode_server(data: bytes) -> ServerFrame:
    """For the reference client and tests: one server frame from bytes."""
    m = _unpack(data, DEFAULT_LIMITS, 2**24)
    if not isinstance(m, dict):
        raise ProtocolError(ErrorCode.INVALID, "frame: must be a msgpack map", "frame")
    try:
        kind = m["type"]
        ref = m.get("ref")
        if kind == "message":
            return _body_from(m)
        if kind == "ack":
            return Ack(id=UUID(m["id"]), hoomi_id=UUID(m["hoomi_id"]), seq=int(m["seq"]),
                       created_at=int(m["created_at"]), ref=ref)
        if kind == "page":
            return Page(hoomi_id=UUID(m["hoomi_id"]),
                        messages=[_body_from(b) for b in m["messages"]],
                        next_before=m.get("next_before"), has_more=m.get("has_more"), ref=ref)
        if kind == "welcome":
            return Welcome(user_id=UUID(m["user_id"]), ref=ref, hoomis=[
                HoomiState(hoomi_id=UUID(h["hoomi_id"]), last_seq=int(h["last_seq"]),
                           role=str(h["role"])) for h in m["hoomis"]])
        if kind == "deleted":
            return Deleted(hoomi_id=UUID(m["hoomi_id"]), id=UUID(m["id"]), seq=int(m["seq"]))
        if kind == "membership":
            return Membership(hoomi_id=UUID(m["hoomi_id"]), state=str(m["state"]))
        if kind == "error":
            return Error(code=ErrorCode(m["code"]), message=str(m["message"]), ref=ref,
                         retry_after_ms=m.get("retry_after_ms"))
        if kind == "pong":
            return Pong(ref=ref)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(ErrorCode.INVALID, f"frame: malformed ({exc})", "frame") from None
    raise ProtocolError(ErrorCode.INVALID, "type: unknown server frame type", "type")
