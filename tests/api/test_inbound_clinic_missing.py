"""A patient's STOP while the clinic's file is missing from config/ as the API reads it
(deleted by mistake, or missing for two looks while a deploy rewrites config/): the Twilio
signature is checked with the clinic's auth token, named in that file, so the STOP was
answered 403 as from an unknown clinic; Twilio does not retry an inbound message, and the
opt-out was lost: the clinic's SMS went on once its file was back.

The API keeps the clinics of the configuration it read before (`Catalog.former`) for the
patients' texts: the signature is checked with the clinic's token as last loaded, the STOP
taken and confirmed, a forged one still refused. The clinic hears of it once its file is
back. Real uvicorn, real Redis, the clinic events delivered signed to a real receiver.
"""

from __future__ import annotations

import time

from tests.api.test_consent_events import receiver, replied, server, tw  # noqa: F401
from tests.api.test_inbound import ANA, EVA, PUBLIC, book, message_of, text
from worker.optout import twilio_signature


def test_a_stop_while_the_clinic_file_is_missing_is_taken(server, tw, receiver):  # noqa: F811
    book(tw, "A-1")
    book(tw, "E-1", phone=EVA, email="eva@example.com")
    clinic = server.settings.config_dir / "clinics" / "tw.toml"
    content = clinic.read_text(encoding="utf-8")
    clinic.unlink()
    time.sleep(1.2)  # missing for longer than an edit: the API reads config/ without it
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
    services = server.app.state.services
    assert "tw" not in services.catalog.clinics
    store = services.store

    answer = message_of(text(server, "STOP"))  # signed with the clinic's token
    assert answer is not None and "no more texts from us" in answer, answer
    assert store.opted_out("tw", "sms", ANA) is not None
    sms = [r for r in store.timeline("tw", "A-1")["reminders"] if r["channel"] == "sms"]
    assert sms and all(r["status"] == "skipped" and r["reason"].startswith("opted_out: ")
                       for r in sms), sms
    assert not [ref for ref in store.redis.zrange(store.due_key, 0, -1)
                if ref.startswith("tw/A-1/") and ref.endswith(":sms")]

    # A forged STOP (another number, another token) is still refused and changes nothing.
    forged = twilio_signature("not-the-token", PUBLIC + "/v1/inbound/sms/tw",
                              [("From", EVA), ("Body", "STOP")])
    assert text(server, "STOP", sender=EVA, signature=forged).status_code == 403
    assert text(server, "STOP", sender=EVA, sign=False).status_code == 403
    assert store.opted_out("tw", "sms", EVA) is None

    clinic.write_text(content, encoding="utf-8")  # back
    time.sleep(1.2)
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
    services = server.app.state.services
    assert "tw" in services.catalog.clinics and "tw" not in services.catalog.former
    assert replied(server, receiver) == [("A-1", "stop", "sms")]  # the clinic is told once
    assert message_of(text(server, "STOP")) is None  # one confirmation, then nothing
    assert store.opted_out("tw", "sms", ANA) is not None


def test_only_a_stop_is_acted_on_while_the_clinic_file_is_missing(server, tw, receiver):  # noqa: F811
    """`former` is for a STOP's signature only: nothing is planned or sent for a clinic
    not in config/. A START while its file was missing put the opted-out SMS back into the
    schedule for that clinic and answered 'texts are back on'; a confirm was recorded and
    answered with its visit's date."""
    book(tw, "A-1")
    assert "no more texts from us" in (message_of(text(server, "STOP")) or "")
    store = server.app.state.services.store
    clinic = server.settings.config_dir / "clinics" / "tw.toml"
    content = clinic.read_text(encoding="utf-8")
    clinic.unlink()
    time.sleep(1.2)  # missing for longer than an edit: the API reads config/ without it
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
    assert "tw" in server.app.state.services.catalog.former

    for body in ("START", "C", "HELP"):
        assert message_of(text(server, body)) is None, body
    assert store.opted_out("tw", "sms", ANA) is not None  # the START not taken
    assert not [ref for ref in store.redis.zrange(store.due_key, 0, -1)
                if ref.startswith("tw/A-1/") and ref.endswith(":sms")]  # none put back
    assert not store.timeline("tw", "A-1").get("confirmed_at")

    clinic.write_text(content, encoding="utf-8")  # back: a START is taken again
    time.sleep(1.2)
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
    assert message_of(text(server, "START")) is not None
    assert store.opted_out("tw", "sms", ANA) is None


