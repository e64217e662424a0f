"""`Store._read` reads many bookings a script per READ_CHUNK (one round trip, a short
script each), and loads the script again if Redis lost it (SCRIPT FLUSH, a restart):
the same bookings as read one at a time. Real redis-server."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.api.conftest import future_booking
from worker.models import parse_booking
from worker.planner import plan
from worker.store import READ_CHUNK, Store


def test_a_read_of_many_bookings_is_chunked_and_survives_a_script_flush(redis_client, catalog):
    store = Store(redis_client)
    now = datetime.now(UTC)
    items = []
    for n in range(READ_CHUNK * 2 + 5):
        doc = future_booking(f"C-{n}", days=10 + n % 7)  # a patient of its own each
        doc["patient"] |= {"phone": f"+346001{n:05d}", "email": f"p{n}@example.com"}
        booking = parse_booking(doc, catalog)
        items.append((booking, plan(booking, catalog.protocols["microneedling"],
                                    catalog.clinics["glow"], now)))
    store.upsert_many(items[1:], now, timelines=False)  # the first one stays missing
    keys = [b.key for b, _ in items]
    one_by_one = [store._read([key], scores=True)[0] for key in keys]
    assert not one_by_one[0].fields and all(s.fields and s.doc for s in one_by_one[1:])
    redis_client.script_flush()
    assert store._read(keys, scores=True) == one_by_one
    assert store._read(keys, scores=True) == one_by_one  # loaded again: pipelined
    # An upsert of them all again reads them the same way: nothing changed.
    previous: list[str | None] = [None] * len(items)
    again = store.upsert_many(items, now, previous=previous, timelines=False)
    assert previous == [None] + ["1"] * (len(items) - 1)
    assert [t["version"] for t in again] == [1] * len(items)


def test_a_batch_read_that_loads_its_script_leaves_no_cycle_holding_the_batch(
        redis_client, catalog):
    """The first pipelined read on a Redis without the read script gets NoScriptError
    replies; each one's traceback holds redis-py's frames, which hold it, and through them
    `upsert_many`'s frame: the whole batch (bookings, plans) stayed alive, unreachable,
    until a full collection (`reminders book`: its first 4,000 bookings, about 0.3 s of
    CPU collected at the end of every run)."""
    import gc

    from worker.models import Booking

    store = Store(redis_client)
    now = datetime.now(UTC)

    def batch() -> list:
        items = []
        for n in range(READ_CHUNK + 5):  # two read scripts: pipelined
            doc = future_booking(f"G-{n}", days=10 + n % 7)
            doc["patient"] |= {"phone": f"+346002{n:05d}", "email": f"g{n}@example.com"}
            booking = parse_booking(doc, catalog)
            items.append((booking, plan(booking, catalog.protocols["microneedling"],
                                        catalog.clinics["glow"], now)))
        return items

    redis_client.script_flush()
    gc.collect()
    gc.disable()
    try:
        timelines = store.upsert_many(batch(), now, timelines=False)  # the batch dropped
        assert len(timelines) == READ_CHUNK + 5
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = [o for o in gc.garbage if isinstance(o, Booking)]
        assert held == [], f"{len(held)} bookings of the batch were held in a cycle"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
