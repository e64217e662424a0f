"""Clinic API keys: issued by `reminders keys issue`, only their hash kept, in Redis.

A key reads `rk_<key id>_<secret>`: `rk_` lets a secret scanner recognise a leaked key,
the key id (8 hex digits) is public and names the key in `keys list` and `keys revoke`,
and the secret is 32 random bytes (`secrets.token_urlsafe`). The key is printed once
and never stored: Redis keeps its SHA-256, the clinic and the times it was issued and
last used.

Why a plain SHA-256 and not a slow password hash (bcrypt, argon2): those slow down the
guessing of low-entropy secrets a person chose. A 256-bit random secret cannot be
guessed however fast each guess is, and a slow hash would cost every API request tens of
milliseconds. The digest is compared with `hmac.compare_digest` (constant time).

Keys under the configured prefix P (none expires):
  P:apikey:<key id>        HASH  clinic, sha256, created_at, last_used_at
  P:apikeys:<clinic>       SET   the clinic's key ids

A clinic may hold any number of keys at once, so a key is rotated by issuing the new
one, moving the booking software to it, then revoking the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis

from .models import utc_iso

KEY_PREFIX = "rk_"
KEY_ID_LENGTH = 8
_KEY = re.compile(rf"^{KEY_PREFIX}(?P<key_id>[0-9a-f]{{{KEY_ID_LENGTH}}})_[A-Za-z0-9_-]{{43}}$")
LAST_USED_RESOLUTION_SECONDS = 60.0  # `last_used_at` is refreshed at most this often
# Refresh `last_used_at` only on a key that still exists: a revoke in between must not
# leave a stray record behind.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1]) end
"""


@dataclass(frozen=True)
class IssuedKey:
    """A new key: `key` is shown to the clinic once and never stored."""

    clinic: str
    key_id: str
    key: str


@dataclass(frozen=True)
class KeyOwner:
    """Who a presented key belongs to."""

    clinic: str
    key_id: str


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key: str) -> str | None:
    """Return the key id of a well-formed key, else None."""
    match = _KEY.match(key)
    return match["key_id"] if match else None


class ApiKeys:
    """Issue, list, revoke and verify clinic API keys."""

    def __init__(self, client: redis.Redis, prefix: str = "reminders") -> None:
        self.redis = client
        self.prefix = prefix
        self._touch = client.register_script(_TOUCH)

    def _key(self, key_id: str) -> str:
        return f"{self.prefix}:apikey:{key_id}"

    def _clinic_set(self, clinic: str) -> str:
        return f"{self.prefix}:apikeys:{clinic}"

    def issue(self, clinic: str, now: datetime | None = None) -> IssuedKey:
        """Create a key for `clinic`; return it (the only time it is seen)."""
        stamp = utc_iso(now or datetime.now(UTC)) or ""
        while True:
            key_id = secrets.token_hex(KEY_ID_LENGTH // 2)
            key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            # HSETNX claims the id; a collision (1 in 4 billion per key) just draws again.
            if self.redis.hsetnx(self._key(key_id), "clinic", clinic):
                break
        pipe = self.redis.pipeline()
        pipe.hset(self._key(key_id), mapping={"sha256": digest(key), "created_at": stamp})
        pipe.sadd(self._clinic_set(clinic), key_id)
        pipe.execute()
        return IssuedKey(clinic=clinic, key_id=key_id, key=key)

    def list(self, clinic: str) -> list[dict[str, Any]]:
        """Return the clinic's keys (id and times, never a secret), oldest first."""
        key_ids = sorted(cast(set[str], self.redis.smembers(self._clinic_set(clinic))))
        pipe = self.redis.pipeline(transaction=False)
        for key_id in key_ids:
            pipe.hgetall(self._key(key_id))
        out = []
        for key_id, record in zip(key_ids, pipe.execute(), strict=True):
            if record.get("clinic") == clinic:
                out.append({"key_id": key_id, "clinic": clinic,
                            "created_at": record.get("created_at") or None,
                            "last_used_at": record.get("last_used_at") or None})
        out.sort(key=lambda k: (k["created_at"] or "", k["key_id"]))
        return out

    def revoke(self, clinic: str, key_id: str) -> bool:
        """Revoke one of the clinic's keys at once; return False if it has no such key."""
        key = self._key(key_id)
        if self.redis.hget(key, "clinic") != clinic:
            return False
        pipe = self.redis.pipeline()
        pipe.delete(key)
        pipe.srem(self._clinic_set(clinic), key_id)
        pipe.execute()
        return True

    def verify(self, presented: str, now: float | None = None) -> KeyOwner | None:
        """Return the owner of a valid key, else None (malformed, unknown or revoked)."""
        key_id = key_id_of(presented)
        if key_id is None:
            return None
        record = cast(dict[str, str], self.redis.hgetall(self._key(key_id)))
        stored = record.get("sha256", "")
        if not stored or not hmac.compare_digest(digest(presented), stored):
            return None
        when = datetime.fromtimestamp(now, UTC) if now is not None else datetime.now(UTC)
        last = record.get("last_used_at")
        if not last or (when - datetime.fromisoformat(last)).total_seconds() > (
            LAST_USED_RESOLUTION_SECONDS
        ):
            self._touch(keys=[self._key(key_id)], args=[utc_iso(when) or ""])
        return KeyOwner(clinic=record["clinic"], key_id=key_id)
