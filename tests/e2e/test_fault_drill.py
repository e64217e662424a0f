"""The fault drill (benchmarks/fault_drill.py, `make faults`) at a small size.

60 bookings x 4 messages, real Redis (AOF), two real Celery workers and beat, real SMTP
and HTTP sinks; two workers SIGKILLed and restarted, one stopped warm (SIGTERM) while a
new one starts beside it (a warm stop explains no duplicate), one pool process SIGKILLed
alone (its worker's main process forks a replacement), Redis SIGKILLed and restarted on
its AOF, the SMTP server down for 10 s (its open sessions dropped as it goes down, and
once more at T+27 s, the server up), the SMS gateway answering 503 (taking nothing) for
8 s; meanwhile 3 bookings cancelled through the API, 3 moved 20 s later through `reminders
book -` and 2 patients texting STOP through the inbound webhook, each judged after the
drain (benchmarks/drill_changes.py: the judging rules are tested here on made-up records
too). Nothing may be lost or dead-lettered, and every
message that arrived twice must have had its first copy accepted just before a kill, and
the store must show an attempt of it whose outcome went unrecorded (begun, never finished)
or was unknown: the explanation rule is tested here on made-up sink and store records.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.drill_changes import Change, judge, plan_changes
from benchmarks.fault_drill import (
    QUICK,
    DrillParams,
    Duplicate,
    Fault,
    StoreEvidence,
    fault_plan,
    find_duplicates,
    render_report,
    run_drill,
)
from tests.once import once_per_run


def _processes_using(folder: Path) -> list[str]:
    """Return the command lines of live processes whose cwd or arguments mention `folder`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (str(folder) in cmdline.decode(errors="replace")
                             or cwd.startswith(str(folder))):
            found.append(f"{entry.name}: {cmdline.decode(errors='replace')}")
    return found


# --- the accounting, on made-up sink records ---------------------------------------------

T0 = 1_000_000.0
EMAIL = ("email", "d-00001@example.com", "One week on: how is your skin?")
SMS = ("sms", "+34600100001", "Good morning Ana.")
NAMES = {EMAIL: "drill/D-00001/check:email", SMS: "drill/D-00001/spf:sms"}
FAULTS = [Fault("worker kill", T0 + 10, T0 + 10, "w1"),
          Fault("smtp down", T0 + 12, T0 + 42, "port 1"),
          Fault("redis kill", T0 + 30, T0 + 31.5, "port 2")]


def test_a_copy_just_before_a_worker_kill_explains_its_duplicate():
    dups, unexpected = find_duplicates({EMAIL: [T0 + 20, T0 + 8.5], SMS: [T0 + 9]}, NAMES,
                                       FAULTS, 2.0, T0)
    assert unexpected == []
    (dup,) = dups
    assert dup.ref == "drill/D-00001/check:email" and dup.copies == [T0 + 8.5, T0 + 20]
    assert dup.by_time and "1.50s before the worker kill at T+10.0s" in dup.explanations[0]
    # The time rule alone explains nothing: the store was not read.
    assert not dup.by_store and not dup.explained


@pytest.mark.parametrize("accepted", [7.9, 10.6, 13.0])  # too early, too late, an outage
def test_a_copy_away_from_any_kill_is_an_unexplained_duplicate(accepted):
    (dup,), _ = find_duplicates({EMAIL: [T0 + accepted, T0 + 50]}, NAMES, FAULTS, 2.0, T0)
    assert not dup.by_time and dup.explanations == [""]
    dup.store = StoreEvidence("1|2|t2|1.5|1", [line("t1", "unknown"), line("t2", "sent")])
    assert dup.by_store and not dup.explained  # the store's evidence is not enough either


def test_a_pool_process_kill_explains_as_a_worker_kill_and_an_outage_explains_nothing():
    faults = [Fault("pool kill", T0 + 10, T0 + 10.3, "w1 pool pid 7 of main pid 6"),
              Fault("sms gateway 5xx", T0 + 12, T0 + 27, "port 3 answered 503")]
    for accepted, explained in [(7.9, False), (8.1, True), (10.4, True), (10.6, False),
                                (15.0, False)]:
        (dup,), _ = find_duplicates({SMS: [T0 + accepted, T0 + 60]}, NAMES, faults, 2.0, T0)
        assert dup.by_time is explained, accepted
    (dup,), _ = find_duplicates({SMS: [T0 + 9.5, T0 + 60]}, NAMES, faults, 2.0, T0)
    assert "0.50s before the pool kill at T+10.0s" in dup.explanations[0]


