"""An endpoint that did not answer rests (worker/webhooks.py): one clinic whose webhook
accepts and never answers no longer holds every event sender while another clinic's events,
and its own held-booking alert, wait behind its burst. Real Redis, the real EventSenders and
delivery path, a real endpoint that never answers (then recovers) and a real receiver.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.sinks import DeadEndpoint, WebhookReceiver
from tests.test_webhooks import ENV, ROOT, SECRET, STARTS, glow
from worker.clinics import Clinic
from worker.clock import redis_time
from worker.dispatch import Watchdog
from worker.embedded import free_port
from worker.event_senders import EventSenders
from worker.rendering import Renderer
from worker.settings import Settings
from worker.webhooks import REST_MAX_SECONDS, Events, deliver_event, pump_events, webhook_urls

TIMEOUT = 1.5  # the webhook's timeout: how long a dead endpoint holds a thread
THREADS = 4
HOOK = {"secret": "${GLOW_WEBHOOK_SECRET}"}


@pytest.fixture
def events(redis_client) -> Events:
    return Events(redis_client, "t", retention_days=1)


def fast(tmp_path: Path) -> Settings:
    return Settings(templates_dir=ROOT / "templates", data_dir=tmp_path, _env_file=None,
                    backoff_base_seconds=2, backoff_cap_seconds=4,
                    webhook_timeout_seconds=TIMEOUT)  # type: ignore[call-arg]


def clinic(clinic_id: str, url: str, **extra: object) -> Clinic:
    return glow(id=clinic_id, name=f"{clinic_id} clinic", webhook=HOOK | {"url": url}, **extra)


def deliver(events: Events, event_id: str, claim: str, the_clinic: Clinic,
            tmp_path: Path) -> str:
    return deliver_event(events, event_id, claim, clinics={the_clinic.id: the_clinic},
                         renderer=Renderer(ROOT / "templates"), settings=fast(tmp_path), env=ENV)


def attempts(events: Events, event_id: str) -> int:
    return int(events.redis.hget(events.event_key(event_id), "attempts") or 0)


def wait_until(predicate, timeout: float) -> float:
    """Wait for `predicate`; return how long it took."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - began


def test_a_clinic_endpoint_that_never_answers_starves_no_other_clinic(events, tmp_path):
    dead = DeadEndpoint().start()
    receiver = WebhookReceiver(SECRET).start()
    # Clinic "glow": its webhook accepts and never answers; its alerts go to the outbox.
    # Clinic "bloom": its webhook answers 200.
    clinics = {"glow": clinic("glow", dead.url, outbox=True),
               "bloom": clinic("bloom", receiver.url)}

    def send(event_id: str, claim: str, wait_at_most: float) -> str:
        return deliver_event(events, event_id, claim, clinics=clinics,
                             renderer=Renderer(ROOT / "templates"), settings=fast(tmp_path),
                             env=ENV, timeout=wait_at_most)

    kills: list[str] = []
    lanes = EventSenders(events, send, threads=THREADS,
                         dog=Watchdog(kill=lambda: kills.append("kill")))
    stop = threading.Event()

    def pump() -> None:  # the pump's part, as beat runs it (each second, here each half)
        while not stop.is_set():
            pump_events(events, lanes.submit, batch=200, lease_seconds=30, capacity=THREADS)
            stop.wait(0.5)

    burst = [str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": f"A-{n}"}))
             for n in range(60)]
    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        wait_until(lambda: dead.connections() >= THREADS, 10)  # every thread held by glow
        other = str(events.emit("bloom", "webhook", "reminder.sent", {"booking_id": "B-1"}))
        events.emit("glow", "alert", "booking.held", {
            "booking_id": "A-held", "treatment": "chemical-peel", "starts_at": STARTS,
            "reason": "isotretinoin"})
        began = time.monotonic()
        seen: dict[str, float] = {}

        def arrived() -> bool:
            if [h.headers["Reminders-Event-Id"] for h in receiver.snapshot()] == [other]:
                seen.setdefault("other", time.monotonic() - began)
            if (tmp_path / "outbox").exists() and any((tmp_path / "outbox").iterdir()):
                seen.setdefault("alert", time.monotonic() - began)
            return len(seen) == 2

        # Without rests, the 60 events ahead of them hold the 4 threads 1.5 s each: ~20 s.
        wait_until(arrived, 40)
        assert seen["other"] < 2 * TIMEOUT + 1, seen
        # Glow's own alert is another endpoint (its email channel): its webhook's rest
        # never holds it back.
        assert seen["alert"] < 2 * TIMEOUT + 1, seen

        # Glow's endpoint stays dead a while: it rests between tries, it is not hammered.
        time.sleep(max(0.0, began + 10 - time.monotonic()))
        tried = dead.connections()
        counted = {event_id: attempts(events, event_id) for event_id in burst}
        assert tried <= 12, tried  # 60 events, ~11 s dead: ~4 at first, then ~1 per rest
        # Each connection is a real attempt, counted; the events rested were not.
        assert sum(counted.values()) <= tried <= sum(counted.values()) + THREADS
        assert events.dead() == []  # none given up: max_attempts counts real attempts only
        assert max(counted.values()) < fast(tmp_path).webhook_max_attempts
        rested = [e for e, n in counted.items() if n == 0]
        assert rested, counted
        note = events.redis.hget(events.event_key(rested[0]), "last_error") or ""
        assert "rest" in note, note
        assert "127.0.0.1" not in note and "http" not in note and SECRET not in note

        # Glow's endpoint recovers: every event of the burst arrives.
        dead.answer()
        wait_until(lambda: set(burst) <= set(dead.answered_ids()), 60)
        wait_until(lambda: events.pending() == [], 10)
    finally:
        stop.set()
        pumping.join(5)
        lanes.close(0)
        dead.stop()
        receiver.stop()
    answered = dead.answered_ids()
    # No duplicate: an event is only sent again after an attempt that got no answer, and
    # the dead endpoint never read one; a recovered one answers each once.
    assert sorted(answered, key=int) == sorted(burst, key=int)
    assert [h.headers["Reminders-Event-Id"] for h in receiver.snapshot()] == [other]
    assert events.dead() == [] and kills == []


