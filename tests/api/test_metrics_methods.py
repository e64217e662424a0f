"""The API's request metrics keep a bounded set of labels whatever the client sends.

Before: the `method` label was the request's method as sent, and uvicorn (h11) passes any
token through (`FOO`, `X0001`, ...). Each new one made new series of
reminders_api_requests_total and the duration histogram (15 series each), kept for the
life of the process: anyone reaching the API without a key could grow its memory and every
scrape without bound, and put text of their choosing into the metrics. Now a method the API
serves no route with counts as "other".
"""

from __future__ import annotations

import re

import httpx

DISTINCT = 200


def test_unknown_methods_do_not_become_labels(api) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for n in range(DISTINCT):
            client.request(f"X{n:04d}", "/v1/bookings")
        client.request("GET", "/v1/bookings")
        text = client.get("/metrics").text
    methods = set(re.findall(r'reminders_api_requests_total\{method="([^"]*)"', text))
    assert not any(m.startswith("X0") for m in methods), sorted(methods)[:5]
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert ('reminders_api_requests_total{method="other",route="/v1/bookings",status="405"} '
            f"{DISTINCT}.0") in text, text
    assert 'reminders_api_requests_total{method="GET",route="/v1/bookings",status="401"}' in text
