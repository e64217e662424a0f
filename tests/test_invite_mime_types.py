"""An email with its calendar invite, sent by a process whose `mimetypes` was not set up yet.

Apprise checks an attachment's MIME type against the stdlib's `mimetypes.types_map`, which
`mimetypes.init()` fills from the system's files (Debian's /etc/mime.types, from the
media-types package) on first use. Two defects followed, both shown here in a fresh
Python process sending through real aiosmtpd:

- Without the system's file (an image without the media-types package, as this project's
  Dockerfile's base, python:3.11-slim: debian:bookworm-slim with ca-certificates, netbase
  and tzdata), "text/calendar" is not in the stdlib's built-in table: every invite email was
  refused by Apprise before sending ("An invalid mime-type"), and the worker recorded it
  as of unknown outcome, again at each retry.
- `mimetypes.init()` marks itself done before it has read the files: a sender thread
  making an invite while another thread's first `init()` was still reading saw the
  built-in table, and its send failed the same way (the confirmation waited for its
  ledger to expire: tests/e2e/test_changes.py met it about one run in three).

And the worker reads none of the system's MIME types files: it needs text/calendar alone,
and the 1,500 types of /etc/mime.types cost each pool process about 0.35 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_email_wire import MailServer

PREAMBLE = """
import json, mimetypes, sys, threading
from datetime import UTC, datetime
{setup}
from worker.delivery import Envelope, deliver
from worker.errors import DeliveryError
from worker.invites import Attachment
from worker.rendering import RenderedMessage

ICS = Attachment("appointment.ics", "text/calendar; method=REQUEST; charset=UTF-8",
                 b"BEGIN:VCALENDAR\\r\\nVERSION:2.0\\r\\nEND:VCALENDAR\\r\\n")
URL = "mailto://127.0.0.1:{port}?from=hola@glow.example&to=ana@example.com&mode=insecure"

def send(n):
    message = RenderedMessage("email", f"Tu cita {{n}}", "Hasta mañana", None,
                              attachments=(ICS,))
    try:
        return deliver(URL, Envelope(f"glow/A-{{n}}/prep:email", "glow", "email",
                                     "ana@example.com"), message, outbox=None, timeout=5,
                       now=datetime.now(UTC))
    except DeliveryError as exc:
        return f"DeliveryError: {{exc.reason}}"
    except Exception as exc:
        return f"{{type(exc).__name__}}: {{exc}}"
"""


def run(script: str) -> list[str]:
    result = subprocess.run([sys.executable, "-"], input=script, cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def calendar_parts(raw: bytes) -> int:
    return raw.count(b"Content-Type: text/calendar; method=REQUEST; charset=UTF-8")


def test_an_invite_is_sent_where_the_system_has_no_mime_types_file() -> None:
    with MailServer() as server:
        # No /etc/mime.types (nor any other file mimetypes reads): as in an image without
        # the media-types package.
        script = PREAMBLE.format(setup="mimetypes.knownfiles = []", port=server.port) + """
print(json.dumps([send(1)]))
"""
        results = run(script)
    assert results == ["sent through Apprise"]
    assert len(server.received) == 1 and calendar_parts(server.received[0]) == 1


def test_an_invite_made_while_another_thread_first_reads_the_mime_types_is_sent() -> None:
    """Forced: the first sender thread to make an invite is parked inside `mimetypes.init()`
    as it reads the system's file (after it has marked itself done), a second thread sends
    an invite meanwhile, then the first goes on. Both arrive, each with its invite. (Set
    up before any send, the first thread never reads the file: nothing is parked.)"""
    with MailServer() as server:
        setup = """
parked, go = threading.Event(), threading.Event()
_read = mimetypes.MimeTypes.read
def read(self, filename, strict=True):
    if threading.current_thread().name == "first":
        parked.set()
        go.wait(20)
    return _read(self, filename, strict)
mimetypes.MimeTypes.read = read
"""
        script = PREAMBLE.format(setup=setup, port=server.port) + """
results = {}
def run(name, n):
    results[name] = send(n)
first = threading.Thread(target=run, args=("first", 1), name="first")
first.start()
while not parked.is_set() and first.is_alive():
    parked.wait(0.01)
second = threading.Thread(target=run, args=("second", 2), name="second")
second.start()
second.join(20)
go.set()
first.join(20)
print(json.dumps([results.get("first"), results.get("second")]))
"""
        results = run(script)
    assert results == ["sent through Apprise", "sent through Apprise"], results
    assert len(server.received) == 2
    assert [calendar_parts(raw) for raw in server.received] == [1, 1]


def test_an_invite_is_sent_without_reading_the_systems_mime_types_files() -> None:
    with MailServer() as server:
        setup = """
read = []
_read = mimetypes.MimeTypes.read
def record(self, filename, strict=True):
    read.append(filename)
    return _read(self, filename, strict)
mimetypes.MimeTypes.read = record
"""
        script = PREAMBLE.format(setup=setup, port=server.port) + """
print(json.dumps([send(1), read, mimetypes.guess_type("visit.ics")[0]]))
"""
        results = run(script)
    assert results == ["sent through Apprise", [], "text/calendar"], results
    assert len(server.received) == 1 and calendar_parts(server.received[0]) == 1
