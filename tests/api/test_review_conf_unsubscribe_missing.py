"""Review (config read again while running): the API reads config/ again (415e358). While a
clinic's file is missing from it (deleted by mistake, or for two looks while a deploy
rewrites config/), a patient's unsubscribe (the page's button, a mail provider's RFC 8058
one-click POST) answered 'This link is not valid' and changed nothing: the token and the
address behind it are in Redis, not in the clinic's file, yet the opt-out was lost, and the
clinic's emails went on once its file was back. The unsubscribe is taken; the clinic is told
of it once, through its configuration as last loaded (`Catalog.former`, as a STOP is,
77fe138): it was told only if the patient clicked again after the file was back. Real
uvicorn, real Redis, the clinic events delivered signed to a real receiver."""

from __future__ import annotations

import time

from tests.api.test_consent_events import receiver, replied, server, tw  # noqa: F401
from tests.api.test_inbound import book, link_for


def test_an_unsubscribe_while_the_clinic_file_is_missing_is_taken(
        server, tw, receiver) -> None:  # noqa: F811
    book(tw, "A-1")
    path = link_for(server, "ana@example.com")
    clinic = server.settings.config_dir / "clinics" / "tw.toml"
    text = clinic.read_text(encoding="utf-8")
    clinic.unlink()
    time.sleep(1.2)  # missing for longer than an edit: the API reads config/ without it
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
        assert "tw" not in server.app.state.services.catalog.clinics
        done = client.post(path, content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "unsubscribed" in done.text, done.text
    store = server.app.state.services.store
    assert store.opted_out("tw", "email", "ana@example.com")
    clinic.write_text(text, encoding="utf-8")  # back
    time.sleep(1.2)
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
        assert "tw" in server.app.state.services.catalog.clinics
    # Told once, without the patient clicking again.
    assert replied(server, receiver) == [("A-1", "unsubscribe", "email")]
    with server.client() as client:  # a click again tells nothing more
        again = client.post(path, content="List-Unsubscribe=One-Click",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert again.status_code == 200 and "unsubscribed" in again.text
    assert replied(server, receiver) == [("A-1", "unsubscribe", "email")]
