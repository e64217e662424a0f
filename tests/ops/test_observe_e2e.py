"""After a real run, the metrics equal what happened, and no log line gives a patient away.

Real Redis, real Celery worker and beat processes, the API served by uvicorn in its own
process, a real aiosmtpd SMTP sink and real HTTP SMS sinks. Three clinics, one protocol
with one step at booking on both channels (sms and email), booked over the API:

  clinic ok     2 bookings: all 4 messages sent
  clinic perm   its SMS gateway answers 400: the SMS fails for good (dead letter); email sent
  clinic flaky  its SMS gateway answers 503 once, then 200: the SMS is retried, then sent

The Prometheus text is scraped over HTTP from the API's /metrics and from the worker's
own port (REMINDERS_METRICS_PORT), and each counter must equal exactly what the sinks saw.
Then every process's captured stdout/stderr (worker, beat, api), in text and in json, is
scanned for each patient's actual email address, phone number (any form), name and the
words of the messages that reached the sinks.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import wait_until
from tests.sinks import HttpSink, SmtpSink
from worker.embedded import free_port
from worker.keys import ApiKeys

pytestmark = pytest.mark.integration

PROTOCOL = """
name = "Observe test protocol"
[[steps]]
id = "confirm"
at = "booking"
channels = ["sms", "email"]
template = "confirmation"
late = "send"
[advice]
spf = 30
sun_sensitive = true
no_tanning_before = true
clean_skin_on_the_day = true
ask_acne_eczema_rosacea = true
ask_cold_sore_or_infection = true
isotretinoin_months = 6
redness_hours = [24, 48]
redness_max_days = 7
gentle_care = true
no_actives_hours = 48
makeup_free_days = 3
warning_signs = true
fever_celsius = 38
"""
PATIENTS = {  # booking id -> (clinic, name, email, phone)
    "OK-1": ("ok", "Ana López", "ana.lopez.obs@example.com", "+34600111001"),
    "OK-2": ("ok", "Bruno Díaz", "bruno.diaz.obs@example.org", "+34600111002"),
    "P-1": ("perm", "Carla Ruiz", "carla.ruiz.obs@example.net", "+34600111003"),
    "F-1": ("flaky", "Dario Gil", "dario.gil.obs@example.com", "+34600111004"),
}


class FlakySink(HttpSink):
    """An SMS gateway that answers 503 to its first `failures` requests, then 200."""

    def __init__(self, failures: int) -> None:
        self._failures = failures
        super().__init__()

    @property  # type: ignore[override]
    def status(self) -> int:
        if self._failures > 0:
            self._failures -= 1
            return 503
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        self._status = value


@pytest.fixture
def gateways():
    ok, perm, flaky = HttpSink(), HttpSink(), FlakySink(failures=1)
    perm.status = 400
    for sink in (ok, perm, flaky):
        sink.start()
    yield {"ok": ok, "perm": perm, "flaky": flaky}
    for sink in (ok, perm, flaky):
        sink.stop()


@pytest.fixture
def e2e_config(tmp_path: Path, smtp_sink: SmtpSink, gateways) -> Path:
    """Overrides the e2e fixture: three clinics on the sinks, the one-step protocol."""
    config = tmp_path / "config"
    (config / "protocols").mkdir(parents=True)
    (config / "clinics").mkdir()
    (config / "protocols" / "now.toml").write_text(PROTOCOL, encoding="utf-8")
    for clinic, sink in gateways.items():
        (config / "clinics" / f"{clinic}.toml").write_text(f"""
