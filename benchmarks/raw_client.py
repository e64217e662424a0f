"""The raw client limit: send straight to the sink, no scheduler, no Celery, no Apprise.

    python -m benchmarks.raw_client email|sms --port PORT --start-at EPOCH RECIPIENT...
    (recipients also one a line on stdin with "-")

One serial client, a new connection per message, as a program that did nothing but
send would: email with smtplib (connect, EHLO, MAIL, RCPT, DATA, QUIT per message), SMS
with `requests.post` (no session: a new connection per message) carrying the same JSON
Apprise's json:// plugin posts. It waits until --start-at (so that importing is not
counted), sends one message to each recipient in order, and exits non-zero if any was
refused. The harness times the messages where they arrive, at the sink.
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import time
from email.message import EmailMessage

import requests

from benchmarks.naive_app import EMAIL_BODY, SMS_TEXT, SUBJECT

FROM = "clinic@example.com"


def send_emails(port: int, recipients: list[str]) -> None:
    for i, to in enumerate(recipients):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = FROM, to, SUBJECT
        msg.set_content(EMAIL_BODY.format(name="Ana", ref=f"raw-{i}"))
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.send_message(msg)


def send_sms(port: int, recipients: list[str]) -> None:
    url = f"http://127.0.0.1:{port}/sms"
    for to in recipients:
        answer = requests.post(url, json={"version": "1.0", "title": "", "type": "info",
                                          "message": SMS_TEXT.format(name="Ana"), "to": to},
                               timeout=30)
        answer.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.raw_client",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("channel", choices=["email", "sms"])
    ap.add_argument("--port", type=int, required=True, help="the sink's port on 127.0.0.1")
    ap.add_argument("--start-at", type=float, default=0.0, help="epoch seconds to start at")
    ap.add_argument("recipients", nargs="+", help="addresses or numbers; '-' reads stdin")
    args = ap.parse_args(argv)
    recipients = [r for arg in args.recipients
                  for r in (sys.stdin.read().split() if arg == "-" else [arg])]
    while (left := args.start_at - time.time()) > 0:
        time.sleep(min(left, 0.05))
    (send_emails if args.channel == "email" else send_sms)(args.port, recipients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
