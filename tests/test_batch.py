"""worker/batch.py: the compact form of checked bookings, the spool, the worker processes,
and the JSON printed one timeline at a time."""

from __future__ import annotations

import io
import json
import pickle
from datetime import UTC, datetime, timedelta

import pytest

from benchmarks.intake import realistic_bookings
from worker import batch
from worker.batch import (
    CheckedChunk,
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
        # The text handed over is the one the store would make of either (and writes).
        assert outcome.doc == booking.model_dump_json() == checked.booking.model_dump_json()
        assert booking.__pydantic_fields_set__ == trusted_booking(
            checked.booking.model_dump(mode="json")).__pydantic_fields_set__
        assert booking.patient.__pydantic_fields_set__ == trusted_booking(
            checked.booking.model_dump(mode="json")).patient.__pydantic_fields_set__
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
    # Chunks as checked here (items) and as a worker process hands them back (their pickle),
    # some going to memory, the rest to the file; a chunk with nothing accepted adds nothing.
    sizes = [2, 4, 0, 1, 5, 3, 6, 4]
    start = 0
    for n, size in enumerate(sizes):
        part = items[start : start + size]
        start += size
        if n % 2:
            spool.add_chunk(CheckedChunk(size, [], size, blob=pickle.dumps(part)))
        else:
            spool.add_chunk(CheckedChunk(size, [], size, items=part))
    assert start == len(items) and spool.count == len(items)
    chunks = list(spool.chunks())
    assert [x for chunk in chunks for x in chunk] == items
    assert all(len(chunk) == 3 for chunk in chunks[:-1]) and len(chunks[-1]) == 1
    assert spool.file is not None  # the rest went to a temporary file
    spool.close()


def _checked(chunks) -> list[tuple[int, list, int, list]]:
    return [(c.size, c.refused, c.count, c.accepted()) for c in chunks]


def test_worker_processes_check_exactly_as_here(catalog, monkeypatch):
    docs = list(realistic_bookings(1200, seed=5, now=NOW))
    docs[700]["patient"]["phone"] = "+34123"
    data = lines(docs) + b"\n" + b'{"clinic": "glow", "clinic": "glow"}\n'
    here = _checked(check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                                 catalog, None, NOW))
    there = list(check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                              catalog, None, NOW, jobs=2))
    assert all(c.items is None and c.blob for c in there)  # handed back as pickles
    assert here == _checked(there)
    # The default (forced onto 2 processes here): an input of more than AUTO_AFTER chunks
    # is checked in the processes from its first booking (no core idle while the first
    # chunks are checked here alone); one of at most AUTO_AFTER chunks, here.
    monkeypatch.setattr(batch, "auto_jobs", lambda: 2)
    monkeypatch.setattr(batch, "AUTO_AFTER", 2)
    there = list(check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                              catalog, None, NOW, jobs=None))
    assert len(there) == 3 and all(c.items is None and c.blob for c in there)
    assert _checked(there) == here
    monkeypatch.setattr(batch, "AUTO_AFTER", 3)
    auto = list(check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")),
                             catalog, None, NOW, jobs=None))
    assert len(auto) == 3 and all(c.items is not None and c.blob is None for c in auto)
    assert _checked(auto) == here
    assert sum(size for size, *_ in here) == 1201
    assert sum(count for _, _, count, _ in here) == 1199
    refused = [o for _, chunk, _, _ in here for o in chunk]
    assert refused[0].errors == [("patient.phone", "is not a valid phone number for its country")]
    assert refused[0].line == 701
    assert (refused[1].line, refused[1].errors) == (
        1202, [("clinic", "is given twice in the same object")])
    # What is accepted is what checking each booking alone gives.
    accepted = [item for *_, items in here for item in items]
    alone = [check_document(doc, catalog, None, NOW)
             for doc in iter_documents(LineReader(io.BytesIO(data), "-"))]
    assert accepted == [(c.booking.model_dump_json(), plan_record(c.plan))
                        for c in alone if c.plan is not None]


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
    (chunk,) = check_chunks(iter_documents(LineReader(io.BytesIO(data), "-")), catalog, None,
                            NOW)
    assert (chunk.size, chunk.count) == (4, 3)
    assert [o.unreadable for o in chunk.refused] == [
        "line 3: not JSON (Expecting property name enclosed in double quotes, column 2)"]


def test_quiet_gc_collects_rarely_while_a_batch_runs_and_gives_the_thresholds_back():
    import gc

    before = gc.get_threshold()
    with batch.quiet_gc():
        assert gc.get_threshold() == batch.QUIET_GC
        assert gc.get_freeze_count() > 0  # what was alive at the start is set aside
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
