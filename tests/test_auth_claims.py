"""Token time claims: `exp`, `iat` and `nbf` are integers in a sane range, or the token is
refused as unauthorized with a message naming the claim. Pure: no servers."""

from __future__ import annotations

import time
from uuid import uuid4

import jwt
import pytest

from hoomi_protocol import ErrorCode
from server import auth

SECRET = "s" * 40
USER = uuid4()


def token(**claims: object) -> str:
    return jwt.encode({"sub": str(USER), **claims}, SECRET, algorithm="HS256")


def refused(tok: str) -> str:
    with pytest.raises(auth.AuthError) as err:
        auth.verify_claims(SECRET, tok)
    assert err.value.code == ErrorCode.UNAUTHORIZED
    return err.value.message


SOON = int(time.time()) + 600


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", [
    str(SOON),  # PyJWT alone takes a numeric string through int()
    1e300,  # and a float past any timer's range
    float(SOON),  # a float that is a whole number is still not an integer NumericDate
    True, -1, 2**64, auth.MAX_NUMERIC_DATE + 1, None, [SOON], {"t": SOON},
])
def test_bad_time_claims_are_refused_naming_the_claim(claim: str, value: object) -> None:
    claims: dict[str, object] = {"exp": SOON, "iat": SOON - 600, claim: value}
    message = refused(token(**claims))
    assert message.startswith(f"invalid token: {claim} must be an integer")


def test_good_time_claims_are_accepted_and_exp_is_kept() -> None:
    now = int(time.time())
    claims = auth.verify_claims(SECRET, token(exp=now + 60, iat=now, nbf=now - 1))
    assert claims.user_id == USER and claims.expires_at == now + 60 + auth.LEEWAY_S
    far = auth.verify_claims(SECRET, token(exp=auth.MAX_NUMERIC_DATE))  # year 9999
    assert far.expires_at == auth.MAX_NUMERIC_DATE + auth.LEEWAY_S


def test_exp_is_still_required() -> None:
    assert "exp" in refused(token(iat=int(time.time())))


def test_a_forged_token_with_a_bad_exp_is_just_invalid() -> None:
    forged = jwt.encode({"sub": str(USER), "exp": "never"}, "x" * 40, algorithm="HS256")
    assert refused(forged) == "invalid token"  # the signature is checked before the claims