def test_a_redis_kill_explains_copies_until_redis_was_back():
    for accepted, explained in [(28.1, True), (31.6, True), (31.9, True), (32.1, False)]:
        (dup,), _ = find_duplicates({SMS: [T0 + accepted, T0 + 60]}, NAMES, FAULTS, 2.0, T0)
        assert dup.by_time is explained, accepted


def test_every_resend_needs_its_own_kill_and_strangers_are_reported():
    received = {EMAIL: [T0 + 9.9, T0 + 29.5, T0 + 45], ("sms", "+34600999999", "hi"): [T0]}
    (dup,), unexpected = find_duplicates(received, NAMES, FAULTS, 2.0, T0)
    assert dup.by_time and len(dup.explanations) == 2
    assert unexpected == [{"key": ["sms", "+34600999999", "hi"], "copies": 1}]
    received[EMAIL] = [T0 + 9.9, T0 + 20, T0 + 45]
    (dup,), _ = find_duplicates(received, NAMES, FAULTS, 2.0, T0)
    assert not dup.by_time and dup.explanations[1] == ""


# --- the store's evidence, on made-up attempt records ------------------------------------
# `<key>+` is claim|attempts|tok|sent_at|sent_version|last_error; `attempts` counts begun
# attempts (worker/store.py _BEGIN_SEND), less those whose owning finish deferred, skipped or
# handed back (_FINISH). Each finish adds one log line with its token.


def line(tok: str, outcome: str, result: str = "ok", attempt: int = 1, claim: str = "1",
         began: float = T0 + 40) -> dict[str, object]:
    return {"version": "1", "claim": claim, "outcome": outcome, "attempt": attempt,
            "at": datetime.fromtimestamp(began, UTC).isoformat(), "result": result,
            "tok": tok}


def duplicate(copies: list[float], store: StoreEvidence) -> Duplicate:
    (dup,), _ = find_duplicates({EMAIL: copies}, NAMES, FAULTS, 2.0, T0)
    dup.store = store
    return dup


def test_an_attempt_begun_and_never_finished_explains_a_resend_near_a_kill():
    # Claim 1 began (attempts 1), its worker was killed after the hand-over: no line. Claim 2
    # (the lease ran out) began after the ledger expired (attempts 2) and was recorded sent.
    store = StoreEvidence("2|2|2.b|1797354000|1", [line("2.b", "sent", claim="2", attempt=2)])
    assert (store.begun, store.finished, store.lost, store.unknown) == (2, 1, 1, 0)
    dup = duplicate([T0 + 9.0, T0 + 30], store)
    assert dup.by_time and dup.by_store and dup.explained and dup.cause == "lost attempt"


def test_a_delivery_recorded_before_an_earlier_copy_arrived_is_a_double_send():
    # The attempt recorded as sent began at T+8.5 s: the copy at T+9.0 s is its, and the one
    # at T+30 s came after the ledger said "sent", whatever attempt the store lost.
    store = StoreEvidence("2|2|2.b|1797354000|1",
                          [line("2.b", "sent", claim="2", attempt=2, began=T0 + 8.5)])
    assert store.lost == 1 and store.sent_started == [T0 + 8.5]
    dup = duplicate([T0 + 9.0, T0 + 30], store)
    assert dup.by_time and not dup.by_store and not dup.explained
    # No recorded delivery at all: nothing says which attempt sent the last copy.
    unsent = StoreEvidence("2|2|2.b", [line("1.a", "retrying")])
    assert unsent.lost == 1 and not duplicate([T0 + 9.0, T0 + 30], unsent).explained


