"""Raw access to a stored reminder (layout 2) for tests that set up a state by hand."""

from __future__ import annotations

from worker.store import Store, encode_reminder, split_ref


def set_reminder_fields(store: Store, ref: str, **fields: str) -> None:
    """Write logical fields (expires_epoch, attempts, status, ...) straight into a reminder."""
    clinic, booking_id, key = split_ref(ref)
    bkey = store.booking_key(clinic, booking_id)
    main, attempt = store.redis.hmget(bkey, [key, key + "+"])

    def no_words(text: str) -> str:
        raise AssertionError(f"set words through the store, not raw: {text!r}")

    main, attempt = encode_reminder(key, fields, main or "", attempt or "", text_id=no_words)
    store.redis.hset(bkey, key, main)
    if attempt:
        store.redis.hset(bkey, key + "+", attempt)
