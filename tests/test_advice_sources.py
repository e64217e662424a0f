"""Every clinical sentence traceable: the values messages state live in each protocol's
[advice] table with their source in a comment; `reminders check --sources` lists them per
step; a value without a source, or a message stating advice its protocol lacks, is an
error; and no message carries a number that is not a sourced value, a date, a time, a
counter or the clinic's phone.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from worker.catalog import Catalog
from worker.checking import check, protocol_comments
from worker.models import CHANNELS, Booking
from worker.planner import plan
from worker.rendering import Renderer
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS_DIR = ROOT / "config" / "protocols"
# What a source comment must name: a seed article, DOMAIN.md, a dated publication, or say
# plainly that it is clinic practice or the product leaflet (to review with the clinic).
CITES = re.compile(r"seeds/\d{3}|DOMAIN\.md|\b(19|20)\d{2}\b|clinic practice|leaflet")


@pytest.mark.parametrize("protocol", sorted(p.stem for p in PROTOCOLS_DIR.glob("*.toml")))
def test_every_advice_value_names_its_source(catalog: Catalog, protocol: str) -> None:
    comments = protocol_comments(PROTOCOLS_DIR / f"{protocol}.toml")
    advice = catalog.protocols[protocol].advice
    assert advice, "every shipped protocol states its advice"
    unsourced = {key: comments.advice.get(key, "") for key in advice
                 if not CITES.search(comments.advice.get(key, ""))}
    assert unsourced == {}


def test_the_demo_states_what_microneedling_states(catalog: Catalog) -> None:
    demo, needling = catalog.protocols["demo"].advice, catalog.protocols["microneedling"].advice
    assert demo == {key: needling[key] for key in demo}
    demo_sources = protocol_comments(PROTOCOLS_DIR / "demo.toml").advice
    needling_sources = protocol_comments(PROTOCOLS_DIR / "microneedling.toml").advice
    assert demo_sources == {key: needling_sources[key] for key in demo}


def test_comments_attach_to_the_key_below_them(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\n# unrelated, a blank line follows\n\n[advice]\n'
                    "# the source of a\n# on two lines\na = 1\nb = true  # trailing source\n"
                    "\n# floating\n\nc = 2\n"
                    '[[steps]]\n# why this step\nid = "s"\nday = 1  # and when\n'
                    "[steps.repeat]\n# how often\nevery_days = 2\n", encoding="utf-8")
    comments = protocol_comments(path)
    assert comments.advice == {"a": "the source of a on two lines", "b": "trailing source",
                               "c": ""}
    assert comments.steps == {"s": "why this step and when how often"}


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    return tmp_path / "config"


def run_check(config: Path) -> Any:
    settings = Settings(config_dir=config, templates_dir=ROOT / "templates", _env_file=None)
    return check(Catalog.load(settings), settings.clinics_dir, env={},
                 protocols_dir=settings.protocols_dir)


def test_an_advice_value_without_a_source_is_an_error(config_copy: Path) -> None:
    path = config_copy / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    comment = re.search(r"((?:#[^\n]*\n)+)makeup_free_days = 3\n", text)
    assert comment
    path.write_text(text.replace(comment[1], ""), encoding="utf-8")
    errors = [str(e) for e in run_check(config_copy).errors]
    assert errors == [f"{path}: advice.makeup_free_days has no source comment (write where "
                      "the value comes from in a comment above it)"]


def test_a_message_stating_advice_its_protocol_lacks_is_an_error(config_copy: Path) -> None:
    path = config_copy / "protocols" / "microneedling.toml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("\nmakeup_free_days = 3\n", "\n"), encoding="utf-8")
    errors = [str(e) for e in run_check(config_copy).errors]
    assert errors and all("makeup_free_days" in e for e in errors)
    assert any("microneedling-aftercare" in e for e in errors)


def test_advice_no_message_states_is_a_warning(config_copy: Path) -> None:
    path = config_copy / "protocols" / "chemical-peel.toml"
    path.write_text(path.read_text(encoding="utf-8").replace(
        "[advice]\n", "[advice]\n# An unused value (test).\nunused_days = 9\n"), encoding="utf-8")
    report = run_check(config_copy)
    assert report.errors == []
    assert report.warnings == [f"{path}: advice.unused_days is stated by no message of this "
                               "protocol"]


def test_check_sources_lists_each_steps_claims_with_their_sources(tmp_path: Path) -> None:
    env = {"REMINDERS_CONFIG_DIR": str(ROOT / "config"),
           "REMINDERS_TEMPLATES_DIR": str(ROOT / "templates"), "PYTHONPATH": str(ROOT),
           "PATH": ""}
    result = subprocess.run([sys.executable, "-m", "worker.cli", "check", "--sources", "--json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sources = {(s["protocol"], s["step"]): s for s in json.loads(result.stdout)["sources"]}
    aftercare = sources[("microneedling", "aftercare")]
    claims = {c["key"]: c for c in aftercare["claims"]}
    assert claims["makeup_free_days"]["value"] == 3
    assert "seeds/002" in claims["makeup_free_days"]["source"]
    assert "seeds/004" in claims["redness_hours"]["source"]
    assert "3 h after the start" in aftercare["timing"]
    # The peel's week check states no redness duration: it has no source for peels.
    peel_week = {c["key"] for c in sources[("chemical-peel", "week-check")]["claims"]}
    assert "redness_max_days" not in peel_week and "warning_signs" in peel_week
    assert "redness_max_days" in {c["key"] for c in sources[("microneedling", "week-check")]
                                  ["claims"]}
    # Every step of every patient protocol is listed, and every claim has a source.
    catalog = Catalog.load(Settings(config_dir=ROOT / "config",
                                    templates_dir=ROOT / "templates", _env_file=None))
    assert set(sources) == {(p.id, s.id) for p in catalog.protocols.values() for s in p.steps}
    assert all(c["source"] for s in sources.values() for c in s["claims"])
    text = subprocess.run([sys.executable, "-m", "worker.cli", "check", "--sources"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "  aftercare (microneedling-aftercare)\n" in text.stdout
    assert "    makeup_free_days = 3: Makeup: \"avoiding makeup for a few days\" (seeds/002)" \
        in text.stdout


# --- no number without a source ---------------------------------------------------------

NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


@pytest.mark.parametrize("locale", ["en", "es"])
@pytest.mark.parametrize("protocol_id", ["chemical-peel", "microneedling", "tretinoin-start"])
def test_every_number_in_a_message_is_sourced_or_a_date(
    catalog: Catalog, booking_doc: dict[str, Any], protocol_id: str, locale: str,
) -> None:
    renderer = Renderer(catalog.templates_dir)
    clinic = catalog.clinics["glow"]
    protocol = catalog.protocols[protocol_id]
    doc = {**booking_doc, "treatment": protocol_id,
           "medications": {"tretinoin": True, "retinol": True}}
    doc["patient"] = {**doc["patient"], "locale": locale}
    booking = Booking.model_validate(doc, context={"catalog": catalog})
    planned = plan(booking, protocol, clinic, booking.starts_at - timedelta(days=30))
    plan_dates: dict[str, datetime] = {}
    for reminder in planned.reminders:
        plan_dates.setdefault(reminder.step, reminder.due_at)
    unsourced = []
    for reminder in planned.reminders:
        args = dict(booking=booking, clinic=clinic, protocol=protocol,
                    occurrence=reminder.occurrence, due_at=reminder.due_at,
                    plan_dates=plan_dates)
        for channel in CHANNELS:
            message = renderer.render(template=reminder.template, channel=channel, **args)
            ctx = renderer.context(channel=channel, **args)
            allowed = {str(ctx["week"]), str(-ctx["days_until"] // 7), str(ctx["days_until"])}
            for key in message.claims:
                value = protocol.advice[key]
                for x in value if isinstance(value, list) else [value]:
                    if not isinstance(x, bool):
                        allowed.add(ctx["number"](x))
            text = f"{message.subject or ''}\n{message.text}"
            dates = [d for day in ctx["plan_dates"].values() for d in (day, day.capitalize())]
            for fixed in sorted([ctx["appointment_date"], ctx["appointment_date_short"],
                                 ctx["appointment_time"], clinic.phone, *dates],
                                key=len, reverse=True):
                text = text.replace(fixed, " ")
            unsourced += [(reminder.key, channel, n) for n in NUMBER.findall(text)
                          if n not in allowed]
    assert unsourced == []
