"""Apprise's email plugin with a faster serialization of its MIME messages, same text out.

Apprise builds each email as stdlib compat32 MIME objects and turns it into the text it
hands to SMTP with `Message.as_string()`. Two parts of that serialization cost a message
work whose result does not depend on the message (about a third of `as_string`):

- A multipart's boundary is checked against the text of its parts with a regular
  expression compiled for that boundary (`Generator._make_boundary`): a random boundary,
  so the `re` cache never hits and every multipart compiles a new pattern. Here the
  pattern is compiled and run only if the boundary occurs in the text at all (a line
  equal to it cannot exist otherwise): same boundaries, same draws from `random`.
- Every header of every part is folded by `email.header.Header.encode` (pure Python),
  though most are the same in every message (each part's Content-Type, MIME-Version and
  Content-Transfer-Encoding, X-Application, List-Unsubscribe-Post, From, often Subject).
  The folded text of a compat32 header is a function of the header's name and value (its
  text and charsets, for a `Header`) and the policy's line separator and maximum line
  length; for the headers of FOLD_CACHED it is kept (at most FOLD_CACHE_SIZE of them).
  And a header that is one line of printable ASCII (To, Date, Message-ID, a
  List-Unsubscribe link: most of those that differ per message) is written as compat32
  writes it when not folding, without `Header.encode` (`_plain`).

Header injection: Python's fix for CVE-2024-6923 (3.11.10+, and Debian's 3.11 builds) has
the stdlib Generator refuse a folded header that does not end with the line separator or
holds a newline not followed by whitespace (`HeaderWriteError`). FastGenerator makes that
check on every Python, whether or not its stdlib has it (`_verify`): a header of a clinic's
configuration with a stray newline is refused, never written into the message.

Long headers: one whose line would pass SMTP's 998 characters is folded (MAX_LINE).

`install()` puts the subclasses below where the plugin looks up MIMEMultipart and MIMEText
(as delivery's SMTP session manager is put in place); they differ from the stdlib classes
only in `as_string`, which gives the same text as the stdlib's for the same message, and
in FastMIMEText's constructor, which makes the same part with less work (its docstring).
It also answers the plugin's `_get_charset` (asked of the subject and of every header
value) with `str.isascii`, the same answer.

The plain-text part: for an HTML email Apprise writes as plain part its own conversion of
the HTML (`convert_between`, an HTML parser run per message). `install()` also puts
`plain_part` there: while a send sets `plain_text` (delivery does, to the step's own
`*.email.txt.j2` rendering), the plain part is that text, as the clinic wrote it; else
Apprise's conversion as before.
"""

from __future__ import annotations

import random
import re
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from email import errors as email_errors
from email.charset import BASE64, QP, Charset
from email.generator import Generator
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32, compat32
from io import StringIO
from typing import Any

# Headers whose values repeat from message to message (the others, To, Date, Message-ID,
# List-Unsubscribe, are per message: caching them would only churn the cache).
FOLD_CACHED = frozenset({
    "content-type", "mime-version", "content-transfer-encoding", "content-disposition",
    "x-application", "list-unsubscribe-post", "subject", "from",
})
FOLD_CACHE_SIZE = 512
# Apprise writes its emails without folding headers (`as_string()`, no line limit), as the
# stdlib does then. A header line over RFC 5322's 998 characters (a long non-ASCII subject
# is one encoded word: about 370 accented or 180 emoji characters reach it) makes a server
# refuse the whole email ("500 Line too long"): such a header, and only such, is folded at
# FOLD_AT as the stdlib folds for SMTP; every other header is written as the stdlib writes.
MAX_LINE = 998
FOLD_AT = 78

_BOUNDARY_FORMAT = f"%0{len(repr(sys.maxsize - 1))}d"  # as email.generator's `_fmt`
_folded: dict[tuple[Any, ...], str] = {}
_folded_lock = threading.Lock()
# As email.generator's, on the Pythons that have the CVE-2024-6923 fix.
_NEWLINE_WITHOUT_FWSP = re.compile(r"\r\n[^ \t]|\r[^ \n\t]|\n[^ \t]")


_STDLIB_HEADER_WRITE_ERROR: type[email_errors.MessageError] = getattr(
    email_errors, "HeaderWriteError", email_errors.MessageError)


class HeaderWriteError(_STDLIB_HEADER_WRITE_ERROR):  # type: ignore[misc,valid-type]
    """A folded header that would break out of its line (the stdlib's HeaderWriteError
    where it has one, so callers catch either)."""


def _too_long(folded: str, linesep: str) -> bool:
    """Whether a folded header has a line longer than SMTP takes (MAX_LINE)."""
    return len(folded) > MAX_LINE and any(
        len(line) > MAX_LINE for line in folded.split(linesep))


