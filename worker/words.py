"""The short texts kept beside the templates that are not Jinja templates.

Two files per language folder of templates/, each a TOML table of plain strings with
`str.format` placeholders:
- `_replies.toml`: the answers to a patient's text (worker/api/inbound.py), sent back as
  one SMS;
- `_unsubscribe.toml`: the words of the email unsubscribe page
  (worker/api/unsubscribe.py), shown in the patient's language as their emails are.

English (templates/en) must have both; another language's file is optional: its patients
get English then, as they do for a text missing from it or one that does not format. A
file is read again once it changes (as templates are) and kept as last loaded while an
edit does not load (logged). `reminders check` reads every file against `VALUES`
(worker/checking.py): a folder adding a language adds its files, nothing else.
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

REPLIES = "_replies.toml"
UNSUBSCRIBE = "_unsubscribe.toml"
FALLBACK = "en"

# Each file's texts and the values each is written with (its placeholders may name these).
VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    REPLIES: {
        "stop": ("clinic", "phone"), "start": ("clinic", "phone"),
        "help": ("clinic", "phone"), "confirm": ("clinic", "phone", "date", "time"),
        "reschedule": ("clinic", "phone"), "no_visit": ("clinic", "phone"),
        "clarify": ("clinic", "phone"), "change": ("clinic", "phone"),
    },
    UNSUBSCRIBE: {
        "ask_title": ("clinic",), "ask": ("clinic", "address", "phone"), "button": (),
        "safety": (), "questions": ("clinic", "phone"), "done_title": ("clinic",),
        "done": ("clinic", "address"), "the_clinic": (), "invalid_title": (),
        "invalid": (),
    },
}

# Each file as last loaded, with the (mtime, size) it was loaded at.
_LOADED: dict[Path, tuple[tuple[int, int], dict[str, str]]] = {}
_lock = threading.Lock()


def table(templates_dir: Path, folder: str, name: str) -> dict[str, str]:
    """The texts of templates/<folder>/<name>: read again once the file changes, kept as
    last loaded while an edit does not load (logged); raise if it never loaded."""
    path = templates_dir / folder / name
    held = _LOADED.get(path)
    try:
        stat = path.stat()
        seen = (stat.st_mtime_ns, stat.st_size)
        if held is not None and held[0] == seen:
            return held[1]
        with open(path, "rb") as fh:
            loaded = {k: str(v) for k, v in tomllib.load(fh).items()}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        if held is None:
            raise
        log.error("%s does not load (%s): its texts as last loaded are kept", path,
                  type(exc).__name__)
        return held[1]
    with _lock:
        _LOADED[path] = (seen, loaded)
    return loaded


def language_of(locale: str) -> str:
    """"es-MX" -> "es", "en_GB" -> "en" (lower case)."""
    return locale.replace("_", "-").split("-")[0].lower()


def folder_for(templates_dir: Path, locales: Iterable[str], name: str) -> str:
    """The language folder a text of `name` is written from: the first of `locales` whose
    language folder has the file, else English."""
    for locale in locales:
        language = language_of(locale)
        if language and (templates_dir / language / name).is_file():
            return language
    return FALLBACK


def text(templates_dir: Path, folder: str, name: str, key: str, **values: str) -> str:
    """The text `key` of `name` in `folder`, formatted with `values`; in English (logged)
    when that folder's file does not load, lacks it, or it does not format with them.
    Raises only when English itself fails (`reminders check` reports that)."""
    for candidate in dict.fromkeys((folder, FALLBACK)):
        try:
            return table(templates_dir, candidate, name)[key].format(**values)
        except (KeyError, IndexError, ValueError, OSError) as exc:
            if candidate == FALLBACK:
                raise
            log.error("templates/%s/%s: the text %r does not load or format (%s): "
                      "given in English", candidate, name, key, type(exc).__name__)
    raise AssertionError("unreachable: English or raise")
