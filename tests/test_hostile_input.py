"""Hostile bookings (tests/hostile_corpus.py) get a refusal naming the field, never a traceback.

Each case goes through the CLI's own reading, validation and planning in-process (fast,
exact: the field named), then to `reminders plan -` and `reminders book -` as real
subprocesses with a real Redis: exit 1, the field named on stderr, no traceback, nothing
printed on stdout, nothing invisible or unprintable echoed to the terminal, nothing stored.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tests.hostile_corpus import CORPUS, Hostile, base
from worker.batch import LineReader, UsageError, check_document, iter_documents
from worker.jsonsafe import unsafe_char

BIN = Path(sys.executable).parent
IDS = [case.name for case in CORPUS]


def names(field: str, expected: str) -> bool:
    return field == expected or field.startswith(expected + ".")


def test_the_corpus_has_at_least_forty_cases_of_each_kind_asked_for():
    assert len(CORPUS) >= 40
    kinds = ["nested", "of-1-mib", "year-9999", "last-dose-in-the-future", "bidi", "zero-width",
             "invalid-utf8", "duplicate", "a-number", "100k-items", "nan", "infinity"]
    for kind in kinds:
        assert any(kind in case.name for case in CORPUS), kind


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_refused_naming_the_field_in_process(case: Hostile, catalog):
    docs = list(iter_documents(LineReader(io.BytesIO(case.raw), "-")))
    assert len(docs) == 1
    checked = check_document(docs[0], catalog, None, datetime.now(UTC))
    assert checked.booking is None and checked.refused is not None, checked
    errors = checked.refused.errors
    assert any(names(field, case.field) for field, _ in errors), errors
    assert all(message for _, message in errors)
    assert len(errors) <= 20
    for field, message in errors:  # safe to print: nothing invisible, nothing endless
        assert unsafe_char(field) is None and unsafe_char(message) is None, (field, message)
        assert len(message) < 300, message


@pytest.fixture
def cli(redis_server, redis_client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_REDIS_URL=redis_server.url, REMINDERS_DATA_DIR=str(tmp_path))

    def run(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(BIN / "reminders"), *args], input=stdin, env=env, cwd=ROOT,
                              capture_output=True, timeout=60)

    return run


@pytest.mark.integration
@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_cli_plan_and_book_refuse_it_and_store_nothing(case: Hostile, cli, redis_client):
    for command in ("plan", "book"):
        done = cli(command, "-", stdin=case.raw)
        stderr = done.stderr.decode("utf-8")  # whatever came in, what goes out is UTF-8
        assert done.returncode == 1, (command, stderr)
        assert "Traceback" not in stderr and "Error:" not in stderr, stderr
        fields = re.findall(r"^  (\S+): ", stderr, flags=re.M)
        assert any(names(field, case.field) for field in fields), (command, stderr)
        assert done.stdout == b"", done.stdout[:500]
        assert all(unsafe_char(c) is None for c in stderr.replace("\n", "")), stderr
        assert len(stderr) < 5000
        if command == "book":
            assert "nothing was stored" in stderr
    assert redis_client.dbsize() == 0


FIELDS = ["clinic", "booking_id", "treatment", "starts_at", "patient", "medications",
          "patient.name", "patient.email", "patient.phone", "patient.timezone",
          "patient.locale", "patient.channels", "medications.tretinoin", "medications.retinol",
          "medications.isotretinoin_last_dose", "extra", "patient.extra"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30) | st.sampled_from(["9999-12-31T23:59:59-23:59", "0001-01-01",
                                              "+34600111222", "Europe/Madrid", "sms"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4))
def test_any_json_in_any_field_is_planned_or_refused_never_a_crash(catalog, changes):
    doc = base()
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        here = doc
        for part in parents:
            if not isinstance(here.get(part), dict):
                here[part] = {}
            here = here[part]
        here[leaf] = value
    raw = json.dumps(doc).encode("utf-8", "surrogatepass")
    try:
        docs = list(iter_documents(LineReader(io.BytesIO(raw), "-")))
    except UsageError:  # not JSON at all (a lone surrogate from st.text): a usage error
        return
    checked = check_document(docs[0], catalog, None, datetime.now(UTC))
    assert checked.unreadable is None
    if checked.refused is not None:
        assert checked.refused.errors and all(f and m for f, m in checked.refused.errors)
    else:
        assert checked.booking is not None and checked.plan is not None
