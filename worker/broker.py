"""kombu's Redis transport, with one narrow fix for a worker that outlives a Redis restart.

The kombu path (kombu 5.7, kombu/transport/redis.py). When Redis goes away under a
worker, Celery collects the broker connection (`Consumer.on_connection_error_after_
connected` → `kombu.Connection.collect()`): `Transport.close_connection` closes the
channels one by one, and a channel with an auto-delete fanout queue (gossip, pidbox)
fails in `Channel.close` → `queue_delete` on the dead socket, which ends the loop and
leaves the other channels open; then `Connection._do_close_transport` sets
`transport.client = None`. When such a channel holding a delivered, unacknowledged
message (acks late) is closed or collected later, `Channel.close` drops its pools
(`_disconnect_pools`) and `QoS.restore_unacked_once` → `QoS.restore_unacked` →
`conn_or_acquire` → `_create_client` → `pool` → `_get_pool` → `_connparams` reads
`self.connection.client.hostname` and raises
`AttributeError: 'NoneType' object has no attribute 'hostname'`, so the message is not
given back to its queue: it waits in the unacked hash until the visibility timeout. An
ack, a requeue (`QoS.ack`, `QoS.reject` → `restore_by_tag` → `_do_restore_message`) or a
`queue_delete` through the same pool-less channel takes the same path.
tests/e2e/test_supervision.py reproduces it against a real, killed Redis.
It resembles celery/kombu#582 ("Error on restarting Gossip": channel close →
`queue_delete` → `_connparams` → `hostname`) and celery/kombu#970 ("Error on Restarting
Celery": `restore_unacked_once` → `restore_unacked` → `conn_or_acquire` → `_connparams`
→ `hostname`, unacked messages not restored on a warm shutdown).

The fix: the channel remembers the connection parameters it last connected with and uses
them once its kombu Connection is gone, so a late restore, ack or requeue reaches the
same Redis (the message goes back to its queue at once), or fails with an ordinary redis
ConnectionError, which kombu and Celery handle. Wired in by `broker_transport` in
worker/celery_app.py; nothing else of kombu's changes.

With Sentinel (REMINDERS_REDIS_SENTINELS, worker/connections.py) the broker uses kombu's
`sentinel://` transport, whose channel builds its pool from the sentinel list it reads in
`kombu.Connection.alt` (`SentinelChannel._sentinel_managed_pool`) — the same dead end once
the Connection is gone, and a failover is exactly when it happens. `SentinelChannel` below
remembers the sentinels too and asks them for the current master, so a message delivered
before the failover is given back to its queue on the new master at once.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.url import _parse_url
from redis.sentinel import Sentinel


class Channel(kombu_redis.Channel):
    """kombu's Redis channel that can still reach Redis after its Connection was closed."""

    _remembered_params: dict[bool, dict[str, Any]] | None = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self._remembered_params is None:
            self._remembered_params = {}
        transport = self.connection
        if transport is not None and transport.client is not None:
            params = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
            self._remembered_params[asynchronous] = params
        elif asynchronous not in self._remembered_params:
            raise redis.ConnectionError(
                "the broker connection of this channel is closed")
        return dict(self._remembered_params[asynchronous])


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel that can still find the master after its Connection closed."""

    _remembered_sentinels: list[tuple[str, int]] | None = None

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is not None and transport.client is not None:
            found = []
            for url in transport.client.alt:
                parsed = _parse_url(url)
                if parsed.scheme == "sentinel":
                    found.append((parsed.hostname, parsed.port or transport.default_port))
            if found:
                self._remembered_sentinels = found
            return super()._sentinel_managed_pool(asynchronous)  # type: ignore[no-untyped-call]
        if not self._remembered_sentinels:
            raise redis.ConnectionError("the broker connection of this channel is closed")
        params = self._connparams(asynchronous)
        params.pop("host", None)
        params.pop("port", None)
        manager = Sentinel(self._remembered_sentinels,  # type: ignore[no-untyped-call]
                           min_other_sentinels=getattr(self, "min_other_sentinels", 0),
                           sentinel_kwargs=getattr(self, "sentinel_kwargs", None), **params)
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        master = manager.master_for(  # type: ignore[no-untyped-call]
            getattr(self, "master_name", None), redis.Redis, **credentials)
        return master.connection_pool


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with the channel above."""

    Channel = SentinelChannel
