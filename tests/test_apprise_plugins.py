"""worker/apprise_plugins.py: Apprise's plugins load one module at a time, as URLs need them.

Apprise's plugin manager is one per process and never forgets, so each case runs in a fresh
interpreter (a script on stdin) and prints what it found as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT

MAILTO = "mailto://127.0.0.1:2525?from=clinic@example.com&to={to}&mode=insecure"
JSON_SMS = "json://127.0.0.1:8080/sms?:to={to}"
TWILIO = ("twilio://ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa:authtoken123456789012345678901234@"
          "+34910000000/+34600111222")
DISCORD = "https://discord.com/api/webhooks/4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js"

PRELUDE = """
import json, sys
from worker import delivery
from worker.apprise_plugins import has_plugin, plugins_loaded

def plugins():
    return sorted({m.split(".")[2] for m, v in list(sys.modules.items())
                   if v is not None and m.startswith("apprise.plugins.")} - {"base"})

def kind(url):
    services = delivery.load_services(url.replace("{to}", "ana@example.com"))
    return [type(s).__name__ for s in services] if services else None
"""


def run(script: str) -> Any:
    result = subprocess.run([sys.executable, "-"], input=PRELUDE + script, cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_warm_up_loads_the_configured_channels_plugins_only() -> None:
    out = run(f"""
delivery.warm_up([{MAILTO!r}, {JSON_SMS!r}, {MAILTO!r}])
after_warm_up = plugins()
print(json.dumps([after_warm_up, kind({MAILTO!r}), kind({JSON_SMS!r}), plugins()]))
""")
    assert out == [["custom_json", "email"], ["NotifyEmail"], ["NotifyJSON"],
                   ["custom_json", "email"]]


def test_a_schema_not_loaded_yet_loads_at_its_first_message_alone() -> None:
    out = run(f"""
delivery.warm_up([{MAILTO!r}])
twilio = kind({TWILIO!r})
after_twilio = plugins()
# A provider's native URL: no plugin claims "https" by name; Apprise asks every plugin.
discord = kind({DISCORD!r})
print(json.dumps([twilio, after_twilio, discord, len(plugins()), kind("nothing://here")]))
""")
    twilio, after_twilio, discord, everything, nothing = out
    assert twilio == ["NotifyTwilio"]
    assert after_twilio == ["email", "twilio"]
    assert discord == ["NotifyDiscord"]
    assert everything > 100  # then all of them, as Apprise always did
    assert nothing is None


def test_same_objects_as_apprise_loads_after_a_partial_load() -> None:
    # Loaded lean first, then Apprise's own full scan (a native URL): the modules loaded
    # first are Apprise's own and keep working; Apprise.add makes the same plugin objects.
    out = run(f"""
import apprise
delivery.warm_up([{MAILTO!r}, {JSON_SMS!r}])
kind({DISCORD!r})
rows = []
for url in [{MAILTO!r}, {JSON_SMS!r}, {TWILIO!r}]:
    url = url.replace("{{to}}", "ana@example.com")
    theirs = apprise.Apprise()
    theirs.add(url)
    ours = delivery.load_services(url)
    rows.append([[type(s).__name__ for s in ours], [type(s).__name__ for s in theirs],
                 [s.url(privacy=False) for s in ours] == [s.url(privacy=False) for s in theirs]])
print(json.dumps(rows))
""")
    for ours, theirs, same_url in out:
        assert ours == theirs and same_url


def test_threads_asking_while_a_load_is_under_way_wait_for_it() -> None:
    # Forced: the first load is parked inside Apprise's loader; meanwhile other threads ask
    # for the same schema and another one. They must wait for it, not find the manager empty
    # and make Apprise load every plugin (nor miss the plugin), then all find theirs.
    out = run(f"""
import threading, time
from apprise.apprise import N_MGR
parked, release = threading.Event(), threading.Event()
real = N_MGR.load_modules
def load_modules(*args, **kwargs):
    if not parked.is_set():
        parked.set()
        release.wait(10)
    return real(*args, **kwargs)
N_MGR.load_modules = load_modules
results = {{}}
def ask(name, fn):
    results[name] = fn()
first = threading.Thread(target=ask, args=("first", lambda: has_plugin("json")))
first.start()
assert parked.wait(10)
others = [threading.Thread(target=ask, args=("same", lambda: has_plugin("json"))),
          threading.Thread(target=ask, args=("email", lambda: kind({MAILTO!r})))]
for t in others:
    t.start()
time.sleep(0.3)
waiting = sorted(name for name in ("same", "email") if name not in results)
release.set()
for t in [first, *others]:
    t.join(10)
print(json.dumps([waiting, results, plugins()]))
""")
    waiting, results, loaded = out
    assert waiting == ["email", "same"]
    assert results == {"first": True, "same": True, "email": ["NotifyEmail"]}
    assert loaded == ["custom_json", "email"]
