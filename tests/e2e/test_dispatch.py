"""Every reminder sent once, on time, with the right words: real Redis, worker, beat, sinks."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from tests.api.conftest import ApiServer, api_settings
from tests.conftest import ROOT
from tests.e2e.conftest import QUICK_MESSAGES, wait_until
from worker.catalog import Catalog
from worker.models import Booking, parse_booking
from worker.optout import make_token, unsubscribe_key
from worker.rendering import Renderer
from worker.settings import Settings

pytestmark = pytest.mark.integration
ON_TIME_SECONDS = 2.0
_REDIS: list = []  # the test's Redis client: the unsubscribe secret the worker shares


@pytest.fixture(autouse=True)
def _shared_redis(redis_client):
    _REDIS[:] = [redis_client]
    yield
    _REDIS.clear()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def expected_messages(config, doc, timeline):
    """Render, in the test, what each scheduled reminder must look like at its sink."""
    # The service's Redis holds the unsubscribe secret the worker made (worker/secrets.py):
    # every email's footer carries the patient's link.
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates",
                        data_dir=config.parent / "data", _env_file=None)
    catalog = Catalog.load(settings)
    booking: Booking = parse_booking(doc, catalog)
    renderer = Renderer(catalog.templates_dir)
    plan_dates: dict[str, datetime] = {}
    for r in timeline["reminders"]:
        when = datetime.fromisoformat(r["due_at"].replace("Z", "+00:00"))
        plan_dates[r["step"]] = min(when, plan_dates.get(r["step"], when))
    step_template = {s.id: s.template for s in catalog.protocols["quick"].steps}
    out = {}
    for r in timeline["reminders"]:
        out[r["id"]] = renderer.render(
            template=step_template[r["step"]],
            channel=r["channel"],
            booking=booking,
            clinic=catalog.clinics["e2e"],
            protocol=catalog.protocols["quick"],
            occurrence=1,
            due_at=datetime.fromisoformat(r["due_at"].replace("Z", "+00:00")).astimezone(UTC),
            plan_dates=plan_dates,
            unsubscribe_url=(f"{settings.public_base_url}/v1/unsubscribe/"
                             + make_token(unsubscribe_key(settings, _REDIS[0],
                                                          settings.key_prefix), "e2e", "email",
                                          booking.patient.contact("email"))
                             if r["channel"] == "email" else None),
        )
    return out


def _norm(text: str | None) -> str:
    """Compare message text the way it reads: SMTP turns line ends into CRLF."""
    return (text or "").replace("\r\n", "\n").strip()


def received(smtp_sink, sms_sink):
    return [("email", m) for m in smtp_sink.snapshot()] + [("sms", m) for m in sms_sink.snapshot()]


def assert_delivered_once_on_time(config, doc, timeline, smtp_sink, sms_sink, also=None):
    """Each scheduled reminder arrived exactly once, within 2 s of due, with its words.

    `also`: reminder id -> another acceptable rendering (one sent before a change).
    """
    expected = expected_messages(config, doc, timeline)
    got = received(smtp_sink, sms_sink)
    assert len(got) == len(expected), [(c, m.subject or m.text[:40]) for c, m in got]
    unmatched = list(got)
    for r in timeline["reminders"]:
        wants = [expected[r["id"]]] + ([also[r["id"]]] if also and r["id"] in also else [])
        for item in unmatched:
            channel, msg = item
            same = channel == r["channel"] and any(
                _norm(msg.text) == _norm(want.text)
                if channel == "sms"
                else msg.subject == want.subject and _norm(msg.html) == _norm(want.html)
                for want in wants
            )
            if same:
                unmatched.remove(item)
                lateness = msg.at - _epoch(r["due_at"])
                assert -0.5 <= lateness <= ON_TIME_SECONDS, (r["id"], lateness)
                break
        else:
            raise AssertionError(f"{r['id']} never arrived with its rendered content")
    assert not unmatched


def test_every_reminder_arrives_once_on_time_with_its_content(
    service, smtp_sink, sms_sink, make_booking, e2e_config
):
    service.up()
    doc = make_booking("B-1")
    (timeline,) = service.book(doc)
    assert len(timeline["reminders"]) == QUICK_MESSAGES
    wait_until(lambda: len(received(smtp_sink, sms_sink)) >= QUICK_MESSAGES, 40)
    time.sleep(2)  # anything sent twice would show up now
    assert_delivered_once_on_time(e2e_config, doc, timeline, smtp_sink, sms_sink)
    sms = sms_sink.snapshot()
    assert {m.to for m in sms} == {"+34600111222"}
    assert {m.to for m in smtp_sink.snapshot()} == {"b-1@example.com"}
    # Privacy: at INFO the worker logs say what happened to which reminder, never to whom
    # or what it said.
    worker_log = (service.logs / "w1.log").read_text(encoding="utf-8")
    assert "send e2e/B-1/prep:sms: sent" in worker_log
    for secret in ("b-1@example.com", "+34600111222", "600111222", "López"):
        assert secret not in worker_log
    for message in smtp_sink.snapshot() + sms_sink.snapshot():
        first_line = next(line for line in message.text.splitlines() if line.strip())
        assert first_line.strip() not in worker_log
    final = service.show("B-1")
    assert {r["status"] for r in final["reminders"]} == {"sent"}
    assert all(r["attempts"] == 1 and r["sent_at"] for r in final["reminders"])


def test_cancel_before_due_sends_nothing_more(service, smtp_sink, sms_sink, make_booking):
    service.up()
    service.book(make_booking("B-2", starts_in=20))
    # The at-booking confirmation goes at once; everything else is still in the future.
    wait_until(lambda: len(smtp_sink.snapshot()) == 1, 15)
    result = service.cli("cancel", "--clinic", "e2e", "--json", "B-2")
    assert result.returncode == 0, result.stderr
    time.sleep(25)  # past every due time
    assert len(smtp_sink.snapshot()) == 1 and sms_sink.snapshot() == []
    statuses = {r["id"]: r["status"] for r in service.show("B-2")["reminders"]}
    assert statuses.pop("confirm:email") == "sent"
    assert set(statuses.values()) == {"cancelled"}


def test_reschedule_sends_at_the_new_times_only(
    service, smtp_sink, sms_sink, make_booking, e2e_config, redis_server
):
    api = ApiServer(api_settings(config_dir=e2e_config), redis_server.url).start()
    try:
        service.up()
        # The move must land before the first booking's prep (due 6 s after it): two
        # `reminders book` processes took longer on a loaded machine, the prep went for the
        # old date and came again for the new one. Over HTTP each is a PUT of milliseconds.
        first = make_booking("B-3", starts_in=14)
        moved = make_booking("B-3", starts_in=22)
        first_prep_due = datetime.fromisoformat(first["starts_at"]).timestamp() - 8
        with api.client(api.issue_key("e2e")) as client:
            booked = client.put("/v1/bookings/B-3",
                                json={k: v for k, v in first.items() if k != "clinic"})
            assert booked.status_code == 201, booked.text
            put = client.put("/v1/bookings/B-3",
                             json={k: v for k, v in moved.items() if k != "clinic"})
            assert put.status_code == 200 and put.json()["version"] == 2, put.text
        assert time.time() < first_prep_due, "moved after the first date's prep was due"
    finally:
        api.stop()
    timeline = service.show("B-3")
    assert timeline["version"] == 2
    wait_until(lambda: len(received(smtp_sink, sms_sink)) >= QUICK_MESSAGES, 40)
    time.sleep(3)
    # The confirmation goes at once, usually before the move: it names the first time
    # (the same words unless the two start times fall in different minutes).
    before = expected_messages(e2e_config, first, timeline)
    assert_delivered_once_on_time(e2e_config, moved, timeline, smtp_sink, sms_sink,
                                  also={"confirm:email": before["confirm:email"]})


def test_same_booking_ten_times_sends_each_reminder_once(
    service, smtp_sink, sms_sink, make_booking, e2e_config, redis_server
):
    api = ApiServer(api_settings(config_dir=e2e_config), redis_server.url).start()
    try:
        service.up()
        # All ten must land before the start (a past appointment is refused), the first as
        # soon as booked (its confirmation is due at its check): ten `reminders book`
        # processes outlasted 30 s of lead on a loaded machine, and one alone stored its
        # booking seconds after checking it. Over HTTP each is a PUT of milliseconds: all
        # ten land well before the prep, due 6 s after them.
        doc = make_booking("B-4", starts_in=14)
        body = {k: v for k, v in doc.items() if k != "clinic"}  # the key says which clinic
        with api.client(api.issue_key("e2e")) as client:
            for n in range(10):
                put = client.put("/v1/bookings/B-4", json=body)
                assert put.status_code == (200 if n else 201), put.text
                assert put.json()["version"] == 1, put.json()
        timeline = service.show("B-4")
        assert timeline["version"] == 1
    finally:
        api.stop()
    wait_until(lambda: len(received(smtp_sink, sms_sink)) >= QUICK_MESSAGES, 60)
    time.sleep(3)
    assert_delivered_once_on_time(e2e_config, doc, timeline, smtp_sink, sms_sink)