def test_an_endpoint_that_did_not_answer_rests_until_the_retry_and_an_answer_ends_it(
        events, tmp_path):
    receiver = WebhookReceiver(SECRET).start()
    refusing = clinic("glow", f"http://127.0.0.1:{free_port()}/hooks")  # nothing listens
    hung = DeadEndpoint().start()
    rest_key = "t:ev:rest:glow"
    try:
        first, parked, before = (str(events.emit("glow", "webhook", "reminder.sent",
                                                 {"booking_id": f"A-{n}"})) for n in range(3))
        claims = dict(events.claim(10, 30))
        # An attempt under way (begun before any rest) parks at the receiver.
        receiver.gate.clear()
        outcome: list[str] = []
        under_way = threading.Thread(target=lambda: outcome.append(
            deliver(events, parked, claims[parked], clinic("glow", receiver.url), tmp_path)))
        under_way.start()
        wait_until(lambda: len(receiver.snapshot()) == 1, 10)

        # Refused: no answer. The endpoint rests until that event's retry, on Redis's clock,
        # and the mark expires on its own.
        assert deliver(events, first, claims[first], refusing, tmp_path) == (
            "retrying: webhook unreachable (ConnectionError)")
        retry_at = float(events.redis.zscore(events.due_key, first))
        until = float(events.redis.hget(rest_key, "until") or 0)
        assert until == pytest.approx(retry_at, abs=0.01)
        now = redis_time(events.redis)
        assert until - now - 1 <= events.redis.ttl(rest_key) <= until - now + 120

        # An event claimed before the rest, taken by a thread meanwhile: not tried (the
        # hung endpoint sees no connection), back to the schedule at the rest's end, no
        # attempt counted, the reason told without URL or secret.
        result = deliver(events, before, claims[before], clinic("glow", hung.url), tmp_path)
        assert result.startswith("resting"), result
        assert hung.connections() == 0 and attempts(events, before) == 0
        assert float(events.redis.zscore(events.due_key, before)) == pytest.approx(until,
                                                                                   abs=0.01)
        assert events.redis.zscore(events.out_key, before) is None
        note = events.redis.hget(events.event_key(before), "last_error") or ""
        assert "rest" in note and "127.0.0.1" not in note and SECRET not in note, note
        # An event written during the rest is not even claimed: it waits for the rest's end.
        later = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-9"}))
        assert events.claim(10, 30, capacity=THREADS) == []
        assert float(events.redis.zscore(events.due_key, later)) == pytest.approx(until,
                                                                                  abs=0.01)
        assert attempts(events, later) == 0

        # The attempt under way is answered: the rest ends at once and the events that
        # waited for it are due now.
        receiver.gate.set()
        under_way.join(10)
        assert outcome == ["delivered"]
        assert not events.redis.exists(rest_key)
        now = redis_time(events.redis)
        for waited in (before, later):
            assert float(events.redis.zscore(events.due_key, waited)) <= now
        assert sorted(e for e, _ in events.claim(10, 30)) == sorted([before, later])
    finally:
        receiver.gate.set()
        receiver.stop()
        hung.stop()


