"""Apprise's part of a send on its own: CPU per message through `worker.delivery.deliver`
to the benchmark's sinks (not part of `make bench`).

    python -m benchmarks.apprise_probe [--n 1000] [--channels email,sms] [--profile FILE]

Starts the sinks (an aiosmtpd server and an HTTP SMS gateway, in this process but in their
own threads), then sends --n messages per channel from one thread exactly as a sender
thread does (the clinic's URL with the recipient filled in, an email with its
List-Unsubscribe headers), and prints the sending thread's CPU milliseconds per message
(the sinks' threads apart). --profile FILE writes cProfile's stats of the sends (pstats).
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import time
from datetime import UTC, datetime

from benchmarks.side_by_side import Sinks
from worker.delivery import Envelope, deliver
from worker.dispatch import unsubscribe_headers
from worker.rendering import RenderedMessage

BATCH = 50

EMAIL = RenderedMessage(
    channel="email", subject="Your visit tomorrow: Bench Skin Clinic",
    text="Hi Ana,\n\nA reminder that your visit is tomorrow at 14:30.\n\n" * 3,
    html="<html><body><p>Hi Ana,</p><p>A reminder that your visit is tomorrow at 14:30."
         "</p></body></html>" * 3)
SMS = RenderedMessage(channel="sms", subject=None, html=None,
                      text="Hi Ana, your visit is tomorrow at 14:30. Reply STOP to opt out")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.apprise_probe")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--channels", default="email,sms")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args(argv)
    sinks = Sinks()
    profile = cProfile.Profile() if args.profile else None
    try:
        for channel in args.channels.split(","):
            template = sinks.email_url if channel == "email" else sinks.sms_url
            message = EMAIL if channel == "email" else SMS
            tos = [f"ana{i}@example.com" if channel == "email" else f"+4478{i:08d}"
                   for i in range(args.n + 1)]
            per_batch: list[float] = []

            def one(i: int, channel: str = channel, template: str = template,
                    message: RenderedMessage = message, tos: list[str] = tos) -> None:
                to = tos[i]
                headers = (unsubscribe_headers(f"https://r.example/v1/unsubscribe/t{i}")
                           if channel == "email" else None)
                deliver(template.replace("{to}", to), Envelope(f"bench/P-{i}/spf:{channel}",
                        "bench", channel, to), message, outbox=None,  # type: ignore[arg-type]
                        timeout=10.0, now=datetime.now(UTC), headers=headers)

            one(0)  # warm up: plugin loaded, first session
            cpu = time.thread_time()
            if profile:
                profile.enable()
            for at in range(1, args.n + 1, BATCH):
                began = time.thread_time()
                for i in range(at, min(at + BATCH, args.n + 1)):
                    one(i)
                per_batch.append((time.thread_time() - began) / BATCH)
            if profile:
                profile.disable()
            cpu = time.thread_time() - cpu
            print(f"{channel}: {args.n} sends: {cpu / args.n * 1000:.3f} ms CPU (batches of "
                  f"{BATCH}: min {min(per_batch) * 1000:.3f}, median "
                  f"{statistics.median(per_batch) * 1000:.3f})", flush=True)
        if profile and args.profile:
            profile.dump_stats(args.profile)
    finally:
        sinks.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
