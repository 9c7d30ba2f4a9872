"""The wire codec: every frame round-trips, hostile input raises only ProtocolError, and each
validation rule answers with its exact code and field. Pure code: no servers, no asyncio."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any
from uuid import UUID, uuid4

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoomi_protocol import (
    DEFAULT_LIMITS,
    Ack,
    ClientFrame,
    CloseCode,
    Delete,
    Deleted,
    Edit,
    EditAck,
    Edited,
    Error,
    ErrorCode,
    Hello,
    History,
    HoomiState,
    Limits,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    Presence,
    PresenceReply,
    ProtocolError,
    Read,
    ReadAck,
    Receipt,
    Reencrypt,
    ReencryptAck,
    ReencryptItem,
    Search,
    Send,
    ServerFrame,
    Sync,
    Typing,
    TypingNotice,
    Welcome,
    decode_client,
    decode_server,
    decode_server_stream,
    encode_client,
    encode_server,
    split_stream,
)

INT64_MAX = 2**63 - 1
HOOMI = UUID("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")

# -- strategies --------------------------------------------------------------------------------

uuids = st.uuids()
seqs = st.integers(min_value=1, max_value=INT64_MAX)
refs = st.none() | st.integers(-(2**63), INT64_MAX) | st.text(max_size=64)
times = st.integers(min_value=0, max_value=2**53)
no_nul_text = st.text(min_size=1, max_size=128).filter(lambda s: "\x00" not in s)
schemes = st.integers(1, 255)
search_tokens = st.binary(min_size=8, max_size=32)
contents = st.binary(min_size=16, max_size=256)
nonces = st.binary(min_size=12, max_size=12)

client_frames = st.one_of(
    st.builds(Hello, token=no_nul_text, ref=refs,
              resume=st.dictionaries(uuids, st.integers(0, INT64_MAX), max_size=10),
              features=st.lists(st.text(min_size=1, max_size=32), max_size=16).map(tuple)),
    st.builds(Send, hoomi_id=uuids, client_msg_id=uuids, session_id=no_nul_text, ref=refs,
              content=st.binary(min_size=16, max_size=1024),
              nonce=st.binary(min_size=12, max_size=12), scheme=schemes,
              tokens=st.lists(search_tokens, max_size=64).map(tuple)),
    st.builds(History, hoomi_id=uuids, before=st.none() | seqs, limit=st.integers(1, 100),
              scheme_below=st.none() | st.integers(1, 256), ref=refs),
    st.builds(Sync, hoomi_id=uuids, after=st.integers(0, INT64_MAX),
              limit=st.integers(1, 100), scheme_below=st.none() | st.integers(1, 256),
              ref=refs),
    st.builds(Edit, hoomi_id=uuids, id=uuids, content=contents, nonce=nonces,
              session_id=no_nul_text, scheme=schemes,
              tokens=st.lists(search_tokens, max_size=8).map(tuple), ref=refs),
    st.builds(Reencrypt, hoomi_id=uuids, ref=refs, items=st.lists(st.builds(
        ReencryptItem, id=uuids, old_nonce=nonces, content=contents, nonce=nonces,
        session_id=no_nul_text, scheme=schemes,
        tokens=st.none() | st.lists(search_tokens, max_size=4).map(tuple)),
        min_size=1, max_size=5).map(tuple)),
    st.builds(Search, hoomi_id=uuids, tokens=st.lists(search_tokens, min_size=1,
                                                      max_size=8).map(tuple),
              before=st.none() | seqs, limit=st.integers(1, 100), ref=refs),
    st.builds(Delete, hoomi_id=uuids, id=uuids, ref=refs),
    st.builds(Ping, ref=refs),
    st.builds(Read, hoomi_id=uuids, seq=st.integers(0, INT64_MAX), ref=refs),
    st.builds(Typing, hoomi_id=uuids, ref=refs),
    st.builds(Presence, hoomi_id=uuids, ref=refs),
)

live_bodies = st.builds(
    MessageBody, id=uuids, hoomi_id=uuids, seq=seqs, sender_id=st.none() | uuids,
    content=st.binary(min_size=16, max_size=256), nonce=st.binary(min_size=12, max_size=12),
    session_id=no_nul_text, created_at=times, deleted=st.just(False), scheme=schemes,
    updated_at=st.none() | times)
tombstones = st.builds(
    MessageBody, id=uuids, hoomi_id=uuids, seq=seqs, sender_id=st.none() | uuids,
    content=st.none(), nonce=st.none(), session_id=st.none(), created_at=times,
    deleted=st.just(True), scheme=schemes, updated_at=st.none() | times)
bodies = live_bodies | tombstones

server_frames = st.one_of(
    st.builds(Welcome, user_id=uuids, ref=refs, hoomis=st.lists(st.builds(
        HoomiState, hoomi_id=uuids, last_seq=st.integers(0, INT64_MAX),
        role=st.sampled_from(["admin", "member"]), read_seq=st.integers(0, INT64_MAX)),
        max_size=4), max_content_bytes=st.none() | st.integers(16, 2**31),
        features=st.none() | st.lists(st.text(max_size=32), max_size=4)),
    st.builds(Ack, id=uuids, hoomi_id=uuids, seq=seqs, created_at=times, ref=refs),
    bodies,
    st.builds(Page, hoomi_id=uuids, messages=st.lists(bodies, max_size=4),
              next_before=st.none() | seqs, has_more=st.none(), ref=refs),
    st.builds(Page, hoomi_id=uuids, messages=st.lists(bodies, max_size=4),
              next_before=st.none(), has_more=st.booleans(), ref=refs),
    st.builds(Deleted, hoomi_id=uuids, id=uuids, seq=seqs),
    st.builds(Membership, hoomi_id=uuids, state=st.sampled_from(["joined", "left"])),
    st.builds(Error, code=st.sampled_from(list(ErrorCode)), message=st.text(max_size=80),
              ref=refs, retry_after_ms=st.none() | st.integers(1, 60_000)),
    st.builds(Pong, ref=refs),
    st.builds(EditAck, id=uuids, hoomi_id=uuids, seq=seqs, updated_at=times, ref=refs),
    st.builds(ReencryptAck, hoomi_id=uuids, updated=st.integers(0, 100),
              skipped=st.lists(uuids, max_size=5), ref=refs),
    st.builds(Edited, hoomi_id=uuids, id=uuids, seq=seqs, content=contents, nonce=nonces,
              session_id=no_nul_text, scheme=schemes, updated_at=times),
    st.builds(ReadAck, hoomi_id=uuids, seq=st.integers(0, INT64_MAX), ref=refs),
    st.builds(Receipt, hoomi_id=uuids, user_id=uuids, seq=st.integers(0, INT64_MAX)),
    st.builds(TypingNotice, hoomi_id=uuids, user_id=uuids),
    st.builds(PresenceReply, hoomi_id=uuids, user_ids=st.lists(uuids, max_size=5), ref=refs),
)

# Everything msgpack can carry, floats and bins included.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=12) | st.integers(0, 10) | st.none(), inner, max_size=4),
    max_leaves=16,
)
field_names = st.sampled_from([
    "type", "ref", "token", "resume", "hoomi_id", "client_msg_id", "content", "nonce",
    "session_id", "before", "after", "limit", "id", "scheme", "tokens", "items",
    "scheme_below", "seq", "features"])
field_values = msgpack_values | uuids.map(str) | st.binary(min_size=10, max_size=20) | (
    st.dictionaries(uuids.map(str), msgpack_values, max_size=3))
frame_types = st.sampled_from(["hello", "send", "history", "sync", "delete", "ping", "edit",
                               "reencrypt", "search", "read", "typing", "presence",
                               "nope"])


# Every key some client frame reads (protocol/hoomi_protocol/frames.py).
KNOWN_KEYS = {"type", "ref", "token", "resume", "hoomi_id", "client_msg_id", "content",
              "nonce", "session_id", "before", "after", "limit", "id", "scheme", "tokens",
              "items", "scheme_below", "seq", "features"}


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def rejects(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        decode_client(data, limits)
    return err.value


def send_map(**over: Any) -> dict[str, Any]:
    """A valid `send` with ref "r1", with fields replaced (or removed, given ...)."""
    m = {"type": "send", "hoomi_id": str(HOOMI), "client_msg_id": str(uuid4()),
         "content": bytes(16), "nonce": bytes(12), "session_id": "s1", "ref": "r1"}
    m.update(over)
    return {k: v for k, v in m.items() if v is not ...}


# -- round trips -------------------------------------------------------------------------------

@settings(max_examples=250, deadline=None)
@given(client_frames)
def test_every_client_frame_round_trips(frame: ClientFrame) -> None:
    assert decode_client(encode_client(frame)) == frame


@settings(max_examples=250, deadline=None)
@given(server_frames)
def test_every_server_frame_round_trips_with_type_first_and_no_nil_ref(
        frame: ServerFrame) -> None:
    data = encode_server(frame)
    assert decode_server(data) == frame
    raw = unpack(data)
    assert next(iter(raw)) == "type"
    assert "ref" not in raw or raw["ref"] is not None


@settings(max_examples=150, deadline=None)
@given(st.lists(server_frames, min_size=1, max_size=6))
def test_a_batch_stream_splits_into_the_frames_it_packs_in_order(
        frames: list[ServerFrame]) -> None:
    """SPEC 7.2 "batch": consecutive frames in one message decode to the same frames."""
    parts = [encode_server(f) for f in frames]
    data = b"".join(parts)
    assert split_stream(data) == parts
    assert decode_server_stream(data) == frames
    assert decode_server_stream(parts[0]) == frames[:1]  # a v1 message: a stream of one


@settings(max_examples=200, deadline=None)
@given(st.lists(server_frames, min_size=1, max_size=3), st.data())
def test_a_cut_or_corrupted_stream_raises_only_protocol_error(
        frames: list[ServerFrame], data: st.DataObject) -> None:
    raw = bytearray(b"".join(encode_server(f) for f in frames))
    corrupted = data.draw(st.booleans())
    if corrupted:
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode_server_stream(bytes(raw[:cut]))
    except ProtocolError:
        pass
    # Intact frames cut between two frame boundaries: always refused as truncated.
    if not corrupted and 0 < cut < len(raw) and cut not in _ends(frames):
        with pytest.raises(ProtocolError):
            split_stream(bytes(raw[:cut]))


def _ends(frames: list[ServerFrame]) -> set[int]:
    out, end = set(), 0
    for f in frames:
        end += len(encode_server(f))
        out.add(end)
    return out


# -- hostile input -----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        decode_client(data)
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_arbitrary_msgpack_values_raise_only_protocol_error(value: Any) -> None:
    try:
        decode_client(pack(value))
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode)
        assert (err.close == CloseCode.BAD_FRAME) == (not isinstance(value, dict))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, field_values, max_size=8), frame_types)
def test_maps_of_arbitrary_fields_raise_only_protocol_error(m: dict[str, Any],
                                                            kind: str) -> None:
    m.setdefault("type", kind)
    try:
        frame = decode_client(pack(m))
    except ProtocolError as err:
        assert err.close is None
        assert err.field is not None and err.message.startswith(err.field + ":")
    else:
        assert decode_client(encode_client(frame)) == frame


@settings(max_examples=250, deadline=None)
@given(client_frames, st.data())
def test_corrupted_frames_decode_or_raise_only_protocol_error(frame: ClientFrame,
                                                              data: st.DataObject) -> None:
    raw = bytearray(encode_client(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode_client(bytes(raw[:cut]))
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256) | msgpack_values.map(pack))
def test_decode_server_raises_only_protocol_error_on_garbage(data: bytes) -> None:
    try:
        decode_server(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize("data", [
    pack([1]), pack("x"), pack(7), pack(None), pack(b"bin"), b"", b"\xc1",
    pack({"type": "ping"})[:-1],  # truncated
    pack({"type": "ping"}) + b"\x00",  # two values
    b"\x91" * 5000,  # nesting deeper than msgpack's stack
    b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items
    b"\x82\xa4type\xa4ping\xa1x" + b"\x91" * 1025 + b"\xc0",  # an unknown value too deep
])
def test_frames_that_are_not_one_msgpack_map_ask_to_close_with_4400(data: bytes) -> None:
    err = rejects(data)
    assert (err.code, err.close, err.field) == (ErrorCode.INVALID, CloseCode.BAD_FRAME, "frame")


def test_nested_array_headers_cannot_make_the_decoder_allocate_much() -> None:
    # msgpack allocates an array's slots from its header: 300 nested headers of 60 000
    # items would take 144 MB if the decoder did not bound array lengths.
    header = b"\xdc" + struct.pack(">H", 60_000)
    tracemalloc.start()
    try:
        err = rejects(header * 300)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.close == CloseCode.BAD_FRAME
    assert peak < 4_000_000


def test_frame_over_the_size_limit_is_too_large() -> None:
    limits = Limits(max_content_bytes=1024)
    err = rejects(pack(send_map(content=bytes(limits.max_frame_bytes))), limits)
    assert (err.code, err.field, err.close) == (ErrorCode.TOO_LARGE, "frame", None)


def test_max_frame_bytes_leaves_4096_bytes_around_the_content() -> None:
    assert DEFAULT_LIMITS.max_frame_bytes == 65536 + 4096
    assert Limits(max_content_bytes=100).max_frame_bytes == 4196


# -- validation rules, one by one ------------------------------------------------------------

@pytest.mark.parametrize("over, code, field", [
    ({"nonce": bytes(11)}, ErrorCode.INVALID, "nonce"),
    ({"nonce": bytes(13)}, ErrorCode.INVALID, "nonce"),
    ({"nonce": "x" * 12}, ErrorCode.INVALID, "nonce"),
    ({"nonce": ...}, ErrorCode.INVALID, "nonce"),
    ({"content": bytes(15)}, ErrorCode.INVALID, "content"),
    ({"content": bytes(65537)}, ErrorCode.TOO_LARGE, "content"),
    ({"content": "x" * 16}, ErrorCode.INVALID, "content"),
    ({"content": ...}, ErrorCode.INVALID, "content"),
    ({"hoomi_id": str(HOOMI).upper()}, ErrorCode.INVALID, "hoomi_id"),
    ({"hoomi_id": HOOMI.hex}, ErrorCode.INVALID, "hoomi_id"),
    ({"hoomi_id": "{" + str(HOOMI) + "}"}, ErrorCode.INVALID, "hoomi_id"),
    ({"hoomi_id": "urn:uuid:" + str(HOOMI)}, ErrorCode.INVALID, "hoomi_id"),
    ({"hoomi_id": HOOMI.bytes}, ErrorCode.INVALID, "hoomi_id"),
    ({"hoomi_id": ...}, ErrorCode.INVALID, "hoomi_id"),
    ({"client_msg_id": 5}, ErrorCode.INVALID, "client_msg_id"),
    ({"client_msg_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5g"}, ErrorCode.INVALID,
     "client_msg_id"),
    ({"session_id": "x" * 129}, ErrorCode.INVALID, "session_id"),
    ({"session_id": ""}, ErrorCode.INVALID, "session_id"),
    ({"session_id": "a\x00"}, ErrorCode.INVALID, "session_id"),
    ({"session_id": b"s1"}, ErrorCode.INVALID, "session_id"),
    ({"type": "shout"}, ErrorCode.INVALID, "type"),
    ({"type": b"send"}, ErrorCode.INVALID, "type"),
    ({"type": ...}, ErrorCode.INVALID, "type"),
])
def test_bad_send_field_is_named_and_the_error_echoes_the_ref(over: dict[str, Any],
                                                              code: ErrorCode,
                                                              field: str) -> None:
    err = rejects(pack(send_map(**over)))
    assert (err.code, err.field, err.ref, err.close) == (code, field, "r1", None)
    assert str(err) == err.message and err.message.startswith(field + ": ")


def test_nonce_error_message_says_the_rule() -> None:
    assert rejects(pack(send_map(nonce=bytes(11)))).message == "nonce: must be exactly 12 bytes"


def test_content_at_both_bounds_is_accepted() -> None:
    for size in (16, 65536):
        frame = decode_client(pack(send_map(content=bytes(size))))
        assert isinstance(frame, Send) and frame.content == bytes(size)


def test_content_bounds_follow_the_given_limits() -> None:
    limits = Limits(max_content_bytes=1024, min_content_bytes=28)
    assert rejects(pack(send_map(content=bytes(1025))), limits).code == ErrorCode.TOO_LARGE
    assert rejects(pack(send_map(content=bytes(27))), limits).code == ErrorCode.INVALID
    assert isinstance(decode_client(pack(send_map(content=bytes(1024))), limits), Send)


def test_valid_send_decodes_to_typed_values() -> None:
    cmid = uuid4()
    frame = decode_client(pack(send_map(client_msg_id=str(cmid), ref=7)))
    assert frame == Send(hoomi_id=HOOMI, client_msg_id=cmid, content=bytes(16),
                         nonce=bytes(12), session_id="s1", ref=7)


@pytest.mark.parametrize("frame, field", [
    ({"type": "history", "limit": 0}, "limit"),
    ({"type": "history", "limit": 101}, "limit"),
    ({"type": "history", "limit": True}, "limit"),
    ({"type": "history", "limit": 1.0}, "limit"),
    ({"type": "history", "limit": "5"}, "limit"),
    ({"type": "history", "before": 0}, "before"),
    ({"type": "history", "before": -5}, "before"),
    ({"type": "history", "before": True}, "before"),
    ({"type": "history", "before": 2**64 - 1}, "before"),
    ({"type": "sync", "after": 0, "limit": 0}, "limit"),
    ({"type": "sync", "after": 0, "limit": 101}, "limit"),
    ({"type": "sync", "after": -1}, "after"),
    ({"type": "sync", "after": False}, "after"),
    ({"type": "sync", "after": "3"}, "after"),
    ({"type": "sync"}, "after"),
    ({"type": "delete"}, "id"),
    ({"type": "delete", "id": str(HOOMI).upper()}, "id"),
    ({"type": "history", "hoomi_id": None}, "hoomi_id"),
])
def test_bad_request_field_is_invalid_and_named(frame: dict[str, Any], field: str) -> None:
    frame = {"hoomi_id": str(HOOMI), "ref": 42, **frame}
    err = rejects(pack(frame))
    assert (err.code, err.field, err.ref) == (ErrorCode.INVALID, field, 42)


def test_history_defaults_to_the_newest_fifty() -> None:
    expected = History(hoomi_id=HOOMI, before=None, limit=50)
    assert decode_client(pack({"type": "history", "hoomi_id": str(HOOMI)})) == expected
    with_nil = {"type": "history", "hoomi_id": str(HOOMI), "before": None, "limit": None}
    assert decode_client(pack(with_nil)) == expected


def test_limit_and_seq_bounds_are_accepted() -> None:
    assert decode_client(pack({"type": "history", "hoomi_id": str(HOOMI), "before": 1,
                               "limit": 100})) == History(hoomi_id=HOOMI, before=1, limit=100)
    assert decode_client(pack({"type": "sync", "hoomi_id": str(HOOMI), "after": 0,
                               "limit": 1})) == Sync(hoomi_id=HOOMI, after=0, limit=1)
    assert decode_client(pack({"type": "sync", "hoomi_id": str(HOOMI),
                               "after": INT64_MAX})) == Sync(hoomi_id=HOOMI, after=INT64_MAX)


@pytest.mark.parametrize("frame, field", [
    ({"type": "hello"}, "token"),
    ({"type": "hello", "token": ""}, "token"),
    ({"type": "hello", "token": b"jwt"}, "token"),
    ({"type": "hello", "token": "t", "resume": [str(HOOMI)]}, "resume"),
    ({"type": "hello", "token": "t", "resume": {"nope": 1}}, "resume"),
    ({"type": "hello", "token": "t", "resume": {str(HOOMI).upper(): 1}}, "resume"),
    ({"type": "hello", "token": "t", "resume": {1: 1}}, "resume"),
    ({"type": "hello", "token": "t", "resume": {str(HOOMI): -1}}, "resume"),
    ({"type": "hello", "token": "t", "resume": {str(HOOMI): True}}, "resume"),
    ({"type": "hello", "token": "t", "resume": {str(HOOMI): 2**64 - 1}}, "resume"),
])
def test_bad_hello_field_is_invalid_and_named(frame: dict[str, Any], field: str) -> None:
    err = rejects(pack({**frame, "ref": "h1"}))
    assert (err.code, err.field, err.ref) == (ErrorCode.INVALID, field, "h1")


def test_resume_is_limited_to_a_thousand_hoomis() -> None:
    resume = {str(UUID(int=i)): i for i in range(1000)}
    frame = decode_client(pack({"type": "hello", "token": "t", "resume": resume}))
    assert isinstance(frame, Hello) and frame.resume[UUID(int=999)] == 999
    resume[str(UUID(int=1000))] = 0
    err = rejects(pack({"type": "hello", "token": "t", "resume": resume}))
    assert (err.code, err.field, err.close) == (ErrorCode.INVALID, "resume", None)


@pytest.mark.parametrize("ref", ["", "x" * 64, 0, -(2**63), INT64_MAX])
def test_refs_at_the_bounds_are_echoed_in_the_frame(ref: str | int) -> None:
    assert decode_client(pack({"type": "ping", "ref": ref})) == Ping(ref=ref)


@pytest.mark.parametrize("ref", [True, 1.5, "x" * 65, 2**63, 2**64 - 1, [1], b"r"])
def test_unreadable_ref_is_invalid_and_not_echoed(ref: Any) -> None:
    err = rejects(pack({"type": "ping", "ref": ref}))
    assert (err.code, err.field, err.ref, err.close) == (ErrorCode.INVALID, "ref", None, None)


def test_ref_is_echoed_even_when_the_type_is_missing() -> None:
    err = rejects(pack({"ref": 9}))
    assert (err.field, err.ref, err.message) == ("type", 9, "type: required")


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    m = {"type": "ping", "ref": 3, "v2": [1, {"x": 1.5}], 7: None, None: 1, 2.5: "f",
         "ext": msgpack.ExtType(5, b"ab"), "at": msgpack.Timestamp(1, 2),
         (1, 2): 1}  # an array as a key: unhashable in Python, ignored all the same
    assert decode_client(pack(m)) == Ping(ref=3)


# Unknown keys are ignored whatever their value, within the frame's size and msgpack's
# nesting limit (1024 levels): arrays and maps of any length, any key type.
unknown_values = st.recursive(
    msgpack_values,
    lambda inner: st.lists(inner, min_size=150, max_size=300) | st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-(2**63), 2**63), inner, max_size=4),
    max_leaves=300,
)


# Large values on purpose (arrays of 150-300 items): not a health problem here.
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow])
@given(unknown_values, st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_KEYS))
def test_any_value_under_an_unknown_key_is_ignored(value: Any, key: str) -> None:
    assert decode_client(pack({"type": "ping", key: value, "ref": 4})) == Ping(ref=4)
    frame = send_map(**{key: value})
    assert decode_client(pack(frame)).ref == "r1"


@pytest.mark.parametrize("value", [
    list(range(200)),  # the array that used to close the socket with 4400
    [[0] * 1000] * 60,  # 60 000 items, 60 KB
    {"a": list(range(5000))},
    [{"k": [1, 2, 3]}] * 500,
])
def test_long_arrays_under_unknown_keys_are_ignored(value: Any) -> None:
    assert decode_client(pack({"type": "ping", "v2": value, "ref": 1})) == Ping(ref=1)


def test_unknown_value_nested_1024_levels_is_ignored() -> None:
    data = b"\x82\xa4type\xa4ping\xa1x" + b"\x91" * 1024 + b"\xc0"
    assert decode_client(data) == Ping()


def test_array_headers_under_an_unknown_key_cannot_make_the_decoder_allocate_much() -> None:
    # 1000 nested headers each claiming 65 535 items would be 500 MB of list slots if
    # built; the value of an unknown key is skipped, never built.
    header = b"\xdc\xff\xff"
    tracemalloc.start()
    try:
        err = rejects(b"\x82\xa4type\xa4ping\xa1x" + header * 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (err.close, err.field) == (CloseCode.BAD_FRAME, "frame")  # truncated: not msgpack
    assert peak < 1_000_000


@pytest.mark.parametrize("field", ["nonce", "content", "session_id", "hoomi_id", "type"])
def test_an_array_in_a_known_field_is_invalid_with_the_ref(field: str) -> None:
    err = rejects(pack(send_map(**{field: list(range(300))})))
    assert (err.code, err.field, err.ref, err.close) == (ErrorCode.INVALID, field, "r1", None)


def test_an_array_in_resume_is_invalid_with_the_ref() -> None:
    err = rejects(pack({"type": "hello", "token": "t", "ref": 2,
                        "resume": {str(HOOMI): list(range(300))}}))
    assert (err.code, err.field, err.ref, err.close) == (ErrorCode.INVALID, "resume", 2, None)


def test_extension_value_in_a_field_is_invalid_not_a_bad_frame() -> None:
    err = rejects(pack(send_map(nonce=msgpack.ExtType(1, bytes(12)))))
    assert (err.code, err.field, err.close) == (ErrorCode.INVALID, "nonce", None)


# -- server frames on the wire -----------------------------------------------------------------

def body(seq: int, deleted: bool = False) -> MessageBody:
    if deleted:
        return MessageBody(id=UUID(int=seq), hoomi_id=HOOMI, seq=seq, sender_id=None,
                           content=None, nonce=None, session_id=None, created_at=5,
                           deleted=True, updated_at=7)
    return MessageBody(id=UUID(int=seq), hoomi_id=HOOMI, seq=seq, sender_id=UUID(int=1),
                       content=bytes(16), nonce=bytes(12), session_id="s1", created_at=5,
                       updated_at=5)


def test_message_push_has_type_message_and_every_field() -> None:
    raw = unpack(encode_server(body(3)))
    assert raw == {"type": "message", "id": str(UUID(int=3)), "hoomi_id": str(HOOMI),
                   "seq": 3, "sender_id": "00000000-0000-0000-0000-000000000001",
                   "content": bytes(16), "nonce": bytes(12), "session_id": "s1",
                   "created_at": 5, "scheme": 1, "updated_at": 5}
    assert list(raw)[0] == "type"


def test_content_and_nonce_travel_as_bin_and_uuids_as_str() -> None:
    raw = msgpack.unpackb(encode_server(body(3)), raw=True)
    assert raw[b"content"] == bytes(16) and raw[b"nonce"] == bytes(12)
    assert raw[b"hoomi_id"] == str(HOOMI).encode()
    # with raw=False a str would still decode as str, a bin as bytes:
    assert isinstance(unpack(encode_server(body(3)))["content"], bytes)


def test_tombstone_has_deleted_and_no_content_keys_and_live_has_no_deleted_key() -> None:
    page = Page(hoomi_id=HOOMI, messages=[body(4, deleted=True), body(3)], next_before=3)
    raw = unpack(encode_server(page))
    dead, live = raw["messages"]
    assert dead.keys() == {"id", "hoomi_id", "seq", "sender_id", "deleted", "created_at",
                           "scheme", "updated_at"}
    assert dead["deleted"] is True and dead["sender_id"] is None
    assert "deleted" not in live and live["content"] == bytes(16)


def test_history_page_carries_next_before_even_when_nil_and_no_has_more() -> None:
    raw = unpack(encode_server(Page(hoomi_id=HOOMI, messages=[], ref="up")))
    assert raw == {"type": "page", "ref": "up", "hoomi_id": str(HOOMI), "messages": [],
                   "next_before": None}


def test_sync_page_carries_has_more_and_no_next_before() -> None:
    raw = unpack(encode_server(Page(hoomi_id=HOOMI, messages=[body(1)], has_more=False)))
    assert raw["has_more"] is False and "next_before" not in raw and "ref" not in raw


def test_ack_and_error_echo_the_ref_and_error_omits_absent_retry() -> None:
    ack = unpack(encode_server(Ack(id=UUID(int=2), hoomi_id=HOOMI, seq=44, created_at=9,
                                   ref=7)))
    assert ack == {"type": "ack", "ref": 7, "id": str(UUID(int=2)), "hoomi_id": str(HOOMI),
                   "seq": 44, "created_at": 9}
    err = unpack(encode_server(Error(code=ErrorCode.INVALID,
                                     message="nonce: must be exactly 12 bytes", ref=8)))
    assert err == {"type": "error", "ref": 8, "code": "invalid",
                   "message": "nonce: must be exactly 12 bytes"}
    limited = unpack(encode_server(Error(ErrorCode.RATE_LIMITED, "slow down",
                                         retry_after_ms=250)))
    assert limited == {"type": "error", "code": "rate_limited", "message": "slow down",
                       "retry_after_ms": 250}


def test_pushes_without_ref_have_no_ref_key() -> None:
    assert unpack(encode_server(Pong())) == {"type": "pong"}
    assert unpack(encode_server(Deleted(hoomi_id=HOOMI, id=UUID(int=2), seq=3))) == {
        "type": "deleted", "hoomi_id": str(HOOMI), "id": str(UUID(int=2)), "seq": 3}
    assert unpack(encode_server(Membership(hoomi_id=HOOMI, state="left"))) == {
        "type": "membership", "hoomi_id": str(HOOMI), "state": "left"}


@pytest.mark.parametrize("m, field", [
    ({"type": "nope"}, "type"),
    ({"type": "ack", "id": "x", "hoomi_id": str(HOOMI), "seq": 1, "created_at": 1}, "id"),
    ({"type": "ack", "id": str(HOOMI), "hoomi_id": str(HOOMI), "seq": "1",
      "created_at": 1}, "seq"),
    ({"type": "message", "id": str(HOOMI), "hoomi_id": str(HOOMI), "seq": 1,
      "sender_id": None, "content": 2**40, "nonce": bytes(12), "session_id": "s",
      "created_at": 1}, "content"),
    ({"type": "page", "hoomi_id": str(HOOMI), "messages": "abc"}, "messages"),
    ({"type": "page", "hoomi_id": str(HOOMI), "messages": [1]}, "messages"),
    ({"type": "error", "code": "teapot", "message": "m"}, "code"),
    ({"type": "pong", "ref": [1]}, "ref"),
])
def test_decode_server_rejects_malformed_frames_naming_the_field(m: dict[str, Any],
                                                                 field: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_server(pack(m))
    assert (err.value.code, err.value.field) == (ErrorCode.INVALID, field)


def test_protocol_error_repr_and_str() -> None:
    err = ProtocolError(ErrorCode.INVALID, "limit: must be an integer from 1 to 100", "limit",
                        ref="r")
    assert str(err) == "limit: must be an integer from 1 to 100"
    assert "limit" in repr(err) and err.close is None
    assert ErrorCode.INVALID == "invalid" and str(ErrorCode.TOO_LARGE) == "too_large"
    assert int(CloseCode.BAD_FRAME) == 4400


# -- v1.1: scheme, tokens, edit, reencrypt, search ------------------------------------------

def test_a_v1_send_has_no_v11_keys_and_decodes_with_scheme_1_and_no_tokens() -> None:
    frame = decode_client(pack(send_map()))
    assert isinstance(frame, Send) and (frame.scheme, frame.tokens) == (1, ())
    assert unpack(encode_client(frame)).keys() == set(send_map()) - {"ref"} | {"ref"}


@pytest.mark.parametrize("over, field", [
    ({"scheme": 0}, "scheme"), ({"scheme": 256}, "scheme"), ({"scheme": True}, "scheme"),
    ({"tokens": [b"x" * 7]}, "tokens"), ({"tokens": [b"x" * 33]}, "tokens"),
    ({"tokens": ["text-is-not-bin"]}, "tokens"), ({"tokens": [b"x" * 8] * 65}, "tokens"),
    ({"tokens": b"x" * 8}, "tokens"),
])
def test_bad_scheme_or_tokens_on_send_is_invalid_and_named(over: dict[str, Any],
                                                          field: str) -> None:
    err = rejects(pack(send_map(**over)))
    assert (err.code, err.field, err.ref, err.close) == (ErrorCode.INVALID, field, "r1", None)


def _item(**over: Any) -> dict[str, Any]:
    m = {"id": str(uuid4()), "old_nonce": bytes(12), "content": bytes(16),
         "nonce": bytes([1]) * 12, "session_id": "mig", "scheme": 2}
    m.update(over)
    return {k: v for k, v in m.items() if v is not ...}


@pytest.mark.parametrize("items", [
    [], [_item()] * 101, [_item(scheme=...)], [_item(old_nonce=bytes(11))],
    [_item(), _item(content=bytes(15))], [_item(id="nope")], [_item(session_id="")], ["x"],
    [_item(tokens=[b"t"])],
])
def test_bad_reencrypt_items_are_invalid_naming_items(items: list[Any]) -> None:
    err = rejects(pack({"type": "reencrypt", "hoomi_id": str(HOOMI), "items": items,
                        "ref": 9}))
    assert (err.code, err.field, err.ref, err.close) == (ErrorCode.INVALID, "items", 9, None)


def test_search_needs_one_to_eight_tokens() -> None:
    for tokens in ([], [b"x" * 8] * 9, None):
        m = {"type": "search", "hoomi_id": str(HOOMI), "ref": "q"}
        if tokens is not None:
            m["tokens"] = tokens
        err = rejects(pack(m))
        assert (err.field, err.ref) == ("tokens", "q")
    ok = decode_client(pack({"type": "search", "hoomi_id": str(HOOMI), "tokens": [b"x" * 8]}))
    assert ok == Search(hoomi_id=HOOMI, tokens=(b"x" * 8,))


def test_huge_token_array_headers_cannot_make_the_decoder_allocate_much() -> None:
    m = send_map()
    m["tokens"] = [1] * 60_000  # one byte each: the longest array a frame can hold
    tracemalloc.start()
    err = rejects(pack(m))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (err.field, err.close) == ("tokens", None) and peak < 2_000_000


def test_edit_and_reencrypt_acks_decode_to_their_own_frames() -> None:
    edit_ack = EditAck(id=UUID(int=1), hoomi_id=HOOMI, seq=4, updated_at=9, ref="e")
    assert unpack(encode_server(edit_ack)) == {"type": "ack", "ref": "e", "id": str(UUID(int=1)),
                                               "hoomi_id": str(HOOMI), "seq": 4,
                                               "updated_at": 9}
    assert decode_server(encode_server(edit_ack)) == edit_ack
    re_ack = ReencryptAck(hoomi_id=HOOMI, updated=3, skipped=[UUID(int=2)], ref=1)
    assert decode_server(encode_server(re_ack)) == re_ack


# -- live signals (v1.1: read, typing, presence) -----------------------------------------------

def test_a_v1_hello_and_welcome_carry_no_features_key() -> None:
    assert "features" not in unpack(encode_client(Hello(token="t")))
    welcome = unpack(encode_server(Welcome(user_id=HOOMI, hoomis=[])))
    assert "features" not in welcome
    asked = Hello(token="t", features=("signals", "not-yet"))
    assert decode_client(encode_client(asked)) == asked


@pytest.mark.parametrize("features", [
    "signals", ["x" * 33], [""], [1], ["a"] * 17, [["signals"]]])
def test_bad_hello_features_are_invalid_naming_features(features: Any) -> None:
    err = rejects(pack({"type": "hello", "token": "t", "features": features, "ref": 2}))
    assert (err.code, err.field, err.ref, err.close) == (ErrorCode.INVALID, "features", 2, None)


@pytest.mark.parametrize(("m", "field"), [
    ({"type": "read", "hoomi_id": str(HOOMI)}, "seq"),
    ({"type": "read", "hoomi_id": str(HOOMI), "seq": -1}, "seq"),
    ({"type": "read", "hoomi_id": str(HOOMI), "seq": "3"}, "seq"),
    ({"type": "read", "seq": 3}, "hoomi_id"),
    ({"type": "typing"}, "hoomi_id"),
    ({"type": "presence", "hoomi_id": str(HOOMI).upper()}, "hoomi_id"),
])
def test_bad_signal_requests_are_invalid_naming_the_field(m: dict[str, Any],
                                                          field: str) -> None:
    err = rejects(pack({**m, "ref": "s"}))
    assert (err.code, err.field, err.ref) == (ErrorCode.INVALID, field, "s")


def test_read_ack_decodes_to_its_own_frame_and_the_pushes_keep_their_wire_names() -> None:
    ack = ReadAck(hoomi_id=HOOMI, seq=7, ref="r")
    assert unpack(encode_server(ack)) == {"type": "ack", "ref": "r", "hoomi_id": str(HOOMI),
                                          "seq": 7}
    assert decode_server(encode_server(ack)) == ack
    user = UUID(int=5)
    assert unpack(encode_server(Receipt(hoomi_id=HOOMI, user_id=user, seq=3))) == {
        "type": "receipt", "hoomi_id": str(HOOMI), "user_id": str(user), "seq": 3}
    assert unpack(encode_server(TypingNotice(hoomi_id=HOOMI, user_id=user))) == {
        "type": "typing", "hoomi_id": str(HOOMI), "user_id": str(user)}
    reply = unpack(encode_server(PresenceReply(hoomi_id=HOOMI, user_ids=[user], ref=1)))
    assert reply == {"type": "presence", "ref": 1, "hoomi_id": str(HOOMI),
                     "user_ids": [str(user)]}
    # A welcome from an older hub (no read_seq) decodes with read_seq 0.
    old = pack({"type": "welcome", "user_id": str(user), "hoomis": [
        {"hoomi_id": str(HOOMI), "last_seq": 4, "role": "member"}]})
    decoded = decode_server(old)
    assert isinstance(decoded, Welcome) and decoded.hoomis[0].read_seq == 0


# -- the hot path's shortcuts give what the general code gives ----------------------------------

def _field_variants(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly valid, else absent (None here), nil, or of a wrong kind."""
    odd = st.sampled_from([None, b"", "", 0, 1, True, 2**63, "x" * 36, "\x00", b"\x00" * 12])
    return st.one_of(valid, valid, valid, odd)


