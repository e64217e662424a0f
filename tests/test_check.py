"""`reminders check`, run as a subprocess on the repository's config and on broken copies."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.protocols import NOTICE_STEPS, load_protocols

ROOT = Path(__file__).resolve().parent.parent
# Every step's template, and the change notices' (worker/notices.py).
_PROTOCOLS = load_protocols(ROOT / "config" / "protocols").values()
TEMPLATES = sorted({s.template for p in _PROTOCOLS for s in p.steps} | set(NOTICE_STEPS)
                   | {p.hold_template for p in _PROTOCOLS if p.hold_template})
EXIT_OK, EXIT_USAGE, EXIT_CONFIG = 0, 2, 3


def run_check(config: Path, templates: Path, *args: str, cwd: Path,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `reminders check` in a clean environment pointed at `config` and `templates`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    clean.update(env or {})
    clean.update(REMINDERS_CONFIG_DIR=str(config), REMINDERS_TEMPLATES_DIR=str(templates),
                 PYTHONPATH=str(ROOT))
    # cwd is a scratch folder, so that no developer's .env is read.
    return subprocess.run([sys.executable, "-m", "worker.cli", "check", *args], cwd=cwd,
                          env=clean, capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A scratch copy of config/ and templates/ to break."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    return tmp_path


def check_copy(copy: Path, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return run_check(copy / "config", copy / "templates", *args, cwd=copy, **kwargs)


def table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("TEMPLATE "))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_repo_config_is_valid_and_every_sms_fits_one_segment(tmp_path: Path) -> None:
    result = run_check(ROOT / "config", ROOT / "templates", cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == ""
    rows = table_rows(result.stdout)
    assert [r[:3] for r in rows] == [[t, loc, wording] for t in TEMPLATES for loc in ("en", "es")
                                     for wording in ("plain", "discreet")]
    for template, locale, wording, encoding, length, segments in rows:
        assert (encoding, segments) == ("GSM-7", "1"), (template, locale, wording)
        assert 0 < int(length) <= 160
    assert "WARNING" not in result.stdout
    # Where the calendar invites say each clinic is.
    assert "clinic glow: Glow Skin Clinic, Calle de Serrano 41, 28001 Madrid" in result.stdout
    protocols = len(list((ROOT / "config" / "protocols").glob("*.toml")))
    clinics = len(list((ROOT / "config" / "clinics").glob("*.toml")))
    assert result.stdout.rstrip().splitlines()[-1] == (
        f"ok: {protocols} protocols, {clinics} clinic(s), locales en, es")


def test_output_is_stable(tmp_path: Path) -> None:
    first = run_check(ROOT / "config", ROOT / "templates", cwd=tmp_path)
    second = run_check(ROOT / "config", ROOT / "templates", cwd=tmp_path)
    assert first.stdout == second.stdout and first.stdout


def test_json_gives_the_same_data(tmp_path: Path) -> None:
    result = run_check(ROOT / "config", ROOT / "templates", "--json", cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["errors"] == []
    assert len(report["sms"]) == len(TEMPLATES) * 2 * 2
    day_before = next(s for s in report["sms"] if (s["template"], s["locale"], s["discreet"])
                      == ("day-before", "es", False))
    # The worst Spanish sample name: 12 letters, its "ó" folded to GSM-7 (sms_accents).
    assert day_before["text"].startswith("Hola, Purificacion: te esperamos")
    assert day_before["text"].endswith(". Responde BAJA para no recibir SMS")
    assert (day_before["encoding"], day_before["segments"]) == ("GSM-7", 1)
    assert day_before["length"] == len(day_before["text"])


@pytest.mark.parametrize(
    ("breakage", "file", "problem"),
    [
        ("delete", "templates/es/day-before.sms.txt.j2", "missing (needed by step 'day-before'"),
        ("delete", "templates/en/peel-prep.email.html.j2", "missing"),
        ("write:Hi {{ patient_firstname }}", "templates/es/spf-morning.sms.txt.j2",
         "'patient_firstname' is undefined"),
        ("write:{% if discreet %}\nHi", "templates/en/week-check.email.txt.j2:2",
         "syntax error"),
        ("write:<p>{{ clinic_adress }}</p>{% block body %}{% endblock %}",
         "templates/en/_layout.email.html.j2:1", "'clinic_adress' is undefined"),
        # A Python error inside a template (not Jinja's own): a traceback, exit 1.
        ("write:Hi {{ 1 / 0 }}", "templates/es/day-before.sms.txt.j2:1",
         "ZeroDivisionError: division by zero"),
        ("write:{{ '%d' % clinic_name }}", "templates/en/week-check.email.txt.j2:1",
         "TypeError: %d format: a real number is required"),
        ("write:name = [broken", "config/protocols/microneedling.toml", "configuration error"),
        ("write:name = 'x'\nsteps = []", "config/protocols/microneedling.toml",
         "steps: List should have at least 1 item"),
    ],
)
def test_a_broken_file_exits_3_and_is_named(copy: Path, breakage: str, file: str,
                                            problem: str) -> None:
    path = copy / file.split(":")[0]
    if breakage == "delete":
        path.unlink()
    else:
        path.write_text(breakage.removeprefix("write:"), encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert str(copy / file) in result.stderr
    assert problem in result.stderr


def test_a_clinic_locale_without_templates_is_an_error(copy: Path) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace('locale = "es"', 'locale = "fr"'))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG
    assert f"{clinic}: locale 'fr' has no templates folder" in result.stderr


@pytest.mark.parametrize("written", ["ES", "Es", "es_es"])
def test_a_clinic_locale_in_another_case_is_its_language(copy: Path, written: str) -> None:
    # Language tags are case-insensitive (RFC 5646 2.1.1), as a patient's locale is read:
    # "ES" was refused ("has no templates folder") while "es" has one.
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace('locale = "es"', f'locale = "{written}"'))
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stderr
    assert "has no templates folder" not in result.stderr


@pytest.mark.parametrize("written", ["", "spanish!", "e", "es-ES-x-y-z"])
def test_a_clinic_locale_that_is_no_language_tag_is_named(copy: Path, written: str) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace('locale = "es"', f'locale = "{written}"'))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG
    assert re.search(rf"{re.escape(str(clinic))}.*locale: .*language tag such as en or es-ES",
                     result.stderr), result.stderr


def test_a_reader_leaving_stdout_does_not_turn_an_error_into_success(copy: Path) -> None:
    # `reminders check | grep -q ...` (or `| head` under `set -o pipefail`): the reader
    # leaves before check prints. The broken pipe was caught as "the reader left, not an
    # error" and check exited 0 on a broken configuration.
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace('locale = "es"', 'locale = "fr"'))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    clean.update(REMINDERS_CONFIG_DIR=str(copy / "config"), PYTHONPATH=str(ROOT),
                 REMINDERS_TEMPLATES_DIR=str(copy / "templates"))
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "check"], cwd=copy, env=clean,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the first line
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_CONFIG, stderr
    assert f"{clinic}: locale 'fr' has no templates folder" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_an_sms_over_one_segment_is_a_warning(copy: Path) -> None:
    sms = copy / "templates" / "es" / "week-check.sms.txt.j2"
    sms.write_text(sms.read_text() + " Recuerda tu próxima sesión dentro de unas semanas.\n")
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stderr
    # Folded to GSM-7 ("proxima sesion"), it is two segments, not UCS-2.
    assert f"WARNING: {sms} (plain): 2 segments (GSM-7, " in result.stdout
    assert ["week-check", "es", "plain", "GSM-7"] == next(
        r[:4] for r in table_rows(result.stdout) if r[:3] == ["week-check", "es", "plain"])
    # A character with no GSM-7 base letter cannot be folded: UCS-2, and named.
    sms.write_text(sms.read_text() + " \u263a\n")
    result = check_copy(copy)
    assert re.search(rf"WARNING: {re.escape(str(sms))} \(plain\): \d segments \(UCS-2, .*"
                     "not GSM-7 because of \u263a", result.stdout)


def test_a_clinic_keeping_accents_sees_their_cost(copy: Path) -> None:
    """sms_accents = "keep": "María" stays, and with it the whole text is UCS-2."""
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace("discreet = false", 'discreet = false\n'
                                                 'sms_accents = "keep"'))
    result = check_copy(copy, "--clinic", "glow")
    assert result.returncode == EXIT_OK, result.stderr
    rows = {tuple(r[:3]): r[3:] for r in table_rows(result.stdout)}
    # The worst sample names have a letter outside GSM-7 in both languages (Zoë, Purificación).
    assert rows[("day-before", "es", "plain")][0] == "UCS-2"
    assert int(rows[("day-before", "es", "plain")][2]) >= 3
    assert rows[("day-before", "en", "plain")][0] == "UCS-2"
    day_before = copy / "templates" / "es" / "day-before.sms.txt.j2"
    assert f"WARNING: {day_before} (plain): 3 segments (UCS-2, " in result.stdout
    assert "not GSM-7 because of ó" in result.stdout
    # The default folds them: the same clinic without the setting has no warning at all.
    clinic.write_text(clinic.read_text().replace('sms_accents = "keep"', ""))
    assert "WARNING" not in check_copy(copy, "--clinic", "glow").stdout


def test_a_clinic_name_with_accents_is_folded_in_sms(copy: Path) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace('name = "Glow Skin Clinic"',
                                                 'name = "Clínica Núñez"'))
    result = check_copy(copy, "--clinic", "glow", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = json.loads(result.stdout)
    texts = [s["text"] for s in report["sms"] if "Clinica Nuñez" in s["text"]]
    assert texts and all(s["encoding"] == "GSM-7" for s in report["sms"])
    assert report["warnings"] == []


def test_missing_channel_secrets_are_warnings(copy: Path) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text()
                      + 'sms = "json://sms.example/${CHECK_TEST_SMS_TOKEN}/{to}"\n'
                      + 'email = "mailto://smtp.example?from=desk@glow.example&to={to}"\n')
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stderr
    assert (f"WARNING: {clinic}: environment variable CHECK_TEST_SMS_TOKEN is not set"
            in result.stdout)
    with_secret = check_copy(copy, env={"CHECK_TEST_SMS_TOKEN": "x"})
    assert "CHECK_TEST_SMS_TOKEN" not in with_secret.stdout



def test_emails_whose_unsubscribe_link_patients_cannot_open_are_a_warning(copy: Path) -> None:
    """Without REMINDERS_PUBLIC_URL every email's unsubscribe link (footer, List-Unsubscribe)
    is the API's own http://127.0.0.1:8000 address; one-click (RFC 8058) takes https only."""
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text()
                      + 'sms = "json://sms.example/send?:to={to}"\n'
                      + 'email = "mailto://smtp.example?from=desk@glow.example&to={to}"\n')
    unset = check_copy(copy, "--clinic", "glow")
    assert unset.returncode == EXIT_OK, unset.stderr
    assert ("WARNING: REMINDERS_PUBLIC_URL is not set: the unsubscribe link of every email "
            "(its footer and List-Unsubscribe header) is http://127.0.0.1:8000/v1/unsubscribe/"
            in unset.stdout), unset.stdout
    plain = check_copy(copy, "--clinic", "glow",
                       env={"REMINDERS_PUBLIC_URL": "http://reminders.glow.example"})
    assert ("WARNING: REMINDERS_PUBLIC_URL is http://reminders.glow.example: mail providers' "
            "one-click unsubscribe (RFC 8058) takes https links only" in plain.stdout)
    https = check_copy(copy, "--clinic", "glow",
                       env={"REMINDERS_PUBLIC_URL": "https://reminders.glow.example"})
    assert "REMINDERS_PUBLIC_URL" not in https.stdout
    # Emails to the outbox only (no email URL): no patient gets a link.
    assert "REMINDERS_PUBLIC_URL" not in check_copy(copy, "--clinic", "demo").stdout

