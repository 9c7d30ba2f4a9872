"""The one error model: close codes carry their reconnect policy, and a HoomiError maps
once to a wire error and to an HTTP status (server/errors.py)."""

from __future__ import annotations

import asyncpg
import pytest

from hoomi_client.sdk import HubError
from hoomi_protocol import CloseCode, ErrorCode, HoomiError, ProtocolError, Reconnect
from server import errors
from server.auth import AuthError
from storage.errors import StorageError


def test_every_close_code_says_whether_to_reconnect():
    policy = {code: code.reconnect for code in CloseCode}
    assert policy[CloseCode.UNAUTHORIZED] is Reconnect.NEW_TOKEN
    assert policy[CloseCode.BAD_FRAME] is policy[CloseCode.POLICY_VIOLATION] is Reconnect.NEVER
    for code in (CloseCode.TOO_SLOW, CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER,
                 CloseCode.MESSAGE_TOO_BIG):
        assert policy[code] is Reconnect.RESUME
    assert CloseCode.of(4401) is CloseCode.UNAUTHORIZED
    assert CloseCode.of(4999) is None and CloseCode.of(None) is None


def test_every_layer_raises_the_one_error_base():
    for err in (ProtocolError(ErrorCode.INVALID, "x: bad", "x"),
                StorageError(ErrorCode.NOT_FOUND, "id: gone", "id"),
                AuthError(ErrorCode.UNAUTHORIZED, "invalid token")):
        assert isinstance(err, HoomiError)
        assert errors.as_hoomi_error(err) is err
    # The SDK's refusals too, as the client sees them.
    refused = HubError(ErrorCode.FORBIDDEN, "not a member")
    assert isinstance(refused, HoomiError) and str(refused) == "forbidden: not a member"


def test_outages_map_to_unavailable_and_bugs_do_not_map():
    mapped = errors.as_hoomi_error(ConnectionRefusedError())
    assert mapped is not None and mapped.code == ErrorCode.UNAVAILABLE
    assert errors.as_hoomi_error(asyncpg.InterfaceError("closed")) is not None
    assert errors.as_hoomi_error(KeyError("bug")) is None


@pytest.mark.parametrize(("code", "status", "retry"), [
    (ErrorCode.INVALID, 400, None), (ErrorCode.UNAUTHORIZED, 401, None),
    (ErrorCode.FORBIDDEN, 403, None), (ErrorCode.NOT_FOUND, 404, None),
    (ErrorCode.TOO_LARGE, 413, None), (ErrorCode.RATE_LIMITED, 429, 1000),
    (ErrorCode.UNAVAILABLE, 503, 1000)])
def test_one_mapping_to_the_wire_and_to_http(code, status, retry):
    err = HoomiError(code, "what: why", "what")
    frame = errors.wire_error(err, 7)
    assert (frame.code, frame.message, frame.ref, frame.retry_after_ms) == (
        code, "what: why", 7, retry)
    assert errors.STATUS[code] == status
    # An explicit wait wins, in ms on the wire and whole seconds (rounded up) over HTTP.
    assert errors.wire_error(HoomiError(code, "m", None, 2500), None).retry_after_ms == 2500
