"""The SMS cap's two counts of a stored booking's SMS agree: `_sms_slots` in Python (what an
upsert and `send_caps_read` read) and `sms_slots` in the finish's Lua (`_CAPS_GUARD`, what
the finish and the restamp check), over random stored hashes in a real Redis: reminder keys
of every kind (the plan's, notices, messages again, the pause again, the hold notice), every
status code and an unknown one, due left empty or not, flags ("b", "s", "#<n>", an "s" after
the "#"), reasons holding "|", attempt fields with or without a sent_at, and the booking
held or not. Any difference would make the finish refuse ("caps changed") what was read,
forever, or accept what changed."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.store import _CAPS_GUARD, _PRELUDE, STATUS_CODE, _sms_slots

STEPS = ["evening", "day-before", "again-day-before", "again-prep#2", "rescheduled#1",
         "cancelled#3", "repause#2", "hold-notice", "hold-notice#2", "check",
         "stop-retinoids#4"]
EPOCHS = st.sampled_from(["1797354000", "1797354000.25", "1797440400", "17", "0.5"])
SLOT = st.one_of(st.just(""), EPOCHS)
FLAGS = st.sampled_from(["", "s", "b", "bs", "sb", "s#2", "#3", "b#2", "#s", "bs#2"])
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