def test_a_clinic_with_a_url_for_one_channel_only_is_an_error(copy: Path) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text() + 'sms = "json://sms.example/send?:to={to}"\n')
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"configuration error: {clinic}: has no URL for email and does not use the "
            "outbox (add channels.email, or outbox = true" in result.stderr)
    assert "no URL for sms" not in result.stderr
    assert "demo.toml" not in result.stderr  # no channel URL at all: the outbox


def test_outbox_true_makes_a_clinic_with_one_channel_url_valid(copy: Path) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    text = clinic.read_text().replace("# outbox = true ", "outbox = true ", 1)
    assert "\noutbox = true " in text
    clinic.write_text(text + 'sms = "json://sms.example/send?:to={to}"\n')
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == ""


def test_a_template_no_step_uses_is_a_warning(copy: Path) -> None:
    stray = copy / "templates" / "en" / "day-befor.sms.txt.j2"
    stray.write_text("Hi {{ patient_first_name }}")
    result = check_copy(copy)
    assert result.returncode == EXIT_OK
    assert f"WARNING: {copy / 'templates' / 'en'}: template 'day-befor' is used by no" \
        in result.stdout


def test_an_unknown_clinic_is_a_usage_error(tmp_path: Path) -> None:
    result = run_check(ROOT / "config", ROOT / "templates", "--clinic", "nope", cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert "unknown clinic 'nope'" in result.stderr


def test_a_missing_held_alert_template_is_an_error(copy: Path) -> None:
    missing = copy / "templates" / "es" / "clinic" / "held.email.txt.j2"
    missing.unlink()
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG
    assert f"{missing}: missing (needed by clinic glow's held-booking alert)" in result.stderr


def test_a_webhook_secret_must_come_from_the_environment(copy: Path) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace(
        "[send_window]", '[webhook]\nurl = "https://booking.glow.example/hooks"\n'
        'secret = "hunter2"\n\n[send_window]'))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG
    assert "webhook.secret" in result.stderr and "hunter2" not in result.stderr
    clinic.write_text(clinic.read_text().replace('"hunter2"', '"${GLOW_WEBHOOK_SECRET}"'))
    unset = check_copy(copy)
    assert unset.returncode == EXIT_OK, unset.stderr
    assert "environment variable GLOW_WEBHOOK_SECRET is not set" in unset.stdout


