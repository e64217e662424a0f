"""SMS text rules: the GSM 03.38 alphabet, typographic clean-up, accent folding and
segment counting.

A text made only of GSM-7 characters costs 160 units in one segment, 153 per part when
split (each extension character takes two units). One character outside GSM-7 turns
the whole text into UCS-2: 70 UTF-16 code units in one segment, 67 per part.
"""

from __future__ import annotations

import unicodedata
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
# `normalise` never replaces letters: "María" stays "María" (folding is `fold_to_gsm7`).
_TYPOGRAPHIC = str.maketrans({
    "\u00a0": " ", "\u2007": " ", "\u2009": " ", "\u202f": " ",
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'",
    # Apostrophes names are written with: modifier letters (the Hawaiian ʻokina, U+02BC),
    # and a grave or acute accent typed for one ("O`Brien", "D´Angelo" on Spanish keyboards).
    "\u02bb": "'", "\u02bc": "'", "\u0060": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u2026": "...",
})


def normalise(text: str) -> str:
    """Return `text` on one line, typographic characters replaced by their GSM-7 twins."""
    return " ".join(text.translate(_TYPOGRAPHIC).split())


# Letters outside GSM-7 that Unicode does not decompose into a base letter + accent.
_FOLD_EXTRA = {
    "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "ı": "i", "ħ": "h",
    "Ħ": "H", "ŧ": "t", "Ŧ": "T", "œ": "oe", "Œ": "OE", "þ": "th", "Þ": "Th",
}


def fold_to_gsm7(text: str) -> str:
    """Return `text` with each letter outside GSM-7 folded to its base letter(s).

    "María Zoë Łukasz François" -> "Maria Zoe Lukasz Francois". GSM-7's own accented
    letters (é è ù ì ò à ä ö ñ ü Ä Ö Ñ Ü Ç É Å å Ø ø Æ æ ß) are kept, as is anything
    with no GSM-7 base (other scripts, emoji, "°"): those still cost UCS-2.

    Each character folds on its own (`_fold_one`, kept once worked out): a text already
    all GSM-7 (most SMS) is returned as it is; else each of its characters outside GSM-7
    is replaced by its fold (a fold is GSM-7 or the character itself, so no replacement
    makes another). (A per-character loop was the send path's costliest function of its
    own for an SMS: two texts a message.)
    """
    text = unicodedata.normalize("NFC", text)
    if _GSM7.issuperset(text):
        return text
    for ch in set(text).difference(_GSM7):
        folded = _FOLDS.get(ch)
        if folded is None:
            folded = _fold_one(ch)
            if len(_FOLDS) < FOLDS_KEPT:
                _FOLDS[ch] = folded
        if folded != ch:
            text = text.replace(ch, folded)
    return text


def _fold_one(ch: str) -> str:
    """One character folded as `fold_to_gsm7` folds it."""
    if ch in _GSM7:
        return ch
    if ch in _FOLD_EXTRA:
        return _FOLD_EXTRA[ch]
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return base if base and is_gsm7(base) else ch


# Each character folded so far and its fold (the sender threads share it: a fold is the
# same whichever thread stores it); at most FOLDS_KEPT, so that texts in every script
# cannot grow it without bound (past that, a new character is worked out each time).
FOLDS_KEPT = 4096
_FOLDS: dict[str, str] = {}
_GSM7 = GSM7_BASIC | GSM7_EXTENSION


def is_gsm7(text: str) -> bool:
    return _GSM7.issuperset(text)


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
