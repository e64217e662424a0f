"""Protocols and clinics as configuration: the shipped files load; broken ones are refused
with a ConfigError that names the file and the problem."""

from __future__ import annotations

import datetime as dt
from datetime import timedelta
from pathlib import Path

import pytest

from worker.clinics import load_clinic, load_clinics
from worker.errors import ConfigError
from worker.protocols import format_duration, load_protocol, load_protocols, parse_duration

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"


# --- the shipped configuration --------------------------------------------------------------


def test_shipped_protocols_load():
    protocols = load_protocols(CONFIG / "protocols")
    assert set(protocols) == {"microneedling", "chemical-peel", "tretinoin-start", "demo"}
    for name, protocol in protocols.items():
        assert protocol.id == name
        assert protocol.name
        assert protocol.steps


def test_shipped_microneedling_matches_the_domain_table():
    p = load_protocol(CONFIG / "protocols" / "microneedling.toml")
    assert p.isotretinoin_washout_days == 182
    when = {}
    for s in p.steps:
        if s.at:
            when[s.id] = ("booking", tuple(s.channels), tuple(s.only_if_any))
        elif s.offset is not None:
            when[s.id] = (s.offset, tuple(s.channels), tuple(s.only_if_any))
        else:
            when[s.id] = ((s.day, s.time), tuple(s.channels), tuple(s.only_if_any))
    retinoids = ("tretinoin", "retinol")
    assert when == {
        "booking-confirmation": ("booking", ("email",), ()),
        "stop-retinoids": ((-7, dt.time(18, 0)), ("sms", "email"), retinoids),
        "prep": ((-3, dt.time(10, 0)), ("email",), ()),
        "day-before": ((-1, dt.time(10, 0)), ("sms",), ()),
        "aftercare": (timedelta(hours=3), ("email",), ()),
        "spf": ((1, dt.time(9, 0)), ("sms",), ()),
        "redness-check": ((2, dt.time(10, 0)), ("email",), ()),
        "resume-retinoids": ((3, dt.time(18, 0)), ("sms",), retinoids),
        "week-check": ((7, dt.time(10, 0)), ("sms",), ()),
    }


def test_shipped_clinic_loads():
    clinics = load_clinics(CONFIG / "clinics")
    assert "glow" in clinics
    glow = clinics["glow"]
    assert glow.id == "glow"
    assert glow.timezone == "Europe/Madrid"
    assert glow.send_window.describe() == "09:00-20:00"
    assert glow.phone == "+34910000000"
    # Its channel URLs are commented-out examples: everything goes to the outbox.
    assert all(glow.uses_outbox(c) for c in ("email", "sms"))
    assert glow.unreachable_channels() == []
    assert clinics["demo"].delivery_url("sms", "+34600111222") is None


def test_catalog_loads_the_repository(catalog):
    assert set(catalog.protocols) >= {"microneedling", "chemical-peel", "tretinoin-start"}
    assert "glow" in catalog.clinics
    assert {"en", "es"} <= catalog.locales


@pytest.mark.parametrize(("text", "delta"), [
    ("-7d", timedelta(days=-7)), ("3h", timedelta(hours=3)), ("1h30m", timedelta(minutes=90)),
    ("90s", timedelta(seconds=90)), ("+2d", timedelta(days=2)), ("-6h", timedelta(hours=-6)),
])
def test_durations(text, delta):
    assert parse_duration(text) == delta
    assert parse_duration(format_duration(delta)) == delta


# --- broken protocol files ------------------------------------------------------------------