def test_a_clinic_without_address_is_a_warning_and_a_bad_one_an_error(copy: Path) -> None:
    clinic = copy / "config" / "clinics" / "glow.toml"
    text = clinic.read_text()
    clinic.write_text("\n".join(x for x in text.splitlines() if not x.startswith("address")))
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stderr
    assert f"WARNING: {clinic}: no address" in result.stdout
    assert "clinic glow: Glow Skin Clinic, (no address)" in result.stdout
    clinic.write_text(text.replace('address = "Calle de Serrano 41, 28001 Madrid"',
                                   'address = "  "'))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG
    assert "address: Value error, must not be blank" in result.stderr or (
        "address" in result.stderr and "blank" in result.stderr), result.stderr


# Review (config while sending): `check` passed a clinic whose channel URL Apprise cannot
# load (a scheme mistyped, "jsn://"; an email URL with no sender, "mailto://host?to={to}"):
# exit 0, and the worker dead-lettered every message of that channel at its first attempt
# ("Apprise cannot load the channel URL", a permanent failure). `check` loads each URL as
# the worker does (the patient's address a sample, its ${NAME}s from the environment; with
# one unset only the scheme is asked) and names the file and channels.<channel>, never the
# URL (it may hold a secret once filled in).
def test_a_channel_url_apprise_cannot_load_is_an_error(copy: Path) -> None:
    from worker.delivery import load_services

    clinic = copy / "config" / "clinics" / "glow.toml"
    text = clinic.read_text()
    clinic.write_text(text + 'sms = "jsn://sms.example/${CHECK_TEST_TOKEN}?:to={to}"\n'
                      + 'email = "mailto://smtp.example?to={to}"\n')
    # What the worker makes of them at each send (worker/delivery.py): nothing to send with.
    assert load_services("jsn://sms.example/x?:to=%2B34600111222") is None
    assert load_services("mailto://smtp.example?to=patient@example.com") is None
    for env in ({}, {"CHECK_TEST_TOKEN": "s3cret-value"}):
        result = check_copy(copy, env=env)
        assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
        assert (f"configuration error: {clinic}: channels.sms: Apprise cannot load this URL "
                "(no plugin for the scheme 'jsn')") in result.stderr, result.stderr
        assert (f"configuration error: {clinic}: channels.email: Apprise cannot load this URL"
                in result.stderr), result.stderr
        assert "smtp.example" not in result.stderr and "s3cret" not in result.stderr
    # Loadable URLs pass, their secrets set or not.
    clinic.write_text(text + 'sms = "json://sms.example/${CHECK_TEST_TOKEN}?:to={to}"\n'
                      + 'email = "mailto://smtp.example?from=desk@glow.example&to={to}"\n')
    for env in ({}, {"CHECK_TEST_TOKEN": "s3cret-value"}):
        result = check_copy(copy, env=env)
        assert result.returncode == EXIT_OK, result.stdout + result.stderr


