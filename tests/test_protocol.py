"""The wire codec: round trips of every frame, and hostile bytes never raise anything but
ProtocolError. Pure code: no servers."""

from __future__ import annotations

import os
from uuid import UUID, uuid4

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Ack,
    CloseCode,
    Delete,
    Deleted,
    Error,
    ErrorCode,
    Hello,
    History,
    HoomiState,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    ProtocolError,
    Send,
    Sync,
    Welcome,
    decode_client,
    decode_server,
    encode_client,
    encode_server,
)

uuids = st.uuids()
seqs = st.integers(min_value=1, max_value=2**63 - 1)
refs = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=64)
ms = st.integers(min_value=0, max_value=2**53)
session_ids = st.text(min_size=1, max_size=128).filter(lambda s: "\x00" not in s)

client_frames = st.one_of(
    st.builds(Hello, token=st.text(min_size=1, max_size=200).filter(lambda s: "\x00" not in s),
              resume=st.dictionaries(uuids, st.integers(0, 2**63 - 1), max_size=20), ref=refs),
    st.builds(Send, hoomi_id=uuids, client_msg_id=uuids,
              content=st.binary(min_size=16, max_size=2048), nonce=st.binary(min_size=12,
                                                                              max_size=12),
              session_id=session_ids, ref=refs),
    st.builds(History, hoomi_id=uuids, before=st.none() | seqs, limit=st.integers(1, 100),
              ref=refs),
    st.builds(Sync, hoomi_id=uuids, after=st.integers(0, 2**63 - 1), limit=st.integers(1, 100),
              ref=refs),
    st.builds(Delete, hoomi_id=uuids, id=uuids, ref=refs),
    st.builds(Ping, ref=refs),
)

live_bodies = st.builds(MessageBody, id=uuids, hoomi_id=uuids, seq=seqs,
                        sender_id=st.none() | uuids, content=st.binary(min_size=16,
                                                                        max_size=512),
                        nonce=st.binary(min_size=12, max_size=12), session_id=session_ids,
                        created_at=ms, deleted=st.just(False))
dead_bodies = st.builds(MessageBody, id=uuids, hoomi_id=uuids, seq=seqs,
                        sender_id=st.none() | uuids, content=st.none(), nonce=st.none(),
                        session_id=st.none(), created_at=ms, deleted=st.just(True))
bodies = live_bodies | dead_bodies

server_frames = st.one_of(
    st.builds(Welcome, user_id=uuids, ref=refs, hoomis=st.lists(st.builds(
        HoomiState, hoomi_id=uuids, last_seq=st.integers(0, 2**63 - 1),
        role=st.sampled_from(["admin", "member"])), max_size=5)),
    st.builds(Ack, id=uuids, hoomi_id=uuids, seq=seqs, created_at=ms, ref=refs),
    bodies,
    st.builds(Page, hoomi_id=uuids, messages=st.lists(bodies, max_size=5),
              next_before=st.none() | seqs, has_more=st.none(), ref=refs),
    st.builds(Page, hoomi_id=uuids, messages=st.lists(bodies, max_size=5),
              next_before=st.none(), has_more=st.booleans(), ref=refs),
    st.builds(Deleted, hoomi_id=uuids, id=uuids, seq=seqs),
    st.builds(Membership, hoomi_id=uuids, state=st.sampled_from(["joined", "left"])),
    st.builds(Error, code=st.sampled_from(list(ErrorCode)), message=st.text(max_size=100),
              ref=refs, retry_after_ms=st.none() | st.integers(1, 60000)),
    st.builds(Pong, ref=refs),
)


@settings(max_examples=300)
@given(client_frames)
def test_every_client_frame_round_trips(frame):
    assert decode_client(encode_client(frame)) == frame


@settings(max_examples=300)
@given(server_frames)
def test_every_server_frame_round_trips(frame):
    assert decode_server(encode_server(frame)) == frame


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_error(data):
    try:
        decode_client(data)
    except ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.text(max_size=12) | st.integers(0, 10), inner, max_size=6),
    max_leaves=20,
)
keys = st.sampled_from(["type", "ref", "token", "resume", "hoomi_id", "client_msg_id",
                        "content", "nonce", "session_id", "before", "after", "limit", "id"])
types = st.sampled_from(["hello", "send", "history", "sync", "delete", "ping", "nope"])


@settings(max_examples=500)
@given(st.dictionaries(keys, msgpack_values, max_size=8), types)
def test_arbitrary_maps_raise_only_protocol_error(m, kind):
    m = {**m, "type": m.get("type", kind)}
    try:
        decode_client(msgpack.packb(m, use_bin_type=True))
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode)


