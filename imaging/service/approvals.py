"""Secrets of the service: users' bearer tokens and the signed links that approve a request.

A bearer token is 32 random bytes shown once when it is made; the store keeps only its sha256
(a random token needs no slow password hash: nothing about it can be guessed). An approval link
carries a token signed with the service's key (itsdangerous, with its time of signing) naming the
request, the admin it was mailed to, the request's version (how many transitions it had) and a
nonce. It is refused when the signature is wrong, when it is older than the configured lifetime,
when it was used before (its nonce is stored on use), or when the request has moved on since the
link was made.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from imaging.errors import ImagingError

TOKEN_PREFIX = "imaging_"
_SALT = "imaging.approve.v1"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


class ApprovalRefused(ImagingError):
    """An approval link that cannot be used; ``status`` is the HTTP code that says why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Approval:
    request_id: str
    admin_id: int
    version: int
    nonce: str


def _serializer(key: str, now: float | None = None) -> URLSafeTimedSerializer:
    """The serializer of approval tokens; ``now`` signs as of another time (tests make old links)."""

    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(now if now is not None else time.time())

    return URLSafeTimedSerializer(key, salt=_SALT, signer=Signer)


def sign_approval(
    key: str, request_id: str, admin_id: int, version: int, *, now: float | None = None
) -> str:
    data = {"r": request_id, "a": admin_id, "v": version, "n": secrets.token_urlsafe(12)}
    return str(_serializer(key, now).dumps(data))


def check_approval(key: str, token: str, max_age: int) -> Approval:
    """The approval a link's token stands for; ApprovalRefused (403 or 410) if it cannot be used."""
    try:
        data = _serializer(key).loads(token, max_age=max_age)
    except SignatureExpired:
        raise ApprovalRefused(
            "this approval link has expired: approve the request in the API", 410
        ) from None
    except BadSignature:
        raise ApprovalRefused("this approval link is not valid", 403) from None
    try:
        return Approval(str(data["r"]), int(data["a"]), int(data["v"]), str(data["n"]))
    except (KeyError, TypeError, ValueError):
        raise ApprovalRefused("this approval link is not valid", 403) from None
