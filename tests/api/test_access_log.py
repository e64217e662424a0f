"""The API's access log at INFO, as production writes it, holds no secret and no patient data.

The API runs as `reminders run` and docker-compose run it (`python -m uvicorn
worker.api:app --log-level info`, worker/service.py `api_command`), in its own process
with its own logging (worker/api/factory.py routes uvicorn's loggers through
worker/logs.py), on a real Redis; real HTTP requests. Its stderr is read after it stops.

An unsubscribe link's token is a patient's key to opt out: whoever reads it can
unsubscribe them. A text's sender and body sent in a query string (an SMS provider's
webhook set to GET) are a patient's number and message. The access line keeps the
method, the route, the status (and the line's time); those parts become "…".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.api.conftest import future_booking
from tests.conftest import ROOT
from worker.dispatch import unsubscribe_link
from worker.embedded import free_port
from worker.keys import ApiKeys
from worker.service import api_command
from worker.settings import Settings
from worker.store import Store

PUBLIC = "https://reminders.example"
SECRET = "unsubscribe-secret-for-the-access-log-test"
ADDRESS = "ana.access@example.com"
PHONE = "+34600999888"
TEXT = "please stop texting me about my visit"


class ApiProcess:
    """The API in a process of its own at INFO, its stdout and stderr in a file."""

    def __init__(self, redis_url: str, folder: Path, fmt: str) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
        env.update(REMINDERS_REDIS_URL=redis_url, REMINDERS_CONFIG_DIR=str(ROOT / "config"),
                   REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"),
                   REMINDERS_DATA_DIR=str(folder / "data"), REMINDERS_PUBLIC_URL=PUBLIC,
                   REMINDERS_UNSUBSCRIBE_SECRET=SECRET, REMINDERS_LOG_LEVEL="INFO",
                   REMINDERS_LOG_FORMAT=fmt)
        self.log = folder / f"api-{fmt}.log"
        argv = api_command(Settings(_env_file=None, log_level="INFO"), port)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=ROOT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> str:
        """Stop it (SIGTERM, as ops would) and return everything it wrote."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return self.log.read_text(encoding="utf-8")


@pytest.fixture
def api_process(redis_server, redis_client, tmp_path):
    started: list[ApiProcess] = []

    def start(fmt: str) -> ApiProcess:
        started.append(ApiProcess(redis_server.url, tmp_path, fmt))
        return started[-1]

    yield start
    for api in started:
        api.stop()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_access_log_at_info_names_routes_without_tokens_or_patient_data(
        api_process, redis_client, fmt):
    api = api_process(fmt)
    key = ApiKeys(redis_client, "reminders").issue("glow").key
    auth = {"Authorization": f"Bearer {key}"}
    doc = future_booking("AL-1")
    doc["patient"] = doc["patient"] | {"email": ADDRESS, "phone": PHONE}
    settings = Settings(_env_file=None, public_url=PUBLIC, unsubscribe_secret=SECRET)
    store = Store(redis_client, "reminders")
    # The link the email to this patient carries (made as the send makes it).
    ctx = SimpleNamespace(settings=settings, store=store)
    path = unsubscribe_link(ctx, "glow", ADDRESS)[len(PUBLIC):]  # type: ignore[arg-type]
    token = path.rsplit("/", 1)[1]
    with httpx.Client(base_url=api.url, timeout=10) as client:
        assert client.put("/v1/bookings/AL-1", json=doc, headers=auth).status_code == 201
        assert client.get(path).status_code == 200
        assert store.opted_out("glow", "email", ADDRESS) is None
        done = client.post(path, content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        # In the patient's language (the booking's locale is "es"), as their emails.
        assert done.status_code == 200 and "ya no recibirá correos" in done.text
        assert store.opted_out("glow", "email", ADDRESS) is not None
        assert client.put(path).status_code == 405
        assert client.get(path + "?utm_source=mail").status_code == 200
        # A provider's webhook set to GET: the sender and the text in the query string.
        assert client.get("/v1/inbound/sms/glow",
                          params={"From": PHONE, "Body": TEXT}).status_code == 405
        assert client.get("/v1/bookings", params={"email": ADDRESS},
                          headers=auth).status_code == 422
        assert client.get("/v1/bookings", params={"status": "held", "limit": "5"},
                          headers=auth).status_code == 200
    assert store.opted_out("glow", "email", ADDRESS)
    text = api.stop()

    payload, mac = token.split(".")[1:]
    leaked = [s for s in (token, payload, mac, ADDRESS, ADDRESS.replace("@", "%40"), PHONE,
                          PHONE[1:], "%2B34600999888", TEXT, TEXT.replace(" ", "+"))
              if s in text]
    assert not leaked, f"the API log holds {leaked}:\n{text}"
    if fmt == "json":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        access = [r for r in records if r["logger"] == "uvicorn.access"]
        assert all(r["level"] == "INFO" and r["ts"] for r in access)
        lines = [r["message"] for r in access]
    else:
        lines = [line.split("] ", 1)[1] for line in text.splitlines()
                 if re.match(r"\[\S+ \S+: INFO/MainProcess\] 127\.0\.0\.1:\d+ - \"", line)]
    requests = [line.split(" - ", 1)[1] for line in lines if "/readyz" not in line]
    # The method, route and status of every request, in order; the secret parts "…".
    assert requests == [
        '"PUT /v1/bookings/AL-1 HTTP/1.1" 201',
        '"GET /v1/unsubscribe/… HTTP/1.1" 200',
        '"POST /v1/unsubscribe/… HTTP/1.1" 200',
        '"PUT /v1/unsubscribe/… HTTP/1.1" 405',
        '"GET /v1/unsubscribe/…?utm_source=… HTTP/1.1" 200',
        '"GET /v1/inbound/sms/glow?From=…&Body=… HTTP/1.1" 405',
        '"GET /v1/bookings?email=… HTTP/1.1" 422',
        '"GET /v1/bookings?status=held&limit=5 HTTP/1.1" 200',
    ], text
    assert "unsubscribe for clinic glow: email opted out" in text
