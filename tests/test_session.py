"""server/session.py, the socket's protocol state machine, driven directly (no socket, no
event loop, no database: a model of PostgreSQL stands in for the reads it asks for).

A hypothesis state machine runs random sequences of frames, pushes in any order,
deletions, membership changes, reads finishing late, and a client that reads its socket
or does not, and checks after every step what a client could observe."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hoomi_protocol import (
    DEFAULT_LIMITS,
    CloseCode,
    Error,
    ErrorCode,
    Hello,
    Membership,
    Ping,
    Pong,
    Send,
    Welcome,
    decode_server,
    encode_client,
)
from server.config import load
from server.session import Effect, Session, SessionError, State, Task, Verdict
from storage.records import HoomiSummary

QUEUE = 24
HOOMIS = [UUID(int=1), UUID(int=2), UUID(int=3)]
USER = uuid4()


def message(h: UUID, seq: int) -> bytes:
    return b"M|%d|%d" % (h.int, seq)


def deletion(h: UUID, seq: int) -> bytes:
    return b"D|%d|%d" % (h.int, seq)


def new_session(**env: str) -> Session:
    clock = [0.0]
    s = Session(load({"HOOMI_SEND_QUEUE_FRAMES": str(QUEUE), **env}), DEFAULT_LIMITS,
                clock=lambda: clock[0])
    s.test_clock = clock  # type: ignore[attr-defined]
    return s


def drain(s: Session) -> list[bytes]:
    out = []
    while (frame := s.data_to_send()) is not None:
        out.append(frame)
    return out


def hello(s: Session, member_of: dict[UUID, int], resume: dict[UUID, int] | None = None,
          ) -> list[UUID]:
    frame = s.receive(encode_client(Hello(token="t", resume=resume or {}, ref=1)))
    assert isinstance(frame, Hello)
    mine = [HoomiSummary(h, last, "member") for h, last in member_of.items()]
    s.authenticated(USER, 3600.0, mine)
    s.membership_at_hello(mine)
    return s.welcome(frame, mine, lambda h: member_of.get(h, 0))


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = new_session()
        self.db: dict[UUID, int] = {h: 0 for h in HOOMIS}  # last committed seq
        self.members = {HOOMIS[0], HOOMIS[1]}
        self.tasks: list[Task] = []
        self.seen: list[bytes] = []  # what the client read, in order
        self.welcomed = False
        self.edge: dict[UUID, int] = {}  # per Hoomi: last seq the client had at (re)join
        self.last: dict[UUID, int] = {}  # per Hoomi: last message seq the client read
        self.had: set[tuple[UUID, int]] = set()
        self.resume: dict[UUID, int] = {}
        self.join_edges: dict[UUID, list[int]] = {}

    # -- the client ------------------------------------------------------------------------

    @precondition(lambda self: self.s.state is State.AWAITING_HELLO)
    @rule(resume=st.integers(0, 5))
    def send_hello(self, resume: int) -> None:
        self.resume = {h: resume for h in self.members}
        behind = hello(self.s, {h: self.db[h] for h in self.members}, self.resume)
        self.tasks += [Task(Effect.READ, h, self.s.generation(h) or 0) for h in behind]

    @precondition(lambda self: self.s.state is State.AWAITING_HELLO)
    @rule(data=st.binary(max_size=8))
    def garbage_first(self, data: bytes) -> None:
        assert self.s.receive(data) is None
        assert self.s.state is State.DRAINING

    @rule()
    def ping(self) -> None:
        self.s.receive(encode_client(Ping(ref=7)))

    @rule()
    def send(self) -> None:
        frame = Send(hoomi_id=HOOMIS[0], client_msg_id=uuid4(), content=b"x" * 16, nonce=b"n" * 12,
                     session_id="s", ref=9)
        got = self.s.receive(encode_client(frame))
        assert got is None or (isinstance(got, Send) and self.s.state is State.LIVE)

    @rule(n=st.integers(1, 40))
    def read_socket(self, n: int) -> None:
        for _ in range(n):
            frame = self.s.data_to_send()
            if frame is None:
                return
            self.observe(frame)

    # -- PostgreSQL and the hub ------------------------------------------------------------

    @rule(h=st.sampled_from(HOOMIS))
    def commit(self, h: UUID) -> None:
        self.db[h] += 1

    @rule(h=st.sampled_from(HOOMIS), n=st.integers(1, 6))
    def commit_and_push(self, h: UUID, n: int) -> None:
        """The common case: the hub pushes each commit as it happens."""
        for _ in range(n):
            self.db[h] += 1
            self.s.on_message(h, self.db[h], message(h, self.db[h]))
        self.collect()

    @rule(h=st.sampled_from(HOOMIS), back=st.integers(0, 4))
    def push(self, h: UUID, back: int) -> None:
        seq = self.db[h] - back
        if seq >= 1:
            self.s.on_message(h, seq, message(h, seq))
            self.collect()

    @rule(h=st.sampled_from(HOOMIS), back=st.integers(0, 6))
    def delete(self, h: UUID, back: int) -> None:
        seq = self.db[h] - back
        if seq >= 1:
            self.s.on_deletion(h, seq, deletion(h, seq))

    @rule(h=st.sampled_from(HOOMIS))
    def join(self, h: UUID) -> None:
        self.members.add(h)
        self.s.on_joined(h, "member")
        self.collect()

    @rule(h=st.sampled_from(HOOMIS))
    def leave(self, h: UUID) -> None:
        self.members.discard(h)
        self.s.on_left(h)
        self.collect()

    @rule()
    def reconcile(self) -> None:
        self.s.on_memberships({h: "member" for h in self.members})
        self.collect()

    @precondition(lambda self: self.tasks)
    @rule(i=st.integers(0, 10), page=st.integers(1, 5))
    def finish_a_task(self, i: int, page: int) -> None:
        """A join or a read finishes, maybe long after it began (maybe after a leave)."""
        task = self.tasks.pop(i % len(self.tasks))
        if task.effect is Effect.JOIN:
            if self.s.generation(task.hoomi_id) == task.generation:
                self.join_edges.setdefault(task.hoomi_id, []).append(self.db[task.hoomi_id])
            self.s.joined_at(task.hoomi_id, task.generation, self.db[task.hoomi_id])
        elif task.effect is Effect.READ:
            rng = self.s.read_range(task.hoomi_id, task.generation, self.db[task.hoomi_id])
            if rng is not None:
                after, upto = rng
                rows = [(q, message(task.hoomi_id, q))
                        for q in range(after + 1, min(self.db[task.hoomi_id], after + page) + 1)]
                has_more = bool(rows) and rows[-1][0] < self.db[task.hoomi_id]
                end = rows[-1][0] if has_more else max(upto, rows[-1][0] if rows else 0)
                if self.s.rows_read(task.hoomi_id, task.generation, rows, end):
                    self.tasks.append(task)  # the runner goes on until read_range is None
        self.collect()

    def collect(self) -> None:
        for task in self.s.take_effects():
            if task.effect is not Effect.LEAVE:
                self.tasks.append(task)

    # -- what the client saw ---------------------------------------------------------------

    def observe(self, frame: bytes) -> None:
        self.seen.append(frame)
        if frame[:2] in (b"M|", b"D|"):
            kind, hi, seq_s = frame.split(b"|")
            h, seq = UUID(int=int(hi)), int(seq_s)
            assert self.welcomed, "a push before welcome"
            if kind == b"M":
                last = self.last.get(h, self.edge[h])
                assert seq > last, f"{h}: seq {seq} after {last}"
                assert seq == last + 1, f"{h}: gap between {last} and {seq}"
                self.last[h] = seq
                self.had.add((h, seq))
            else:
                assert (h, seq) in self.had or seq <= self.edge.get(h, 0), \
                    f"deleted {seq} before its message"
            return
        body = decode_server(frame)
        if not self.welcomed:
            assert isinstance(body, Welcome | Error), f"{body} before welcome"
        if isinstance(body, Welcome):
            self.welcomed = True
            for state in body.hoomis:
                self.edge[state.hoomi_id] = min(self.resume.get(state.hoomi_id, state.last_seq),
                                                state.last_seq)
        elif isinstance(body, Membership):
            self.last.pop(body.hoomi_id, None)
            if body.state == "joined":
                # The cursor starts at the edge read when the join finished.
                self.edge[body.hoomi_id] = self.join_edges[body.hoomi_id].pop(0)
            else:
                self.edge[body.hoomi_id] = 10**9  # nothing until it joins again
        else:
            assert isinstance(body, Pong | Error), body

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def outbox_is_bounded_and_too_slow_is_a_verdict(self) -> None:
        assert len(self.s.outbox.frames) <= QUEUE
        if self.s.close_request is not None and self.s.close_request[0] is CloseCode.TOO_SLOW:
            assert self.s.state is State.DRAINING

    @invariant()
    def nothing_before_welcome_but_the_reply_to_hello(self) -> None:
        if self.s.state is State.AWAITING_HELLO:
            assert not self.s.outbox.frames


SessionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                            deadline=None)

TestSessionMachine = SessionMachine.TestCase


# -- cases that needed a replica subprocess before, now on the session alone -----------------

def test_the_first_frame_must_be_hello():
    s = new_session()
    assert s.receive(encode_client(Ping(ref=3))) is None
    error, = (decode_server(f) for f in drain(s))
    assert (error.code, error.ref) == (ErrorCode.UNAUTHORIZED, 3)
    assert s.state is State.DRAINING and s.close_request[0] is CloseCode.UNAUTHORIZED


def test_a_text_frame_or_garbage_closes_4400():
    s = new_session()
    hello(s, {})
    assert s.receive(None) is None
    assert s.close_request == (CloseCode.BAD_FRAME, "frames must be binary msgpack maps")
    s = new_session()
    hello(s, {})
    s.receive(b"\x93\x01\x02\x03")  # msgpack, but not a map
    assert s.close_request[0] is CloseCode.BAD_FRAME


def test_a_second_hello_is_invalid_and_the_socket_stays():
    s = new_session()
    hello(s, {})
    drain(s)
    assert s.receive(encode_client(Hello(token="t", ref=2))) is None
    error, = (decode_server(f) for f in drain(s))
    assert error.code == ErrorCode.INVALID and s.state is State.LIVE


def test_sends_past_the_burst_are_rate_limited_with_a_retry():
    s = new_session(HOOMI_SEND_BURST="2", HOOMI_SEND_RATE="1")
    hello(s, {})
    drain(s)
    frames = [s.receive(encode_client(Send(
        hoomi_id=HOOMIS[0], client_msg_id=uuid4(), content=b"x" * 16, nonce=b"n" * 12,
        session_id="s", ref=i))) for i in range(3)]
    assert [isinstance(f, Send) for f in frames] == [True, True, False]
    error, = (decode_server(f) for f in drain(s))
    assert error.code == ErrorCode.RATE_LIMITED and error.retry_after_ms > 0
    # The caller holds reading for as long: a flood costs one error per refill.
    assert s.hold_reading_ms == error.retry_after_ms


def test_a_push_past_the_outbox_is_a_too_slow_verdict_not_a_close():
    s = new_session()
    hello(s, {HOOMIS[0]: 0})
    drain(s)
    verdicts = [s.queue(message(HOOMIS[0], q), "message") for q in range(QUEUE + 1)]
    assert verdicts[-1] is Verdict.TOO_SLOW and verdicts[-2] is Verdict.QUEUED
    assert s.state is State.DRAINING and s.close_request[0] is CloseCode.TOO_SLOW
    assert s.queue(b"late", "message") is Verdict.DROPPED
    assert len(drain(s)) == QUEUE  # what was queued still goes out


def test_resume_ahead_of_the_hoomi_gets_pushes_from_the_real_edge():
    s = new_session()
    assert hello(s, {HOOMIS[0]: 3}, {HOOMIS[0]: 99}) == []
    drain(s)
    s.on_message(HOOMIS[0], 4, message(HOOMIS[0], 4))
    assert drain(s) == [message(HOOMIS[0], 4)]


def test_a_read_that_finishes_after_leave_and_join_changes_nothing():
    s = new_session()
    h = HOOMIS[0]
    assert hello(s, {h: 5}, {h: 2}) == [h]  # behind: its first page is read in a batch
    old = s.generation(h)
    s.on_left(h)
    s.on_joined(h, "member")
    join, = [t for t in s.take_effects() if t.effect is Effect.JOIN]
    assert join.generation != old
    assert s.read_range(h, old, 5) is None
    assert not s.rows_read(h, old, [(3, message(h, 3))], 3)
    s.joined_at(h, join.generation, 5)
    assert [f for f in drain(s) if f.startswith(b"M|")] == []


def test_the_token_expires_on_the_injected_clock():
    s = new_session()
    hello(s, {})
    drain(s)
    s.test_clock[0] = 3000.0  # type: ignore[attr-defined]
    assert s.expires_in() == 600.0
    s.token_expired()
    error, = (decode_server(f) for f in drain(s))
    assert error.code == ErrorCode.UNAUTHORIZED and error.ref is None
    assert s.close_request == (CloseCode.UNAUTHORIZED, "token expired")


def read_all(s: Session, task: Task, db_last: int, page: int = 200) -> None:
    """What server/ws.py's _catch_up does, with a list for PostgreSQL."""
    while (rng := s.read_range(task.hoomi_id, task.generation, db_last)) is not None:
        after, upto = rng
        rows = [(q, message(task.hoomi_id, q))
                for q in range(after + 1, min(db_last, after + page) + 1)]
        has_more = bool(rows) and rows[-1][0] < db_last
        if not s.rows_read(task.hoomi_id, task.generation, rows,
                           rows[-1][0] if has_more else max(upto, db_last)):
            return


