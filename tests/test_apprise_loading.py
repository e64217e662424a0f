"""`load_services` loads a channel URL into the same plugin objects `Apprise.add` makes."""

from __future__ import annotations

import apprise
import pytest

from worker.delivery import load_services

URLS = [
    "mailto://127.0.0.1:2525?from=clinic@example.com&to=ana%2Bx@example.com&mode=insecure",
    "mailtos://user:secret@smtp.example.com?to=a@example.com&cto=15&rto=15",
    "json://127.0.0.1:8080/sms?:to=+34600111222&cto=5&rto=5",
    "twilio://ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa:authtoken123456789012345678901234@"
    "+34910000000/+34600111222",
    # A provider's native URL (no plugin by that scheme): Apprise's own loader.
    "https://discord.com/api/webhooks/4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js",
]


@pytest.mark.parametrize("url", URLS)
def test_same_plugin_as_apprise(url: str) -> None:
    ours = load_services(url)
    theirs = apprise.Apprise()
    assert theirs.add(url)
    assert ours is not None
    assert [type(s) for s in ours] == [type(s) for s in theirs]
    assert [s.url(privacy=False) for s in ours] == [s.url(privacy=False) for s in theirs]


@pytest.mark.parametrize("url", [
    "nothing://here",  # no such service
    "mailto://",  # no host
    "twilio://short:token@+1/+2",  # the plugin's constructor refuses it
    "json://127.0.0.1/x, nothing://here",  # two URLs, one unusable: all or nothing
])
def test_unusable_url(url: str) -> None:
    assert not apprise.Apprise().add(url)
    assert load_services(url) is None