def _send(**over) -> bytes:
    m = {"type": "send", "hoomi_id": str(uuid4()), "client_msg_id": str(uuid4()),
         "content": os.urandom(16), "nonce": os.urandom(12), "session_id": "s", "ref": "r1"}
    m.update(over)
    return msgpack.packb({k: v for k, v in m.items() if v is not ...}, use_bin_type=True)


@pytest.mark.parametrize("over, code, field", [
    ({"nonce": os.urandom(11)}, ErrorCode.INVALID, "nonce"),
    ({"nonce": "not bytes 12"}, ErrorCode.INVALID, "nonce"),
    ({"content": os.urandom(15)}, ErrorCode.INVALID, "content"),
    ({"content": os.urandom(65537)}, ErrorCode.TOO_LARGE, "content"),
    ({"content": ...}, ErrorCode.INVALID, "content"),
    ({"hoomi_id": str(uuid4()).upper()}, ErrorCode.INVALID, "hoomi_id"),
    ({"hoomi_id": uuid4().hex}, ErrorCode.INVALID, "hoomi_id"),
    ({"client_msg_id": 5}, ErrorCode.INVALID, "client_msg_id"),
    ({"session_id": "x" * 129}, ErrorCode.INVALID, "session_id"),
    ({"session_id": ""}, ErrorCode.INVALID, "session_id"),
    ({"session_id": "a\x00"}, ErrorCode.INVALID, "session_id"),
    ({"type": "shout"}, ErrorCode.INVALID, "type"),
    ({"type": ...}, ErrorCode.INVALID, "type"),
])
def test_bad_send_fields_are_named_and_keep_the_ref(over, code, field):
    with pytest.raises(ProtocolError) as err:
        decode_client(_send(**over))
    assert (err.value.code, err.value.field, err.value.ref) == (code, field, "r1")
    assert err.value.message.startswith(field + ":")
    assert err.value.close is None


@pytest.mark.parametrize("frame, field", [
    ({"type": "history", "limit": 0}, "limit"),
    ({"type": "history", "limit": 101}, "limit"),
    ({"type": "history", "limit": True}, "limit"),
    ({"type": "history", "before": 0}, "before"),
    ({"type": "sync", "after": -1}, "after"),
    ({"type": "sync"}, "after"),
    ({"type": "hello"}, "token"),
    ({"type": "hello", "token": "t", "resume": {"nope": 1}}, "resume"),
    ({"type": "hello", "token": "t", "resume": {str(uuid4()): -1}}, "resume"),
])
def test_bad_request_fields_are_named(frame, field):
    frame.setdefault("hoomi_id", str(uuid4()))
    with pytest.raises(ProtocolError) as err:
        decode_client(msgpack.packb(frame, use_bin_type=True))
    assert (err.value.code, err.value.field) == (ErrorCode.INVALID, field)


def test_history_defaults_to_newest_fifty():
    h = UUID(int=7)
    assert decode_client(msgpack.packb({"type": "history", "hoomi_id": str(h)})) == History(
        hoomi_id=h, before=None, limit=50)


@pytest.mark.parametrize("data", [msgpack.packb([1]), msgpack.packb("x"), b"\xc1", b""])
def test_non_map_frames_ask_for_close_4400(data):
    with pytest.raises(ProtocolError) as err:
        decode_client(data)
    assert err.value.close == CloseCode.BAD_FRAME


@pytest.mark.parametrize("ref", [True, 1.5, "x" * 65, 2**63, [1]])
def test_bad_ref_is_invalid(ref):
    with pytest.raises(ProtocolError) as err:
        decode_client(msgpack.packb({"type": "ping", "ref": ref}))
    assert (err.value.code, err.value.field) == (ErrorCode.INVALID, "ref")


def test_unknown_keys_are_ignored_for_forward_compatibility():
    assert decode_client(msgpack.packb({"type": "ping", "ref": 3, "v2_field": 1})) == Ping(ref=3)


def test_tombstone_in_a_page_has_no_content_keys():
    body = MessageBody(id=uuid4(), hoomi_id=uuid4(), seq=3, sender_id=None, content=None,
                       nonce=None, session_id=None, created_at=5, deleted=True)
    raw = msgpack.unpackb(encode_server(Page(hoomi_id=body.hoomi_id, messages=[body],
                                             next_before=None)))
    assert raw["messages"][0].keys() == {"id", "hoomi_id", "seq", "sender_id", "created_at",
                                         "deleted"}
    assert list(raw)[0] == "type" and raw["next_before"] is None and "has_more" not in raw
