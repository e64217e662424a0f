"""A new booking whose SMS cap reads no other SMS of the patient, and whose patient takes
email exactly as the booking lists it, is stored with the planner's own cap (`Store.
_capped_plan`): `cap_plan` would work the cap out again, for a patient without email, to the
same reminders. Checked here for random bookings against `cap_plan` itself, reminders, late
pause and the store's encoding alike, SMS only or not, some capped by the planner."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from benchmarks.intake import realistic_bookings
from worker.models import parse_booking, utc_iso
from worker.planner import cap_plan, plan
from worker.store import Store, _CapsRead, _Stored
from worker.webhooks import hooks_for

NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def test_the_planners_cap_is_what_cap_plan_gives_with_nothing_else_to_count(catalog,
                                                                            redis_client):
    rng = random.Random(5)
    store = Store(redis_client, "cs", hooks=hooks_for(catalog.clinics))
    recapped = unsubscribed = 0
    for doc in realistic_bookings(600, seed=13, now=NOW):
        # Many SMS close together: the planner's cap changes many plans.
        doc["starts_at"] = (NOW + timedelta(days=rng.randrange(1, 6))).isoformat()
        if rng.random() < 0.6:
            doc["patient"]["channels"] = ["sms"]
        booking = parse_booking(doc, catalog)
        planned = plan(booking, catalog.protocols[booking.treatment],
                       catalog.clinics[booking.clinic], NOW)
        email = "email" in booking.patient.channels
        read = _CapsRead([], ["cid", "(1.0", 51, [], []], email)
        got = store._capped_plan(booking, planned, _Stored({}, None, {}), read, NOW, False)
        want = cap_plan(planned, booking, [], email=email)
        recapped += want is not planned
        assert got == want
        assert got.reminders == want.reminders and got.late_pause == want.late_pause
        args = [store._prepare_new(booking, p, NOW, False, {}, read.guard,
                                   timeline=False).args for p in (got, want)]
        assert args[0] == args[1]
        if email:  # unsubscribed from email, though listed: capped again, without email
            read = _CapsRead([], read.guard, False)
            got = store._capped_plan(booking, planned, _Stored({}, None, {}), read, NOW, False)
            assert got == cap_plan(planned, booking, [], email=False)
            unsubscribed += got != planned
    # The shortcut was taken where cap_plan worked the cap out again; and the other case seen.
    assert recapped > 50 and unsubscribed > 10


def test_a_new_bookings_stamps_and_keep_until(catalog, redis_client, booking_doc):
    """`_prepare_new`'s faster forms: `updated_at` is each call's own `now` (kept for the
    last one only), and `keep_until` counts from the latest of the start (given in the
    patient's zone) and the reminders, whichever it is."""
    store = Store(redis_client, "cs", hooks=hooks_for(catalog.clinics))
    booking = parse_booking(booking_doc, catalog)
    planned = plan(booking, catalog.protocols[booking.treatment],
                   catalog.clinics[booking.clinic], NOW)

    def fields(p, now):
        head = store._prepare_new(booking, p, now, False, {}, timeline=False).args[0]
        hset = json.loads(head)[4]
        return dict(zip(hset[0::2], hset[1::2], strict=True))

    later = NOW + timedelta(seconds=1, microseconds=5)
    for now in (NOW, later, NOW):
        assert fields(planned, now)["updated_at"] == utc_iso(now)
    last = max(r.due_at for r in planned.reminders)
    assert booking.starts_at.utcoffset() and last > booking.starts_at
    retention = store.retention_seconds
    assert fields(planned, NOW)["keep_until"] == str(math.ceil(last.timestamp() + retention))
    early = [r for r in planned.reminders if r.due_at <= booking.starts_at]
    assert fields(replace(planned, reminders=early), NOW)["keep_until"] == str(
        int(booking.starts_at.timestamp()) + retention)
