"""The SMS cap's two counts of a stored booking's SMS agree: `_sms_slots` in Python (what an
upsert and `send_caps_read` read) and `sms_slots` in the finish's Lua (`_CAPS_GUARD`, what
the finish and the restamp check), over random stored hashes in a real Redis: reminder keys
of every kind (the plan's, notices, messages again, the pause again, the hold notice), every
status code and an unknown one, due left empty or not, flags ("b", "s", "#<n>", an "s" after
the "#"; "r" beside them), reasons holding "|", attempt fields with or without a sent_at, and
the booking held or not. Any difference would make the finish refuse ("caps changed") what was
read, forever, or accept what changed."""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.status import Status
from worker.store import (
    _CAPS_GUARD,
    _OPT_OUT,
    _PRELUDE,
    REMINDER_SLOTS,
    STATUS_CODE,
    STATUS_OF,
    _sms_slots,
    _split,
    _without_flag,
)

STEPS = ["evening", "day-before", "again-day-before", "again-prep#2", "rescheduled#1",
         "cancelled#3", "repause#2", "hold-notice", "hold-notice#2", "check",
         "stop-retinoids#4"]
EPOCHS = st.sampled_from(["1797354000", "1797354000.25", "1797440400", "17", "0.5"])
SLOT = st.one_of(st.just(""), EPOCHS)
FLAGS = st.sampled_from(["", "s", "b", "bs", "sb", "s#2", "#3", "b#2", "#s", "bs#2",
                         "r", "rs", "sr#2", "rbs", "r#s"])  # "r": a replay, an unknown retry
REASON = st.sampled_from(["", "why", "a|b", "@t1", "x|y|z"])
CODES = [*STATUS_CODE.values(), "Z", ""]


@st.composite
def reminder(draw: st.DrawFn) -> tuple[str, str, str | None]:
    key = f"{draw(st.sampled_from(STEPS))}:{draw(st.sampled_from(['sms', 'email']))}"
    slots = [draw(st.sampled_from(CODES)), "3", draw(EPOCHS), draw(SLOT), draw(SLOT), "",
             "", draw(FLAGS), draw(REASON)]
    main = "|".join(slots)
    if draw(st.booleans()):
        main = main.rstrip("|")  # trailing empty slots left out, as stored
    extra = None
    if draw(st.booleans()):
        extra = "|".join(["c1", "1", "tok", draw(SLOT), draw(st.sampled_from(["", "2"])),
                          draw(REASON)])
    return key, main, extra


@st.composite
def booking_hash(draw: st.DrawFn) -> dict[str, str]:
    fields: dict[str, str] = {"version": "3"}
    status = draw(st.sampled_from(["scheduled", "held", "cancelled", "completed", None]))
    if status is not None:
        fields["status"] = status
    for key, main, extra in draw(st.lists(reminder(), max_size=8, unique_by=lambda r: r[0])):
        fields[key] = main
        if extra is not None:
            fields[key + "+"] = extra
    return fields


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=booking_hash(), skip_any=st.booleans())
def test_python_and_lua_count_the_same_sms(redis_client, fields, skip_any):
    script = redis_client.register_script(
        _PRELUDE + _CAPS_GUARD + "\nreturn sms_slots(KEYS[1], ARGV[1])")
    keys = [k for k in fields if ":" in k and not k.endswith("+")]
    skip = keys[0] if skip_any and keys else ""
    redis_client.delete("prop:b")
    redis_client.hset("prop:b", mapping=fields)
    lua = [v.decode() if isinstance(v, bytes) else v
           for v in script(keys=["prop:b"], args=[skip])]
    assert Counter(lua) == Counter(_sms_slots(fields, skip)), fields


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=booking_hash())
def test_python_and_lua_take_the_same_emails_off_sms(redis_client, fields):
    """An email still to go that an attempt took by SMS (flag "s") loses its flag the same
    way in Python (the upsert's `_without_flag`, 01ed5e3) as in Lua (the opt-in's unflag,
    the begin's): the same stored field, so the same count both sides, and the email no
    longer counted as an SMS."""
    keys = [k for k, v in fields.items() if k.endswith(":email")
            and "s" in _split(v, len(REMINDER_SLOTS))[7].split("#", 1)[0]
            and STATUS_OF.get(_split(v, len(REMINDER_SLOTS))[0])
            in (Status.SCHEDULED, Status.RETRYING)]
    redis_client.delete("prop:b:c/b1")
    redis_client.hset("prop:b:c/b1", mapping=fields)
    script = redis_client.register_script(_PRELUDE + _OPT_OUT)
    script(keys=["prop:optout:c", "prop:due", "prop:lease"],
           args=["prop", "c", "email", "a@example.com", "why", "in", "", "", "[]", "[]",
                 '[[],"",[]]', json.dumps([["b1", k] for k in keys])])
    lua = redis_client.hgetall("prop:b:c/b1")
    python = {**fields, **{k: _without_flag(fields[k], "s") for k in keys}}
    if keys:
        python["smsv"] = "1"
    # (the script writes an attempt field back as stored: its trailing empty slots left out)
    assert {k: v.rstrip("|") if k.endswith("+") else v for k, v in lua.items()} == {
        k: v.rstrip("|") if k.endswith("+") else v for k, v in python.items()}, fields
    counts = redis_client.register_script(
        _PRELUDE + _CAPS_GUARD + "\nreturn sms_slots(KEYS[1], ARGV[1])")
    got = [v.decode() if isinstance(v, bytes) else v
           for v in counts(keys=["prop:b:c/b1"], args=[""])]
    assert Counter(got) == Counter(_sms_slots(python)), fields
    assert Counter(_sms_slots(python)) == Counter(
        _sms_slots({k: v for k, v in fields.items() if k not in keys}))
