"""Review (revconf): a step's time out of range. `offset = "999999999999d"` crashed
`reminders check` (and the worker's start) with an OverflowError traceback naming neither
the file nor the field; `day = 100000000` (or a series' `through_day`) loaded, and then
every booking of the protocol failed to plan (OverflowError: a 500 from the API, a
traceback from `reminders book`; a huge `through_day` a list of that many days). A step
more than a year from the appointment is now refused, naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_check import EXIT_CONFIG, check_copy, copy  # noqa: F401


@pytest.mark.parametrize(("when", "field"), [
    ('offset = "999999999999d"', "steps.4.offset"),
    ('offset = "-367d"', "steps.4.offset"),
    ('day = 100000000\ntime = "10:00"', "steps.4.day"),
    ('day = 1\ntime = "10:00"\n[steps.repeat]\nthrough_day = 100000000\nevery_days = 1',
     "steps.4.repeat.through_day"),
])
def test_a_step_more_than_a_year_away_is_refused(copy: Path, when: str,  # noqa: F811
                                                  field: str) -> None:
    path = copy / "config" / "protocols" / "demo.toml"
    text = path.read_text(encoding="utf-8")
    # The demo's spf step (steps.4), wherever it stands in the file.
    assert text.count('offset = "30s"\nchannels = ["sms"]\ntemplate = "spf-morning"') == 1
    text = text.replace('offset = "30s"\nchannels = ["sms"]\ntemplate = "spf-morning"',
                        f'channels = ["sms"]\ntemplate = "spf-morning"\n{when}', 1)
    path.write_text(text, encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"configuration error: {path}: {field}: " in result.stderr, result.stderr