def test_an_endpoint_that_answers_an_error_does_not_rest(events, tmp_path):
    receiver = WebhookReceiver(SECRET).start()
    receiver.status = 500
    try:
        one, two = (str(events.emit("glow", "webhook", "reminder.sent",
                                    {"booking_id": f"A-{n}"})) for n in range(2))
        ((_, claim),) = events.claim(1, 30)
        assert deliver(events, one, claim, clinic("glow", receiver.url), tmp_path) == (
            "retrying: webhook answered HTTP 500")
        assert not events.redis.exists("t:ev:rest:glow")
        ((again, _),) = events.claim(10, 30)  # the other is claimed, as before
        assert again == two
    finally:
        receiver.stop()


def test_an_event_given_up_unanswered_rests_its_endpoint_until_a_replay(events, tmp_path):
    refusing = clinic("glow", f"http://127.0.0.1:{free_port()}/hooks")  # nothing listens
    once = fast(tmp_path).model_copy(update={"webhook_max_attempts": 1})
    first = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"}))
    ((_, claim),) = events.claim(10, 30)
    assert deliver_event(events, first, claim, clinics={"glow": refusing},
                         renderer=Renderer(ROOT / "templates"), settings=once, env=ENV) == (
        "given up: webhook unreachable (ConnectionError)")
    assert events.dead() == [first] and attempts(events, first) == 1
    assert events.redis.exists("t:ev:rest:glow")  # as long as a retry would have waited
    waiting = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-2"}))
    assert events.claim(10, 30) == [] and attempts(events, waiting) == 0
    # The operator replays it once the endpoint is fixed: the rest ends with it.
    assert events.replay([first]) == [first]
    assert not events.redis.exists("t:ev:rest:glow")
    assert sorted(e for e, _ in events.claim(10, 30)) == sorted([first, waiting])


def test_a_rest_lasts_at_most_a_minute_though_the_events_own_retry_is_an_hour_away(
        events, tmp_path):
    # An endpoint down for hours: the event that finds it so has tried many times and its
    # own retry is the backoff's cap away (an hour). Its endpoint's rest must not last as
    # long, or events the clinic writes after the endpoint is back would wait that hour
    # though none of them was ever tried: a rest ends after REST_MAX_SECONDS at most, and
    # the next event due tries the endpoint (that event's own backoff is unchanged).
    refusing = clinic("glow", f"http://127.0.0.1:{free_port()}/hooks")  # nothing listens
    slow = fast(tmp_path).model_copy(update={"backoff_base_seconds": 60.0,
                                             "backoff_cap_seconds": 3600.0})
    first = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"}))
    events.redis.hset(events.event_key(first), "attempts", 8)  # its 9th try
    ((_, claim),) = events.claim(10, 30)
    assert deliver_event(events, first, claim, clinics={"glow": refusing},
                         renderer=Renderer(ROOT / "templates"), settings=slow, env=ENV) == (
        "retrying: webhook unreachable (ConnectionError)")
    now = redis_time(events.redis)
    assert float(events.redis.zscore(events.due_key, first)) > now + 1700  # its own backoff
    until = float(events.redis.hget("t:ev:rest:glow", "until") or 0)
    assert now + REST_MAX_SECONDS - 2 <= until <= now + REST_MAX_SECONDS + 0.5
    assert events.redis.ttl("t:ev:rest:glow") <= REST_MAX_SECONDS + 61


def senders_pumping(events: Events, clinics: dict[str, Clinic], tmp_path: Path,
                    settings: Settings | None = None) -> tuple[EventSenders, threading.Event,
                                                              threading.Thread]:
    """The real event senders fed by a pump thread (beat's part, each tenth of a second),
    delivering with `clinics` as config/ reads now."""
    used = settings or fast(tmp_path)

    def send(event_id: str, claim: str, wait_at_most: float) -> str:
        return deliver_event(events, event_id, claim, clinics=clinics,
                             renderer=Renderer(ROOT / "templates"), settings=used,
                             env=ENV, timeout=wait_at_most)

    lanes = EventSenders(events, send, threads=THREADS, dog=Watchdog(kill=lambda: None))
    stop = threading.Event()

    def pump() -> None:  # with the clinics' webhook URLs, as the worker's pump reads them
        while not stop.is_set():
            pump_events(events, lanes.submit, batch=200, lease_seconds=30, capacity=THREADS,
                        endpoints=webhook_urls(clinics))
            stop.wait(0.1)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    return lanes, stop, pumping