def test_an_unknown_outcome_explains_a_resend_unless_it_was_then_recorded_sent():
    store = StoreEvidence("1|2|1.b|1797354000|1",
                          [line("1.a", "unknown", result="ok"), line("1.b", "sent", attempt=2)])
    assert (store.lost, store.unknown) == (0, 1)
    dup = duplicate([T0 + 9.0, T0 + 30], store)
    assert dup.explained and dup.cause == "unknown outcome"
    # A send a shutdown cut (unknown) that the provider accepted after all is recorded sent
    # with the same token: one attempt, its outcome known, nothing in doubt.
    settled = StoreEvidence("1|1|1.a|1797354000|1",
                            [line("1.a", "unknown"), line("1.a", "sent", result="ok")])
    assert (settled.begun, settled.finished, settled.lost, settled.unknown) == (1, 1, 0, 0)
    assert not duplicate([T0 + 9.0, T0 + 30], settled).explained


def test_a_resend_whose_every_attempt_is_recorded_is_a_double_send_even_near_a_kill():
    # Two begun attempts, both finished: a retry (nothing taken) and the delivery. A second
    # copy at the sink has no attempt that could have sent it unrecorded: a real double send.
    store = StoreEvidence("1|2|1.b|1797354000|1",
                          [line("1.a", "retrying"), line("1.b", "sent", attempt=2)])
    assert (store.begun, store.finished, store.lost, store.unknown) == (2, 2, 0, 0)
    dup = duplicate([T0 + 9.0, T0 + 30], store)
    assert dup.by_time and not dup.by_store and not dup.explained and dup.cause == ""
    assert "2 begun, 2 finished (1 sent), 0 never finished, 0 unknown outcome" in \
        store.summary()
    # Two recorded deliveries (two attempts sent it, each recorded): not explained either.
    twice = StoreEvidence("2|2|2.a|1797354000|1",
                          [line("1.a", "sent"), line("2.a", "sent", claim="2", attempt=2)])
    assert not duplicate([T0 + 9.0, T0 + 30], twice).explained


def test_hand_backs_and_defers_give_their_count_back_and_hide_no_lost_attempt():
    # Begun four times: a hand-back before sending (its finish took the count back), a
    # defer (the same), an attempt killed after the hand-over (no line), the delivery.
    store = StoreEvidence("3|2|3.a|1797354000|1", [
        line("1.a", "abandoned"), line("1.b", "deferred"),
        line("3.a", "sent", claim="3", attempt=2)])
    assert (store.begun, store.finished, store.lost) == (4, 3, 1)
    assert duplicate([T0 + 9.0, T0 + 30], store).explained
    # A stale defer (another claim owned it by then) took nothing back: its count stays.
    stale = StoreEvidence("2|2|2.a|1797354000|1", [
        line("1.a", "deferred", result="stale"), line("2.a", "sent", claim="2", attempt=2)])
    assert (stale.begun, stale.finished, stale.lost) == (2, 2, 0)
    assert not duplicate([T0 + 9.0, T0 + 30], stale).explained


def test_every_resend_needs_its_own_unrecorded_attempt():
    # Three copies: two resends, each near a kill; the store shows one lost attempt only.
    one = StoreEvidence("3|2|3.a|1797354000|1", [line("3.a", "sent", claim="3")])
    dup = duplicate([T0 + 9.9, T0 + 29.5, T0 + 45], one)
    assert dup.by_time and not dup.by_store and not dup.explained
    two = StoreEvidence("3|3|3.a|1797354000|1", [line("3.a", "sent", claim="3")])
    assert duplicate([T0 + 9.9, T0 + 29.5, T0 + 45], two).explained
    both = StoreEvidence("3|3|3.a|1797354000|1",
                         [line("2.a", "unknown", claim="2"), line("3.a", "sent", claim="3")])
    assert duplicate([T0 + 9.9, T0 + 29.5, T0 + 45], both).cause == \
        "lost attempt and unknown outcome"


def test_an_unreadable_or_trimmed_store_explains_no_lost_attempt():
    gone = StoreEvidence(None, [], error="ConnectionError: refused")
    assert not duplicate([T0 + 9.0, T0 + 30], gone).explained
    assert "store unreadable" in gone.summary()
    # The log keeps its last 50 lines: older finishes may be gone, the counts say nothing.
    lines = [line(f"{i}.a", "retrying", claim=str(i)) for i in range(50)]
    trimmed = StoreEvidence("60|60|59.a", lines)
    assert trimmed.trimmed and trimmed.lost == 0
    assert not duplicate([T0 + 9.0, T0 + 30], trimmed).explained


