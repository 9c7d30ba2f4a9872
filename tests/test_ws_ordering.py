"""A socket's outgoing order, driven directly on its Session (server/session.py): a
`deleted` push never precedes the message it deletes, and nothing but the reply to hello
precedes `welcome`."""

from __future__ import annotations

from uuid import uuid4

from hoomi_protocol import DEFAULT_LIMITS, Hello
from server.config import load
from server.session import Session, State
from storage.records import HoomiSummary

H = uuid4()


def session(at: int | None = None) -> Session:
    s = Session(load({}), DEFAULT_LIMITS)
    if at is not None:
        mine = [HoomiSummary(H, at, "member")]
        s.authenticated(uuid4(), 1e9, mine)
        s.welcome(Hello(token="t", resume={}), mine, lambda h: at)
        s.data_to_send()  # the welcome
    return s


def sent(s: Session) -> list[bytes]:
    out = []
    while (frame := s.data_to_send()) is not None:
        out.append(frame)
    return out


def test_deleted_waits_for_the_message_it_deletes():
    s = session(at=1)
    s.on_deletion(H, 3, b"D3")  # its message is not out yet: held
    s.on_message(H, 2, b"M2")
    assert sent(s) == [b"M2"]
    s.on_message(H, 3, b"M3")
    assert sent(s) == [b"M3", b"D3"]
    s.on_deletion(H, 2, b"D2")  # already out: at once
    assert sent(s) == [b"D2"]


def test_deletions_before_welcome_are_held_and_membership_changes_wait():
    s = session()
    s.authenticated(uuid4(), 1e9, [HoomiSummary(H, 0, "member")])
    s.on_deletion(H, 1, b"D1")
    s.on_left(H)
    assert sent(s) == [] and s.take_effects() == ()
    assert H in s.cursors and s.state is State.AWAITING_HELLO


def test_deletions_for_hoomis_the_socket_is_not_in_are_dropped():
    s = session(at=0)
    s.on_deletion(uuid4(), 1, b"D1")
    assert sent(s) == []