def rest_after_refusal(events: Events, tmp_path: Path) -> tuple[str, float]:
    """Rest glow's endpoint as a refused attempt does; return that event and the rest's end."""
    refusing = clinic("glow", f"http://127.0.0.1:{free_port()}/hooks")  # nothing listens
    first = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-0"}))
    ((_, claim),) = events.claim(10, 30)
    assert deliver(events, first, claim, refusing, tmp_path).startswith("retrying")
    return first, float(events.redis.hget("t:ev:rest:glow", "until") or 0)


def test_events_of_a_webhook_removed_during_a_rest_are_dropped_at_its_end_not_one_per_probe(
        events, tmp_path):
    # Glow's endpoint rests (a refused attempt); events wait for it. The clinic then removes
    # its webhook from config/: at the rest's end each of its events is dropped (the clinic
    # takes none). The first one claimed is the rest's probe, and a dropped probe got no
    # answer and no silence either: the rest must end with it, not leave the others waiting
    # `probe_for` (two timeouts and a margin) each, one event dropped per probe.
    _, until = rest_after_refusal(events, tmp_path)
    waiting = [str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": f"A-{n}"}))
               for n in range(1, 6)]
    assert events.claim(10, 30) == []  # they wait for the rest
    lanes, stop, pumping = senders_pumping(events, {"glow": glow()}, tmp_path)  # no webhook
    try:
        def dropped() -> bool:
            return not any(events.redis.exists(events.event_key(e)) for e in waiting)

        wait_until(dropped, 60)
        late = redis_time(events.redis) - until
    finally:
        stop.set()
        pumping.join(5)
        lanes.close(0)
    # One probe_for here is 2 x 1.5 + 2 = 5 s: five waiting events took ~20 s past the rest.
    assert late < 2.0, late
    assert events.dead() == []


def test_a_probe_that_meets_a_tls_error_ends_the_rest_so_the_others_are_tried(events, tmp_path):
    # After a rest, the probe finds the endpoint back up but answering TLS with a bad
    # certificate (a TLS error is an answer, not silence: no rest). The others must be
    # tried then (each counting its attempt, on its own backoff), not kept waiting one
    # probe_for per event while the "rest" goes on with nothing to rest for.
    import socket
    import ssl  # noqa: F401  (the client's TLS handshake meets a plain-text server)

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    stop_serving = threading.Event()

    def serve() -> None:  # not TLS: the client's handshake fails at once
        server.settimeout(0.2)
        while not stop_serving.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    _, until = rest_after_refusal(events, tmp_path)
    waiting = [str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": f"A-{n}"}))
               for n in range(1, 6)]
    tls = {"glow": clinic("glow", f"https://127.0.0.1:{port}/hooks")}
    lanes, stop, pumping = senders_pumping(events, tls, tmp_path)
    try:
        wait_until(lambda: all(attempts(events, e) >= 1 for e in waiting), 40)
        late = redis_time(events.redis) - until
    finally:
        stop.set()
        pumping.join(5)
        lanes.close(0)
        stop_serving.set()
        serving.join(2)
        server.close()
    assert late < 2.0, late
    note = events.redis.hget(events.event_key(waiting[0]), "last_error") or ""
    assert "SSLError" in note, note


def test_a_probe_handed_back_by_a_stopping_worker_leaves_the_next_claim_free_to_probe(
        events, tmp_path):
    # The rest is over; the pump claims the probe, but the worker it goes to is stopping and
    # hands it back, not begun (due now). Nothing tried the endpoint: the next claim (on
    # another worker) must probe it now, not find the handed-back probe's token holding
    # the endpoint for probe_for while every event of the clinic waits.
    first, until = rest_after_refusal(events, tmp_path)
    waiting = [str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": f"A-{n}"}))
               for n in range(1, 4)]
    time.sleep(max(0.0, until - redis_time(events.redis)) + 0.05)
    ((probe, claim),) = events.claim(1, 30)
    assert events.redis.hget("t:ev:rest:glow", "probe") == f"{probe}:{claim}"
    stopping = EventSenders(events, lambda *_: "delivered", threads=1,
                            dog=Watchdog(kill=lambda: None))
    stopping.stop()
    assert stopping.submit(probe, claim).startswith("handed back")
    assert attempts(events, probe) == 0
    again = [e for e, _ in events.claim(10, 30)]
    assert len(again) == 1 and again[0] in [first, *waiting], again
    assert events.redis.hget("t:ev:rest:glow", "probe") == f"{again[0]}:" + str(
        events.redis.hget(events.event_key(again[0]), "claim"))


