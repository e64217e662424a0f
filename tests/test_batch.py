"""worker/batch.py: the compact form of checked bookings, the spool, the worker processes,
and the JSON printed one timeline at a time."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from benchmarks.intake import realistic_bookings
from worker import batch
from worker.batch import (
    Document,
    JsonArrayOut,
    LineReader,
    Spool,
    check_chunks,
    check_document,
    decode,
    iter_documents,
    outcome_of,
)
from worker.models import trusted_booking
from worker.planner import plan_from_record, plan_record

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def lines(docs) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


def test_the_compact_form_gives_back_equal_bookings_and_plans(catalog):
    docs = list(realistic_bookings(600, seed=11, now=NOW))
    docs[5]["medications"]["isotretinoin_last_dose"] = "2026-11-01"  # held
    for doc in iter_documents(LineReader(io.BytesIO(lines(docs)), "-")):
        checked = check_document(doc, catalog, None, NOW)
        assert checked.booking is not None and checked.plan is not None
        outcome = outcome_of(checked)
        assert outcome.doc is not None and outcome.plan is not None
        booking, planned = decode((outcome.doc, outcome.plan), catalog)
        assert booking == checked.booking
        assert booking.model_dump_json() == checked.booking.model_dump_json()
        assert planned == checked.plan
        assert [r.__dict__ for r in planned.reminders] == [
            r.__dict__ for r in checked.plan.reminders]
        assert trusted_booking(checked.booking.model_dump(mode="json")) == checked.booking
        clinic = catalog.clinics[booking.clinic]
        assert plan_from_record(plan_record(checked.plan), clinic.send_window,
                                clinic.sms) == checked.plan


def test_instants_with_microseconds_come_back_exact(catalog, booking_doc):
    now = datetime(2026, 11, 21, 12, 0, 0, 999_999, tzinfo=UTC)
    checked = check_document(Document(1, None, booking_doc), catalog, None, now)
    outcome = outcome_of(checked)
    _, planned = decode((outcome.doc, outcome.plan), catalog)
    assert planned.reminders[0].due_at == now and planned == checked.plan


def test_the_spool_keeps_order_across_memory_and_its_file(monkeypatch):
    monkeypatch.setattr(batch, "SPOOL_AFTER", 7)
    monkeypatch.setattr(batch, "CHUNK", 3)
    spool = Spool()
    items = [({"n": i}, ("scheduled", None, ())) for i in range(25)]
    for item in items:
        spool.add(item)  # type: ignore[arg-type]
    chunks = list(spool.chunks())
    assert [x for chunk in chunks for x in chunk] == items
    assert all(len(chunk) <= 3 for chunk in chunks)
    assert spool.file is not None  # the rest went to a temporary file
    spool.close()


def test_worker_processes_check_exactly_as_here(catalog, monkeypatch):
    docs = list(realistic_bookings(1200, seed=5, now=NOW))
    docs[700]["patient"]["phone"] = "+34123"
    data = lines(docs) + b"\n" + b'{"clinic": "glow", "clinic": "glow"}\n'
    here = [o for chunk in check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                                        catalog, None, NOW) for o in chunk]
    there = [o for chunk in check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                                         catalog, None, NOW, jobs=2) for o in chunk]
    assert here == there
    # The default: the first chunks here, the rest in processes (forced onto 2 here).
    monkeypatch.setattr(batch, "auto_jobs", lambda: 2)
    monkeypatch.setattr(batch, "AUTO_AFTER", 1)
    auto = [o for chunk in check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                                        catalog, None, NOW, jobs=None) for o in chunk]
    assert auto == here
    assert len(here) == 1201
    assert here[700].errors == [("patient.phone", "is not a valid phone number for its country")]
    assert (here[1200].line, here[1200].errors) == (
        1202, [("clinic", "is given twice in the same object")])


@pytest.mark.parametrize("count", [0, 1, 3])
def test_json_out_prints_what_json_dumps_of_the_list_prints(count):
    timelines = [{"clinic": "glow", "booking_id": f"A-{i}", "reminders": [{"id": "x", "n": i}],
                  "é": None} for i in range(count)]
    out = io.StringIO()
    writer = JsonArrayOut(out, single=False)
    for timeline in timelines:
        writer.write(timeline)
    writer.close()
    assert out.getvalue() == json.dumps(timelines, indent=2, ensure_ascii=False) + "\n"
    if count == 1:
        out = io.StringIO()
        writer = JsonArrayOut(out, single=True)
        writer.write(timelines[0])
        writer.close()
        assert out.getvalue() == json.dumps(timelines[0], indent=2, ensure_ascii=False) + "\n"


def test_a_line_that_is_not_json_in_the_middle_is_reported_with_its_line(catalog):
    docs = list(realistic_bookings(3, seed=2, now=NOW + timedelta(days=1)))
    data = lines(docs[:2]) + b"{oops\n" + lines(docs[2:])
    outcomes = [o for chunk in check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                                            catalog, None, NOW) for o in chunk]
    assert [o.unreadable for o in outcomes] == [
        None, None, "line 3: not JSON (Expecting property name enclosed in double quotes, "
        "column 2)", None]