def test_invalid_fields_get_invalid_and_the_socket_stays_usable():
    s = new_session()
    hello(s, {})
    drain(s)
    import msgpack

    wire = msgpack.unpackb(encode_client(Send(
        hoomi_id=HOOMIS[0], client_msg_id=uuid4(), content=b"x" * 16, nonce=b"n" * 12,
        session_id="s", ref=5)))
    bad = msgpack.packb({**wire, "nonce": b"n" * 11})
    assert s.receive(bad) is None
    error, = (decode_server(f) for f in drain(s))
    assert error.code == ErrorCode.INVALID and error.ref == 5 and error.message.startswith("nonce")
    s.receive(encode_client(Ping(ref=6)))
    assert isinstance(decode_server(drain(s)[0]), Pong) and s.state is State.LIVE


def test_history_requests_are_rate_limited_per_socket():
    from hoomi_protocol import History

    s = new_session(HOOMI_REQUEST_BURST="3", HOOMI_REQUEST_RATE="0.1")
    hello(s, {})
    drain(s)
    got = [s.receive(encode_client(History(hoomi_id=HOOMIS[0], ref=i))) for i in range(5)]
    assert [g is not None for g in got] == [True, True, True, False, False]
    assert {decode_server(f).code for f in drain(s)} == {ErrorCode.RATE_LIMITED}


