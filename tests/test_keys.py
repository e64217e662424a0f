"""Clinic API keys on a real Redis, and `reminders keys issue|list|revoke` as run by ops."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from worker.keys import ApiKeys, key_id_of

BIN = Path(sys.executable).parent


def test_a_key_is_verified_to_its_clinic_and_only_its_hash_is_kept(redis_client):
    keys = ApiKeys(redis_client, "reminders")
    issued = keys.issue("glow")
    assert issued.key.startswith(f"rk_{issued.key_id}_") and len(issued.key) == 3 + 8 + 1 + 43
    assert key_id_of(issued.key) == issued.key_id
    owner = keys.verify(issued.key)
    assert owner is not None and (owner.clinic, owner.key_id) == ("glow", issued.key_id)
    # Nothing in Redis holds the key itself, or its secret part.
    secret = issued.key.split("_", 2)[2]
    for name in redis_client.scan_iter("*"):
        kind = redis_client.type(name)
        values = (redis_client.hvals(name) if kind == "hash" else
                  redis_client.smembers(name) if kind == "set" else [])
        assert not any(secret in str(v) for v in [name, *values])
    stored = redis_client.hgetall(f"reminders:apikey:{issued.key_id}")
    assert stored["sha256"] == hashlib.sha256(issued.key.encode()).hexdigest()


def test_wrong_malformed_and_revoked_keys_are_refused(redis_client):
    keys = ApiKeys(redis_client, "reminders")
    issued = keys.issue("glow")
    assert keys.verify(issued.key[:-1] + ("x" if issued.key[-1] != "x" else "y")) is None
    for junk in ("", "rk_", "Bearer x", issued.key + "x", issued.key.upper(), "rk_zzzzzzzz_" +
                 "a" * 43):
        assert keys.verify(junk) is None, junk
    assert keys.revoke("demo", issued.key_id) is False  # another clinic's key: not revoked
    assert keys.verify(issued.key) is not None
    assert keys.revoke("glow", issued.key_id) is True
    assert keys.verify(issued.key) is None
    assert redis_client.keys("reminders:apikey:*") == []  # nothing left behind


def test_two_keys_at_once_for_rotation_and_list_shows_no_secret(redis_client):
    keys = ApiKeys(redis_client, "reminders")
    old, new = keys.issue("glow"), keys.issue("glow")
    keys.issue("demo")
    assert keys.verify(old.key).clinic == keys.verify(new.key).clinic == "glow"
    listed = keys.list("glow")
    assert {k["key_id"] for k in listed} == {old.key_id, new.key_id}
    assert all(k["last_used_at"] for k in listed)  # both were just used
    assert old.key not in json.dumps(listed)
    keys.revoke("glow", old.key_id)
    assert keys.verify(old.key) is None and keys.verify(new.key) is not None
    assert [k["key_id"] for k in keys.list("glow")] == [new.key_id]


def reminders(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_url, REMINDERS_CONFIG_DIR=str(ROOT / "config"),
               REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"))
    return subprocess.run([str(BIN / "reminders"), *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_keys_command_issues_lists_and_revokes(redis_server, redis_client):
    issued = reminders("keys", "issue", "--clinic", "glow", redis_url=redis_server.url)
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()  # the key alone on stdout, for KEY=$(...)
    key_id = key_id_of(key)
    assert key_id and "shown only this once" in issued.stderr and key not in issued.stderr
    assert ApiKeys(redis_client).verify(key).clinic == "glow"

    listed = reminders("keys", "list", "--clinic", "glow", "--json", redis_url=redis_server.url)
    assert [k["key_id"] for k in json.loads(listed.stdout)] == [key_id]
    assert key not in listed.stdout
    table = reminders("keys", "list", "--clinic", "glow", redis_url=redis_server.url)
    assert table.stdout.startswith(f"{key_id}  created ")

    as_json = reminders("keys", "issue", "--clinic", "demo", "--json", redis_url=redis_server.url)
    doc = json.loads(as_json.stdout)
    assert doc["clinic"] == "demo" and ApiKeys(redis_client).verify(doc["key"]).clinic == "demo"

    wrong = reminders("keys", "--clinic", "demo", "revoke", key_id, redis_url=redis_server.url)
    assert wrong.returncode == 1 and f"clinic demo has no API key {key_id}" in wrong.stderr
    revoked = reminders("keys", "revoke", "--clinic", "glow", key_id, redis_url=redis_server.url)
    assert revoked.returncode == 0 and f"revoked API key {key_id}" in revoked.stdout
    assert ApiKeys(redis_client).verify(key) is None


def test_keys_command_refuses_bad_usage(redis_server):
    unknown = reminders("keys", "issue", "--clinic", "nope", redis_url=redis_server.url)
    assert unknown.returncode == 2 and "unknown clinic 'nope'" in unknown.stderr
    ambiguous = reminders("keys", "issue", redis_url=redis_server.url)
    assert ambiguous.returncode == 2 and "--clinic is required" in ambiguous.stderr
    no_id = reminders("keys", "revoke", "--clinic", "glow", redis_url=redis_server.url)
    assert no_id.returncode == 2 and "required: KEY_ID" in no_id.stderr
    bad_action = reminders("keys", "rotate", "--clinic", "glow", redis_url=redis_server.url)
    assert bad_action.returncode == 2


def test_a_removed_clinics_keys_can_be_listed_and_revoked_and_a_broken_config_stops_neither(
        redis_server, redis_client, tmp_path):
    # README: "revoke a removed clinic's keys" (they go on authenticating). `keys list` and
    # `keys revoke --clinic X` refused X once its file was gone ("--clinic: unknown clinic",
    # exit 2), and any key at all while config/ did not load (a bad edit the running
    # services survive: exit 3): a leaked key could not be revoked then. Both act on what
    # Redis holds; a clinic neither configured nor holding keys is still refused (a typo).
    import shutil

    keys = ApiKeys(redis_client)
    gone, kept = keys.issue("demo"), keys.issue("glow")
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    (config / "clinics" / "demo.toml").unlink()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
        env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_CONFIG_DIR=str(config),
                   REMINDERS_TEMPLATES_DIR=str(ROOT / "templates"), PYTHONPATH=str(ROOT))
        return subprocess.run([str(BIN / "reminders"), *args], env=env, capture_output=True,
                              text=True, timeout=60, cwd=ROOT)

    listed = run("keys", "list", "--clinic", "demo", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [k["key_id"] for k in json.loads(listed.stdout)] == [gone.key_id]
    revoked = run("keys", "revoke", "--clinic", "demo", gone.key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert keys.verify(gone.key) is None
    typo = run("keys", "list", "--clinic", "demoo")
    assert typo.returncode == 2 and "unknown clinic 'demoo'" in typo.stderr, typo.stderr

    (config / "clinics" / "glow.toml").write_text("name = [\n", encoding="utf-8")  # broken
    revoked = run("keys", "revoke", "--clinic", "glow", kept.key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert keys.verify(kept.key) is None
    issued = run("keys", "issue", "--clinic", "glow")  # a new key needs a clinic that loads
    assert issued.returncode == 3 and "glow.toml" in issued.stderr, issued.stderr
    assert keys.list("glow") == []
