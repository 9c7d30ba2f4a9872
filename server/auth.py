"""User tokens: HS256 JWTs whose `sub` is the user id. Only checked here, in one place."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from uuid import UUID

import jwt

from protocol.errors import ErrorCode

ALGORITHM = "HS256"


class AuthError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def issue(secret: str, user_id: UUID, ttl_seconds: int = 86400) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": str(user_id), "iat": now, "exp": now + ttl_seconds}, secret, algorithm=ALGORITHM
    )


# Clock skew tolerated between the token's issuer and this replica, in seconds.
LEEWAY_S = 5


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: UUID
    expires_at: float  # Unix seconds after which the token no longer counts (leeway included)


def verify(secret: str, token: str) -> UUID:
    """The user id the token was issued for; AuthError(unauthorized) otherwise."""
    return verify_claims(secret, token).user_id


def verify_claims(secret: str, token: str) -> Claims:
    """What a valid token grants, and until when; AuthError(unauthorized) otherwise."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]},
            leeway=LEEWAY_S,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(ErrorCode.UNAUTHORIZED, "token expired") from None
    except jwt.PyJWTError:
        raise AuthError(ErrorCode.UNAUTHORIZED, "invalid token") from None
    try:
        user_id = UUID(claims["sub"])
    except (ValueError, TypeError, AttributeError):
        raise AuthError(ErrorCode.UNAUTHORIZED, "token sub is not a user id") from None
    return Claims(user_id, float(claims["exp"]) + LEEWAY_S)


def is_operator(expected: str, presented: str) -> bool:
    # Constant-time: the admin token must not leak through response timing.
    return bool(expected) and hmac.compare_digest(expected.encode(), presented.encode())
