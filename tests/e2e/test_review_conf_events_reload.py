"""Review (config read again while running): the clinic's events are delivered with the
configuration of the process that delivers them, and only a send attempt read config/ again
(worker/dispatch.py). A worker with no reminder to send (a quiet hour, a held booking: no
patient message) delivered every clinic event with the clinic file as at its start: the
held-booking alert went to the clinic's old address after the clinic changed it (and a
webhook to its old URL, signed with its old secret). Real Redis, Celery worker and beat,
aiosmtpd, a real webhook receiver."""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.conftest import wait_until
from tests.e2e.test_webhooks import RECENT_DOSE, by_type, hooked, receiver
from worker.catalog import CONFIG_RECHECK_SECONDS, CONFIG_STILL_SECONDS

__all__ = ["hooked", "receiver"]  # the fixtures, used by name


def test_a_held_alert_goes_to_the_clinic_address_as_edited_while_the_worker_ran(
        hooked, receiver, e2e_config: Path, make_booking, smtp_sink) -> None:
    hooked.up()
    clinic = e2e_config / "clinics" / "e2e.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8").replace(
        'email = "desk@e2e.test"', 'email = "review@e2e.test"'), encoding="utf-8")
    # A running process reads config/ again once the edit held still for a look, and looks
    # at most once a second (worker/catalog.py `fresh`): a look just after the edit only
    # notes it, the next one, a second later, reads it. 1.5 s was once the wait here, and a
    # loaded full run saw the alert go with the configuration as before the edit.
    time.sleep(CONFIG_STILL_SECONDS + CONFIG_RECHECK_SECONDS + 1.0)
    held = make_booking("W-9", starts_in=3600)
    held["medications"] = {"isotretinoin_last_dose": RECENT_DOSE}
    (timeline,) = hooked.book(held)
    assert timeline["status"] == "held"
    wait_until(lambda: by_type(receiver)["booking.held"] == 1, 30)
    wait_until(lambda: smtp_sink.snapshot(), 30)
    time.sleep(0.5)  # nothing else arrives
    assert [m.to for m in smtp_sink.snapshot()] == ["review@e2e.test"]
