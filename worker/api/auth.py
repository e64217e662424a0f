"""Who is calling: the clinic behind an `Authorization: Bearer <key>` header, rate-limited.

No key, a malformed key, an unknown key and a revoked key all get the same 401 (with
`WWW-Authenticate`): the answer never tells which keys exist. The clinic comes from the
key and only from it; every route acts on that clinic's bookings alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import WWW_AUTHENTICATE, ApiError
from .services import Svc

log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 256

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="clinicKey",
    description="A clinic API key from `reminders keys issue --clinic <clinic>`.",
)


@dataclass(frozen=True)
class Caller:
    """The authenticated clinic and the key it used."""

    clinic: str
    key_id: str


def _unauthorized(why: str, *, invalid: bool) -> ApiError:
    challenge = WWW_AUTHENTICATE + (', error="invalid_token"' if invalid else "")
    return ApiError(401, why, headers={"WWW-Authenticate": challenge})


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    svc: Svc,
) -> Caller:
    """Return the caller, or raise 401 (no or bad key) or 429 (the key's rate is spent)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized(
            "an API key is required: Authorization: Bearer <key>", invalid=False)
    presented = credentials.credentials.strip()
    owner = svc.keys.verify(presented) if len(presented) <= MAX_KEY_LENGTH else None
    if owner is None:
        raise _unauthorized("the API key is not valid (unknown or revoked)", invalid=True)
    verdict = svc.limiter.take(owner.key_id)
    if not verdict.allowed:
        log.info("rate limit: key %s of clinic %s", owner.key_id, owner.clinic)
        raise ApiError(
            429,
            f"too many requests for this key; try again in {verdict.retry_after_seconds}s",
            headers={"Retry-After": str(verdict.retry_after_seconds)},
        )
    request.state.key_id = owner.key_id
    return Caller(clinic=owner.clinic, key_id=owner.key_id)


Authenticated = Annotated[Caller, Depends(authenticate)]