def _verify(folded: str, linesep: str) -> None:
    """Refuse a folded header that would inject lines (as the patched stdlib does)."""
    if not folded.endswith(linesep):
        raise HeaderWriteError(f"folded header does not end with {linesep!r}: {folded!r}")
    if _NEWLINE_WITHOUT_FWSP.search(folded.removesuffix(linesep)):
        raise HeaderWriteError(f"folded header contains newline: {folded!r}")


def _fold_key(policy: Compat32, name: str, value: Any) -> tuple[Any, ...] | None:
    """The inputs compat32's fold of this header depends on, or None if not cached."""
    if name.lower() not in FOLD_CACHED:
        return None
    if isinstance(value, str):
        return (policy.linesep, policy.max_line_length, name, value)
    if type(value) is Header:  # its text and charsets, its line lengths, its continuation
        state: Any = value  # (attributes of Header that typeshed does not list)
        chunks = tuple((text, str(charset)) for text, charset in state._chunks)
        return (policy.linesep, policy.max_line_length, name, chunks, state._maxlinelen,
                state._headerlen, state._continuation_ws)
    return None


def _plain(value: Any) -> str | None:
    """The text of a header value compat32 writes as it is when not folding (a line
    length of 0, as `as_string()` has it): one ASCII text, printable characters only (no
    line break, no tab), not starting or ending with a space; None for any other value.

    compat32 folds each header through `Header.encode`, which splits the text at its
    spaces and joins the pieces again; for such a text on one line, the text itself
    (tests/test_email_mime.py compares the two). Most of a message's headers that differ
    from message to message (To, Date, Message-ID, List-Unsubscribe) are such texts."""
    if type(value) is str:
        text = value
    elif type(value) is Header:
        state: Any = value  # (attributes of Header that typeshed does not list)
        chunks = state._chunks
        if len(chunks) != 1 or str(chunks[0][1]) != "us-ascii":
            return None
        text = chunks[0][0]
        if type(text) is not str:
            return None
    else:
        return None
    if text and text.isascii() and text.isprintable() and text[0] != " " \
            and text[-1] != " ":
        return text
    return None


class FastGenerator(Generator):
    """The stdlib Generator, with the boundary check and header folding described above."""

    @classmethod
    def _make_boundary(cls, text: str | None = None) -> str:
        token = random.randrange(sys.maxsize)
        boundary = ("=" * 15) + (_BOUNDARY_FORMAT % token) + "=="
        if text is None:
            return boundary
        b = boundary
        counter = 0
        # As the stdlib's, except that the pattern is compiled only if "--" + b occurs.
        while ("--" + b) in text and re.compile(  # (Generator._compile_re: re.compile)
                "^--" + re.escape(b) + "(--)?$", re.MULTILINE).search(text):
            b = boundary + "." + str(counter)
            counter += 1
        return b

    def _write_headers(self, msg: Message) -> None:
        policy = self.policy
        if type(policy) is not Compat32:
            super()._write_headers(msg)  # type: ignore[misc]  # untyped in typeshed
            return
        unfolded = not policy.max_line_length  # as Apprise writes (`as_string()`)
        for name, value in msg.raw_items():
            if unfolded:
                text = _plain(value)
                if text is not None and len(name) + 2 + len(text) <= MAX_LINE:
                    self.write(f"{name}: {text}{policy.linesep}")  # compat32's fold of it
                    continue
            key = _fold_key(policy, name, value)
            folded = _folded.get(key) if key is not None else None
            if folded is None:
                folded = policy.fold(name, value)
                if _too_long(folded, policy.linesep):  # see MAX_LINE
                    folded = policy.clone(max_line_length=FOLD_AT).fold(name, value)
                _verify(folded, policy.linesep)  # before it is cached: cached ones passed
                if key is not None:
                    with _folded_lock:
                        if len(_folded) >= FOLD_CACHE_SIZE:
                            _folded.clear()
                        _folded[key] = folded
            self.write(folded)
        self.write(self._NL)  # type: ignore[attr-defined]  # set by flatten()


class _FastAsString:
    def as_string(self, unixfrom: bool = False, maxheaderlen: int = 0,
                  policy: Any = None) -> str:
        """`Message.as_string`, through FastGenerator."""
        policy = self.policy if policy is None else policy  # type: ignore[attr-defined]
        fp = StringIO()
        FastGenerator(fp, mangle_from_=False, maxheaderlen=maxheaderlen,
                      policy=policy).flatten(self, unixfrom=unixfrom)
        return fp.getvalue()


