"""A socket's outgoing order, driven directly: a `deleted` push never precedes the message
it deletes, and nothing but the reply to hello precedes `welcome`."""

from __future__ import annotations

from types import SimpleNamespace
from uuid import uuid4

from server.config import load
from server.metrics import Metrics
from server.ws import Connection, _Cursor

H = uuid4()


def connection() -> Connection:
    services = SimpleNamespace(settings=load({}), metrics=Metrics())
    conn = Connection(ws=None, services=services)  # type: ignore[arg-type]
    conn._welcomed = True
    return conn


def test_deleted_waits_for_the_message_it_deletes():
    conn = connection()
    conn.cursors[H] = _Cursor(1)
    conn.deleted(H, 3, b"D3")  # its message is not out yet: held
    conn.deliver(H, 2, b"M2")
    assert list(conn._out) == [b"M2"]
    conn.deliver(H, 3, b"M3")
    assert list(conn._out) == [b"M2", b"M3", b"D3"]
    conn.deleted(H, 2, b"D2")  # already out: at once
    assert list(conn._out) == [b"M2", b"M3", b"D3", b"D2"]


def test_deletions_before_welcome_are_held_and_membership_changes_wait():
    conn = connection()
    conn._welcomed = False
    conn.cursors[H] = _Cursor(0, catching_up=True)
    conn.deleted(H, 1, b"D1")
    conn.left(H)
    assert list(conn._out) == []
    assert H in conn.cursors
    assert conn._early == [(H, None)]


def test_deletions_for_hoomis_the_socket_is_not_in_are_dropped():
    conn = connection()
    conn.deleted(H, 1, b"D1")
    assert list(conn._out) == []