_send_maps = st.fixed_dictionaries({
    "hoomi_id": _field_variants(uuids.map(str) | uuids.map(lambda u: str(u).upper())),
    "client_msg_id": _field_variants(uuids.map(str) | st.just("{" + str(HOOMI)[1:35] + "}")),
    "content": _field_variants(st.binary(min_size=14, max_size=40)),
    "nonce": _field_variants(st.binary(min_size=11, max_size=13)),
    "session_id": _field_variants(st.text(max_size=130)),
    "scheme": _field_variants(st.integers(0, 257)),
    "tokens": _field_variants(st.lists(search_tokens, max_size=2)),
}).map(lambda m: {k: v for k, v in m.items() if v is not None})


@settings(max_examples=400, deadline=None)
@given(_send_maps, refs)
def test_a_send_decoded_in_one_pass_is_what_the_field_checks_give(
        m: dict[str, Any], ref: Any) -> None:
    """codec._send takes every well-formed send in one pass and hands anything else to
    the field-by-field checks: the same frame (UUIDs equal and alike) or the same error."""
    from hoomi_protocol import codec
    limits = Limits(max_content_bytes=30, min_content_bytes=16)
    got: Any
    want: Any
    try:
        got = codec._send(dict(m), ref, limits)
    except ProtocolError as err:
        got = (err.code, err.message, err.field, err.ref)
    try:
        want = codec._send_checked(dict(m), ref, limits)
    except ProtocolError as err:
        want = (err.code, err.message, err.field, err.ref)
    assert got == want
    if isinstance(want, Send):
        assert got.client_msg_id.is_safe == want.client_msg_id.is_safe
        assert str(got.client_msg_id) == m["client_msg_id"]


@given(uuids, uuids, seqs, times, refs)
def test_an_ack_encoded_from_its_fields_is_the_bytes_of_the_ack_frame(
        message_id: UUID, hoomi_id: UUID, seq: int, at: int, ref: Any) -> None:
    from hoomi_protocol.codec import encode_ack
    assert encode_ack(ref, message_id, hoomi_id, seq, at) == encode_server(
        Ack(id=message_id, hoomi_id=hoomi_id, seq=seq, created_at=at, ref=ref))
