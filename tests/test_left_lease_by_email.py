"""A lease that a change kept (3de9b7b, `_LEFT`) never brings a reminder that is made to
go again, at another time, by a path other than the upsert (review of 3de9b7b).

The upsert keeps the lease of a reminder being sent that it takes out of the plan, so the
pump's claim settles that attempt's end once the lease runs out. The upsert itself drops
such a lease when it schedules the key again; but the SMS cap's email copy of a step
(`_FINISH` 'by_email', and START's '@' in `_OPT_OUT`) writes that email key `scheduled` at
its own instant without looking at the lease set. Its old lease then ran out first and the
claim took it as an expired lease of a reminder still to go: sent at once, hours before its
time (the SMS cap had moved it to a day with room).

Real Redis, the store's claim, begin and finish scripts (tests/test_send_races.py's rig).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tests.test_send_races import STOP
from tests.test_send_races import gate as gate  # noqa: F401  (the fixtures)
from tests.test_send_races import rig as rig  # noqa: F401
from worker.store import Attempt, SendCapped, SendCapsRead

EMAIL = "rc/R-1/stop:email"


def _skip_by_email(rig, ref: str, token: str, at: datetime) -> None:
    """The SMS cap at send time: no room for this SMS, its step goes by email at `at`."""
    claim = rig.claim_now(ref)
    assert rig.store.begin_send(ref, claim.version, claim.claim, token, 5000) == "ok"
    capped = SendCapped(SendCapsRead([], []), by_email=at, email_reason="by email: SMS cap",
                        email_goes="its email goes")
    assert rig.store.finish(ref, Attempt(claim.version, claim.claim, token), "skip",
                            fields={"reason": "SMS cap: by email"}, capped=capped) == "ok"


def test_an_email_copy_scheduled_again_is_not_claimed_early_by_a_kept_lease(rig):
    doc = rig.booking()
    doc["patient"] |= {"email": "ana@example.com", "channels": ["sms", "email"]}
    rig.book(doc)
    store = rig.store
    # The stop SMS goes by email (now): that email is claimed (a 2 s lease) and its task
    # handed to a worker ...
    _skip_by_email(rig, STOP, "sms-1", datetime.now(UTC))
    assert rig.state(EMAIL)["record"]["status"] == "scheduled"
    [claim] = [c for c in store.claim_due(100, 2) if c.ref == EMAIL]
    assert rig.state(EMAIL)["record"]["status"] == "sending"
    # ... when the clinic takes the step out of the plan (its lease kept: `_LEFT`) ...
    rig.book(doc | {"medications": {"tretinoin": False}})
    assert rig.state(EMAIL)["record"]["status"] == "cancelled"
    assert rig.state(EMAIL)["lease"] is not None
    # ... and back: the stop SMS goes again, and the SMS cap sends its step by email in an
    # hour (a day with room).
    rig.book(doc)
    later = datetime.now(UTC) + timedelta(hours=1)
    _skip_by_email(rig, STOP, "sms-2", later)
    assert rig.state(EMAIL)["record"]["status"] == "scheduled"
    assert rig.state(EMAIL)["due"] == later.timestamp()
    time.sleep(2.2)  # the kept lease runs out
    claims = [c.ref for c in store.claim_due(100, 8)]
    assert EMAIL not in claims  # its time is in an hour
    state = rig.state(EMAIL)
    assert state["record"]["status"] == "scheduled"
    assert state["due"] == later.timestamp() and state["lease"] is None
    # The first attempt's task, begun late, sends nothing (its version moved).
    assert store.begin_send(EMAIL, claim.version, claim.claim, "email-1", 5000) != "ok"
