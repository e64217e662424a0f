"""Ops tests reuse the end-to-end fixtures: real Redis, Celery worker and beat, sinks."""

from tests.e2e.conftest import (  # noqa: F401 - fixtures, registered by being imported here
    e2e_config,
    make_booking,
    service,
    sms_sink,
    smtp_sink,
)
