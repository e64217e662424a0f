"""A message sent again for a new date (`again-<step>`, `repause`: worker/notices.py) is
care-critical in the store's opt-out checks when its step is: its email to a patient who
unsubscribed from email goes by SMS, as the step's own email does (real Redis, real Apprise,
a real HTTP SMS gateway; the rig of tests/test_notices_sms.py, with the microneedling
protocol made to have a care-critical step that goes again: its prep care-critical, its
pause message by email only).

Before, the store's Lua read only the step id from the key ("again-prep", "repause"), which
names no care-critical step: the again email was skipped as opted out at its begin (or at
the unsubscribe, while waiting), and the patient never got that step for the new date."""

from __future__ import annotations

from typing import Any

import pytest

from tests import test_notices_sms as ns
from worker.catalog import Catalog
from worker.dispatch import Context
from worker.rendering import Renderer

gate = ns.gate  # fixtures
rig = ns.rig


@pytest.fixture
def crig(rig: ns.Rig) -> ns.Rig:
    path = rig.ctx.settings.config_dir / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    prep = 'template = "microneedling-prep"\n'
    pause = 'channels = ["sms", "email"]\ntemplate = "stop-retinoids"\n'
    assert prep in text and pause in text
    text = text.replace(prep, prep + "care_critical = true\n").replace(
        pause, 'channels = ["email"]\ntemplate = "stop-retinoids"\n')
    path.write_text(text, encoding="utf-8")
    catalog = Catalog.load(rig.ctx.settings)
    assert "microneedling/prep" in catalog.critical_steps.split()
    ctx = Context(settings=rig.ctx.settings, store=rig.store, catalog=catalog,
                  renderer=Renderer(catalog.templates_dir))
    return ns.Rig(rig.store, ctx, catalog, rig.gate)


def _doc(r: ns.Rig, days: int, retinoids: bool) -> dict[str, Any]:
    doc = r.doc(days, channels=("sms", "email"))
    doc["medications"]["tretinoin"] = retinoids
    return doc


@pytest.mark.parametrize("when", ["before the move", "with the again email waiting"])
@pytest.mark.parametrize("which", ["again-prep#1:email", "repause#1:email"])
def test_unsubscribed_from_email_a_care_critical_step_again_goes_by_sms(crig, which, when):
    retinoids = which.startswith("repause")
    first, sent = (12, "stop-retinoids:email") if retinoids else (5, "prep:email")
    crig.book(_doc(crig, first, retinoids))
    assert crig.send(f"sk/M-1/{sent}") == "sent"

    def unsubscribe() -> None:  # as the one-click unsubscribe does (worker/api/unsubscribe.py)
        crig.store.opt_out("sk", "email", "ana@example.com", "unsubscribed",
                           critical=crig.catalog.critical_steps)

    if when == "before the move":
        unsubscribe()
    moved = _doc(crig, first + 7, retinoids)
    crig.book(moved)
    shown = crig.reminders()
    assert shown[which]["status"] == "scheduled", shown
    assert which.replace(":email", ":sms") not in shown, shown  # its own SMS carries nothing
    if when != "before the move":
        unsubscribe()
        assert crig.reminders()[which]["status"] == "scheduled", crig.reminders()[which]
    before = len(crig.gate.bodies)
    assert crig.send(f"sk/M-1/{which}") == "sent", crig.reminders()[which]
    mine = [b for b in crig.gate.bodies[before:] if b["to"] == "+34600111222"]
    assert mine, crig.gate.bodies[before:]
    assert not [b for b in crig.gate.bodies[before:] if b["to"] == "ana@example.com"]
    assert crig.reminders()[which]["status"] == "sent", crig.reminders()[which]
