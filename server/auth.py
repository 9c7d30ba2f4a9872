"""User tokens: HS256 JWTs whose `sub` is the user id. Only checked here, in one place."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from uuid import UUID

import jwt

from hoomi_protocol.errors import ErrorCode, HoomiError

ALGORITHM = "HS256"


class AuthError(HoomiError):
    """A token refused (always `unauthorized`)."""


def issue(secret: str, user_id: UUID, ttl_seconds: int = 86400, *,
          issuer: str | None = None, audience: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, object] = {"sub": str(user_id), "iat": now, "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


# Clock skew tolerated between the token's issuer and this replica, in seconds.
LEEWAY_S = 5


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: UUID
    expires_at: float  # Unix seconds after which the token no longer counts (leeway included)


def verify(secret: str, token: str, *, issuer: str | None = None,
           audience: str | None = None) -> UUID:
    """The user id the token was issued for; AuthError(unauthorized) otherwise."""
    return verify_claims(secret, token, issuer=issuer, audience=audience).user_id


def verify_claims(secret: str, token: str, *, issuer: str | None = None,
                  audience: str | None = None) -> Claims:
    """What a valid token grants, and until when; AuthError(unauthorized) otherwise.

    With `issuer` / `audience` set (HOOMI_JWT_ISSUER / HOOMI_JWT_AUDIENCE), a token must
    name them in `iss` / `aud`: a token an identity service minted for another service
    that happens to share the secret is not accepted here."""
    _check_times(secret, token)
    required = ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else [])
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={
                "require": required, "verify_aud": bool(audience), "verify_iss": bool(issuer)},
            leeway=LEEWAY_S, issuer=issuer, audience=audience,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(ErrorCode.UNAUTHORIZED, "token expired") from None
    except (jwt.InvalidIssuerError, jwt.InvalidAudienceError) as err:
        raise AuthError(ErrorCode.UNAUTHORIZED, f"token not for this hub: {err}") from None
    except jwt.MissingRequiredClaimError as err:
        raise AuthError(ErrorCode.UNAUTHORIZED, f"invalid token: {err}") from None
    except jwt.PyJWTError:
        raise AuthError(ErrorCode.UNAUTHORIZED, "invalid token") from None
    try:
        user_id = UUID(claims["sub"])
    except (ValueError, TypeError, AttributeError):
        raise AuthError(ErrorCode.UNAUTHORIZED, "token sub is not a user id") from None
    return Claims(user_id, float(claims["exp"]) + LEEWAY_S)


# A NumericDate claim must be an integer from 0 to the end of year 9999 (what datetime can
# hold): PyJWT alone takes "9999999999" (a string) or 1e300 for `exp` via int(), and such
# an expiry, past any timer's range, would keep a socket authenticated for ever.
MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z
TIME_CLAIMS = ("exp", "iat", "nbf")


def _check_times(secret: str, token: str) -> None:
    """AuthError naming the claim when a signed token's exp/iat/nbf is not a sane integer."""
    try:  # the signature first: an unsigned token's claims are not worth reading
        payload = jwt.decode(token, secret, algorithms=[ALGORITHM], options={
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": False, "verify_iss": False})
    except jwt.PyJWTError:
        raise AuthError(ErrorCode.UNAUTHORIZED, "invalid token") from None
    for claim in TIME_CLAIMS:
        if claim not in payload:
            continue
        value = payload[claim]
        if type(value) is not int or not 0 <= value <= MAX_NUMERIC_DATE:
            raise AuthError(ErrorCode.UNAUTHORIZED,
                            f"invalid token: {claim} must be an integer from 0 to "
                            f"{MAX_NUMERIC_DATE} (Unix seconds)")


def is_operator(expected: str, presented: str) -> bool:
    # Constant-time: the admin token must not leak through response timing.
    return bool(expected) and hmac.compare_digest(expected.encode(), presented.encode())


class VerifiedTokens:
    """Tokens this replica has verified, with their user and expiry: a client sending the
    same token on every request pays the signature and claim checks (about 47 us, two
    JWT decodes in `verify_claims`) once. A token's validity depends only on the time
    once its signature and claims passed, so a hit is checked against its expiry and
    nothing else; refused tokens are never kept (each one is checked and counted). At
    most `size` tokens, the oldest forgotten first."""

    __slots__ = ("_claims", "size")

    def __init__(self, size: int = 4096) -> None:
        self._claims: dict[str, Claims] = {}
        self.size = size

    def get(self, token: str, now: float) -> UUID | None:
        """The token's user if it was verified here and has not expired at `now`."""
        claims = self._claims.get(token)
        if claims is None:
            return None
        if now >= claims.expires_at:
            del self._claims[token]
            return None
        return claims.user_id

    def put(self, token: str, claims: Claims) -> None:
        if len(self._claims) >= self.size:
            del self._claims[next(iter(self._claims))]
        self._claims[token] = claims