def test_pages_asked_for_and_not_read_are_bounded_in_bytes():
    s = new_session(HOOMI_SEND_QUEUE_MB="0.0625")  # 64 KiB
    hello(s, {})
    drain(s)
    verdicts = [s.queue(b"p" * 20_000, "page") for _ in range(5)]
    assert Verdict.TOO_SLOW in verdicts and s.close_request[0] is CloseCode.TOO_SLOW


def test_resume_delivers_exactly_what_was_missed_then_pushes():
    s = new_session()
    h = HOOMIS[0]
    assert hello(s, {h: 7}, {h: 3}) == [h]
    s.on_message(h, 8, message(h, 8))  # a push while it catches up: held, not lost
    read_all(s, Task(Effect.READ, h, s.generation(h)), 8, page=2)
    assert [f for f in drain(s) if f.startswith(b"M|")] == [message(h, q) for q in (4, 5, 6, 7, 8)]
    s.on_message(h, 9, message(h, 9))
    assert drain(s) == [message(h, 9)]


def test_hello_without_resume_starts_at_the_edge():
    s = new_session()
    assert hello(s, {HOOMIS[0]: 7}) == []
    welcome = decode_server(drain(s)[0])
    assert isinstance(welcome, Welcome) and welcome.hoomis[0].last_seq == 7
    s.on_message(HOOMIS[0], 8, message(HOOMIS[0], 8))
    assert drain(s) == [message(HOOMIS[0], 8)]