# Review (config while sending): `check` never read templates/<language>/_replies.toml, the
# answers to a patient's texts (worker/api/inbound.py). A placeholder mistyped there
# ("{clinc}"), one an answer is not given ("{date}" outside `confirm`), an answer left out or
# a file that is not TOML passed `check` (exit 0); the API then failed the patient's STOP
# with a 500 after taking it (the provider does not send it again: the STOP's confirmation,
# the one answer an opted-out number is owed, never went), and every HELP with a 500; since
# 27f26e8 it answers such a patient in English instead, still not in their language.
# `check` reads each file as the API does and names the file and the answer.
def test_a_reply_the_api_cannot_write_is_an_error(copy: Path) -> None:
    from worker.api.inbound import reply_text
    from worker.catalog import Catalog
    from worker.settings import Settings

    replies = copy / "templates" / "es" / "_replies.toml"
    text = replies.read_text(encoding="utf-8")
    broken = (text.replace("stop = \"{clinic}:", "stop = \"{clinc}:", 1)
              .replace("help = \"{clinic}:", "help = \"{clinic} ({date}):", 1))
    assert "{clinc}" in broken and "({date})" in broken
    broken = "\n".join(line for line in broken.splitlines()
                       if not line.startswith("no_visit ")) + "\n"
    replies.write_text(broken, encoding="utf-8")
    settings = Settings(config_dir=copy / "config", templates_dir=copy / "templates",
                        _env_file=None)
    clinic = Catalog.load(settings).clinics["glow"]
    # What the API does with a Spanish patient's STOP: answered, but in English (27f26e8;
    # it was a 500 before).
    assert "no more texts from us" in reply_text(copy / "templates", "es", "stop", clinic)
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    for problem in ("stop: the placeholder {clinc} is not one this text has",
                    "help: the placeholder {date} is not one this text has",
                    "no_visit: missing"):
        assert f"configuration error: {replies}: {problem}" in result.stderr, result.stderr
    replies.write_text("stop = \n", encoding="utf-8")  # not TOML
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"configuration error: {replies}: " in result.stderr, result.stderr
    replies.write_text(text, encoding="utf-8")
    assert check_copy(copy).returncode == EXIT_OK


