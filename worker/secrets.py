"""Server secrets every process shares, kept in Redis.

`server_secret(client, prefix, name)` returns the 32-byte secret `name` (HMAC keys: the
unsubscribe links, contact ids). The first process that asks makes it: 32 bytes from the
OS's random source, written with SET NX, so when two processes ask at once one value wins
and both read it back. Every process that shares the Redis (API, workers, beat, the CLI,
in any number of containers) therefore agrees without a shared disk or a setting.

Key under the configured prefix P (never expires; it is not patient data):
  P:secret:<name>     STRING   the secret, urlsafe base64 without padding

Losing the key (a Redis wiped without its data) makes a new secret: links signed with the
old one stop working, as every booking in that Redis would be gone too. A secret set
explicitly (e.g. REMINDERS_UNSUBSCRIBE_SECRET) wins over this one: see
worker/optout.py `unsubscribe_key`.
"""

from __future__ import annotations

import base64
import functools
import os
import re
from typing import Any

import redis

SECRET_BYTES = 32
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def secret_key(prefix: str, name: str) -> str:
    """Return the Redis key of the secret `name`."""
    if not _NAME.match(name):
        raise ValueError(f"secret name {name!r} must be lower-case letters, digits, - or _")
    return f"{prefix}:secret:{name}"


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def server_secret(client: redis.Redis, prefix: str, name: str, *,
                  stored: str | None = None) -> bytes:
    """Return the shared secret `name` (32 bytes), making it first if there is none.

    `stored`: the key's value as just read elsewhere (e.g. by the send's begin script, in
    the same round trip as its fence): used as is, without reading it again."""
    key = secret_key(prefix, name)
    value: Any = stored if stored is not None else client.get(key)
    if value is None:
        fresh = base64.urlsafe_b64encode(os.urandom(SECRET_BYTES)).decode().rstrip("=")
        client.set(key, fresh, nx=True)  # the first writer wins; everyone reads it back
        value = client.get(key)
        if value is None:
            raise redis.RedisError(f"the secret {key} was written but cannot be read back")
    return _decoded(key, _text(value))


@functools.lru_cache(maxsize=64)
def _decoded(key: str, text: str) -> bytes:
    """The secret `text` (as stored under `key`) decoded and checked; cached per value, so a
    value that changes (a wiped Redis made a new one) is decoded anew."""
    try:
        secret = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        secret = b""
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"Redis key {key} does not hold a {SECRET_BYTES}-byte secret "
                         "(urlsafe base64); delete it to make a new one")
    return secret