def test_the_fault_plan_alternates_workers_and_ends_the_outage():
    plan = fault_plan(DrillParams(**QUICK), T0)  # type: ignore[arg-type]
    assert [what for _, what in plan] == ["kill w1", "stop w2", "smtp down", "kill w2",
                                         "gateway fail", "kill redis", "pool w2", "smtp up",
                                         "gateway ok", "smtp cut"]
    at = {what: when for when, what in plan}
    assert at["smtp up"] - at["smtp down"] == QUICK["smtp_down_for"]
    assert at["gateway ok"] - at["gateway fail"] == QUICK["gateway_fail_for"]
    # A pool kill's explain window (2 s before it, 0.5 s after) overlaps no other kill's, nor
    # falls on a warm stop: a duplicate it explains is its own.
    kills = [when for when, what in plan if what.startswith(("kill", "stop"))]
    assert all(abs(at["pool w2"] - k) >= 2.5 for k in kills)
    full = fault_plan(DrillParams(), T0)
    assert [what for _, what in full if what.startswith("pool")] == ["pool w2", "pool w1",
                                                                   "pool w2"]
    # Redis is not killed while a warm stop may still be under way (a worker hands its
    # unacknowledged messages back to Redis as it stops: with Redis down it outlasts its
    # grace): a run of the full drill had its second stop 2.6 s before the Redis kill, and
    # that stop took 30 s.
    for each in (plan, full):
        redis_at = [when for when, what in each if what == "kill redis"]
        stops = [when for when, what in each if what.startswith("stop")]
        assert redis_at and all(not 0 <= r - s < 5.0 for r in redis_at for s in stops), (
            redis_at, stops)
    others = [when for when, what in full if what.startswith(("kill", "stop"))]
    assert all(abs(when - k) >= 2.5 for when, what in full if what.startswith("pool")
               for k in others)


# --- the competing changes, judged on made-up records ----------------------------------

OFFSETS = {"aftercare": 1.0, "spf": 3.0, "redness": 5.0, "check": 7.0}
B = "D-00001"
REFS = {B: [f"drill/{B}/aftercare:email", f"drill/{B}/spf:sms", f"drill/{B}/check:email"]}


def change(kind: str, committed: float = T0 + 20, new_start: float = 0.0) -> Change:
    return Change(kind, B, committed - 1, began=committed - 0.3, committed=committed,
                  outcome="ok", new_start=new_start)


def rems(**statuses: tuple[str, str]) -> dict[str, dict[str, str]]:
    return {f"drill/{B}/{k.replace('_', ':')}": {"status": st, "reason": why}
            for k, (st, why) in statuses.items()}


def no_store(ref: str) -> StoreEvidence:
    return StoreEvidence("1|1|1.a", [])


def test_the_changes_are_spread_and_no_booking_is_changed_twice():
    starts = [T0 + i for i in range(60)]
    changes = plan_changes(starts, 3, 3, 2)
    assert [c.kind for c in changes].count("cancel") == 3 and len(changes) == 8
    assert len({c.booking_id for c in changes}) == 8
    assert changes == sorted(changes, key=lambda c: c.at)
    assert all(starts[int(c.booking_id[2:])] < c.at <= starts[int(c.booking_id[2:])] + 7
               for c in changes)
    # More changes than bookings: each booking is changed once, and the plan ends.
    assert sorted(c.booking_id for c in plan_changes(starts[:3], 5, 5, 5)) == [
        "D-00000", "D-00001", "D-00002"]


def test_a_cancel_suppresses_what_was_pending_and_keeps_what_went_before():
    statuses = rems(aftercare_email=("sent", ""), spf_sms=("cancelled", "cancelled by the clinic"),
                    check_email=("cancelled", "cancelled by the clinic"))
    out = judge([change("cancel")], REFS, {REFS[B][0]: [T0 + 15]}, statuses, no_store,
                OFFSETS, T0)
    assert (out.cancelled, out.suppressed, out.sent_before) == (1, 2, 1)
    assert out.violations == [] and out.exceptions == []
    assert out.sent_refs == {REFS[B][0]}