GOOD_STEP = """
[[steps]]
id = "a"
day = -1
time = "10:00"
channels = ["sms"]
template = "t"
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def step(**fields: str) -> str:
    """A [[steps]] table; values are TOML literals, None drops a default field."""
    base = {"id": '"a"', "channels": '["sms"]', "template": '"t"'}
    base.update(fields)
    lines = [f"{k} = {v}" for k, v in base.items() if v is not None and not k.startswith("_")]
    extra = fields.get("_table", "")
    return "\n[[steps]]\n" + "\n".join(lines) + "\n" + extra


BROKEN_PROTOCOLS = [
    ("bad-duration", step(offset='"3 hours"'), "steps.0.offset", "duration"),
    ("bad-duration-unit", step(offset='"3w"'), "steps.0.offset", "duration"),
    ("bad-duration-number", step(offset="3"), "steps.0.offset", "duration"),
    ("bad-late-until", step(day="-1", time='"10:00"', late='"send"', late_until='"soon"'),
     "late_until", "duration"),
    ("day-and-offset", step(day="-1", time='"10:00"', offset='"-1d"'), "steps.0", "exactly one"),
    ("booking-and-offset", step(at='"booking"', offset='"1h"'), "steps.0", "exactly one"),
    ("no-when", step(), "steps.0", "exactly one"),
    ("day-without-time", step(day="-1"), "steps.0", "day and time go together"),
    ("repeat-without-day", step(offset='"1d"', _table="[steps.repeat]\nthrough_day = 5\n"
                                "every_days = 1\n"), "steps.0", "repeat needs day + time"),
    ("repeat-through-before-day", step(day="3", time='"10:00"',
                                       _table="[steps.repeat]\nthrough_day = 1\n"
                                       "every_days = 1\n"), "steps.0", "through_day"),
    ("repeat-both-rules", step(day="0", time='"10:00"',
                               _table='[steps.repeat]\nthrough_day = 7\nevery_days = 1\n'
                               'weekdays = ["mon"]\n'), "steps.0.repeat", "exactly one"),
    ("repeat-bad-weekday", step(day="0", time='"10:00"',
                                _table='[steps.repeat]\nthrough_day = 7\nweekdays = ["monday"]\n'),
     "steps.0.repeat.weekdays", ""),
    ("late-until-without-send", step(day="-1", time='"10:00"', late_until='"-6h"'), "steps.0",
     "late_until only applies"),
    ("late-until-with-skip", step(day="-1", time='"10:00"', late='"skip"', late_until='"-6h"'),
     "steps.0", "late_until only applies"),
    ("late-bad-policy", step(day="-1", time='"10:00"', late='"maybe"'), "steps.0.late", ""),
    ("duplicate-step-ids", GOOD_STEP + GOOD_STEP, "", "step ids used twice: a"),
    ("bad-time", step(day="-1", time='"25:00"'), "steps.0.time", ""),
    ("unknown-channel", step(day="-1", time='"10:00"', channels='["fax"]'), "steps.0.channels",
     ""),
    ("duplicate-channel", step(day="-1", time='"10:00"', channels='["sms", "sms"]'), "steps.0",
     "twice"),
    ("no-channels", step(day="-1", time='"10:00"', channels="[]"), "steps.0.channels", ""),
    ("unknown-condition", step(day="-1", time='"10:00"', only_if_any='["isotretinoin"]'),
     "steps.0.only_if_any", ""),
    ("bad-step-id", step(id='"Stop Retinoids"', day="-1", time='"10:00"'), "steps.0.id", ""),
    ("bad-template-name", step(day="-1", time='"10:00"', template='"../etc/passwd"'),
     "steps.0.template", ""),
    ("unknown-step-field", step(day="-1", time='"10:00"', when='"later"'), "steps.0.when", ""),
    ("negative-washout", "isotretinoin_washout_days = -1\n" + GOOD_STEP,
     "isotretinoin_washout_days", ""),
]


@pytest.mark.parametrize(("body", "where", "problem"), [c[1:] for c in BROKEN_PROTOCOLS],
                         ids=[c[0] for c in BROKEN_PROTOCOLS])
def test_broken_protocol_is_refused_naming_file_and_problem(tmp_path, body, where, problem):
    path = write(tmp_path, "broken.toml", 'name = "Broken"\n' + body)
    with pytest.raises(ConfigError) as exc:
        load_protocol(path)
    assert exc.value.path == path
    message = str(exc.value)
    assert message.startswith(str(path))
    assert where in exc.value.problem
    assert problem in exc.value.problem


def test_protocol_without_steps(tmp_path):
    path = write(tmp_path, "empty.toml", 'name = "Empty"\nsteps = []\n')
    with pytest.raises(ConfigError, match="steps"):
        load_protocol(path)


def test_protocol_without_name(tmp_path):
    path = write(tmp_path, "nameless.toml", GOOD_STEP)
    with pytest.raises(ConfigError) as exc:
        load_protocol(path)
    assert "name" in exc.value.problem and exc.value.path == path


def test_protocol_id_must_match_the_file_name(tmp_path):
    path = write(tmp_path, "microneedling.toml", 'id = "peel"\nname = "X"\n' + GOOD_STEP)
    with pytest.raises(ConfigError) as exc:
        load_protocol(path)
    assert exc.value.path == path
    assert "'peel'" in exc.value.problem and "'microneedling'" in exc.value.problem


def test_protocol_not_toml(tmp_path):
    path = write(tmp_path, "garbage.toml", 'name = "X"\n[[steps]\nid = \n')
    with pytest.raises(ConfigError) as exc:
        load_protocol(path)
    assert exc.value.path == path and str(path) in str(exc.value)


def test_one_broken_protocol_in_a_folder_names_that_file(tmp_path):
    write(tmp_path, "good.toml", 'name = "Good"\n' + GOOD_STEP)
    bad = write(tmp_path, "bad.toml", 'name = "Bad"\n' + step(offset='"soon"'))
    with pytest.raises(ConfigError) as exc:
        load_protocols(tmp_path)
    assert exc.value.path == bad


def test_protocols_folder_missing(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_protocols(tmp_path / "nope")
    assert "not found" in exc.value.problem


def test_a_good_protocol_file_loads(tmp_path):
    path = write(tmp_path, "mine.toml", 'name = "Mine"\n' + step(
        day="0", time='"20:00"', late='"send"', late_until='"1d"',
        _table='[steps.repeat]\nthrough_day = 13\nweekdays = ["mon", "wed", "fri"]\n'))
    p = load_protocol(path)
    assert p.id == "mine"
    assert p.steps[0].late_until == timedelta(days=1)
    assert p.steps[0].day_offsets() == list(range(14))


# --- broken clinic files --------------------------------------------------------------------

CLINIC = """name = "Test Clinic"
phone = "+34910000000"
timezone = "Europe/Madrid"
"""


def clinic_text(window: tuple[str, str] | None = None, channels: dict[str, str] | None = None,
                extra: str = "") -> str:
    text = CLINIC + extra
    if window:
        text += f'\n[send_window]\nstart = "{window[0]}"\nend = "{window[1]}"\n'
    if channels:
        text += "\n[channels]\n" + "".join(f"{k} = '{v}'\n" for k, v in channels.items())
    return text


BROKEN_CLINICS = [
    ("window-start-after-end", clinic_text(window=("20:00", "09:00")), "send_window",
     "start must be before end"),
    ("window-empty", clinic_text(window=("09:00", "09:00")), "send_window",
     "start must be before end"),
    ("window-from-midnight-to-midnight", clinic_text(window=("24:00", "24:00")), "send_window",
     "start must be before end"),
    ("window-not-a-clock", clinic_text(window=("9am", "20:00")), "send_window.start",
     "clock time"),
    ("window-past-24", clinic_text(window=("09:00", "24:30")), "send_window.end", "24:00"),
    ("literal-password", clinic_text(channels={
        "email": "mailtos://glow:hunter2@smtp.glow.example?to={to}"}), "channels.email",
     "password"),
    ("literal-token-twilio", clinic_text(channels={
        "sms": "twilio://AC123:s3cr3t@+34910000000/{to}"}), "channels.sms", "password"),
    ("literal-password-with-dollar", clinic_text(channels={
        "email": "mailtos://glow:pa$$w0rd@smtp.glow.example?to={to}"}), "channels.email",
     "password"),
    ("password-half-literal", clinic_text(channels={
        "email": "mailtos://glow:abc${GLOW_PASS}@smtp.glow.example?to={to}"}), "channels.email",
     "password"),
    ("literal-pass-parameter", clinic_text(channels={
        "email": "mailtos://smtp.glow.example?user=glow&pass=hunter2&to={to}"}),
     "channels.email", "pass parameter"),
    ("literal-token-parameter", clinic_text(channels={
        "sms": "json://sms.glow.example/send?token=abc123&to={to}"}),
     "channels.sms", "token parameter"),
    ("missing-to", clinic_text(channels={
        "email": "mailtos://${U}:${P}@smtp.glow.example"}), "channels.email", "{to}"),
    ("unknown-channel", clinic_text(channels={"fax": "fax://{to}"}), "channels.fax", ""),
    ("bad-timezone", CLINIC.replace("Europe/Madrid", "Madrid"), "timezone", "IANA"),
    ("bad-phone", CLINIC.replace("+34910000000", "910000000"), "phone", "E.164"),
    ("no-name", CLINIC.replace('name = "Test Clinic"\n', ""), "name", ""),
    ("unknown-field", clinic_text(extra='colour = "pink"\n'), "colour", ""),
    ("negative-washout", clinic_text(extra="isotretinoin_washout_days = -5\n"),
     "isotretinoin_washout_days", ""),
]


@pytest.mark.parametrize(("text", "where", "problem"), [c[1:] for c in BROKEN_CLINICS],
                         ids=[c[0] for c in BROKEN_CLINICS])
def test_broken_clinic_is_refused_naming_file_and_problem(tmp_path, text, where, problem):
    path = write(tmp_path, "glow.toml", text)
    with pytest.raises(ConfigError) as exc:
        load_clinic(path)
    assert exc.value.path == path
    assert str(exc.value).startswith(str(path))
    assert where in exc.value.problem
    assert problem in exc.value.problem


@pytest.mark.parametrize("url", [
    "mailtos://glow:hunter2@smtp.glow.example?to={to}",
    "twilio://AC123:hunter2@+34910000000/{to}",
    "mailtos://smtp.glow.example?user=glow&pass=hunter2&to={to}",
])
def test_literal_password_is_not_echoed_in_the_error(tmp_path, url):
    path = write(tmp_path, "glow.toml", clinic_text(channels={"email": url}))
    with pytest.raises(ConfigError) as exc:
        load_clinic(path)
    assert "hunter2" not in str(exc.value)


def test_clinic_id_must_match_the_file_name(tmp_path):
    path = write(tmp_path, "glow.toml", 'id = "shine"\n' + CLINIC)
    with pytest.raises(ConfigError) as exc:
        load_clinic(path)
    assert exc.value.path == path
    assert "'shine'" in exc.value.problem and "'glow'" in exc.value.problem


def test_clinic_file_name_must_be_a_valid_clinic_id(tmp_path):
    path = write(tmp_path, "Glow Clinic.toml", CLINIC)
    with pytest.raises(ConfigError) as exc:
        load_clinic(path)
    assert exc.value.path == path and "id" in exc.value.problem


def test_clinic_not_toml(tmp_path):
    path = write(tmp_path, "glow.toml", "name = 'x\n")
    with pytest.raises(ConfigError) as exc:
        load_clinic(path)
    assert exc.value.path == path


def test_clinics_folder_missing(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_clinics(tmp_path / "nope")


@pytest.mark.parametrize("url", [
    "mailtos://${GLOW_USER}:${GLOW_PASS}@smtp.glow.example?from=hola@glow.example&to={to}",
    "mailtos://smtp.glow.example?user=${GLOW_USER}&pass=${GLOW_PASS}&to={to}",
    "twilio://${SID}:${TOKEN}@${FROM}/{to}",
    "mailto://hola@glow.example?to={to}",            # a user name alone is not a secret
    "json://localhost:8080/sms?to={to}",             # host:port is not user:password
])
def test_urls_without_literal_secrets_are_accepted(tmp_path, url):
    clinic = load_clinic(write(tmp_path, "glow.toml", clinic_text(channels={"email": url})))
    assert clinic.channels["email"] == url


def test_clinic_with_secrets_from_the_environment(tmp_path):
    path = write(tmp_path, "glow.toml", clinic_text(
        window=("08:00", "21:00"),
        channels={"email": "mailtos://${GLOW_USER}:${GLOW_PASS}@smtp.glow.example?to={to}",
                  "sms": "twilio://${SID}:${TOKEN}@+34910000000/{to}"}))
    clinic = load_clinic(path)
    assert clinic.send_window.describe() == "08:00-21:00"
    env = {"GLOW_USER": "glow", "GLOW_PASS": "p@ss/word", "SID": "AC1"}
    assert clinic.missing_secrets(env) == ["TOKEN"]
    url = clinic.channel_url("email", "ana@example.com", env)
    assert url == "mailtos://glow:p%40ss%2Fword@smtp.glow.example?to=ana@example.com"
    with pytest.raises(ConfigError, match="TOKEN"):
        clinic.channel_url("sms", "+34600111222", env)


def test_clinic_defaults(tmp_path):
    clinic = load_clinic(write(tmp_path, "plain.toml", CLINIC))
    assert clinic.id == "plain"
    assert clinic.send_window.describe() == "09:00-20:00"
    assert clinic.channels == {}
    assert clinic.isotretinoin_washout_days is None


# --- channels and the outbox ----------------------------------------------------------------

SMS_URL = "json://sms.glow.example/send?:to={to}"
MAIL_URL = "mailtos://${GLOW_USER}:${GLOW_PASS}@smtp.glow.example?to={to}"
MAIL_ENV = {"GLOW_USER": "glow", "GLOW_PASS": "pw"}


def test_a_clinic_without_channel_urls_uses_the_outbox(tmp_path):
    for name, text in [("bare", CLINIC), ("empty", CLINIC + "\n[channels]\n")]:
        clinic = load_clinic(write(tmp_path, f"{name}.toml", text))
        assert clinic.outbox is None and clinic.channels == {}
        assert clinic.delivery_url("sms", "+34600111222", {}) is None
        assert clinic.delivery_url("email", "ana@example.com", {}) is None
        assert clinic.unreachable_channels() == []


def test_a_clinic_with_urls_for_every_channel_never_uses_the_outbox(tmp_path):
    clinic = load_clinic(write(tmp_path, "glow.toml",
                               clinic_text(channels={"sms": SMS_URL, "email": MAIL_URL})))
    assert clinic.delivery_url("sms", "+34600111222", {}) == (
        "json://sms.glow.example/send?:to=+34600111222")
    assert clinic.delivery_url("email", "ana@example.com", MAIL_ENV) == (
        "mailtos://glow:pw@smtp.glow.example?to=ana@example.com&name=Test%20Clinic")
    assert clinic.unreachable_channels() == []
    with pytest.raises(ConfigError, match="GLOW_USER is not set"):
        clinic.delivery_url("email", "ana@example.com", {})


def test_a_half_configured_clinic_loads_but_the_missing_channel_fails(tmp_path):
    clinic = load_clinic(write(tmp_path, "glow.toml", clinic_text(channels={"sms": SMS_URL})))
    assert clinic.unreachable_channels() == ["email"]
    assert clinic.delivery_url("sms", "+34600111222", {}).endswith("?:to=+34600111222")
    with pytest.raises(ConfigError) as exc:
        clinic.delivery_url("email", "ana@example.com", {})
    assert str(exc.value) == (
        "clinic glow: has no URL for email and does not use the outbox "
        "(add channels.email, or outbox = true to write email to the outbox)")
    assert "ana@example.com" not in str(exc.value)


def test_outbox_true_sends_the_channels_without_a_url_to_the_outbox(tmp_path):
    clinic = load_clinic(write(tmp_path, "glow.toml",
                               clinic_text(channels={"sms": SMS_URL}, extra="outbox = true\n")))
    assert clinic.outbox is True
    assert clinic.delivery_url("email", "ana@example.com", {}) is None
    assert clinic.delivery_url("sms", "+34600111222", {}).endswith("?:to=+34600111222")
    assert clinic.unreachable_channels() == []
    no_urls = load_clinic(write(tmp_path, "shine.toml", clinic_text(extra="outbox = true\n")))
    assert no_urls.delivery_url("sms", "+34600111222", {}) is None


def test_outbox_false_never_uses_the_outbox(tmp_path):
    clinic = load_clinic(write(tmp_path, "glow.toml", clinic_text(extra="outbox = false\n")))
    assert clinic.unreachable_channels() == ["email", "sms"]
    with pytest.raises(ConfigError, match="no URL for sms and does not use the outbox"):
        clinic.delivery_url("sms", "+34600111222", {})


def test_outbox_must_be_a_boolean(tmp_path):
    path = write(tmp_path, "glow.toml", clinic_text(extra='outbox = "yes"\n'))
    with pytest.raises(ConfigError) as exc:
        load_clinic(path)
    assert exc.value.path == path and "outbox" in exc.value.problem