def test_a_clinic_write_while_its_file_is_missing_is_503_to_send_again(server, tw):  # noqa: F811
    """While the clinic's file is missing from config/ (a deploy rewriting it), its PUT,
    batch and release were refused 422 "clinic: unknown clinic 'tw'", "the booking was
    refused": an answer a clinic's system takes as final (the booking is wrong, do not send
    it again), so the booking was never stored and its patient got no reminders. The key
    says the clinic is real and the API knew its file a moment ago: 503 with Retry-After,
    nothing stored, and the same request works once the file is back."""
    from tests.api.conftest import future_booking, held_booking

    held = held_booking("H-1") | {"clinic": "tw"}
    assert tw.put("/v1/bookings/H-1", json=held).status_code == 201
    store = server.app.state.services.store
    clinic = server.settings.config_dir / "clinics" / "tw.toml"
    content = clinic.read_text(encoding="utf-8")
    clinic.unlink()
    time.sleep(1.2)  # missing for longer than an edit: the API reads config/ without it
    assert tw.get("/v1/bookings/H-1").status_code == 200
    assert "tw" in server.app.state.services.catalog.former
    before = sorted(store.redis.keys("*"))

    doc = future_booking("N-1", clinic="tw")
    for answer in (tw.put("/v1/bookings/N-1", json=doc),
                   tw.post("/v1/bookings:batch", json={"bookings": [doc]}),
                   tw.post("/v1/bookings/H-1/release")):
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
        assert answer.json()["error"]["code"] == "unavailable"
    assert [k for k in sorted(store.redis.keys("*")) if ":ratelimit:" not in k] == [
        k for k in before if ":ratelimit:" not in k]

    clinic.write_text(content, encoding="utf-8")  # back
    time.sleep(1.2)
    assert tw.put("/v1/bookings/N-1", json=doc).status_code == 201
    assert tw.post("/v1/bookings/H-1/release").json()["status"] == "scheduled"


def test_a_booking_whose_protocol_file_is_missing_is_503_to_send_again(server, tw):  # noqa: F811
    """As for the clinic's file: while the treatment's protocol file is missing from
    config/ (a deploy rewriting it), a PUT answered 422 "no protocol for treatment
    'microneedling'", "the booking was refused", and a batch refused the item the same way:
    the booking was never sent again. 503 (the batch: that item's status), nothing stored."""
    from tests.api.conftest import future_booking

    store = server.app.state.services.store
    protocol = server.settings.config_dir / "protocols" / "microneedling.toml"
    content = protocol.read_text(encoding="utf-8")
    protocol.unlink()
    time.sleep(1.2)  # missing for longer than an edit: the API reads config/ without it
    assert tw.get("/readyz").status_code == 200
    assert "microneedling" in server.app.state.services.catalog.former_protocols

    doc = future_booking("N-1", clinic="tw")
    answer = tw.put("/v1/bookings/N-1", json=doc)
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    batch = tw.post("/v1/bookings:batch", json={"bookings": [doc]})
    assert batch.status_code == 200, batch.text
    (item,) = batch.json()["results"]
    assert (item["status"], item["error"]["code"]) == (503, "unavailable"), item
    assert store.booking_ids("tw") == []

    protocol.write_text(content, encoding="utf-8")  # back
    time.sleep(1.2)
    assert tw.put("/v1/bookings/N-1", json=doc).status_code == 201


def test_a_key_of_a_clinic_config_lacks_at_start_is_403_not_a_booking_to_fix(serve, tmp_path,
                                                                              caplog):
    """A clinic removed from config/ (its keys not revoked) after the API restarts: its PUT
    and batch answered 422 `invalid_booking`, "clinic: unknown clinic 'tw'", blaming a field
    the clinic never sent (the clinic is the key's) and telling its system the booking is
    wrong: the answer the 503 above keeps it from while the API still knew the file. Now 403
    `forbidden` naming the clinic as not configured, nothing stored, and one WARNING for
    ops to revoke its keys; its release and dead-letter replay too. Reads of what it left
    are answered as before."""
    import logging

    from tests.api.conftest import future_booking
    from tests.api.test_inbound import write_config

    config = write_config(tmp_path / "config")
    (config / "clinics" / "tw.toml").unlink()  # removed before this API process started
    started = serve(config_dir=config, data_dir=tmp_path / "data")
    store = started.app.state.services.store
    key = started.issue_key("tw")
    before = sorted(store.redis.keys("*"))
    doc = future_booking("N-1", clinic="tw")
    with started.client(key) as clinic, caplog.at_level(logging.INFO):
        answers = [clinic.put("/v1/bookings/N-1", json=doc),
                   clinic.post("/v1/bookings:batch", json={"bookings": [doc]}),
                   clinic.post("/v1/bookings/N-1/release"),
                   # a replay would send its dead letters to fail "not configured" again
                   clinic.post("/v1/dead-letters/replay", json={"all": True})]
        read = clinic.get("/v1/bookings/N-1")
    for answer in answers:
        assert answer.status_code == 403, (answer.request.url, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "forbidden" and "fields" not in error, error
        assert "'tw' is not configured" in error["message"], error
    assert read.status_code == 404, read.text  # none of its bookings: as any missing one
    # nothing stored (the store's layout mark, the limiter's buckets aside)
    kept = [k for k in sorted(store.redis.keys("*"))
            if ":ratelimit:" not in k and k != "reminders:layout"]
    assert kept == [k for k in before if ":ratelimit:" not in k and k != "reminders:layout"]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([s for s in said if "'tw'" in s and "revoke" in s]) == 4, said