class FastMIMEMultipart(_FastAsString, MIMEMultipart):
    """MIMEMultipart whose `as_string` goes through FastGenerator."""


# (subtype, charset and what its Charset says) -> the headers MIMEText writes for them.
_text_headers: dict[tuple[Any, ...], list[tuple[str, Any]]] = {}


class FastMIMEText(_FastAsString, MIMEText):
    """MIMEText whose `as_string` goes through FastGenerator, and which is made faster
    for a charset whose body encoding is quoted-printable or base64 (Apprise's "utf-8"
    is quoted-printable).

    The stdlib's constructor adds the Content-Type with the charset, then sets the charset
    again as a parameter of it (`set_param`: the header parsed and written again), then
    the MIME-Version and Content-Transfer-Encoding headers: the same headers for every
    text of a subtype and charset when the encoding is one of those two (for 7bit/8bit
    the encoding header depends on the text). Those headers are kept from the first such
    part made the stdlib's way; the payload is encoded by the same calls as the stdlib's
    (`set_payload`, `set_charset`): the same part, about a third of the time."""

    def __init__(self, _text: str, _subtype: str = "plain", _charset: str | None = None,
                 *, policy: Any = None) -> None:
        if policy is not None or _charset is None or type(_text) is not str \
                or type(_charset) is not str:
            super().__init__(_text, _subtype, _charset, policy=policy)
            return
        charset = Charset(_charset)
        key = (_subtype, _charset, charset.input_charset, charset.header_encoding,
               charset.body_encoding, charset.output_charset, charset.input_codec,
               charset.output_codec)
        headers = _text_headers.get(key)
        output = charset.output_charset
        if headers is None or output is None:
            super().__init__(_text, _subtype, _charset, policy=policy)
            if charset.body_encoding in (QP, BASE64) and output is not None \
                    and charset == charset.get_output_charset():
                made: Any = self  # (Message's attributes, which typeshed does not list)
                _text_headers[key] = list(made._headers)
            return
        Message.__init__(self, policy=compat32)
        # set_payload: the text in the output charset, kept as surrogate-escaped ASCII.
        payload = _text.encode(output).decode("ascii", "surrogateescape")
        # set_charset: the charset is its own output charset (checked above); the payload
        # encoded by the Charset (quoted-printable or base64), as bytes unless empty.
        part: Any = self
        part._charset = charset
        part._payload = charset.body_encode(
            payload.encode("ascii", "surrogateescape") if payload else payload)
        part._headers = list(headers)


# The plain-text part of the HTML email this context is sending (None: Apprise's own).
plain_text: ContextVar[str | None] = ContextVar("email_plain_text", default=None)


def plain_part(convert: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """Return Apprise's `convert_between` giving `plain_text`, when set, as the text of an
    HTML body (the email plugin's plain part); every other conversion is Apprise's."""

    def convert_between(from_format: Any, to_format: Any, content: Any) -> Any:
        text = plain_text.get()
        if text is not None and from_format == "html" and to_format == "text":
            return text
        return convert(from_format, to_format, content)

    convert_between.wrapped = convert  # type: ignore[attr-defined]
    return convert_between


def header_charset(get_charset: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """Apprise's email plugin's `_get_charset` (the charset of a header value: "utf-8"
    only if a character is not ASCII), answered by `str.isascii` instead of a Python loop
    over the characters; anything but a str is Apprise's to answer."""

    def get_charset_fast(text: Any) -> str | None:
        if type(text) is not str:
            return get_charset(text)
        if not text:
            return None
        return None if text.isascii() else "utf-8"

    get_charset_fast.wrapped = get_charset  # type: ignore[attr-defined]
    return get_charset_fast


def install(module: Any) -> bool:
    """Put the fast classes in `module` (Apprise's email plugin) where it has the stdlib's,
    and `plain_part` over its `convert_between`; return whether all three were found."""
    if getattr(module, "MIMEMultipart", None) is not MIMEMultipart or getattr(
            module, "MIMEText", None) is not MIMEText or not callable(
            getattr(module, "convert_between", None)):
        return False
    module.MIMEMultipart = FastMIMEMultipart
    module.MIMEText = FastMIMEText
    plugin = getattr(module, "NotifyEmail", None)
    found = getattr(plugin, "__dict__", {}).get("_get_charset")
    if isinstance(found, staticmethod) and getattr(found.__func__, "wrapped", None) is None:
        plugin._get_charset = staticmethod(  # type: ignore[union-attr]
            header_charset(found.__func__))
    if getattr(module.convert_between, "wrapped", None) is None:
        module.convert_between = plain_part(module.convert_between)
    return True