# The unsubscribe page's words were Python (a dict of en and es in worker/api/unsubscribe.py):
# a clinic adding templates in a third language got its emails in it and the page in
# English. They are templates/<language>/_unsubscribe.toml now, read by `check` as the
# answers are.
def test_an_unsubscribe_page_text_the_api_cannot_write_is_an_error(copy: Path) -> None:
    words = copy / "templates" / "es" / "_unsubscribe.toml"
    text = words.read_text(encoding="utf-8")
    broken = "\n".join(
        line.replace("{phone}", "{telefono}") if line.startswith("questions =") else line
        for line in text.splitlines() if not line.startswith("button =")) + "\n"
    assert "{telefono}" in broken
    words.write_text(broken.replace('done_title = "', 'done_title = "{address} '),
                     encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    for problem in ("questions: the placeholder {telefono} is not one this text has (it has "
                    "{clinic}, {phone})",
                    "done_title: the placeholder {address} is not one this text has",
                    "button: missing (the unsubscribe page's text"):
        assert f"configuration error: {words}: {problem}" in result.stderr, result.stderr
    words.unlink()  # Spanish patients then get the English page: not an error
    assert check_copy(copy).returncode == EXIT_OK
    english = copy / "templates" / "en" / "_unsubscribe.toml"
    english.unlink()
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"configuration error: {english}: cannot be read" in result.stderr, result.stderr


# Review (config while sending): every `*.toml` in config/clinics and config/protocols was
# read, hidden files too: the AppleDouble `._glow.toml` a macOS tar or copy leaves beside
# each file (binary), or the lock `.#glow.toml` Emacs keeps while a file is edited (a
# symlink to nowhere), made the whole configuration fail to load: `check` exit 3, and a
# worker or API (re)started then stopped at start, again and again, though no clinic or
# protocol was wrong (no clinic id may begin with "."). Hidden files are not configuration.
def test_hidden_files_beside_the_configuration_are_not_read(copy: Path) -> None:
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\x09\xff"
    (copy / "config" / "clinics" / "._glow.toml").write_bytes(apple)
    (copy / "config" / "protocols" / "._microneedling.toml").write_bytes(apple)
    (copy / "config" / "clinics" / ".#glow.toml").symlink_to("ops@host.4242:1763880000")
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stderr == ""
    clinics = len(list((ROOT / "config" / "clinics").glob("*.toml")))
    assert f" protocols, {clinics} clinic(s), " in result.stdout.splitlines()[-1], result.stdout


# Review (config while sending): a hidden folder in templates/ (`.git` when templates/ is its
# own checkout, an editor's `.idea`) was taken as a language: `check` failed with every
# template "missing" in it and ".git: not a locale Babel knows" (exit 3, 85 errors), for
# templates the worker sends from without a word (its renderer never takes a hidden folder
# as a language). Hidden folders are not languages.
def test_a_hidden_folder_in_templates_is_not_a_language(copy: Path) -> None:
    git = copy / "templates" / ".git"
    (git / "objects").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stderr == ""
    assert result.stdout.rstrip().splitlines()[-1].endswith("locales en, es"), result.stdout


# Review (config while sending): `check` compiles every .j2 file under templates/, hidden ones
# too, and took a file that is not UTF-8 as a crash: the AppleDouble `._day-before.sms.txt.j2`
# a macOS copy leaves beside each template (binary; the worker never reads it) ended check
# with a UnicodeDecodeError traceback, and so did a template saved as Latin-1, naming no file
# (the worker dead-letters its messages). Hidden files are left out; a template that is not
# UTF-8 is an error naming the file.
def test_a_template_that_is_not_utf8_is_named_and_hidden_ones_are_not_read(copy: Path) -> None:
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\x09\xff\xfe"
    (copy / "templates" / "en" / "._day-before.sms.txt.j2").write_bytes(apple)
    result = check_copy(copy)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stderr == ""
    sms = copy / "templates" / "es" / "confirmation.sms.txt.j2"
    text = sms.read_text(encoding="utf-8")
    assert not text.isascii()
    sms.write_bytes(text.encode("latin-1"))  # saved as Latin-1
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"configuration error: {sms}: not UTF-8 text (byte " in result.stderr, result.stderr


# Review (config while sending): an [advice] value written `inf` or `nan` (TOML floats) loaded
# and passed `check` (exit 0): the messages stating it told patients "SPF inf" / "SPF nan".
# A value must be a finite number; refused at load, naming the file and the key.
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_an_advice_value_that_is_no_number_is_an_error(copy: Path, value: str) -> None:
    protocol = copy / "config" / "protocols" / "microneedling.toml"
    text = protocol.read_text(encoding="utf-8")
    assert "\nspf = 30" in text
    protocol.write_text(text.replace("\nspf = 30", f"\nspf = {value}", 1), encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"configuration error: {protocol}: advice.spf" in result.stderr, result.stderr


@pytest.mark.parametrize("zone", ["CET", "EST", "MST7MDT", "Etc/GMT-1"])
def test_a_clinic_timezone_that_names_no_place_is_an_error(copy: Path, zone: str) -> None:
    """A zone abbreviation or a fixed offset loads in zoneinfo but is not where the clinic
    is: "EST" stays UTC-5 all summer (invites, patients' replies an hour off in New York),
    and no country is found for the region's formats (°F, dates)."""
    clinic = copy / "config" / "clinics" / "glow.toml"
    clinic.write_text(clinic.read_text().replace('timezone = "Europe/Madrid"',
                                                 f'timezone = "{zone}"'))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"{clinic}: timezone: {zone!r} is not a place" in result.stderr
    assert "e.g. Europe/Madrid or America/New_York" in result.stderr


def test_two_pause_steps_in_one_protocol_are_an_error(copy: Path) -> None:
    """Only one step's pause is corrected when the visit moves (Protocol.pause_step): a
    second `pause = true` would be left standing, so it is refused."""
    protocol = copy / "config" / "protocols" / "microneedling.toml"
    protocol.write_text(protocol.read_text().replace(
        'template = "microneedling-prep"', 'template = "microneedling-prep"\npause = true'))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"{protocol}: pause = true on steps stop-retinoids, prep: one step per protocol "
            "may pause a product") in result.stderr


@pytest.mark.parametrize(("file", "old", "new", "problem"), [
    ("protocols/microneedling.toml", 'offset = "3h"', 'offest = "3h"',
     "steps.4.offest: unknown key (did you mean offset?) in step 'aftercare'"),
    ("protocols/microneedling.toml", 'late_until = "-6h"', 'late_untill = "-6h"',
     "steps.1.late_untill: unknown key (did you mean late_until?) in step 'stop-retinoids'"),
    ("protocols/microneedling.toml", 'time = "18:00"', 'time = "25:00"',
     "steps.1.time: Input should be in a valid time format, hour value is outside expected "
     "range of 0-23 in step 'stop-retinoids'"),
    ("clinics/glow.toml", "[send_window]", "[sendwindow]",
     "sendwindow: unknown key (did you mean send_window?)"),
    ("clinics/glow.toml", "max_per_day = 1", "max_per_dya = 1",
     "sms.max_per_dya: unknown key (did you mean max_per_day?)"),
])
def test_a_mistyped_key_is_named_with_what_to_write_and_its_step(copy: Path, file: str, old: str,
                                                                 new: str, problem: str) -> None:
    """An ops person's typo: the error says which key was meant, and which step (by id, not
    only its 0-based place among the [[steps]]) it is in."""
    path = copy / "config" / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert f"{path}: {problem}" in result.stderr


@pytest.mark.parametrize(("name", "instead"), [("chemical peel", "chemical-peel"),
                                               ("Chemical-Peel", "chemical-peel"),
                                               ("peel.v2", "peel-v2")])
def test_a_protocol_file_name_that_is_no_treatment_id_is_an_error(copy: Path, name: str,
                                                                   instead: str) -> None:
    """The file name is the treatment id bookings name and the store keeps space-separated
    ("<treatment>/<step>", Catalog.critical_steps): a clinic id has a pattern, a treatment
    id had none, so "chemical peel.toml" passed and its care-critical steps were not found
    by the SMS opt-in's split."""
    folder = copy / "config" / "protocols"
    (folder / "chemical-peel.toml").rename(folder / f"{name}.toml")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"{folder / name}.toml: the file name is the treatment id bookings give: "
            f"a-z, 0-9, '-' and '_' only (rename it {instead}.toml)") in result.stderr