def test_a_message_after_a_cancel_needs_its_delivery_begun_before_it():
    statuses = rems(aftercare_email=("sent", ""), spf_sms=("sent", ""),
                    check_email=("cancelled", "cancelled by the clinic"))
    copies = {REFS[B][0]: [T0 + 15], REFS[B][1]: [T0 + 20.4]}
    began = StoreEvidence("1|1|1.a|x|1", [line("1.a", "sent", began=T0 + 19.5)])
    out = judge([change("cancel")], REFS, copies, statuses, lambda ref: began, OFFSETS, T0)
    assert out.violations == [] and len(out.exceptions) == 1
    assert "past its last check" in out.exceptions[0]
    # Its delivery began after the cancel returned: the cancel's fence failed.
    late = StoreEvidence("1|1|1.a|x|1", [line("1.a", "sent", began=T0 + 20.2)])
    out = judge([change("cancel")], REFS, copies, statuses, lambda ref: late, OFFSETS, T0)
    assert len(out.violations) == 1 and "after the change" in out.violations[0]
    # Recorded cancelled, yet it arrived after the cancel: a violation whatever the store says.
    statuses = rems(aftercare_email=("sent", ""), spf_sms=("cancelled", "cancelled by the clinic"),
                    check_email=("cancelled", "cancelled by the clinic"))
    out = judge([change("cancel")], REFS, copies, statuses, no_store, OFFSETS, T0)
    assert len(out.violations) == 1 and "recorded cancelled" in out.violations[0]


def test_a_copy_before_the_change_recorded_cancelled_needs_an_unrecorded_attempt():
    statuses = rems(aftercare_email=("sent", ""), spf_sms=("cancelled", "cancelled by the clinic"),
                    check_email=("cancelled", "cancelled by the clinic"))
    copies = {REFS[B][0]: [T0 + 15], REFS[B][1]: [T0 + 19.0]}
    lost = StoreEvidence("1|1|1.a", [])  # begun, never finished: its worker was killed
    lost_one = StoreEvidence("1|2|1.a", [line("1.a", "abandoned", result="stale")])
    assert lost_one.lost == 1
    handed = {REFS[B][1]: [T0 + 18.9]}
    out = judge([change("cancel")], REFS, copies, statuses,
                lambda ref: lost_one if ref.endswith("sms") else lost, OFFSETS, T0, handed)
    assert out.violations == [] and len(out.exceptions) == 1
    out = judge([change("cancel")], REFS, copies, statuses, lambda ref: StoreEvidence(
        "1|1|1.a", [line("1.a", "sent")]), OFFSETS, T0, handed)
    assert len(out.violations) == 1
    # Accepted after the cancel returned, its worker killed: its hand-over at the sink began
    # before the cancel returned (so did its attempt): in flight. After it: a violation.
    copies[REFS[B][1]] = [T0 + 20.4]
    for at, ok in [(T0 + 19.9, True), (T0 + 20.1, False), (0.0, False)]:
        out = judge([change("cancel")], REFS, copies, statuses, lambda ref: lost_one, OFFSETS,
                    T0, {REFS[B][1]: [at]})
        assert (out.violations == [] and len(out.exceptions) == 1) is ok, at
    # Without the store's lost attempt, a hand-over before the change explains nothing.
    recorded = StoreEvidence("1|1|1.a", [line("1.a", "retrying")])
    out = judge([change("cancel")], REFS, copies, statuses, lambda ref: recorded, OFFSETS, T0,
                {REFS[B][1]: [T0 + 19.9]})
    assert len(out.violations) == 1