def test_removed_member_stops_receiving_at_once_and_added_member_starts():
    s = new_session()
    a, b = HOOMIS[0], HOOMIS[1]
    hello(s, {a: 0})
    drain(s)
    s.on_left(a)
    assert [t.effect for t in s.take_effects()] == [Effect.LEAVE]
    s.on_message(a, 1, message(a, 1))
    left, = drain(s)
    assert decode_server(left) == Membership(hoomi_id=a, state="left")
    s.on_joined(b, "member")
    join, = s.take_effects()
    s.on_message(b, 5, message(b, 5))  # before the join finished: held
    s.joined_at(b, join.generation, 4)
    frames = drain(s)
    assert decode_server(frames[0]) == Membership(hoomi_id=b, state="joined")
    assert frames[1:] == [message(b, 5)]


def test_deleted_user_is_disconnected_4401():
    s = new_session()
    hello(s, {})
    s.on_user_gone()
    assert s.close_request == (CloseCode.UNAUTHORIZED, "user deleted")


def test_membership_changes_during_hello_apply_after_welcome_in_order():
    s = new_session()
    a = HOOMIS[0]
    frame = s.receive(encode_client(Hello(token="t", ref=1)))
    mine = [HoomiSummary(a, 0, "member")]
    s.authenticated(USER, 3600.0, mine)
    s.on_left(a)  # arrives while hello reads the database
    s.on_joined(a, "admin")
    assert drain(s) == []
    s.welcome(frame, mine, lambda h: 0)
    bodies = [decode_server(f) for f in drain(s)]
    assert isinstance(bodies[0], Welcome)
    assert bodies[1:] == [Membership(hoomi_id=a, state="left")]
    assert [t.effect for t in s.take_effects()] == [Effect.LEAVE, Effect.JOIN]


def test_a_request_the_hub_does_not_serve_yet_is_answered_not_dropped(monkeypatch):
    from hoomi_protocol import Delete, History, Search, Sync
    from server import session as session_module

    # Every frame the codec decodes is served now: a hub of the release before is played
    # by narrowing SERVED, as a frame of a newer protocol version would find it.
    monkeypatch.setattr(session_module, "SERVED", (History, Sync, Delete))
    s = new_session()
    hello(s, {})
    drain(s)
    assert s.receive(encode_client(Search(hoomi_id=HOOMIS[0], tokens=[b"t" * 16], ref=4))) is None
    error, = (decode_server(f) for f in drain(s))
    assert (error.code, error.ref) == (ErrorCode.INVALID, 4) and error.message.startswith("type:")
    assert s.state is State.LIVE


def test_a_wrong_transition_names_the_operation_and_the_state():
    s = new_session()
    hello(s, {})
    with pytest.raises(SessionError, match="welcome: only during hello, and the session is live"):
        s.welcome(Hello(token="t"), [], lambda h: 0)
