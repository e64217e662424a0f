"""A transient failure whose retry could only come after the reminder expires is skipped at
once, saying why (found by review; real Redis, a real HTTP SMS gateway answering 503, the
real send path with its clock fixed; the rig of tests/test_send_caps_notices.py).

A retry waits for its backoff and then for the patient's send window (worker/dispatch.py
`_failed`), but its time was never held to the reminder's expiry. The day-before SMS of a
10:00 visit ("see you tomorrow", `late_until = "-12h"`: not after 22:00 the night before)
failing at 19:55 was kept `retrying` until 09:00 on the day of the visit, when its next
attempt could only skip it: all night the clinic's timeline said it would be tried again,
the clinic heard of the skip (`reminder.skipped`) an hour before the visit, and the SMS cap
counted the SMS that would never go on the visit's day, so the patient's other booking's SMS
that day was moved off it. The deferral to the window's opening skips such a reminder at
once (`at_send_time`); now the retry does too.
"""

from __future__ import annotations

from datetime import timedelta

from tests.test_send_caps import Rig
from tests.test_send_caps_notices import book, rig  # noqa: F401  (fixture)


def test_a_retry_that_could_only_come_after_its_expiry_is_skipped_at_once(
        rig: Rig) -> None:  # noqa: F811
    d = rig.day
    book(rig, "A-1", "pre", rig.local(d, 10))  # its SMS on D-1 10:00, not after D-1 22:00
    before = rig.local(d - timedelta(days=1), 10)
    assert rig.due("A-1", "before:sms") == before
    rig.sms.status = 503  # the gateway fails for a while: the retry (5-10 min) is after 20:00
    assert rig.send("A-1", "before:sms", rig.local(d - timedelta(days=1), 19, 55)) == "skipped"
    rig.sms.status = 200
    r = rig.reminder("A-1", "before:sms")
    assert r["status"] == "skipped", r
    assert r["attempts"] == 1, r  # the attempt made (the gateway answered 503) counts
    assert r["reason"].startswith("not sent: outside the send window 09:00-20:00 until "), r
    assert "it could be sent only until 12h before the start" in r["reason"], r
    assert "; not tried again after a transient failure (HTTP 503" in r["reason"], r
    assert rig.store.redis.zscore(rig.store.due_key, "cap/A-1/before:sms") is None
    assert rig.sms.snapshot() == []  # the one attempt failed; nothing was delivered
    # The patient's other booking's SMS on D keeps its day: no SMS of A-1 holds it.
    rig.book("A-2", "morn", d - timedelta(days=1))
    assert rig.due("A-2", "morning:sms") == rig.local(d, 10)