name = "Clinic {clinic}"
phone = "+34910000000"
timezone = "UTC"
locale = "en"
[send_window]
start = "00:00"
end = "24:00"
[channels]
email = "mailto://127.0.0.1:{smtp_sink.port}?from=clinic@{clinic}.test&to={{to}}&mode=insecure"
sms = "json://127.0.0.1:{sink.port}/sms?:to={{to}}"
""", encoding="utf-8")
    return config


def parse_metrics(text: str) -> dict[str, float]:
    """Return {'name{labels}': value} of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def series(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Return {"label=value,...": value} (labels sorted) of one metric's samples, not zero."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(name + "{") and value:
            labels = sorted(re.findall(r'(\w+)="([^"]*)"', key[len(name):]))
            out[",".join(f"{k}={v}" for k, v in labels)] = value
    return out


EXPECTED = {
    "reminders_scheduled_total": {
        "channel=email,clinic=flaky": 1, "channel=sms,clinic=flaky": 1,
        "channel=email,clinic=ok": 2, "channel=sms,clinic=ok": 2,
        "channel=email,clinic=perm": 1, "channel=sms,clinic=perm": 1},
    "reminders_sent_total": {
        "channel=email,clinic=flaky": 1, "channel=sms,clinic=flaky": 1,
        "channel=email,clinic=ok": 2, "channel=sms,clinic=ok": 2,
        "channel=email,clinic=perm": 1},
    "reminders_failed_attempts_total": {
        "channel=sms,clinic=flaky": 1, "channel=sms,clinic=perm": 1},
    "reminders_retried_total": {"channel=sms,clinic=flaky": 1},
    "reminders_dead_lettered_total": {"channel=sms,clinic=perm": 1},
    "reminders_skipped_total": {},
    "reminders_deferred_total": {},
}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_metrics_equal_what_happened_and_logs_hold_no_patient_data(
        log_format, service, smtp_sink, gateways, redis_client, tmp_path):
    api_port, metrics_port = free_port(), free_port()
    service.configure(REMINDERS_LOG_FORMAT=log_format, REMINDERS_METRICS_PORT=str(metrics_port),
                      REMINDERS_LOG_LEVEL="INFO")
    worker, _ = service.start()
    api = service._spawn([sys.executable, "-m", "uvicorn", "worker.api:app", "--host",
                          "127.0.0.1", "--port", str(api_port), "--log-level", "info"], "api")
    base = f"http://127.0.0.1:{api_port}"
    wait_until(lambda: _get(f"{base}/readyz") == 200 or api.poll() is not None, 20)
    assert api.poll() is None, api.log_path.read_text()

    keys = ApiKeys(redis_client, "reminders")
    tokens = {clinic: keys.issue(clinic).key for clinic in gateways}
    starts = (datetime.now(UTC) + timedelta(hours=2)).isoformat(timespec="seconds")
    for booking_id, (clinic, name, address, phone) in PATIENTS.items():
        answer = httpx.put(
            f"{base}/v1/bookings/{booking_id}",
            headers={"Authorization": f"Bearer {tokens[clinic]}"},
            json={"treatment": "now", "starts_at": starts,
                  "patient": {"name": name, "email": address, "phone": phone,
                              "timezone": "Europe/Madrid", "locale": "en",
                              "channels": ["sms", "email"]}}, timeout=10)
        assert answer.status_code == 201, answer.text

    def scrape(url: str) -> dict[str, float]:
        return parse_metrics(httpx.get(url, timeout=10).text)

    # Until everything settled: 7 deliveries and a dead letter (the retry takes ~1 s).
    wait_until(lambda: sum(series(scrape(f"{base}/metrics"), "reminders_sent_total").values())
               == 7 and redis_client.zcard("reminders:dead") == 1, 20, interval=0.3)
    wait_until(lambda: not redis_client.zcard("reminders:lease"), 10)

    # What the sinks saw.
    assert len(smtp_sink.snapshot()) == 4
    assert [len(gateways[c].snapshot()) for c in ("ok", "perm", "flaky")] == [2, 0, 1]
    assert [s for _, _, s in gateways["flaky"].requests_snapshot()] == [503, 200]
    assert [s for _, _, s in gateways["perm"].requests_snapshot()] == [400]

    from_api = scrape(f"{base}/metrics")
    from_worker = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    for metrics in (from_api, from_worker):
        for name, expected in EXPECTED.items():
            assert series(metrics, name) == expected, name
        assert metrics["reminders_redis_up"] == 1
        assert metrics["reminders_config_loads"] == 1
        assert metrics["reminders_due"] == 0 and metrics["reminders_leased"] == 0
        assert metrics["reminders_dead_letters"] == 1
        assert metrics["reminders_oldest_overdue_seconds"] == 0
        assert 0 <= metrics["reminders_pump_heartbeat_age_seconds"] < 10
        assert 0 <= metrics["reminders_beat_heartbeat_age_seconds"] < 10
        assert 'reminders_celery_queue_length{queue="reminders.send.sms"}' in metrics
    # The API's own requests, by route template and status.
    assert from_api['reminders_api_requests_total{method="PUT",route="/v1/bookings/'
                    '{booking_id}",status="201"}'] == 4
    # The worker's histograms, merged over its pool processes.
    send = series(from_worker, "reminders_send_duration_seconds_count")
    assert send == {"channel=email,result=sent": 4, "channel=sms,result=sent": 3,
                    "channel=sms,result=failed": 2}
    assert series(from_worker, "reminders_lateness_seconds_count") == {
        "channel=email": 4, "channel=sms": 3}
    assert from_worker["reminders_pump_run_duration_seconds_count"] >= 1
    assert "reminders_send_duration_seconds_count" not in "".join(from_api)

    service.stop()  # every line written, files closed
    logs = {name: (tmp_path / f"{name}.log").read_text(encoding="utf-8")
            for name in ("w1", "beat", "api")}
    assert "send perm/P-1/confirm:sms" in logs["w1"]  # the logs name reminders by ref
    secrets = set()
    for _, name, address, phone in PATIENTS.values():
        secrets |= {name, name.split()[1], address, address.split("@")[0], phone, phone[1:],
                    phone[3:], address.replace("@", "%40")}
    bodies = [*smtp_sink.snapshot(), *gateways["ok"].snapshot(), *gateways["flaky"].snapshot()]
    for message in bodies:
        secrets |= {line.strip() for line in message.text.splitlines() if len(line.strip()) > 12}
        if message.subject:
            secrets.add(message.subject)
    assert len(bodies) == 7 and len(secrets) > 20
    for process, text in logs.items():
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, f"{process} log ({log_format}) holds patient data: {leaked}"

    if log_format == "json":
        for process, text in logs.items():
            lines = [line for line in text.splitlines() if line.strip()]
            assert lines, process
            for line in lines:  # one JSON object per line: banners and warnings too
                record = json.loads(line)
                assert {"ts", "level", "logger", "message"} <= set(record), line
        about = [json.loads(line) for line in logs["w1"].splitlines()
                 if "send perm/P-1/confirm:sms" in line]
        assert about and all(r["booking_id"] == "P-1" and r["clinic"] == "perm"
                             and r["reminder"] == "confirm:sms" for r in about)
        assert any(json.loads(line)["logger"] == "celery.banner" for line in
                   logs["w1"].splitlines())
        assert any("GET /readyz" in json.loads(line)["message"]
                   for line in logs["api"].splitlines())
    else:
        assert re.search(r"^\[\S+ \S+: INFO/ForkPoolWorker-\d+\] send ok/OK-1/confirm:",
                         logs["w1"], re.M)
        # Celery's banners are one line of the format too, not a block printed apart.
        assert re.search(r"^\[\S+ \S+: INFO/MainProcess\] celery worker starting: w1@",
                         logs["w1"], re.M) and "[queues]" in logs["w1"]
        assert "\n.> transport:" not in logs["w1"] and "celery beat v" not in logs["beat"]
        assert re.search(r"^\[\S+ \S+: INFO/MainProcess\] celery beat starting:", logs["beat"],
                         re.M)


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0
