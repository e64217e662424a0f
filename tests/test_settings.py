"""Settings: environment names, secrets, and the checks that keep sends safe."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.settings import Settings


def test_read_from_reminders_variables(monkeypatch):
    monkeypatch.setenv("REMINDERS_REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0")
    monkeypatch.setenv("REMINDERS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("REMINDERS_OUTBOX_DIR", "")  # empty means unset
    settings = Settings(_env_file=None)
    assert settings.max_attempts == 3
    assert settings.redis_url.get_secret_value() == "redis://:s3cret@127.0.0.1:6379/0"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert settings.outbox == settings.data_dir / "outbox"


def test_lease_must_outlast_the_slowest_send():
    with pytest.raises(ValidationError, match=r"lease_seconds \(30\) must exceed"):
        Settings(_env_file=None, lease_seconds=30, send_timeout_seconds=15)
    assert Settings(_env_file=None, lease_seconds=32, send_timeout_seconds=15).lease_seconds == 32


@pytest.mark.parametrize(("field", "value"), [
    ("max_attempts", 0), ("pump_interval_seconds", 0), ("key_prefix", "a b"),
    ("broker_visibility_timeout_seconds", 5), ("api_port", 70000),
])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, **{field: value})
    assert info.value.errors()[0]["loc"][0] == field
