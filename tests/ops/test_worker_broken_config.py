"""A worker started while config/ does not load (a clinic file's bad edit, which the running
workers keep out: worker/catalog.py) refuses to start, naming the file, as `reminders run`
does. Started anyway it said "ready", took send batches off the queues and failed each
(its senders cannot load the configuration): every claim it took waited out its lease
(300 s by default) and could be taken by it again, while the workers that kept the last good
configuration would have sent it, and its healthcheck passed on their pump runs."""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.conftest import wait_until
from tests.test_docker import argv_of

pytestmark = pytest.mark.integration


def test_a_worker_refuses_to_start_on_a_config_that_does_not_load(service, e2e_config) -> None:
    clinic = e2e_config / "clinics" / "e2e.toml"
    clinic.write_text(clinic.read_text(encoding="utf-8") + '\nname = "unclosed\n',
                      encoding="utf-8")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    argv = argv_of(compose["services"]["worker"]["command"])
    assert argv[:4] == ["python", "-m", "worker.celery_main", "worker"]
    proc = service._spawn([sys.executable, *argv[1:]], "broken")
    log = proc.log_path  # type: ignore[attr-defined]
    wait_until(lambda: proc.poll() is not None or b" ready." in log.read_bytes(), 30)
    wait_until(lambda: proc.poll() is not None, 5)
    text = log.read_text(encoding="utf-8")
    assert proc.returncode not in (0, None), text
    assert " ready." not in text and f"{clinic}: " in text, text
    assert "does not load" in text, text


def test_the_config_check_leaves_the_main_process_as_lean_as_before(redis_server) -> None:
    """The check loads config/ in a child process: the prefork pool's main process only
    routes messages, and the catalog's imports (phonenumbers, email-validator, about 4 MB)
    would add to the worker's idle memory, which the benchmark holds to the naive design's."""
    import os
    import subprocess

    code = ("import sys, worker.tasks as t; t._refuse_a_broken_config(); "
            "print(*(m in sys.modules for m in ('worker.catalog', 'phonenumbers', "
            "'email_validator')))")
    env = {**os.environ, "REMINDERS_REDIS_URL": redis_server.url,
           "REMINDERS_CONFIG_DIR": str(ROOT / "config")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"], out.stdout
