"""The addresses behind unsubscribe links (worker/store.py `remember_unsubscribe`): one key
per link, each expiring `retention` after the last email to that address, in a real Redis."""

from __future__ import annotations

import time
from types import SimpleNamespace

from worker.dispatch import unsubscribe_link
from worker.optout import read_token, unsubscribe_key
from worker.settings import Settings
from worker.store import Store

RETENTION_SECONDS = 3


def link_id(url: str, key: bytes) -> str:
    named = read_token(key, url.rsplit("/", 1)[1])
    assert named is not None
    return named.contact_hash


def test_an_old_patients_address_expires_while_the_clinic_keeps_emailing_others(
        redis_client, tmp_path):
    store = Store(redis_client, "t", retention_days=RETENTION_SECONDS / 86400)
    settings = Settings(public_url="https://r.example", data_dir=tmp_path, _env_file=None)
    ctx = SimpleNamespace(settings=settings, store=store)
    key = unsubscribe_key(settings, redis_client, "t")
    ana = link_id(unsubscribe_link(ctx, "glow", "Ana@Example.com"), key)  # type: ignore[arg-type]
    assert store.unsubscribe_address("glow", ana) == ("email", "ana@example.com")
    deadline = time.monotonic() + RETENTION_SECONDS + 1.5
    while time.monotonic() < deadline:  # Eva keeps getting emails from the same clinic
        eva = link_id(unsubscribe_link(ctx, "glow", "eva@example.com"), key)  # type: ignore[arg-type]
        time.sleep(0.25)
    assert store.unsubscribe_address("glow", ana) is None  # forgotten on time
    assert store.unsubscribe_address("glow", eva) == ("email", "eva@example.com")
    # Each link is its own key, named by the link id (never the address), with its own
    # expiry no longer than the retention.
    names = [k for k in redis_client.scan_iter("t:unsub:*")]
    assert names == [f"t:unsub:glow/{eva}"]
    assert 0 < redis_client.ttl(names[0]) <= RETENTION_SECONDS
    assert not [k for k in redis_client.scan_iter("*") if "example.com" in k]
    # Another clinic's link id is not this clinic's.
    assert store.unsubscribe_address("other", eva) is None
