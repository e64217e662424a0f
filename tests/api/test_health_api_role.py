"""`reminders health --role api` agrees with /readyz and /healthz on a Redis that refuses
writes (review).

/readyz and /healthz answer 503 while Redis answers PING but refuses writes (out of memory
under noeviction: OOM; a failed save: MISCONF; a read-only replica: READONLY; short of the
replicas `min-replicas-to-write` asks for: NOREPLICAS): every keyed route writes first, so
the API serves nothing. `reminders health --role api` only read the pump's heartbeat, so
it said healthy (exit 0) meanwhile. It now probes a write as they do (worker/health.py
`write_refusal`) and exits 1 naming the refusal. Real redis-server put into each state as
ops would, the real command as a subprocess (as a Docker healthcheck runs it), real HTTP
to the real app.
"""

from __future__ import annotations

import json
import os
import subprocess

from tests.api.test_redis_refuses_writes import Refusal, api, own  # noqa: F401 (fixtures)
from tests.e2e.conftest import BIN
from worker.health import pump_beat
from worker.store import connect


def health_api(url: str, tmp_path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update({"REMINDERS_REDIS_URL": url, "REMINDERS_DATA_DIR": str(tmp_path)})
    return subprocess.run([str(BIN / "reminders"), "health", "--role", "api", "--json"],
                          env=env, capture_output=True, text=True, timeout=30)


def test_health_role_api_is_unhealthy_while_redis_refuses_writes(api, own, tmp_path):  # noqa: F811
    admin = connect(own.url)
    pump_beat(admin, api.settings.key_prefix, 0.01)  # a running pump: healthy but for Redis
    with api.client() as ops:
        assert ops.get("/readyz").status_code == 200
        well = health_api(own.url, tmp_path)
        assert well.returncode == 0, well.stdout + well.stderr
        for kind in ("OOM", "READONLY", "NOREPLICAS", "MISCONF"):
            pump_beat(admin, api.settings.key_prefix, 0.01)  # fresh: see the end
            refusal = None if kind == "NOREPLICAS" else Refusal(kind, own)
            if refusal is None:
                admin.config_set("min-replicas-to-write", "1")  # and there is no replica
            else:
                refusal.arm()
            try:
                ready = ops.get("/readyz")
                refusing = health_api(own.url, tmp_path)
            finally:
                if refusal is None:
                    admin.config_set("min-replicas-to-write", "0")
                else:
                    refusal.disarm()
            assert ready.status_code == 503 and ready.json()["redis"] == "refuses writes"
            assert refusing.returncode == 1, (kind, refusing.stdout + refusing.stderr)
            verdict = json.loads(refusing.stdout)
            assert verdict["healthy"] is False and verdict["role"] == "api"
            assert verdict["redis"] == "refuses writes"
            assert verdict["status"] == ready.json()["status"]  # the same words as /readyz
            assert f"Redis refuses writes ({kind})" in verdict["status"]
        # The pump's heartbeat again: on a loaded machine the four refusals above can take
        # longer than its 30 s limit, and this test is about Redis's refusals, not its age.
        pump_beat(admin, api.settings.key_prefix, 0.01)
        again = health_api(own.url, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
