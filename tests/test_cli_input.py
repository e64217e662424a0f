"""How `reminders plan/book` read their input: a JSON object, a JSON array or JSON lines.

JSON lines stream (one bounded line held at a time); an array or one object over several
lines is read whole, bounded; refusals say the line (JSON lines) or the position.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from worker import batch
from worker.batch import (
    Checked,
    Document,
    LineReader,
    UsageError,
    iter_documents,
    refusal_heading,
)
from worker.models import MAX_BOOKING_BYTES


def documents(data: bytes) -> list[Document]:
    """The documents, JSON lines parsed (as checking does)."""
    docs = list(iter_documents(LineReader(io.BytesIO(data), "-")))
    return [parsed(d) for d in docs]


def parsed(doc: Document) -> Document:
    if doc.raw is None:
        return doc
    try:
        return Document(doc.number, doc.line, batch._load(doc.raw))
    except batch.JSONRefused as exc:
        if exc.kind == "syntax":
            raise UsageError(f"-: {batch._not_json(exc, doc.line or 0)}") from None
        return Document(doc.number, doc.line, refused=batch.json_refusal(exc))


def heading(doc: Document, single: bool) -> str:
    return refusal_heading(Checked(doc.number, doc.line, batch._label(doc.value)), single)


def line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def test_json_lines_keep_their_line_numbers_across_blank_lines(booking_doc):
    data = b"\n" + line(booking_doc) + b"  \n\r\n" + line({**booking_doc, "booking_id": "B"})
    docs = documents(data)
    assert [(d.number, d.line, d.value["booking_id"]) for d in docs] == [
        (1, 2, "A-1042"), (2, 5, "B")]
    assert heading(docs[1], single=False) == "line 5 (B)"


def test_crlf_and_a_byte_order_mark_are_read(booking_doc):
    data = b"\xef\xbb\xbf" + line(booking_doc).replace(b"\n", b"\r\n") * 2
    assert [d.value["booking_id"] for d in documents(data)] == ["A-1042", "A-1042"]


def test_a_pretty_printed_object_is_one_document(booking_doc):
    docs = documents(json.dumps(booking_doc, indent=2).encode())
    assert len(docs) == 1 and docs[0].value == booking_doc and docs[0].line is None
    assert heading(docs[0], single=True) == "booking 1 (A-1042)"


def test_an_array_is_numbered_by_position(booking_doc):
    docs = documents(json.dumps([booking_doc, {"booking_id": "X"}], indent=1).encode())
    assert [(d.number, d.line) for d in docs] == [(1, None), (2, None)]
    assert heading(docs[1], single=False) == "booking 2 (X)"


def test_a_hostile_element_of_an_array_names_its_position_and_field(booking_doc):
    bad = json.dumps([booking_doc, booking_doc]).encode()
    bad = bad[: bad.rindex(b'"clinic"')] + b'"clinic": "x", ' + bad[bad.rindex(b'"clinic"'):]
    (doc,) = documents(bad)
    assert doc.number == 2 and doc.refused is not None
    assert doc.refused.errors == [("clinic", "is given twice in the same object")]


def test_a_line_that_is_not_json_is_a_usage_error_naming_it(booking_doc):
    with pytest.raises(UsageError, match=r"-: line 3: not JSON \(Expecting"):
        documents(line(booking_doc) * 2 + b"{oops\n" + line(booking_doc))
    with pytest.raises(UsageError, match=r"line 1: not JSON"):
        documents(b"{oops\n" + line(booking_doc))


@pytest.mark.parametrize("data", [b"", b" \n\n\t\r\n", b"\xef\xbb\xbf\n", b"[]", b" [ ] "])
def test_no_booking_at_all_is_a_usage_error(data):
    with pytest.raises(UsageError, match="no booking in the input"):
        documents(data)


class Endless(io.RawIOBase):
    """A stream of one very long line, then a short one; records the reader's largest read."""

    def __init__(self, long: int, tail: bytes) -> None:
        self.left, self.tail = long, tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left > 0:
            n = min(len(buffer), self.left)
            buffer[:n] = b"x" * n
            self.left -= n
            return n
        n = min(len(buffer), len(self.tail))
        buffer[:n], self.tail = self.tail[:n], self.tail[n:]
        return n


def test_an_overlong_line_is_refused_and_never_held_whole(booking_doc, monkeypatch):
    held = []
    more = LineReader._more

    def watch(self: LineReader) -> bool:
        result = more(self)
        held.append(len(self.buf) - self.pos)
        return result

    monkeypatch.setattr(LineReader, "_more", watch)
    stream = io.BufferedReader(Endless(50 * 2**20, b"\n" + line(booking_doc)))
    docs = documents_from(stream)
    assert docs[0].refused is not None and docs[0].line == 1
    assert docs[0].refused.errors[0][0] == "booking"
    assert "16,384 bytes" in docs[0].refused.errors[0][1]
    assert docs[1].value == booking_doc and docs[1].line == 2
    assert max(held) <= MAX_BOOKING_BYTES + LineReader.CHUNK


def documents_from(stream: Any) -> list[Document]:
    return [parsed(d) for d in iter_documents(LineReader(stream, "-"))]


def test_an_array_over_the_whole_input_limit_is_refused(booking_doc, monkeypatch):
    monkeypatch.setattr(batch, "MAX_WHOLE_INPUT_BYTES", 1000)
    with pytest.raises(UsageError, match="give a large input as JSON lines"):
        documents(json.dumps([booking_doc] * 5).encode())


