"""Per-key rate limit: a token bucket in Redis, so every API process shares one budget.

Each API key has a bucket of `burst` tokens refilled at `rate` tokens per second; a
request takes one (a batch of up to 1,000 bookings is one request). The bucket lives in
one small Redis hash, updated by one Lua script on Redis's own clock: several API
processes or containers count the same key together, and none needs its clock in sync.
An empty bucket answers 429 with `Retry-After` (whole seconds until a token is back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

_TAKE = """
local key, rate, burst = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait_ms}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_seconds: int


class RateLimiter:
    """Token buckets per API key id, in Redis."""

    def __init__(self, client: redis.Redis, prefix: str, rate: float, burst: int) -> None:
        self.prefix = prefix
        self.rate = rate
        self.burst = burst
        self._take = client.register_script(_TAKE)

    def take(self, key_id: str) -> Verdict:
        allowed, wait_ms = self._take(keys=[f"{self.prefix}:ratelimit:{key_id}"],
                                      args=[self.rate, self.burst])
        return Verdict(bool(allowed), max(1, math.ceil(int(wait_ms) / 1000)) if not allowed
                       else 0)
