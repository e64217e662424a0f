"""SMS text rules: the GSM 03.38 alphabet, typographic clean-up and segment counting.

A text made only of GSM-7 characters costs 160 units in one segment, 153 per part when
split (each extension character takes two units). One character outside GSM-7 turns
the whole text into UCS-2: 70 UTF-16 code units in one segment, 67 per part.
"""

from __future__ import annotations

from typing import Literal

Encoding = Literal["GSM-7", "UCS-2"]

# GSM 03.38 basic character set (the escape code 0x1B is not a character of its own).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each is sent as ESC + code, so it counts two units.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

SINGLE_SEGMENT = {"GSM-7": 160, "UCS-2": 70}
PART_OF_MANY = {"GSM-7": 153, "UCS-2": 67}

# Typographic characters with a plain GSM-7 twin (Babel puts U+202F in English times).
# Letters are never replaced: "María" stays "María", even though it costs UCS-2.
_TYPOGRAPHIC = str.maketrans({
    "\u00a0": " ", "\u2007": " ", "\u2009": " ", "\u202f": " ",
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u2026": "...",
})


def normalise(text: str) -> str:
    """Return `text` on one line, typographic characters replaced by their GSM-7 twins."""
    return " ".join(text.translate(_TYPOGRAPHIC).split())


def is_gsm7(text: str) -> bool:
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text)


def non_gsm7(text: str) -> list[str]:
    """Return the characters that force `text` into UCS-2, in order of appearance."""
    return list(dict.fromkeys(ch for ch in text if ch not in GSM7_BASIC | GSM7_EXTENSION))


def sms_segments(text: str) -> tuple[Encoding, int, int]:
    """Return (encoding, length in units, number of segments) for an SMS text."""
    if is_gsm7(text):
        encoding: Encoding = "GSM-7"
        units = [2 if ch in GSM7_EXTENSION else 1 for ch in text]
    else:
        encoding = "UCS-2"
        units = [len(ch.encode("utf-16-le")) // 2 for ch in text]
    length = sum(units)
    if length <= SINGLE_SEGMENT[encoding]:
        return encoding, length, 1 if length else 0
    # Phones never split an escape pair or a surrogate pair across two parts.
    segments, used = 1, 0
    for size in units:
        if used + size > PART_OF_MANY[encoding]:
            segments, used = segments + 1, 0
        used += size
    return encoding, length, segments
