"""Schemathesis over the API's own OpenAPI document, against the real server and Redis.

Every operation gets generated requests (valid and invalid: wrong types, missing and
extra fields, odd headers, undocumented methods, no or bad credentials). Every answer
must be documented by the schema (status, content type, headers, body) and none may be
a 5xx.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.api.conftest import ApiServer, api_settings
from worker.api import create_app
from worker.health import pump_beat

pytestmark = pytest.mark.integration
MAX_EXAMPLES = 20


# What each check may expect of this API, where its rules go beyond what a schema can say.
CONFIG = schemathesis.Config.from_str("""
[checks.positive_data_acceptance]
# A schema-valid booking can still be refused with every field named (422): the phone must
# be a real number, the timezone an IANA name, the treatment a configured protocol, the
# body's booking_id the URL's. 412: a generated If-Match that names no current version.
expected-statuses = ["2xx", "401", "404", "409", "412", "422", "429"]

[[operations]]
# A batch answers each booking on its own (200 with a 422 per bad item), by design: one bad
# booking must not hold back the others. Its item schema describes valid bookings.
include-name = "POST /v1/bookings:batch"
checks.negative_data_rejection.enabled = false

[[operations]]
# The SMS provider's webhook: a request without Twilio's signature made with the clinic's
# auth token is refused (403) however well-formed, by design; so is one for a clinic that
# takes no inbound texts (the test clinics take none).
include-name = "POST /v1/inbound/sms/{clinic}"
checks.positive_data_acceptance.expected-statuses = ["2xx", "403", "404", "422"]
""")

# The document the app serves (built without Redis: the app touches none until a request).
schema = schemathesis.openapi.from_dict(
    create_app(api_settings(), url="redis://127.0.0.1:1/0").openapi(), config=CONFIG)


@pytest.fixture
def glow_key(api: ApiServer) -> str:
    return api.issue_key("glow")


@schema.parametrize()
# derandomize: the same examples every run, so the suite never flakes on a new one (run
# with a different seed by hand to explore further).
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented_and_none_is_a_server_error(case, api, glow_key):
    # A running pump's heartbeat: without one /healthz answers 503 by design.
    pump_beat(api.app.state.services.redis, api.settings.key_prefix, 0.01)
    case.call_and_validate(base_url=api.url, headers={"Authorization": f"Bearer {glow_key}"})