# --- as a user runs it --------------------------------------------------------------------

def reminders(*args: str, stdin: bytes | None,
              **popen: Any) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's code, whichever the venv was installed from
    return subprocess.run([str(Path(sys.executable).parent / "reminders"), *args], input=stdin,
                          capture_output=True, cwd=ROOT, env=env, timeout=60, **popen)


def test_plan_names_the_line_of_each_refused_booking_and_plans_the_rest(booking_doc):
    good = dict(booking_doc, booking_id="G-1")
    bidi = json.loads(json.dumps(booking_doc))
    bidi["booking_id"], bidi["patient"]["name"] = "B-2", "Ana \u202eLópez"
    dup = line(dict(booking_doc, booking_id="D-3")).replace(b'{"clinic"', b'{"clinic": 1, "clinic"')
    data = line(good) + b"\n" + line(bidi) + dup + b'"just a string"\n'
    done = reminders("plan", "--now", "2026-11-21T12:00:00Z", "--json", "-", stdin=data)
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert "line 3 (B-2) refused:\n  patient.name: must not contain control" in stderr
    assert "line 4 refused:\n  clinic: is given twice in the same object" in stderr
    assert "line 5 refused:\n  booking: must be a JSON object" in stderr
    assert "\u202e" not in stderr
    assert [t["booking_id"] for t in json.loads(done.stdout)] == ["G-1"]


def test_plan_refuses_a_booking_given_twice_as_book_does(booking_doc):
    # plan, the dry run, said a file was fine (exit 0, two timelines for A-1042) that book
    # then refused whole for its line 3 repeating line 1's booking.
    data = (line(booking_doc) + line(dict(booking_doc, booking_id="A-2")) + line(booking_doc)
            + line(dict(booking_doc, clinic="demo")))
    done = reminders("plan", "--now", "2026-11-21T12:00:00Z", "--json", "-", stdin=data)
    assert done.returncode == 1, done.stderr
    assert done.stderr.decode() == (
        "line 3 (A-1042) refused:\n  booking_id: appears earlier in this input (line 1, "
        "clinic 'glow'): give each booking once\n")
    planned = [(t["clinic"], t["booking_id"]) for t in json.loads(done.stdout)]
    assert planned == [("glow", "A-1042"), ("glow", "A-2"), ("demo", "A-1042")]
    as_array = json.dumps([booking_doc, booking_doc]).encode()
    done = reminders("plan", "--now", "2026-11-21T12:00:00Z", "-", stdin=as_array)
    assert done.returncode == 1
    assert "booking 2 (A-1042) refused:\n  booking_id: appears earlier in this input " \
        "(booking 1, clinic 'glow')" in done.stderr.decode()


@pytest.mark.parametrize(("hostile", "problem"), [
    (b'"booking_id": "A-4", "booking_id": "A-4", ',
     "booking_id: is given twice in the same object"),
    (b'"notes": ' + b"[" * 9 + b"]" * 9 + b", ", "notes: is nested more than 8 levels deep"),
])
def test_a_hostile_booking_of_an_array_is_named_by_its_position_as_the_user_sees_it(
        booking_doc, hostile, problem):
    # The array cannot be read past its 4th booking; that one alone is reported, and was
    # headed "booking refused:" as if the input were one booking: which of the array's
    # bookings (of thousands) was not said.
    docs = [json.dumps(dict(booking_doc, booking_id=f"A-{n}")).encode() for n in range(1, 7)]
    docs[3] = b"{" + hostile + docs[3][1:]
    data = b"[\n" + b",\n".join(docs) + b"\n]\n"
    for command in (["book", "-"], ["plan", "--now", "2026-11-21T12:00:00Z", "-"]):
        done = reminders(*command, stdin=data)
        assert done.returncode == 1
        assert done.stderr.decode().startswith(f"booking 4 refused:\n  {problem}\n"), done.stderr
    done = reminders("plan", "--now", "2026-11-21T12:00:00Z", "--json", "-", stdin=data)
    assert done.returncode == 1 and json.loads(done.stdout) == []  # an array given: an array
    docs[3] = json.dumps(dict(booking_doc, booking_id="A-4")).encode()
    done = reminders("plan", "--now", "2026-11-21T12:00:00Z", "--json", "-",
                     stdin=b"[\n" + b",\n".join(docs) + b"\n]\n")
    assert done.returncode == 0, done.stderr  # the same array without it is fine
    assert [t["booking_id"] for t in json.loads(done.stdout)] == [f"A-{n}" for n in range(1, 7)]


def test_plan_now_outside_the_years_is_a_usage_error():
    done = reminders("plan", "--now", "9999-12-31T23:00:00-05:00", "examples/booking.json",
                     stdin=b"")
    assert done.returncode == 2 and b"years 1900-2999" in done.stderr


@pytest.mark.parametrize("command", ["plan", "book"])
def test_a_closed_stdin_is_a_usage_error_not_a_traceback(command):
    # `reminders book - <&-` (a cron line, a service with no stdin): it was a traceback
    # (AttributeError: 'NoneType' object has no attribute 'buffer'), exit 1 ("refused").
    done = reminders(command, "-", stdin=None, preexec_fn=lambda: os.close(0))
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode().splitlines() == ["error: cannot read -: stdin is closed"]