def test_a_webhook_url_edited_while_its_endpoint_rests_is_tried_at_once(events, tmp_path):
    # Glow's old endpoint refused a late attempt: it rests a minute (the event's own retry is
    # further off). The clinic fixes its webhook URL in config/ meanwhile. The rest was the
    # old URL's: the new one has given no reason to wait, so the events that waited go to it
    # at once, not a minute later.
    refusing = clinic("glow", f"http://127.0.0.1:{free_port()}/hooks")  # nothing listens
    slow = fast(tmp_path).model_copy(update={"backoff_base_seconds": 60.0,
                                             "backoff_cap_seconds": 3600.0})
    first = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-0"}))
    events.redis.hset(events.event_key(first), "attempts", 8)
    ((_, claim),) = events.claim(10, 30)
    assert deliver_event(events, first, claim, clinics={"glow": refusing},
                         renderer=Renderer(ROOT / "templates"), settings=slow, env=ENV
                         ).startswith("retrying")
    until = float(events.redis.hget("t:ev:rest:glow", "until") or 0)
    assert until - redis_time(events.redis) > 50
    waiting = [str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": f"A-{n}"}))
               for n in range(1, 4)]
    assert events.claim(10, 30) == []  # they wait for the old URL's rest
    receiver = WebhookReceiver(SECRET).start()
    lanes, stop, pumping = senders_pumping(events, {"glow": clinic("glow", receiver.url)},
                                           tmp_path, slow)
    try:
        took = wait_until(lambda: {h.headers["Reminders-Event-Id"]
                                   for h in receiver.snapshot()} >= set(waiting), 20)
    finally:
        stop.set()
        pumping.join(5)
        lanes.close(0)
        receiver.stop()
    assert took < 3, took
    assert not events.redis.exists("t:ev:rest:glow")
    # The event that met the old URL keeps its own backoff (it is tried at its retry).
    assert float(events.redis.zscore(events.due_key, first)) > redis_time(events.redis) + 1000
    # An unchanged URL keeps its rest: the check is on the URL, not on any config read.
    refused_again = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-8"}))
    ((_, claim),) = events.claim(10, 30)
    assert deliver(events, refused_again, claim, refusing, tmp_path).startswith("retrying")
    later = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-9"}))
    assert pump_events(events, lambda *_: None, batch=10, lease_seconds=30,
                       endpoints=webhook_urls({"glow": refusing})) == 0
    assert events.redis.exists("t:ev:rest:glow") and attempts(events, later) == 0


def test_an_endpoint_trickling_its_answer_ends_the_attempt_not_the_worker(events, tmp_path):
    # A clinic endpoint (or a proxy before it) answers one header byte at a time, each
    # inside the read timeout. The attempt must end as no answer in time (its two network
    # waits), counted, its endpoint resting: not run on until the watchdog kills the whole
    # worker process (its patients' sends with it), the event claimed again after its lease
    # to kill the next worker, never counted, never given up.
    from tests.test_send_batches import Trickle

    trickle = Trickle()
    kills: list[float] = []
    slow = clinic("glow", f"http://127.0.0.1:{trickle.port}/hooks")

    def send(event_id: str, claim: str, wait_at_most: float) -> str:
        return deliver_event(events, event_id, claim, clinics={"glow": slow},
                             renderer=Renderer(ROOT / "templates"), settings=fast(tmp_path),
                             env=ENV, timeout=wait_at_most)

    lanes = EventSenders(events, send, threads=1,
                         dog=Watchdog(kill=lambda: kills.append(time.monotonic())))
    try:
        event = str(events.emit("glow", "webhook", "reminder.sent", {"booking_id": "A-1"}))
        ((_, claim),) = events.claim(1, 10)
        began = time.monotonic()
        outcome = lanes.attempt(event, claim)  # its waits: 1.5 s each (the webhook timeout)
        took = time.monotonic() - began
    finally:
        lanes.close(0)
        trickle.close()
    assert kills == [] and outcome.startswith("retrying"), (kills, outcome)
    assert took < 2 * TIMEOUT + 1, took
    assert attempts(events, event) == 1
    assert events.redis.exists("t:ev:rest:glow")  # no answer in time: it rests
