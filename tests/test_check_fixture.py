"""A booking file is checked now exactly as it was checked before the checking was made
faster: the stored results (tests/check_fixture.json.gz, computed by the code of `0a0b5c9`)
of a varied set of booking documents, compared field for field with what the checking of
`reminders book` (`worker/batch.py` `_check_docs`: JSON parse, validation, plan, the
document's dump, the plan's record) gives now.

The documents: every protocol of config/protocols; patients in zones with DST changes
(both hemispheres, half-hour offsets) and appointments on and around those days, at the
clock times a spring-forward skips or a fall-back repeats; the two clinics of config/
and copies of them with other send windows (the 08:00-21:00 quiet hours, a short one, an
all-day one) and SMS caps (1 a day and 3 a week, 2 and 4, 10 and 70); locales with and
without templates of their own; both channels, either, in either order; retinoid users,
isotretinoin doses (held, not held); appointments hours to months ahead (late steps sent
or skipped); and refused documents (each bad field named).

    python -m tests.test_check_fixture --write    # store the results of the code as it is
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from worker.batch import Document, _check_docs
from worker.catalog import Catalog
from worker.clinics import SendWindow, SmsSettings

FIXTURE = Path(__file__).with_name("check_fixture.json.gz")
NOW = datetime(2026, 3, 20, 9, 17, 23, 456789, tzinfo=UTC)

ZONES = ["Europe/Madrid", "Europe/London", "America/New_York", "America/Sao_Paulo",
         "America/St_Johns", "Australia/Sydney", "Australia/Adelaide", "Asia/Kolkata",
         "Pacific/Chatham", "UTC"]
# Days with a DST change (2026) in some of the zones above, and a plain day.
DST_DAYS = [date(2026, 3, 29), date(2026, 4, 5), date(2026, 10, 4), date(2026, 10, 25),
            date(2026, 11, 1), date(2027, 3, 14), date(2026, 6, 10)]
# Clock times: in a spring-forward gap, in a repeated hour, the window's edges, ordinary.
CLOCKS = [(2, 30), (1, 30), (8, 0), (9, 0), (12, 30), (19, 30), (20, 59), (23, 45), (0, 10)]
LOCALES = ["es", "en", "en-US", "es-MX", "EN-gb", "fr", "pt-BR"]
CHANNELS = [["sms", "email"], ["email", "sms"], ["sms"], ["email"]]
# Clinic copies: (suffix, send window, SMS caps per day and week).
VARIANTS = [("quiet", ("08:00", "21:00"), (1, 3)), ("short", ("10:00", "16:30"), (2, 4)),
            ("allday", ("00:00", "24:00"), (10, 70)), ("tight", ("09:30", "18:00"), (1, 1))]


def catalog_with_variants(catalog: Catalog) -> Catalog:
    clinics = dict(catalog.clinics)
    for base in catalog.clinics.values():
        for suffix, (start, end), (day, week) in VARIANTS:
            ident = f"{base.id}-{suffix}"
            clinics[ident] = base.model_copy(update={
                "id": ident,
                "send_window": SendWindow(start=start, end=end),
                "sms": SmsSettings(max_per_day=day, max_per_week=week)})
    return dataclasses.replace(catalog, clinics=clinics)


def documents(catalog: Catalog) -> list[dict[str, Any] | str]:
    """The documents checked, in order: valid ones of every kind, then refused ones."""
    rng = random.Random(20261124)
    clinics = sorted(catalog.clinics)
    protocols = sorted(catalog.protocols)
    docs: list[dict[str, Any] | str] = []
    n = 0
    for protocol in protocols:
        for zone in ZONES:
            tz = ZoneInfo(zone)
            starts: list[datetime] = []
            for day in DST_DAYS:
                for hour, minute in rng.sample(CLOCKS, 2):
                    starts.append(datetime(day.year, day.month, day.day, hour, minute,
                                           tzinfo=tz, fold=rng.randrange(2)))
            for hours in (3, 20, 50, 80, 170, 400):  # soon: late steps sent or skipped
                starts.append((NOW + timedelta(hours=hours, minutes=rng.randrange(60)))
                              .astimezone(tz).replace(second=0, microsecond=0))
            for start in starts:
                n += 1
                dose = None
                if rng.random() < 0.15:
                    dose = (NOW.date() - timedelta(days=rng.randrange(1, 400))).isoformat()
                channels = rng.choice(CHANNELS)
                doc: dict[str, Any] = {
                    "clinic": rng.choice(clinics),
                    "booking_id": f"F-{n:04d}",
                    "treatment": protocol,
                    "starts_at": start.isoformat(),
                    "patient": {
                        "name": rng.choice(["Ana López", "Zoë O'Brien", "Íñigo Ibáñez",
                                            "Siobhán de la Fuente", "Li"]),
                        "email": f"p{n}@Example.COM",
                        "phone": rng.choice(["+34600111222", "+447911123456",
                                             "+12125550123", "+61412345678"]),
                        "timezone": zone,
                        "locale": rng.choice(LOCALES),
                        "channels": channels,
                    },
                    "medications": {"tretinoin": rng.random() < 0.5,
                                    "retinol": rng.random() < 0.3,
                                    "isotretinoin_last_dose": dose},
                }
                if rng.random() < 0.1:
                    doc["patient"]["preferred_name"] = "María José"
                if rng.random() < 0.2:
                    del doc["patient"]["email" if channels == ["sms"] else "phone"]
                docs.append(doc)
    good = docs[0]
    assert isinstance(good, dict)

    def bad(**changes: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        for path, value in changes.items():
            *parents, last = path.split("__")
            target = doc
            for part in parents:
                target = target[part]
            if value is KeyError:
                del target[last]
            else:
                target[last] = value
        return doc

    docs += [
        bad(clinic="nowhere"), bad(treatment="botox"), bad(starts_at="2026-13-01T10:00:00Z"),
        bad(starts_at="2020-01-01T10:00:00+00:00"), bad(starts_at="2031-01-01T10:00:00Z"),
        bad(starts_at=1700000000), bad(patient__timezone="Mars/Olympus"),
        bad(patient__phone="+3460011"), bad(patient__email="not an email"),
        bad(patient__locale="xx-QQ"), bad(patient__channels=["sms", "sms"]),
        bad(patient__channels=["fax"]), bad(patient__name="Ana\u202eLópez"),
        bad(medications__isotretinoin_last_dose="2027-01-01"),
        bad(medications__tretinoin="yes"), bad(extra=1), bad(booking_id=KeyError),
        bad(patient__phone=KeyError, patient__channels=["sms"]),
        "[1, 2]", '{"clinic": "glow", "clinic": "demo"}', "not json at all",
    ]
    return docs


def _plain(value: Any) -> Any:
    """A checked result as JSON values (tuples as lists), as the fixture holds it."""
    return json.loads(json.dumps(value))


def check_now(catalog: Catalog) -> list[Any]:
    """What `_check_docs` gives for every document, in input order, as plain values."""
    catalog = catalog_with_variants(catalog)
    docs = [Document(i + 1, i + 1, raw=(d if isinstance(d, str) else json.dumps(
        d, ensure_ascii=False)).encode() + b"\n") for i, d in enumerate(documents(catalog))]
    results: list[Any] = []
    for start in range(0, len(docs), 50):  # chunks, as `check_chunks` hands them
        chunk = _check_docs(docs[start:start + 50], catalog, None, NOW)
        accepted = iter(zip(chunk.items or [], chunk.keys or [], strict=True))
        refused = {o.number: o for o in chunk.refused}
        for doc in docs[start:start + 50]:
            if doc.number in refused:
                outcome = refused[doc.number]
                results.append({"refused": outcome.errors, "unreadable": outcome.unreadable,
                                "label": outcome.label})
            else:
                (text, record), key = next(accepted)
                assert key[2] == doc.number
                results.append({"doc": text, "plan": record})
    return _plain(results)


def test_checking_gives_the_stored_results_field_for_field(catalog):
    expected = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    got = check_now(catalog)
    assert len(got) == len(expected)
    plans = held = refused = late = 0
    for n, (was, now) in enumerate(zip(expected, got, strict=True), 1):
        assert was.keys() == now.keys(), f"document {n}"
        if "refused" in was:
            refused += 1
            assert now == was, f"document {n}"
            continue
        assert now["doc"] == was["doc"], f"document {n}: its dump"
        (status, hold, reminders, notices, late_pause, rule, protected, uncapped) = now["plan"]
        names = ("status", "hold_reason", "reminders", "notice_steps", "late_pause",
                 "pause_rule", "protected", "uncapped")
        for name, a, b in zip(names, was["plan"], now["plan"], strict=True):
            if name in ("reminders", "uncapped") and a is not None and b is not None:
                assert len(b) == len(a), f"document {n}: {name}"
                for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
                    assert rb == ra, f"document {n}: {name}[{i}]"
            assert b == a, f"document {n}: {name}"
        plans += 1
        held += status == "held"
        late += late_pause is not None
    # The set is as varied as it says (a fixture that lost its kinds would still compare).
    assert plans > 250 and held > 5 and late > 5 and refused >= 20


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    from worker.settings import Settings

    root = Path(__file__).resolve().parent.parent
    settings = Settings(config_dir=root / "config", templates_dir=root / "templates",
                        _env_file=None)
    text = json.dumps(check_now(Catalog.load(settings)), ensure_ascii=False,
                      separators=(",", ":")) + "\n"
    FIXTURE.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
