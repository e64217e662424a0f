"""The retention for tests that replay a fixed-date scenario against a real Redis.

Many store tests replay DESIGN.md's example booking (examples/booking.json: a visit on
5 Dec 2026) or other fixed dates with the planner's clock fixed (a `NOW` constant), but the
Redis they write to runs on the real clock. A booking's keys are kept until its last reminder
plus the store's retention (90 days by default), an absolute instant; once the real clock
passes it (12 Mar 2027 09:00 UTC for the example booking), Redis expires the keys the moment
they are written and every such test fails. The scenario's dates are fixed; Redis's clock is
not: such tests give their Store this retention, long enough that the scenario's keys outlive
any real today the suite can run on.

Tests whose subject is retention or expiry itself (tests/test_retention.py) do not use it:
they compute their expectations from the retention they set, or use dates relative to now.
"""

from __future__ import annotations

FIXED_SCENARIO_RETENTION_DAYS = 100 * 365  # a century past the scenario's last reminder
