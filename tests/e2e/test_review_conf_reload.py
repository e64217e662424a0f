"""Review (revconf): a clinic edits a protocol and a template together while the worker runs.

The worker picks up an edited template within a second (worker/rendering.py), and used to
keep the protocols and clinics it read at start until it was restarted. An edit that adds
an `[advice]` value and the template line stating it, which `reminders check` passes, then
rendered the new template with the old protocol: every such message failed for good
("cannot render ...", dead-lettered) until someone restarted the worker. Real Redis, real
Celery worker and beat, real aiosmtpd server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import ROOT
from tests.e2e.conftest import wait_until

LINE = "\nAvoid the gym for {{ advice.gym_free_hours }} hours.\n"


def test_a_protocol_and_template_edit_while_running_is_sent_with_both(
        tmp_path, service, e2e_config: Path, smtp_sink, make_booking) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    service.configure(REMINDERS_TEMPLATES_DIR=str(templates))
    service.up()
    service.book(make_booking("B-1", starts_in=12.0))
    # The worker has read the config: the confirmation went out.
    wait_until(lambda: any(m.to == "b-1@example.com" for m in smtp_sink.snapshot()), 15)
    # The edit: a new advice value with its source, and the aftercare email stating it.
    protocol = e2e_config / "protocols" / "quick.toml"
    protocol.write_text(protocol.read_text(encoding="utf-8")
                        + "# No gym for 72 hours (clinic practice: review).\n"
                        + "gym_free_hours = 72\n", encoding="utf-8")
    text = templates / "en" / "microneedling-aftercare.email.txt.j2"
    text.write_text(text.read_text(encoding="utf-8").replace(
        '{% include "en/_footer', LINE + '{% include "en/_footer', 1), encoding="utf-8")
    assert "gym_free_hours" in text.read_text(encoding="utf-8")
    check = service.cli("check")
    assert "gym_free_hours" not in check.stderr, check.stderr

    def aftercare():
        return [m for m in smtp_sink.snapshot()
                if m.to == "b-1@example.com" and "Avoid the gym" in m.text] or [
            r for r in service.show("B-1")["reminders"]
            if r["id"] == "aftercare:email" and r["status"] in ("failed", "dead")]

    found = wait_until(aftercare, 25, interval=0.3)
    assert not isinstance(found[0], dict), found  # not failed for good
    assert "Avoid the gym for 72 hours." in found[0].text
    (reminder,) = [r for r in service.show("B-1")["reminders"] if r["id"] == "aftercare:email"]
    assert reminder["status"] == "sent", reminder
