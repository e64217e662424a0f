"""worker/jsonsafe.py: untrusted JSON is parsed, or refused saying where — never a traceback."""

from __future__ import annotations

import json
import re
import sys
import tracemalloc
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import worker.jsonsafe as jsonsafe
from benchmarks.intake import realistic_bookings
from worker.jsonsafe import (
    UNSAFE_CATEGORIES,
    JSONRefused,
    _deepest,
    dotted,
    load_json,
    printable,
    unsafe_char,
)


def refused(data: str | bytes, max_bytes: int = 10_000, max_depth: int = 5) -> JSONRefused:
    with pytest.raises(JSONRefused) as exc:
        load_json(data, max_bytes=max_bytes, max_depth=max_depth)
    return exc.value


def test_plain_json_is_what_json_loads_gives():
    text = '{"a": [1, 2.5, "x", true, null, {"b": -3}], "é": "ü\\n😀"}'
    assert load_json(text, max_bytes=1000, max_depth=5) == json.loads(text)
    assert load_json(text.encode(), max_bytes=1000, max_depth=5) == json.loads(text)


@pytest.mark.parametrize("data", ['"x"' + " " * 97, b'"x"' + b" " * 97])
def test_size_is_bounded_in_bytes(data):
    assert load_json(data, max_bytes=100, max_depth=5) == "x"
    exc = refused(data + (" " if isinstance(data, str) else b" "), max_bytes=100)
    assert exc.kind == "size" and exc.path == ()


def test_size_counts_utf8_bytes_of_a_str():
    text = '"' + "é" * 49 + '"'  # 51 characters, 100 bytes
    assert load_json(text, max_bytes=100, max_depth=1) == "é" * 49
    assert refused('"' + "é" * 50 + '"', max_bytes=100).kind == "size"


def test_depth_up_to_the_limit_is_parsed_and_one_more_refused_with_its_path():
    assert load_json("[[[[[1]]]]]", max_bytes=100, max_depth=5) == [[[[[1]]]]]
    exc = refused('{"a": [0, {"b": [[[1]]]}]}', max_depth=5)
    assert (exc.kind, exc.path) == ("depth", ("a", 1, "b", 0, 0))  # the 6th container
    assert "5 levels" in exc.problem


def test_brackets_inside_strings_do_not_count_as_depth():
    text = '{"a": "[[[[[[[[[[{{{{{{{{{{", "b": "\\"[[[[[[["}'
    assert load_json(text, max_bytes=1000, max_depth=1)["b"] == '"[[[[[[['


def reference_deepest(text: str) -> int:
    """The depth scan as worker/jsonsafe.py wrote it before it read UTF-8 bytes: the
    strings (a quote, then anything but a quote or a backslash, or a backslash and any
    character, up to a quote) cut out, then the brackets left counted in order."""
    outside = re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', "", text, flags=re.S)
    depth = deepest = 0
    for char in re.sub(r"[^\[\]{}]+", "", outside):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


_PIECES = ['"', '\\', '\\"', '\\\\', '""', "[", "]", "{", "}", "a", "é", "😀", ":", ",",
           " ", "\n", '"[', ']"', '"{"', "\ufeff"]


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=40).map("".join),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=25)
    .flatmap(lambda v: st.sampled_from([json.dumps(v), json.dumps(v, ensure_ascii=False),
                                        json.dumps(v, indent=1)]))))
def test_the_depth_read_from_utf8_bytes_is_the_depth_of_the_text(text):
    raw = text.encode("utf-8", "surrogatepass")
    assert _deepest(text, raw) == _deepest(text) == reference_deepest(text)


def test_a_batch_of_bookings_is_scanned_for_depth_without_the_string_pattern(monkeypatch):
    """The fast path is the one a batch takes (requests' JSON: every accent escaped)."""
    docs = list(realistic_bookings(300, seed=3))
    docs[5]["patient"]["name"] = 'Ana "[[[[[[[[" López'  # a quote escaped: not this path
    for body in (json.dumps({"bookings": docs[:5] + docs[6:]}),
                 json.dumps({"bookings": docs[:5] + docs[6:]}, ensure_ascii=False)):
        expected = reference_deepest(body)
        monkeypatch.setattr(jsonsafe, "_STRING", None)  # used only by the other path
        assert _deepest(body, body.encode()) == expected == 5  # patient.channels
        assert load_json(body.encode(), max_bytes=10**6, max_depth=5) == json.loads(body)
        exc = refused(body.encode(), max_bytes=10**6, max_depth=4)
        assert (exc.kind, exc.path) == ("depth", ("bookings", 0, "patient", "channels"))
        monkeypatch.undo()
    body = json.dumps({"bookings": docs})
    assert '\\"' in body and _deepest(body, body.encode()) == reference_deepest(body) == 5


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_nesting_never_reaches_the_recursive_parser(depth):
    for text in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth,
                 "[" * depth):  # unbalanced too
        exc = refused(text, max_bytes=10**7, max_depth=32)
        assert exc.kind == "depth"