@pytest.mark.parametrize("value", ["18", "18.5", "1800"])
def test_a_step_time_written_as_a_number_is_an_error(copy: Path, value: str) -> None:
    """`time = 18` was read as 18 seconds after midnight (pydantic's number-to-time), so the
    step went at the send window's opening, not at 18:00, and check said ok."""
    protocol = copy / "config" / "protocols" / "microneedling.toml"
    protocol.write_text(protocol.read_text().replace('time = "18:00"', f"time = {value}", 1))
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (f"{protocol}: steps.1.time: {value} is not a time of day: write it "
            "as \"HH:MM\" in quotes, e.g. time = \"18:00\" in step 'stop-retinoids'"
            ) in result.stderr


def test_a_protocol_lacking_advice_its_messages_read_is_named(copy: Path) -> None:
    # config/protocols/README.md's own example as a new protocol: its stop-retinoids step's
    # messages read advice.retinoid_pause_min_days, which its [advice] lacks. check named
    # only the template and "'worker.rendering.Advice object' has no attribute ...": with
    # five protocols using that template, not which file to fix.
    text = (ROOT / "config/protocols/README.md").read_text(encoding="utf-8")
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    protocol = copy / "config" / "protocols" / "newone.toml"
    protocol.write_text(example, encoding="utf-8")
    result = check_copy(copy)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "worker.rendering" not in result.stderr and "Advice object" not in result.stderr
    assert (f"{protocol}: advice.retinoid_pause_min_days: not defined, and the messages of "
            "step 'stop-retinoids' read it (template stop-retinoids)") in result.stderr
    others = [line for line in result.stderr.splitlines() if "configuration error" in line
              and "newone.toml" not in line]
    assert others == [], others
