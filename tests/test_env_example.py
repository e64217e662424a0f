""".env.example lists every setting with its default, and every clinic channel secret.

The settings side is read from `Settings.model_fields`, so a setting added later fails
here until it is documented; a setting renamed or removed fails until its stale line goes.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / ".env.example"
CLINICS = sorted((ROOT / "config" / "clinics").glob("*.toml"))
PREFIX = "REMINDERS_"
PLACEHOLDER = "change-me"

# `NAME=value`, or `# NAME=value` for a variable shown but left unset.
ASSIGNMENT = re.compile(r"^(?P<hash>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Entry:
    name: str
    value: str
    commented: bool
    line: int
    comment: str  # the description on the line above


def parse_env_example(text: str) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        match = ASSIGNMENT.match(line.strip())
        if not match:
            continue
        name = match["name"]
        assert name not in entries, f".env.example:{number}: {name} is listed twice"
        above = lines[number - 2].strip() if number > 1 else ""
        comment = above.lstrip("#").strip() if above.startswith("#") else ""
        if ASSIGNMENT.match(above):
            comment = ""  # the line above is another variable, not a description
        entries[name] = Entry(name, match["value"], bool(match["hash"]), number, comment)
    return entries


@pytest.fixture(scope="module")
def entries() -> dict[str, Entry]:
    return parse_env_example(ENV_EXAMPLE.read_text(encoding="utf-8"))


def setting_names() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields}


# A channel line of a clinic's [channels] table, live or commented out as an example.
CHANNEL_LINE = re.compile(r"^#?\s*[a-z_]+\s*=\s*(?P<url>\"[^\"]*\"|'[^']*')")


def channel_urls(path: Path) -> list[str]:
    """The channel URLs of a clinic file: the live ones and the commented-out examples."""
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    urls = [url for url in doc.get("channels", {}).values() if isinstance(url, str)]
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if re.match(r"^\[[^\]]+\]", line):
            section = line.split("]")[0].strip("[ ")
        elif section == "channels" and (match := CHANNEL_LINE.match(line)):
            urls.append(match["url"][1:-1])
    return urls


def clinic_secret_names() -> dict[str, set[str]]:
    """${NAME} references in each clinic's channel URLs, commented-out examples included."""
    return {path.name: {name for url in channel_urls(path) for name in ENV_REF.findall(url)}
            for path in CLINICS}


def test_channel_urls_are_found_live_and_commented(tmp_path: Path) -> None:
    clinic = tmp_path / "c.toml"
    clinic.write_text('# ${NOT_A_URL} in prose\nname = "x ${NOR_THIS}"\n[channels]\n'
                      'email = "mailtos://${A_USER}:${A_PASS}@h?to={to}"\n'
                      '# sms = "twilio://${B_SID}:${B_TOKEN}@${B_FROM}/{to}"\n'
                      '[send_window]\nstart = "09:00"\n', encoding="utf-8")
    names = {name for url in channel_urls(clinic) for name in ENV_REF.findall(url)}
    assert names == {"A_USER", "A_PASS", "B_SID", "B_TOKEN", "B_FROM"}


def test_parser_reads_set_and_commented_variables() -> None:
    parsed = parse_env_example("# the URL\n# REMINDERS_REDIS_URL=redis://x\n"
                               "# port\nREMINDERS_API_PORT=1\n# prose, not a variable\n")
    assert parsed["REMINDERS_REDIS_URL"] == Entry("REMINDERS_REDIS_URL", "redis://x", True, 2,
                                                  "the URL")
    assert parsed["REMINDERS_API_PORT"] == Entry("REMINDERS_API_PORT", "1", False, 4, "port")
    assert set(parsed) == {"REMINDERS_REDIS_URL", "REMINDERS_API_PORT"}


def test_every_setting_is_listed(entries: dict[str, Entry]) -> None:
    missing = sorted(setting_names() - set(entries))
    assert not missing, f"add these settings to .env.example: {missing}"


def test_no_stale_setting_is_listed(entries: dict[str, Entry]) -> None:
    listed = {name for name in entries if name.startswith(PREFIX)}
    stale = sorted(listed - setting_names())
    assert not stale, f".env.example lists variables Settings does not read: {stale}"


def test_every_variable_has_a_one_line_description(entries: dict[str, Entry]) -> None:
    undocumented = sorted(name for name, entry in entries.items() if len(entry.comment) < 10)
    assert not undocumented, f"give these a comment line just above them: {undocumented}"


def test_unset_defaults_are_commented_out_and_others_are_not(entries: dict[str, Entry]) -> None:
    # An empty value is not "unset": REMINDERS_OUTBOX_DIR= would mean the current folder.
    for name, field in Settings.model_fields.items():
        entry = entries[PREFIX + name.upper()]
        assert entry.commented == (field.default is None), (
            f"{entry.name}: default {field.default!r}, so it should "
            f"{'be commented out' if field.default is None else 'be set'} in .env.example")


def test_copying_it_to_dot_env_changes_nothing(
    entries: dict[str, Entry], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The set values are the defaults: a fresh `cp .env.example .env` behaves like no .env."""
    import os

    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env in the working folder
    from_example = Settings(_env_file=ENV_EXAMPLE)
    defaults = Settings(_env_file=None)
    assert from_example.model_dump() == defaults.model_dump()


def test_commented_examples_are_valid_values(entries: dict[str, Entry]) -> None:
    for name in Settings.model_fields:
        entry = entries[PREFIX + name.upper()]
        if name == "unsubscribe_secret":
            # A secret's example is a placeholder that must never work if uncommented as is.
            with pytest.raises(ValidationError, match="REMINDERS_UNSUBSCRIBE_SECRET must be"):
                Settings(_env_file=None, **{name: entry.value})
            continue
        if entry.commented:
            settings = Settings(_env_file=None, **{name: entry.value})
            assert getattr(settings, name) is not None


def test_clinic_channel_secrets_are_listed_as_placeholders(entries: dict[str, Entry]) -> None:
    assert CLINICS, "config/clinics/ has no clinic"
    for clinic, names in clinic_secret_names().items():
        missing = sorted(names - set(entries))
        assert not missing, f"{clinic} reads ${{NAME}} secrets missing from .env.example: {missing}"
        for name in names:
            entry = entries[name]
            assert entry.commented and entry.value == PLACEHOLDER, (
                f".env.example:{entry.line}: {name} must be commented out with the "
                f"placeholder {PLACEHOLDER!r}, never a real value")


def test_no_stale_secret_is_listed(entries: dict[str, Entry]) -> None:
    referenced = set().union(*clinic_secret_names().values())
    others = {name for name in entries if not name.startswith(PREFIX)}
    stale = sorted(others - referenced)
    assert not stale, f".env.example lists secrets no clinic file references: {stale}"


def test_loaded_channel_urls_reference_only_listed_secrets(
    entries: dict[str, Entry], catalog
) -> None:
    """The live (uncommented) channel URLs, as the worker loads them, are covered too."""
    for clinic in catalog.clinics.values():
        for channel, url in clinic.channels.items():
            missing = sorted(set(ENV_REF.findall(url)) - set(entries))
            assert not missing, f"clinic {clinic.id} {channel}: {missing} not in .env.example"
