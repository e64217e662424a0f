"""Untrusted JSON in, plain Python values out — or a refusal that says where and why.

`load_json(data, max_bytes=..., max_depth=...)` is `json.loads` for input from outside
(the CLI's files and stdin, HTTP bodies). It never raises anything but `JSONRefused`, and
never a RecursionError, OverflowError or MemoryError on hostile input:

- size: more than `max_bytes` bytes (UTF-8) is refused before anything is parsed;
- encoding: bytes must be UTF-8 (a leading byte-order mark is ignored); a string that
  would hold a lone UTF-16 surrogate (`"\\ud800"`) is refused, as it is not text;
- depth: arrays and objects nested more than `max_depth` deep are refused before the
  (recursive) parser sees them;
- duplicate keys in one object are refused (which one wins is a classic smuggling trick);
- numbers: NaN and Infinity (not JSON, though Python accepts them), floats that overflow
  to infinity (`1e999`) and integers of more than `MAX_INT_DIGITS` digits are refused.

`JSONRefused.path` is where the problem is, as keys and array indexes from the root
(`("patient", "name")`); `dotted(path)` prints it safely (control and format characters
escaped, long keys shortened). `kind` says which rule refused it: "size", "encoding",
"syntax", "depth", "duplicate" or "number" (the HTTP API answers "size" with 413).
"""

from __future__ import annotations

import json
import math
import re
import threading
import unicodedata
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

PathPart = str | int
Path = tuple[PathPart, ...]

MAX_INT_DIGITS = 30
# Categories refused in free text (see `unsafe_char`): control (Cc), format (Cf: bidi
# overrides and isolates, zero-width characters, soft hyphen...), surrogates (Cs) and the
# line and paragraph separators (Zl, Zp).
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A JSON string (as the parser delimits it) and anything that is not a bracket.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]|[^\[\]{}:,"\s]+|\s+', re.S)
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = "holds a lone UTF-16 surrogate (U+D800-U+DFFF), which is not text"
_MAX_KEY_SHOWN = 40


class JSONRefused(ValueError):
    """JSON input refused: `problem` says why, `path` where (empty: the whole input)."""

    def __init__(self, problem: str, path: Path = (), *, kind: str) -> None:
        super().__init__(f"{dotted(path) or 'input'}: {problem}")
        self.problem = problem
        self.path = path
        self.kind = kind
        # For a syntax error: where the parser stopped, and why.
        self.line, self.column, self.reason = 0, 0, ""


def unsafe_char(text: str) -> str | None:
    """Return the first control, format, surrogate or line/paragraph separator in `text`."""
    if text.isascii():
        found = _ASCII_CONTROL.search(text)
        return found.group() if found else None
    category = unicodedata.category
    for char in text:
        if category(char) in UNSAFE_CATEGORIES:
            return char
    return None


def describe_char(char: str) -> str:
    """Return `U+202E RIGHT-TO-LEFT OVERRIDE` for a character (its code point and name)."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def printable(text: str, limit: int = _MAX_KEY_SHOWN) -> str:
    """`text` with anything invisible or unprintable escaped (\\u202e), cut to `limit`."""
    if not text.isprintable() or unsafe_char(text):
        text = "".join(
            c if c.isprintable() and not unsafe_char(c) else f"\\u{ord(c):04x}" for c in text
        )
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(part: PathPart) -> str:
    if isinstance(part, int):
        return str(part)
    return printable(part) or '""'


def dotted(path: Path) -> str:
    """Return a path as `patient.channels.0`, safe to print (nothing invisible or endless)."""
    return ".".join(_show(part) for part in path)


class _Bad:
    """Stands in the parsed tree where a refused value was, until it is located."""

    __slots__ = ("problem", "kind")

    def __init__(self, problem: str, kind: str) -> None:
        self.problem = problem
        self.kind = kind


class _Duplicated(dict[str, Any]):
    """An object that gave `key` twice."""

    __slots__ = ("key",)
    key: str


def _walk(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Yield (path, value) for every value, object keys included (as their own value)."""
    stack: list[tuple[Path, Any]] = [(path, value)]
    while stack:
        here, item = stack.pop()
        yield here, item
        if isinstance(item, dict):
            for key, child in reversed(item.items()):
                yield (*here, key), key
                stack.append(((*here, key), child))
        elif isinstance(item, list):
            stack.extend(((*here, i), child) for i, child in reversed(list(enumerate(item))))


def _locate(value: Any) -> JSONRefused | None:
    """Find the first refused value (a `_Bad`, a duplicate key) in a parsed tree."""
    for path, item in _walk(value):
        if isinstance(item, _Bad):
            return JSONRefused(item.problem, path, kind=item.kind)
        if isinstance(item, _Duplicated):
            return JSONRefused("is given twice in the same object", (*path, item.key),
                               kind="duplicate")
    return None


# Set by the decoder's hooks when they replaced a value by a marker, per thread.
_marked = threading.local()


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(items)
    if len(obj) == len(items):
        return obj
    _marked.any = True
    dup = _Duplicated(obj)
    keys: set[str] = set()
    for key, _ in items:
        if key in keys:
            dup.key = key
            break
        keys.add(key)
    return dup


def _constant(name: str) -> _Bad:
    _marked.any = True
    return _Bad(f"{name} is not a JSON number", "number")


def _real(text: str) -> float | _Bad:
    number = float(text)
    if math.isfinite(number):
        return number
    _marked.any = True
    return _Bad(f"the number {text[:20]} is out of range", "number")


def _integer(text: str) -> int | _Bad:
    digits = len(text.lstrip("-"))
    if digits <= MAX_INT_DIGITS:
        return int(text)
    _marked.any = True
    return _Bad(f"a number of {digits} digits is too long", "number")


# Hooks mark refused values instead of raising, so that they can be located afterwards.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_real, parse_int=_integer
)