def test_an_opt_out_stops_the_sms_only_with_its_reason():
    statuses = rems(aftercare_email=("sent", ""), spf_sms=("skipped", "opted_out: STOP"),
                    check_email=("sent", ""))
    copies = {REFS[B][0]: [T0 + 15], REFS[B][2]: [T0 + 30]}
    out = judge([change("opt-out")], REFS, copies, statuses, no_store, OFFSETS, T0)
    assert (out.opted_out, out.suppressed, out.violations) == (1, 1, [])
    # Skipped for another reason than the opt-out: not what the STOP promises.
    statuses[REFS[B][1]] = {"status": "skipped", "reason": "expired"}
    out = judge([change("opt-out")], REFS, copies, statuses, no_store, OFFSETS, T0)
    assert len(out.violations) == 1 and "not opted_out" in out.violations[0]


def test_a_moved_message_goes_at_its_new_time_unless_it_was_on_its_way():
    move = change("move", committed=T0 + 20, new_start=T0 + 80)
    statuses = rems(aftercare_email=("sent", ""), spf_sms=("sent", ""), check_email=("sent", ""))
    copies = {REFS[B][0]: [T0 + 18], REFS[B][1]: [T0 + 83.2], REFS[B][2]: [T0 + 87.5]}
    out = judge([move], REFS, copies, statuses, no_store, OFFSETS, T0)
    assert (out.moved, out.moved_on_time, out.sent_before, out.violations) == (1, 2, 1, [])
    # The SMS at the old time, after the move returned: only if its delivery began before.
    copies[REFS[B][1]] = [T0 + 21.0]
    out = judge([move], REFS, copies, statuses, no_store, OFFSETS, T0)
    assert len(out.violations) == 1 and "before its new due T+83.00s" in out.violations[0]
    began = StoreEvidence("1|1|1.a|x|1", [line("1.a", "sent", began=T0 + 19.8)])
    out = judge([move], REFS, copies, statuses, lambda ref: began, OFFSETS, T0)
    assert out.violations == [] and "on its way at the old time" in out.exceptions[0]
    # Its worker killed after the hand-over (no line), sent again at the new time: in flight
    # if the hand-over began before the move returned and the store lost an attempt.
    copies[REFS[B][1]] = [T0 + 21.0, T0 + 83.5]
    resent = StoreEvidence("2|2|2.a|x|1", [line("2.a", "sent", claim="2", began=T0 + 83.1)])
    assert resent.lost == 1
    for at, ok in [(T0 + 19.7, True), (T0 + 20.2, False)]:
        out = judge([move], REFS, copies, statuses, lambda ref: resent, OFFSETS, T0,
                    {REFS[B][1]: [at, T0 + 83.3]})
        assert (out.violations == []) is ok and ("its outcome lost" in "".join(
            out.exceptions)) is ok, at
    # A moved reminder never sent is lost.
    statuses[REFS[B][2]] = {"status": "scheduled", "reason": ""}
    out = judge([move], REFS, {REFS[B][0]: [T0 + 18]}, statuses, no_store, OFFSETS, T0)
    assert len(out.violations) == 2


def test_a_change_never_applied_is_reported():
    out = judge([Change("cancel", B, T0, error="RuntimeError: 503")], REFS, {}, {}, no_store,
                OFFSETS, T0)
    assert out.failed == [f"cancel {B}: RuntimeError: 503"] and out.cancelled == 0


# --- the drill itself, small ----------------------------------------------------------------

def _run_quick_drill(workdir: Path):
    return run_drill(DrillParams(**QUICK), workdir), workdir  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory):
    # Run once, even when xdist spreads this module's tests over several workers.
    report, workdir = once_per_run("drill", tmp_path_factory, _run_quick_drill)
    print(render_report(report))  # shown by pytest when a test fails
    return report, workdir


@pytest.mark.integration
def test_nothing_lost_nothing_dead_lettered(drill):
    report, _ = drill
    # All 240 but those a cancel (4 each) or a STOP (the SMS) rightly stopped before they went.
    assert 60 * 4 - 3 * 4 - 2 <= report.expected <= 60 * 4 - report.change_outcome.suppressed
    assert report.lost == [], render_report(report)
    assert report.delivered == report.expected
    assert report.dead_letters == [], report.dead_letters
    assert report.unexpected == [], report.unexpected


