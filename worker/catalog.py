"""The loaded configuration: protocols, clinics and the locales templates exist for.

A running process reads config/ again when its files change (`Catalog.fresh`: looked at
at most once a second, read once the files held still for a look; edited templates are
picked up within a second too, worker/rendering.py), so that a protocol and the templates
that state its values are used together; an edit that does not load keeps the
configuration loaded before (logged as an error naming the file).

A clinic whose file is gone from config/ as read again (deleted by mistake, or missing for
two looks while a deploy rewrites config/) is kept, as last loaded, in `former`: only the
patients' texts use it (worker/api/inbound.py checks a STOP's Twilio signature with the
clinic's auth token, named in that file; Twilio does not retry an inbound message, and
refusing it would lose the opt-out). Nothing is planned or sent for it. Kept for the
process's life (a clinic removed on purpose still has its patients' STOPs taken); a process
started while the file is missing does not know it.

A protocol whose file is gone is kept the same way (`former_protocols`), only for which of
its steps are care-critical (`critical_steps`): its sends fail as "not configured" and are
retried until the file is back (worker/dispatch.py `_unconfigured`), and an email of a
care-critical step to a patient unsubscribed from email must stay one to go by SMS then, not
be skipped as opted out by the begin (or an unsubscribe) meanwhile."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .clinics import Clinic, load_clinics
from .errors import ConfigError
from .protocols import Protocol, config_files, load_protocols
from .settings import Settings

if TYPE_CHECKING:
    from .models import Booking
    from .planner import Plan

log = logging.getLogger(__name__)
# How long a loaded configuration is used without looking at its files again (seconds).
CONFIG_RECHECK_SECONDS = 1.0
# Files unchanged for this long have held still: read at once, without waiting for a look.
CONFIG_STILL_SECONDS = 1.0
# A thread finding another reading config/ waits this long at most for its answer.
RELOAD_WAIT_SECONDS = 10.0
Stamp = tuple[tuple[str, int, int], ...]
_reload_lock = threading.Lock()


def config_stamp(settings: Settings) -> Stamp:
    """Return each protocol and clinic file with its modification time and size."""
    stamp = []
    for path in sorted([*config_files(settings.protocols_dir),
                        *config_files(settings.clinics_dir)]):
        try:
            st = path.stat()
        except OSError:
            continue
        stamp.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def changed_lately(paths: Iterable[Path]) -> bool:
    """Whether any of `paths` changed within the last CONFIG_STILL_SECONDS (or cannot be
    looked at): a folder's time changes when a file is added, removed or renamed into
    place. Change times (ctime), not only modification times: a copy that keeps its
    source's times (rsync -a, cp -p) or a `touch -d` cannot make a file just written look
    old."""
    newest = 0
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            return True
        newest = max(newest, st.st_ctime_ns, st.st_mtime_ns)
    return time.time_ns() - newest < CONFIG_STILL_SECONDS * 1e9


def _still(settings: Settings, stamp: Stamp) -> bool:
    """Whether nothing in config/ (its files and folders) changed for CONFIG_STILL_SECONDS."""
    return not changed_lately([settings.protocols_dir, settings.clinics_dir,
                               *(Path(p) for p, _, _ in stamp)])


@dataclass(frozen=True)
class Catalog:
    """Everything a booking is validated and planned against."""

    protocols: dict[str, Protocol]
    clinics: dict[str, Clinic]
    locales: frozenset[str]
    templates_dir: Path
    # The files as they were when read (`fresh`); () for a catalog made by hand.
    stamp: Stamp = ()
    # Clinics an earlier configuration of this process had and this one has not, as last
    # loaded: for the patients' texts only (see the module's docstring).
    former: dict[str, Clinic] = field(default_factory=dict, compare=False, repr=False)
    # Protocols an earlier configuration of this process had and this one has not, as last
    # loaded: for `critical_steps` only (see the module's docstring).
    former_protocols: dict[str, Protocol] = field(default_factory=dict, compare=False,
                                                  repr=False)
    _checked: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def replan(self, doc: str, now: datetime) -> tuple[Booking, Plan]:
        """A stored booking's document (JSON) validated and planned again at `now`, as a
        re-submission of it is: the email unsubscribe caps the patient's bookings again with
        it (`Store.opt_out`'s `replan`; for a visit already begun, which a re-submission at
        the real now is refused as past, `Store.recap` gives the instant just before its
        start). Raises BookingRejected (or KeyError: its clinic or protocol is no longer
        configured) when the configuration no longer takes it."""
        from .models import parse_booking
        from .planner import plan

        booking = parse_booking(json.loads(doc), self)
        return booking, plan(booking, self.protocols[booking.treatment],
                             self.clinics[booking.clinic], now)

    @cached_property
    def critical_steps(self) -> str:
        """The care-critical steps of every protocol, as the store's opt-out checks take
        them: "<treatment>/<step>", space-separated (worked out once, read at every send);
        those of a protocol whose file is gone too, as last loaded (`former_protocols`)."""
        protocols = {**self.former_protocols, **self.protocols}
        return " ".join(f"{p.id}/{s.id}" for p in protocols.values() for s in p.steps
                        if s.care_critical)

    @cached_property
    def _hooks(self) -> dict[str, str]:
        from .webhooks import hooks_of  # imports this module's neighbours

        return {clinic_id: hooks_of(clinic) for clinic_id, clinic in self.clinics.items()}

    def hooks(self, clinic_id: str) -> str:
        """What the clinic is told of (webhooks.hooks_of), per this configuration."""
        return self._hooks.get(clinic_id, "")

    def _answer_of_another(self) -> Catalog:
        """Another thread is looking at config/, maybe reading an edit: wait for its answer
        rather than go on with the configuration as before the edit (two event threads of
        one booking, its webhook and its alert, ask at once)."""
        if _reload_lock.acquire(timeout=RELOAD_WAIT_SECONDS):
            _reload_lock.release()
        return self._latest()

    def _latest(self) -> Catalog:
        """This catalog, or the last one read again after it (never an older one)."""
        latest = self
        while "next" in latest._checked:
            latest = cast(Catalog, latest._checked["next"])
        return latest

    @classmethod
    def load(cls, settings: Settings) -> Catalog:
        """Read config/ and templates/; raise ConfigError naming the first bad file."""
        templates_dir = settings.templates_dir
        if not templates_dir.is_dir():
            raise ConfigError(templates_dir, "templates folder not found")
        stamp = config_stamp(settings)  # before reading: an edit meanwhile is read again
        locales = frozenset(  # not "_" pieces, nor hidden folders (.git of a checkout)
            p.name for p in templates_dir.iterdir()
            if p.is_dir() and not p.name.startswith(("_", "."))
        )
        return cls(
            protocols=load_protocols(settings.protocols_dir),
            clinics=load_clinics(settings.clinics_dir),
            locales=locales,
            templates_dir=templates_dir,
            stamp=stamp,
        )

    def fresh(self, settings: Settings) -> Catalog:
        """Return this catalog, or config/ read again if its files changed since and held
        still for one more look, or were already unchanged for CONFIG_STILL_SECONDS (looked
        at at most once every CONFIG_RECHECK_SECONDS). A
        change that does not load is logged once and this catalog kept. One thread looks at
        a time: another asking meanwhile waits for its answer, and a catalog read again
        since hands on to the one read after it (a thread may hold an old one)."""
        if not self.stamp:
            return self
        if "next" in self._checked:
            # Read again since (by another thread: this one took this catalog before it was
            # replaced): the last one read after it, itself looked at as any.
            return self._latest().fresh(settings)
        if _reload_lock.locked():
            return self._answer_of_another()
        now = time.monotonic()
        if now - self._checked.get("at", 0.0) < CONFIG_RECHECK_SECONDS:
            return self
        if not _reload_lock.acquire(blocking=False):
            return self._answer_of_another()
        try:
            self._checked["at"] = now
            stamp = config_stamp(settings)
            if stamp in (self.stamp, self._checked.get("bad")):
                return self
            if self._checked.get("seen") != stamp and not _still(settings, stamp):
                # Changed since the last look: read once it holds still for a look, not
                # in the middle of an edit (an editor's save may remove the file a moment).
                # Files that have not changed for that long held still already (a quiet
                # process looks only when a send asks: its first send after an edit made
                # long before would else go with the old configuration and new templates).
                self._checked["seen"] = stamp
                return self
            try:
                catalog = Catalog.load(settings)
            except ConfigError as exc:
                self._checked["bad"] = stamp
                log.error("configuration changed but does not load; still using the one "
                          "loaded before: %s", exc)
                return self
            log.info("configuration changed: read again (%d protocols, %d clinics)",
                     len(catalog.protocols), len(catalog.clinics))
            gone = sorted(set(self.clinics) - set(catalog.clinics))
            if gone:
                log.warning("clinic file(s) no longer in config/: %s; nothing is planned or "
                            "sent for them, their patients' texts (STOP) are still taken",
                            ", ".join(str(settings.clinics_dir / f"{c}.toml") for c in gone))
            gone = sorted(set(self.protocols) - set(catalog.protocols))
            if gone:
                log.warning("protocol file(s) no longer in config/: %s; their reminders are "
                            "retried until the file is back", ", ".join(
                                str(settings.protocols_dir / f"{p}.toml") for p in gone))
            former = {k: v for k, v in {**self.former, **self.clinics}.items()
                      if k not in catalog.clinics}
            former_protocols = {k: v for k, v in {**self.former_protocols,
                                                  **self.protocols}.items()
                                if k not in catalog.protocols}
            if former or former_protocols:
                catalog = replace(catalog, former=former, former_protocols=former_protocols)
            self._checked["next"] = catalog  # for threads that still hold this one
            return catalog
        finally:
            _reload_lock.release()