def _too_deep(text: str, max_depth: int, raw: bytes | None = None) -> Path | None:
    """Return the path at which `text` nests deeper than `max_depth`, or None. `raw`:
    `text` as UTF-8 bytes, when the caller has them (`_deepest`)."""
    if text.count("[") + text.count("{") <= max_depth:
        return None  # cannot be deeper than the number of brackets it has
    if _deepest(text, raw, stop=max_depth) <= max_depth:
        return None
    return _path_at_depth(text, max_depth + 1)


# The brackets and quotes of UTF-8 bytes (`_deepest`): every other byte, and the depth
# each bracket steps by.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STEP = [0] * 256
for _byte in b"[{":
    _STEP[_byte] = 1
for _byte in b"]}":
    _STEP[_byte] = -1


def _deepest(text: str, raw: bytes | None = None, stop: int | None = None) -> int:
    """How deep the brackets outside strings nest in `text` (at least 0), the strings as
    `_STRING` finds them (a quote left open is not a string). With `stop`, the scan may end
    as soon as the depth passes it (the depth returned is then above `stop`, not
    necessarily the deepest): a hostile body of brackets is not read to its end.

    From `raw` (the same text as UTF-8) when no quote in it is escaped, its quotes are
    even in number and no string holds a bracket (plain JSON, a batch of thousands of
    bookings): then each quote opens or closes a string in turn, every byte but the quotes
    and brackets is deleted and the pairs of adjacent quotes (the strings) dropped, and the
    brackets left are stepped through a chunk at a time, in C; about a quarter of the time
    of `_STRING`'s pass over the text (4.6 -> 1.2 ms for a batch of 1,000 bookings, 380 KB),
    and no more memory than a copy of the body's brackets.
    Otherwise `_STRING` and `_NOT_BRACKET` over `text`. The same depth either way (tests/
    test_jsonsafe.py compares them)."""
    if raw is not None and b'\\"' not in raw and not raw.count(b'"') % 2:
        brackets = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
        if b'"' not in brackets:
            return _deepest_steps(brackets, stop)
    depth = deepest = 0
    for char in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if char in "[{" else -1
        if depth > deepest:
            deepest = depth
            if stop is not None and deepest > stop:
                break
    return deepest


_STEPS_CHUNK = 1 << 16


