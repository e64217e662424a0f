"""Review (apihooks): the clinic events the API writes follow the configuration as edited.

The API reads config/ again while it runs, but its store worked out once, at start, what
each clinic is told of (Store(hooks=...)): a webhook added to a clinic file while the API
ran was told nothing of events the API itself writes (the reminders a patient's STOP
skips) until a restart. Real uvicorn, real Redis, Twilio-signed form
posts, events delivered signed to a real webhook receiver."""

from __future__ import annotations

import time

from tests.api.test_consent_events import delivered, receiver  # noqa: F401  (fixture)
from tests.api.test_inbound import PUBLIC, SECRET, TOKEN, book, message_of, text, write_config

HOOK = '[webhook]\nurl = "http://127.0.0.1:9/hooks"\nsecret = "${TW_HOOK_SECRET}"\n'


def test_a_webhook_added_while_the_api_runs_is_told_of_what_the_api_writes(
        serve, tmp_path, monkeypatch, receiver) -> None:  # noqa: F811
    monkeypatch.setenv("TW_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TW_HOOK_SECRET", "whsec-consent-0123456789")
    config = write_config(tmp_path / "config")
    clinic = config / "clinics" / "tw.toml"
    with_hook = clinic.read_text(encoding="utf-8")
    assert HOOK in with_hook
    clinic.write_text(with_hook.replace(HOOK, ""), encoding="utf-8")  # no webhook at start
    server = serve(config_dir=config, public_url=PUBLIC, unsubscribe_secret=SECRET,
                   data_dir=tmp_path / "data")
    with server.client(server.issue_key("tw")) as tw:
        book(tw, "A-1")
        clinic.write_text(with_hook.replace("http://127.0.0.1:9/hooks", receiver.url),
                          encoding="utf-8")
        # config/ is looked at again at most once a second and read once it held still
        # for a look: within about two seconds.
        for _ in range(2):
            time.sleep(1.2)
            assert tw.get("/v1/bookings/A-1").status_code == 200
        assert server.app.state.services.catalog.clinics["tw"].webhook is not None
        assert message_of(text(server, "STOP")) is not None
    got = {(e["type"], e["booking_id"]) for e in delivered(server, receiver)}
    assert ("patient.replied", "A-1") in got, got
    assert ("reminder.skipped", "A-1") in got, got  # its SMS reminders, skipped by STOP
