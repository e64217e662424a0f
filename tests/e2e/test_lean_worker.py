"""The worker as `reminders run` starts it (worker/service.py `celery_command`, through
worker/celery_main.py) carries only what it sends with: each pool process has imported the
Apprise plugins of the clinic's channel URLs and no other, none of Celery's other
sub-commands' imports (the amqp REPL's prompt_toolkit, pygments), no charset_normalizer,
PyYAML or OpenTelemetry, no prometheus-client while the metrics port is off, no icalendar
before its first invite; and it delivers, by email and through the SMS gateway (an HTTP
JSON API).
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Service, wait_until
from worker.service import celery_command
from worker.settings import Settings

pytestmark = pytest.mark.integration
PROBES = "tests:probe:modules"
# tests/e2e/worker_probe.py's task and queue (importing it here needs the Celery app's Redis).
TASK, QUEUE = "tests.probe.modules", "reminders.pump"


def start(service: Service, role: str, *extra: str) -> None:
    argv = celery_command(role, Settings(_env_file=None, log_level="INFO"))  # type: ignore[call-arg]
    proc = service._spawn([*argv, *extra], role)
    if role == "worker":
        wait_until(lambda: b" ready." in proc.log_path.read_bytes()  # type: ignore[attr-defined]
                   or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.log_path.read_text()  # type: ignore[attr-defined]


def test_each_pool_process_holds_only_the_configured_plugins_and_delivers(
        service, redis_client, smtp_sink, sms_sink, make_booking) -> None:
    start(service, "worker", "-I", "tests.e2e.worker_probe")
    from celery import Celery

    publisher = Celery(broker=service.env["REMINDERS_REDIS_URL"], set_as_current=False)
    publisher.conf.broker_transport_options = {"global_keyprefix": "reminders:celery:"}
    try:
        # Two probes at once, each held a second: one in each pool process.
        for _ in range(2):
            publisher.send_task(TASK, args=(PROBES, 1.5), queue=QUEUE)
        found = wait_until(lambda: (lambda h: h if len(h) == 2 else None)(
            redis_client.hgetall(PROBES)), 20)
    finally:
        publisher.close()
    for pid, names in found.items():
        modules = set(json.loads(names))
        plugins = {m.split(".")[2] for m in modules if m.startswith("apprise.plugins.")}
        # The clinic's channels are mailto:// and json://; Apprise ships ~180 plugins.
        assert plugins - {"base"} == {"email", "custom_json"}, (pid, sorted(plugins))
        assert "apprise.plugins.twilio" not in modules
        # Warmed up: the send path is imported before the first message.
        assert {"worker.dispatch", "worker.rendering", "jinja2"} <= modules, pid
        # Inherited from the main process: none of Celery's other sub-commands' imports,
        # nor the optional libraries worker/celery_main.py leaves out (requests is there,
        # without its charset guessing).
        assert not {"click_repl", "prompt_toolkit", "pygments", "celery.bin.amqp"} & modules
        assert "requests" in modules and "charset_normalizer" not in modules
        # Nor kombu's YAML serializer (PyYAML: every message here is JSON) or redis-py's
        # OpenTelemetry hooks (off unless an application sets them up; this one does not).
        assert not {"yaml", "opentelemetry"} & modules, pid
        # The metrics port is off (REMINDERS_METRICS_PORT unset): nothing could show the
        # senders' histograms, and prometheus-client (about 1.8 MB a pool process, its
        # exposition's http.server and wsgiref with it) is not imported for them.
        assert not {"prometheus_client", "wsgiref", "http.server"} & modules, pid
        # The icalendar library waits for the process's first invite (none sent yet).
        assert "icalendar" not in modules and "worker.invites" in modules, pid

    # And it delivers through both plugins (the clinic's email and SMS gateway), with beat
    # started the same way.
    start(service, "beat", "-s", str(service.logs / "beat-schedule"))
    service.book(make_booking("L-1", starts_in=12.0))
    # confirm:email at booking, then prep:sms and prep:email (due 8 s before the visit).
    wait_until(lambda: len(smtp_sink.snapshot()) >= 2 and len(sms_sink.snapshot()) >= 1, 30)


def test_celery_main_takes_celery_worker_and_beat_options_only(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "REMINDERS_REDIS_URL": "redis://127.0.0.1:1/0"}

    def main(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker.celery_main", *args], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    for wrong in ((), ("shell",), ("amqp",)):
        result = main(*wrong)
        assert result.returncode == 2 and "usage: python -m worker.celery_main" in result.stderr
    # Celery's own commands and options (their help, their exit code for a bad option).
    helped = main("worker", "--help")
    assert helped.returncode == 0 and "--concurrency" in helped.stdout, helped.stderr
    assert "--schedule" in main("beat", "--help").stdout
    bad = main("worker", "--no-such-option")
    assert bad.returncode == 2 and "No such option" in bad.stderr
