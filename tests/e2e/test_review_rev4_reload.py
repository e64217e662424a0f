"""Review (rev4): a config/ file edited while the worker runs into one that cannot be read.

Since 54682d1 a worker reads config/ again when a protocol or clinic file changes, and an
edit that does not load keeps the configuration loaded before. A clinic file saved in
Latin-1 (an editor on Windows writing "Dra. Muñoz") is not UTF-8: tomllib raised
UnicodeDecodeError, not the ConfigError the reload keeps the old configuration on, so the
send attempt that looked (one a second per process) ended as 'attempt not completed' and
waited for its lease (never named the file). Real Redis, Celery worker and beat, aiosmtpd.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import wait_until
from tests.sinks import WebhookReceiver

SECRET = "e2e-webhook-secret-0123456789"


def test_a_clinic_file_edited_into_latin1_keeps_the_loaded_config_and_sends_at_once(
        service, e2e_config: Path, smtp_sink, make_booking) -> None:
    worker = service.up()
    service.book(make_booking("B-1", starts_in=10.0))
    wait_until(lambda: any(m.to == "b-1@example.com" for m in smtp_sink.snapshot()), 10)
    clinic = e2e_config / "clinics" / "e2e.toml"
    clinic.write_bytes(clinic.read_bytes() + "# Dra. Muñoz\n".encode("latin-1"))
    # The reminder before the visit (8 s before) sees the edit, the aftercare (2 s after
    # the visit) reads config/ again (it held still: 1c64755) and must not wait for its
    # lease (10 s) to be sent.
    # (The CLI reads config/ as it starts: not used after the edit.)
    wait_until(lambda: len([m for m in smtp_sink.snapshot() if m.to == "b-1@example.com"])
               >= 3, 15, interval=0.3)
    log = worker.log_path.read_text(encoding="utf-8", errors="replace")
    assert "attempt not completed" not in log, log[-3000:]
    assert "does not load" in log and str(clinic) in log, log[-3000:]


def test_a_webhook_added_while_the_worker_runs_is_told_of_the_sends_after_the_reload(
        service, e2e_config: Path, sms_sink, smtp_sink, make_booking) -> None:
    # The worker reads the clinic file again (54682d1), but the events each clinic takes
    # were worked out once, at start (Store(hooks=...)): a webhook added while it ran was
    # in the configuration it sent with and was told nothing until a restart.
    receiver = WebhookReceiver(SECRET).start()
    try:
        service.configure(E2E_WEBHOOK_SECRET=SECRET).up()
        service.book(make_booking("W-1", starts_in=10.0))
        wait_until(lambda: any(m.to == "w-1@example.com" for m in smtp_sink.snapshot()), 10)
        clinic = e2e_config / "clinics" / "e2e.toml"
        clinic.write_text(clinic.read_text(encoding="utf-8") + f'[webhook]\nurl = '
                          f'"{receiver.url}"\nsecret = "${{E2E_WEBHOOK_SECRET}}"\n',
                          encoding="utf-8")
        # The reminder before the visit (2 s from now) reads the edit if it held still for
        # a second by then (58d7b4b), or sees it and leaves it to the next look; the
        # aftercare (12 s) reads it either way (a webhook's delivery follows the send within
        # a second or so). The confirmation, sent before the edit, is told to no one.
        wait_until(lambda: len([m for m in smtp_sink.snapshot() if m.to == "w-1@example.com"])
                   >= 3, 20, interval=0.3)

        def told() -> set[str]:
            return {h.json()["reminder"] for h in receiver.snapshot()
                    if h.json()["type"] == "reminder.sent"}

        wait_until(lambda: "aftercare:email" in told(), 4)
        assert told() <= {"prep:sms", "prep:email", "aftercare:email", "spf:sms"}, told()
        assert "confirm:email" not in told()
    finally:
        receiver.gate.set()
        receiver.stop()
