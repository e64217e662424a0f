"""worker/logs.py `scrub` skips its expressions on lines without "@", "%40", "+" or "%2B":
the same result as running every expression, on realistic lines and random ones."""

from __future__ import annotations

import random

from worker.logs import _EMAIL, _PHONE, _URL_USER, scrub


def every_expression(text: str) -> str:
    text = _URL_USER.sub(r"\1****@", text)
    text = _EMAIL.sub("[email]", text)
    return _PHONE.sub("[phone]", text)


LINES = [
    "send glow/A-1042/day-before:sms: sent (attempt 1, sms)",
    "send glow/A-1042/prep:email: transient failure on attempt 2 (SMTP 451); retry at ...",
    "Sending Email to ana@example.com via smtp.glow.example:587",
    "Sending Email to JOSÉ%40example.es",
    "mailtos://user:secret@smtp.glow.example?to=ana@example.com",
    "json://127.0.0.1:9999/sms?:to=%2B34600111222",
    "SMS to +34 600 111 222 failed.",
    "SMS to +1 (415) 555-0100 failed; 5+3 = 8",
    "a+b@c.d and +44 20 7946 0958",
]


def test_the_shortcut_changes_no_line():
    rng = random.Random(7)
    alphabet = "ab@.+%24B0 1:/-_éx\u00a0()" + "40" * 3
    lines = LINES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                     for _ in range(20_000)]
    for line in lines:
        assert scrub(line) == every_expression(line), line
    assert scrub(LINES[0]) == LINES[0]
    assert "[email]" in scrub(LINES[2]) and "[phone]" in scrub(LINES[6])
