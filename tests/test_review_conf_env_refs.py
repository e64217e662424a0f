"""Review (revconf): a channel URL's `${...}` that is not an environment variable reference
the worker fills in (capitals, digits and `_`: `${Glow_Token}`, `${GLOW-TOKEN}`, an unclosed
`${GLOW_TOKEN`) was kept literally: `reminders check` passed without a word and every send
went to the provider with the text `${...}` in its URL. It is now refused, naming the file
and the channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_check import EXIT_CONFIG, check_copy, copy  # noqa: F401


@pytest.mark.parametrize("ref", ["${glow_token}", "${GLOW-TOKEN}", "${GLOW_TOKEN"])
def test_a_reference_the_worker_cannot_fill_is_refused(copy: Path, ref: str) -> None:  # noqa: F811
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text()
                      + f'sms = "json://sms.example/{ref}/send?:to={{to}}"\n'
                      + 'email = "mailto://smtp.example?from=desk@glow.example&to={to}"\n')
    result = check_copy(copy, env={"glow_token": "x", "GLOW_TOKEN": "x"})
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"configuration error: {clinic}: channels.sms: " in result.stderr
            and "environment variable" in result.stderr), result.stderr
