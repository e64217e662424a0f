"""Review (revconf): a protocol table header with a trailing comment, as
config/protocols/README.md writes `[advice]   # what the messages state, ...`, is valid TOML
and loads; `reminders check` read the comments of such a file as if the table were another
one: every advice value then had "no source comment" (exit 3, though its source is written
above it), and a `[[steps]]  # ...` step lost its comments in `--sources`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_check import EXIT_OK, check_copy, copy  # noqa: F401


def test_table_headers_with_a_trailing_comment(copy: Path) -> None:  # noqa: F811
    path = copy / "config" / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    assert "\n[advice]\n" in text and '\n[[steps]]\nid = "booking-confirmation"' in text
    text = text.replace("\n[advice]\n", "\n[advice]      # what the messages state\n", 1)
    text = text.replace('\n[[steps]]\nid = "booking-confirmation"',
                        '\n[[steps]]     # the confirmation\nid = "booking-confirmation"', 1)
    path.write_text(text, encoding="utf-8")
    result = check_copy(copy, "--sources", "--json")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    sources = {(s["protocol"], s["step"]): s for s in json.loads(result.stdout)["sources"]}
    claims = {c["key"]: c for c in sources[("microneedling", "aftercare")]["claims"]}
    assert "seeds/002" in claims["makeup_free_days"]["source"]
    confirmation = sources[("microneedling", "booking-confirmation")]
    assert "confirmation + the prep plan with dates" in confirmation["timing"]
