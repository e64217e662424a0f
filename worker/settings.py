"""The one settings class: every knob, read from `REMINDERS_*` environment variables."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The shortest signing secret a setting takes (token_urlsafe(32) gives 43 characters).
MIN_SECRET_CHARS = 32
# .env.example's commented-out example of a secret: refused like a short one.
SECRET_PLACEHOLDER = "paste-the-output-of-secrets.token_urlsafe-32-here"
# The shortest retention: the weekly SMS cap counts a patient's SMS from their bookings'
# records, kept `retention` after each booking's last reminder; it must see every SMS of
# the 7 days around a new one, and a day more for the patient's zone (worker/store.py
# CAPS_REACH). Shorter, a patient's next booking is capped without the SMS of the week.
MIN_RETENTION_DAYS = 8


class Settings(BaseSettings):
    """Runtime settings; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_prefix="REMINDERS_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        # An empty variable means "not set" (REMINDERS_REDIS_URL= must not be an empty URL).
        env_ignore_empty=True,
        # A bad value is named, never echoed: it may be a secret (tracebacks included).
        hide_input_in_errors=True,
    )

    # Where things live.
    config_dir: Path = Path("config")
    templates_dir: Path = Path("templates")
    data_dir: Path = Path(".reminders")
    outbox_dir: Path | None = None

    # Redis: unset means "the embedded default" (a private redis-server started by `reminders run`).
    redis_url: SecretStr | None = None
    # Redis through Sentinel (worker/connections.py): "host:port,host:port,..." and the name
    # of the master they monitor. Set, every client follows a failover; REMINDERS_REDIS_URL
    # then gives only the database, user name and password.
    redis_sentinels: str | None = None
    redis_sentinel_master: str = Field("mymaster", pattern=r"^[A-Za-z0-9_.-]+$")
    key_prefix: str = Field("reminders", pattern=r"^[A-Za-z0-9_.-]+$")

    # Pump: how often it runs, how many due reminders it claims at once, how long a claim lasts.
    pump_interval_seconds: float = Field(1.0, gt=0)
    pump_batch: int = Field(200, ge=1)
    lease_seconds: int = Field(300, ge=5)

    # Sending and retrying.
    send_timeout_seconds: float = Field(15.0, gt=0)
    max_attempts: int = Field(8, ge=1)
    backoff_base_seconds: float = Field(30.0, gt=0)
    backoff_cap_seconds: float = Field(3600.0, gt=0)
    # Clinic webhooks and alerts: one attempt's timeout, and attempts before giving up.
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(12, ge=1)
    # Clinic events a worker process delivers at once (its own threads, beside the senders:
    # a dead endpoint holds these, never a pool process; worker/event_senders.py).
    webhook_threads: int = Field(4, ge=1, le=64)
    broker_visibility_timeout_seconds: int = Field(600, ge=60)

    # The send path's throughput (worker/pump.py, worker/dispatch.py): claims go to send
    # tasks in batches, one queue per channel; each worker process sends them with a few
    # threads per channel; the pump hands out only what the senders can start soon.
    send_batch_size: int = Field(20, ge=1)  # most claims one send task carries
    send_threads: int = Field(16, ge=1, le=256)  # sends at once per channel per process
    send_backlog_seconds: float = Field(2.0, gt=0)  # work handed out ahead, per channel
    send_max_wait_seconds: float = Field(10.0, gt=0)  # then an unbegun claim goes back
    # A warm shutdown (SIGTERM): claims not begun go back to the schedule at once; sends
    # under way get this long to finish, then those still handing over are cut (recorded
    # as of unknown outcome). Keep it below the container's stop grace period.
    shutdown_grace_seconds: float = Field(20.0, ge=0)

    # Retention: a booking's keys, attempt logs and ledger entries expire this many days
    # after its last reminder; a dead letter is kept until it is replayed or purged. At
    # least MIN_RETENTION_DAYS (the weekly SMS cap reads these records).
    retention_days: float = 90

    # HTTP API (worker/api/): where it listens (port 0: `reminders run` picks a free one),
    # each key's request rate (token bucket in Redis: sustained rate, burst), and the
    # largest request body (a batch; one booking may be at most 16 KiB).
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_rate_per_second: float = Field(20.0, gt=0)
    api_rate_burst: int = Field(100, ge=1)
    api_max_body_bytes: int = Field(2_097_152, ge=65_536)

    # Patients' controls (worker/api/inbound.py, worker/api/unsubscribe.py): the public
    # base URL the API is reached at from outside (behind a proxy: the proxy's), used for
    # unsubscribe links and to check the SMS provider's signatures; unset: the API's own
    # address. The secret that signs unsubscribe links; unset: one made once and kept in
    # Redis (P:secret:unsubscribe, worker/secrets.py), shared by every process.
    public_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    unsubscribe_secret: SecretStr | None = None

    log_level: str = "INFO"
    # Log lines as plain text, or one JSON object per line (worker/logs.py).
    log_format: Literal["text", "json"] = "text"

    # Observability (worker/metrics.py, worker/health.py): the Celery worker's own
    # Prometheus port on 127.0.0.1-or-`metrics_host` (0: off), and how old the pump's
    # heartbeat (and beat's last tick) may be before `reminders health` and /healthz say
    # unhealthy (unset: max(30 s, 10 pump intervals)).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, ge=0, le=65535)
    health_max_age_seconds: float | None = Field(None, gt=0)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # Python's logging, Celery's --loglevel and uvicorn's --log-level all take these
        # five; logging itself takes only the upper-case names ("debug" stopped the API).
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level; expected one of "
                             f"{', '.join(LOG_LEVELS)} (any case)")
        return level

    @field_validator("retention_days")
    @classmethod
    def _retention_covers_the_sms_week(cls, value: float) -> float:
        # Not `ge`: the refusal says why. NaN and infinity are no number of days.
        if not math.isfinite(value):
            raise ValueError("REMINDERS_RETENTION_DAYS must be a finite number of days")
        if value < MIN_RETENTION_DAYS:
            raise ValueError(
                f"REMINDERS_RETENTION_DAYS must be at least {MIN_RETENTION_DAYS} (days): the "
                "weekly SMS cap counts a patient's SMS from their bookings' records, kept this "
                "long after each booking's last reminder, and must see the 7 days around each "
                "SMS and a day for the patient's time zone")
        return value

    @field_validator("unsubscribe_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # A short or guessable key would let anyone forge a patient's unsubscribe link.
        if value is not None and (len(value.get_secret_value()) < MIN_SECRET_CHARS
                                  or value.get_secret_value() == SECRET_PLACEHOLDER):
            raise ValueError(
                f"REMINDERS_UNSUBSCRIBE_SECRET must be at least {MIN_SECRET_CHARS} characters "
                "of random text (a short one makes unsubscribe links forgeable); make one "
                "with: python -c \"import secrets; print(secrets.token_urlsafe(32))\", or "
                "leave it unset to use the one kept in Redis")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_list(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_sentinels(value)
        return value

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels as (host, port) pairs; [] without Sentinel."""
        return _parse_sentinels(self.redis_sentinels) if self.redis_sentinels else []

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Settings:
        # The lease (and the send ledger, which lives as long) must outlast the slowest
        # send, or a second attempt could start while the first is still talking.
        slowest = 2 * self.send_timeout_seconds + 1
        if self.lease_seconds <= slowest:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must exceed 2 x send_timeout_seconds + 1 "
                f"({slowest:g}), the longest a send can take")
        return self

    @property
    def send_time_limit(self) -> tuple[float, float]:
        """Return the (soft, hard) Celery time limits of one send, in seconds.

        Both end before the attempt's ledger entry (which lives `lease_seconds` from the
        start of the attempt) expires: no attempt outlives its ledger. The soft limit
        leaves time to record the outcome as unknown.
        """
        hard = self.lease_seconds - 1
        return max(1.0, hard - 2), float(hard)

    @property
    def heartbeat_max_age(self) -> float:
        """Return the age (seconds) past which a pump heartbeat or beat tick is stale."""
        if self.health_max_age_seconds is not None:
            return self.health_max_age_seconds
        return max(30.0, 10 * self.pump_interval_seconds)

    @property
    def metrics_dir(self) -> Path:
        """Return the folder of the worker processes' histograms (multiprocess mode)."""
        return self.data_dir / "metrics"

    @property
    def public_base_url(self) -> str:
        """Return the API's public base URL, without a trailing slash."""
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def outbox(self) -> Path:
        """Return the folder the outbox channel writes messages to."""
        return self.outbox_dir or self.data_dir / "outbox"

    @property
    def protocols_dir(self) -> Path:
        return self.config_dir / "protocols"

    @property
    def clinics_dir(self) -> Path:
        return self.config_dir / "clinics"


def _parse_sentinels(value: str) -> list[tuple[str, int]]:
    addresses = []
    for item in value.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item.strip()!r} is not host:port; expected a comma-separated "
                             "list such as sentinel-1:26379,sentinel-2:26379")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def settings_problem(exc: ValidationError) -> str:
    """Return what is wrong with the environment's settings, each named as it is set:
    "REMINDERS_LEASE_SECONDS: Input should be a valid integer, ..." (not the value given:
    it may be a secret)."""
    prefix = Settings.model_config.get("env_prefix", "")
    problems = []
    for error in exc.errors(include_url=False):
        where = "__".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{prefix}{where}".upper() + f": {message}" if where else message)
    return "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()