@pytest.mark.parametrize(("text", "path", "key"), [
    ('{"a": 1, "a": 2}', ("a",), "a"),
    ('{"x": {"b": 1, "c": 2, "b": 3}}', ("x", "b"), "b"),
    ('[{"k": 1}, {"k": 1, "k": 1}]', (1, "k"), "k"),
])
def test_duplicate_keys_are_refused_naming_the_key(text, path, key):
    exc = refused(text)
    assert (exc.kind, exc.path) == ("duplicate", path)


@pytest.mark.parametrize(("number", "word"), [
    ("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
    ("1e999", "out of range"), ("-1e999", "out of range"), ("1" * 31, "31 digits"),
    ("-" + "9" * 5000, "5000 digits"),
])
def test_numbers_python_would_take_but_json_does_not_are_refused(number, word):
    exc = refused(f'{{"a": [0, {number}]}}')
    assert (exc.kind, exc.path) == ("number", ("a", 1))
    assert word in exc.problem


def test_numbers_in_range_are_kept():
    assert load_json('[1e308, -12345678901234567890, 0.5]', max_bytes=100, max_depth=2) == [
        1e308, -12345678901234567890, 0.5]


def test_invalid_utf8_is_refused_naming_the_value_or_key_it_is_in():
    exc = refused(b'{"a": {"b": "x\xffy"}}')
    assert (exc.kind, exc.path) == ("encoding", ("a", "b"))
    assert "0xff" in exc.problem and "offset 14" in exc.problem
    key = refused(b'{"a": {"\xc3(": 1}}')
    assert key.kind == "encoding" and key.path[0] == "a"
    assert dotted(key.path) == "a.\\udcc3("
    outside = refused(b'\xff{"a": 1}')
    assert (outside.kind, outside.path) == ("encoding", ())


@pytest.mark.parametrize("data", [b'["\\ud800"]', '["\\udfff x"]', '["\ud800"]'])
def test_lone_surrogates_are_refused(data):
    exc = refused(data)
    assert (exc.kind, exc.path) == ("encoding", (0,))


def test_escaped_backslashes_and_surrogate_pairs_are_fine():
    assert load_json('["\\\\ud800", "\\ud83d\\ude00"]', max_bytes=100, max_depth=2) == [
        "\\ud800", "😀"]


def test_a_byte_order_mark_is_ignored():
    assert load_json(b'\xef\xbb\xbf{"a": 1}', max_bytes=100, max_depth=2) == {"a": 1}
    assert load_json('\ufeff{"a": 1}', max_bytes=100, max_depth=2) == {"a": 1}


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "{'a': 1}", '["a\n"]', "[1,]"])
def test_syntax_errors_say_where(text):
    exc = refused(text)
    assert exc.kind == "syntax" and "line 1 column" in exc.problem and exc.column > 0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200),
                 st.lists(st.sampled_from(['{', '}', '[', ']', '"a"', ':', ',', '1', 'NaN',
                                           '"\\ud800"', '\xff', ' ']), max_size=60)
                 .map("".join)))
def test_anything_is_parsed_or_refused_never_another_exception(data):
    try:
        value = load_json(data, max_bytes=150, max_depth=4)
    except JSONRefused as exc:
        assert exc.kind in {"size", "encoding", "syntax", "depth", "duplicate", "number"}
        assert unsafe_char(str(exc).replace("\n", "")) is None or exc.kind == "syntax"
    else:
        json.dumps(value).encode("utf-8")  # plain, encodable values


def test_unsafe_char_matches_the_unicode_categories_for_every_code_point():
    category = unicodedata.category
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        assert (unsafe_char(char) is not None) == (category(char) in UNSAFE_CATEGORIES), (
            hex(code))


def test_printable_escapes_what_a_terminal_would_act_on_and_cuts_long_text():
    assert printable("a\x1b[2Jb\u202ec") == "a\\u001b[2Jb\\u202ec"
    assert printable("é" * 50, 10) == "é" * 9 + "…"
    assert dotted(("patient", "channels", 1)) == "patient.channels.1"
    assert dotted(("", "x" * 100))[:3] == '"".'



def _peak(call: Callable[[], object]) -> int:
    """The peak of Python's allocations while `call()` runs (tracemalloc), in bytes."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("unit", [b'["["],', b'{"a":"{"},', b'"]",'])
def test_the_depth_check_of_hostile_bytes_takes_no_more_memory_than_the_parse(unit):
    """Strings holding brackets, among brackets, a body of them the size the API takes:
    the depth check (before the parse) keeps no more in memory at once than the parse of
    the same body (review of cdd7cc3: splitting the body's quote and bracket runs into
    small objects took about twice the parse's peak)."""
    body = b"[" + unit * (1_900_000 // len(unit)) + b"[]]"
    text = body.decode()
    parse = _peak(lambda: json.loads(body))
    checked = _peak(lambda: jsonsafe._too_deep(text, 64, body))
    assert jsonsafe._too_deep(text, 64, body) is None
    assert checked <= parse, (checked, parse)