@pytest.mark.integration
def test_every_duplicate_was_caused_by_a_kill(drill):
    report, _ = drill
    assert report.unexplained == [], render_report(report)
    for dup in report.duplicates:
        assert len(dup.copies) >= 2 and len(dup.explanations) == len(dup.copies) - 1
        assert all("before the" in why or "after the" in why for why in dup.explanations)
        # The store shows, for each resend, an attempt whose outcome went unrecorded.
        assert dup.store is not None and not dup.store.error, render_report(report)
        assert dup.store.lost + dup.store.unknown >= len(dup.copies) - 1, dup.store.summary()
    assert report.ok


@pytest.mark.integration
def test_the_faults_really_happened(drill):
    report, _ = drill
    assert report.worker_kills == 2 and report.redis_kills == 1
    # One pool process SIGKILLed alone; its worker's main process forked a replacement.
    (pool,) = [f for f in report.faults if f.kind == "pool kill"]
    assert report.pool_kills == 1 and report.unreplaced_pools == []
    assert "replaced by pid" in pool.detail, pool.detail
    # The gateway answered 503 to real sends (taking nothing) for its window.
    assert 7.5 <= report.gateway_fail_seconds <= 11, report.faults
    assert report.gateway_refused > 0, render_report(report)
    # The warm stop ended within its grace, its pool with it (else `failed_stops`).
    (stop,) = [f for f in report.faults if f.kind == "worker stop"]
    assert report.failed_stops == [] and stop.until - stop.at < QUICK["stop_grace"] + 10
    assert 9.5 <= report.smtp_down_seconds <= 13, report.faults
    # The outage dropped the workers' open SMTP sessions as it began, and a cut while up
    # dropped those open then (emails flowing after the outage): kept sessions really cut.
    assert [c["outage"] for c in report.smtp_cuts] == [True, False], report.smtp_cuts
    assert report.smtp_sessions_cut > 0, report.smtp_cuts
    assert [f.kind for f in report.faults].count("smtp cut") == 2
    # The outage made email reminders retry: somebody's timeline shows more than one attempt.
    assert report.retried > 0
    assert report.drain_seconds is not None and report.drain_seconds < 60


@pytest.mark.integration
def test_the_changes_kept_their_promise(drill):
    report, _ = drill
    outcome = report.change_outcome
    assert outcome.failed == [] and outcome.violations == [], render_report(report)
    assert (outcome.cancelled, outcome.moved, outcome.opted_out) == (3, 3, 2)
    assert report.notices == []  # the drill's protocol documents none
    # Something was really stopped: a cancel or STOP landed before some message was due.
    assert outcome.suppressed > 0, render_report(report)
    assert all(c.committed >= c.began > 0 for c in report.changes)


@pytest.mark.integration
def test_no_process_outlives_the_drill(drill):
    _, workdir = drill
    assert _processes_using(workdir) == []


def test_a_count_started_afresh_by_a_move_keeps_the_attempts_made_before():
    # The drill's D-00107 (a full run): two retries at version 1, then a move (the reminder
    # was retrying, not being sent: its budget starts afresh, the 2 made before kept as
    # "earlier", worker/store.py), a retry (#3), an attempt killed after the hand-over (#4,
    # no line), the delivery (#5). Compared with the budget's count alone (3) against every
    # line (4) the lost attempt was hidden.
    store = StoreEvidence("6|3+2|6.f|1797354000|2", [
        line("1.a", "retrying", attempt=1, claim="1"),
        line("2.a", "retrying", attempt=2, claim="2"),
        line("3.a", "retrying", attempt=3, claim="3"),
        line("6.f", "sent", attempt=5, claim="6")])
    assert (store.begun, store.finished, store.lost) == (5, 4, 1)
    assert duplicate([T0 + 9.0, T0 + 30], store).explained
    # Without the kill every attempt made has its line: nothing lost, and a second copy is
    # a double send.
    whole = StoreEvidence("6|2+2|6.f|1797354000|2", [
        line("1.a", "retrying", attempt=1, claim="1"),
        line("2.a", "retrying", attempt=2, claim="2"),
        line("3.a", "retrying", attempt=3, claim="3"),
        line("6.f", "sent", attempt=4, claim="6")])
    assert (whole.begun, whole.finished, whole.lost) == (4, 4, 0)
    assert not duplicate([T0 + 9.0, T0 + 30], whole).explained
