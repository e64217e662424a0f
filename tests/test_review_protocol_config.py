"""Review (protocols): what a clinic's own protocol and clinic files may say, run through
`reminders check` as a process on a scratch copy of config/ and templates/, and where a
file's effect is on what is sent, through the real planner.

Each case is a file `reminders check` used to accept although the worker cannot honour it:
the clinic must get an error naming the file, the step and the field instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_check import EXIT_CONFIG, check_copy, copy  # noqa: F401


def edit(path: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there, once) by `new` in the file at `path`."""
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new), encoding="utf-8")


# --- an isotretinoin washout of 0 days ----------------------------------------------------


@pytest.mark.parametrize(("file", "old", "new"), [
    ("protocols/microneedling.toml", "isotretinoin_washout_days = 182",
     "isotretinoin_washout_days = 0"),
    ("clinics/glow.toml", 'timezone = "Europe/Madrid"',
     'timezone = "Europe/Madrid"\nisotretinoin_washout_days = 0'),
])
def test_an_isotretinoin_washout_of_0_days_is_refused(copy: Path, file: str, old: str,  # noqa: F811
                                                      new: str) -> None:
    """A washout of 0 days holds no booking ever (the planner holds a dose fewer than the
    washout's days before the visit; a dose after today is refused): a patient who took
    isotretinoin yesterday is microneedled with no review, while the confirmation and prep
    emails still ask about "the last 6 months" (a clinic's 0 leaves the protocol's months
    in the words). A gate that is not wanted is left out of the protocol; 0 is refused."""
    path = copy / "config" / file
    edit(path, old, new)
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"configuration error: {path}: isotretinoin_washout_days: " in result.stderr, (
        result.stderr)
    assert "Traceback" not in result.stderr