def _deepest_steps(brackets: bytes, stop: int | None) -> int:
    """The deepest level the bracket bytes `brackets` reach (`_deepest`), a chunk at a time
    so that a body of brackets stops once past `stop`."""
    depth = deepest = 0
    for start in range(0, len(brackets), _STEPS_CHUNK):
        levels = list(accumulate(
            map(_STEP.__getitem__, brackets[start:start + _STEPS_CHUNK]), initial=depth))
        deepest = max(deepest, max(levels))
        if stop is not None and deepest > stop:
            break
        depth = levels[-1]
    return deepest


def _path_at_depth(text: str, depth: int) -> Path:
    """Return the path of the first container opened at `depth` (a slow, exact scan)."""
    # Each open container: [kind, current key or index]; a key is the string before ':'.
    stack: list[list[Any]] = []
    last_string: str | None = None
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            if stack and stack[-1][0] == "[" and stack[-1][1] is None:
                stack[-1][1] = 0
            stack.append([token, None])
            if len(stack) >= depth:
                break
        elif token in ("]", "}"):
            if stack:
                stack.pop()
        elif token == ",":
            if stack and stack[-1][0] == "[":
                stack[-1][1] = (stack[-1][1] or 0) + 1
        elif token == ":":
            if stack and stack[-1][0] == "{":
                stack[-1][1] = last_string
        elif token.startswith('"'):
            try:
                last_string = json.loads(token)
            except ValueError:
                last_string = token[1:-1]
        elif token.strip() and stack and stack[-1][0] == "[" and stack[-1][1] is None:
            stack[-1][1] = 0
    return tuple(part for _, part in stack[:-1] if part is not None)


def _not_text(text: str, problem: str, max_depth: int) -> JSONRefused:
    """Say in which key or value of `text` a surrogate is (invalid UTF-8 decoded with
    surrogateescape, or a lone surrogate in a str), if the rest of it is JSON."""
    value = None
    if _too_deep(text, max_depth) is None:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
    return _surrogate(value, problem) or JSONRefused(problem, (), kind="encoding")


def _surrogate(value: Any, problem: str) -> JSONRefused | None:
    """Return a refusal at the first string (key or value) holding a surrogate, or None."""
    for path, item in _walk(value):
        if isinstance(item, str) and _SURROGATE.search(item):
            return JSONRefused(problem, path, kind="encoding")
    return None


def load_json(data: str | bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Parse untrusted JSON; raise JSONRefused (with the path) for anything hostile."""
    raw: bytes | None = None
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise JSONRefused(f"is {len(raw):,} bytes; at most {max_bytes:,} are accepted",
                              kind="size")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : exc.start + 1].hex()
            problem = f"is not valid UTF-8 (byte 0x{bad} at offset {exc.start})"
            raise _not_text(raw.decode("utf-8", "surrogateescape"), problem, max_depth) from None
    else:
        text = data
        if len(text) > max_bytes:  # each character is at least one byte
            raise JSONRefused(f"is over {max_bytes:,} bytes", kind="size")
        if not text.isascii():
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise _not_text(text, _LONE_SURROGATE, max_depth) from None
            if size > max_bytes:
                raise JSONRefused(f"is {size:,} bytes; at most {max_bytes:,} are accepted",
                                  kind="size")
    if text.startswith("\ufeff"):
        text = text[1:]
    deep = _too_deep(text, max_depth, raw)
    if deep is not None:
        raise JSONRefused(f"is nested more than {max_depth} levels deep", deep, kind="depth")
    _marked.any = False
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        syntax = JSONRefused(
            f"not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})", kind="syntax"
        )
        syntax.line, syntax.column, syntax.reason = exc.lineno, exc.colno, exc.msg
        raise syntax from None
    except (RecursionError, ValueError, OverflowError) as exc:  # not expected; never a traceback
        raise JSONRefused(f"not JSON ({type(exc).__name__})", kind="syntax") from None
    if _marked.any:
        refused = _locate(value)
        if refused is not None:
            raise refused
    if _SURROGATE_ESCAPE.search(text):
        refused = _surrogate(value, _LONE_SURROGATE)
        if refused is not None:
            raise refused
    return value
