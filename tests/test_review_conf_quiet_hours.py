"""Review (revconf): a clinic whose SMS go to a real provider may not open its send window
before 08:00 or close it after 21:00 patient-local (DOMAIN.md "US quiet hours", 47 CFR
64.1200(c)(1)). `reminders check` accepted such a window silently; it now fails naming the
file and the field. A clinic writing its SMS to the local outbox (the demo) texts nobody."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_check import EXIT_CONFIG, EXIT_OK, check_copy, copy  # noqa: F401

URLS = ('sms = "json://sms.example/${QH_TOKEN}/{to}"\n'
        'email = "mailto://smtp.example?from=desk@glow.example&to={to}"\n')


def _glow(copy: Path, start: str, end: str) -> Path:  # noqa: F811
    clinic = copy / "config" / "clinics" / "glow.toml"
    text = clinic.read_text().replace('start = "09:00"\nend = "20:00"',
                                      f'start = "{start}"\nend = "{end}"', 1)
    assert f'start = "{start}"' in text
    clinic.write_text(text + URLS)
    return clinic


@pytest.mark.parametrize(("start", "end"), [("07:30", "20:00"), ("09:00", "21:30"),
                                            ("00:00", "24:00")])
def test_an_sms_window_in_quiet_hours_fails_check(copy: Path, start: str,  # noqa: F811
                                                  end: str) -> None:
    clinic = _glow(copy, start, end)
    result = check_copy(copy, env={"QH_TOKEN": "x"})
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"configuration error: {clinic}: send_window: {start}-{end} lets SMS arrive in "
            "US quiet hours" in result.stderr)
    assert "demo.toml" not in result.stderr  # its SMS go to the outbox: nobody is texted


def test_the_widest_lawful_window_passes(copy: Path) -> None:  # noqa: F811
    _glow(copy, "08:00", "21:00")
    result = check_copy(copy, env={"QH_TOKEN": "x"})
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
