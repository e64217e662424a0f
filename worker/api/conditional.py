"""Lost-update protection: `ETag` is the booking's version, `If-Match` must name it.

The check is made inside the upsert's own Redis transaction (the store reads the booking
under WATCH and hands it to `_reconcile`, where the version is compared): if another
write lands between that read and the write, the transaction runs again and compares
against the new version. So two clinics' systems that both read version 3 and both send
`If-Match: "3"` get one 200 and one 412, never two 200s.

The version is also checked once before the upsert, so a booking that does not exist
never matches whichever way the store writes a new one.

If-None-Match (RFC 9110 13.1.2) is checked in the same places: `*` refuses (412) a write
to a booking that exists (PUT as create-only: a second booking system creating the same
id never overwrites the first's patient), and a tag naming the current version refuses a
write. Its tags compare weakly (`W/"3"` names version 3). A GET answers no 304: the version
is the clinic's booking's, and the timeline changes under it as its reminders go out.

DELETE takes If-Match too: the cancel script applies only if the booking's hash is still
the one whose version was compared (else it reads and compares again).

`If-Match: *` asks only that the booking exists. Tags are compared strongly: a weak tag
(`W/"3"`) never matches, as RFC 9110 says for If-Match.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from ..errors import NotFound
from ..models import Booking
from ..planner import Plan
from ..store import Store
from .errors import ApiError

ANY = "*"
# As `etag` writes a version; one of more digits than any version reaches (19: one per
# write) is a well-formed tag naming no version, not read as an int (Python refuses to read
# past 4300 digits: a 500).
_VERSION_TAG = re.compile(r'"(0|[1-9][0-9]{0,18})"')
_WEAK_VERSION_TAG = re.compile(r'(?:W/)?"(0|[1-9][0-9]{0,18})"')
Tags = str | frozenset[int] | None  # a parsed If-Match or If-None-Match (see parse_if_match)


def etag(version: int) -> str:
    return f'"{version}"'


def parse_if_match(header: str | None) -> str | frozenset[int] | None:
    """Return None (no header), "*", or the versions the header names (maybe none)."""
    if header is None:
        return None
    if header.strip() == ANY:
        return ANY
    versions = set()
    for tag in header.split(","):
        tag = tag.strip()
        # Compared character by character (RFC 9110 8.8.3.2): only a version as ETag
        # writes it (`"3"`, never `"03"`), in ASCII digits.
        if _VERSION_TAG.fullmatch(tag):
            versions.add(int(tag[1:-1]))
    return frozenset(versions)


def parse_if_none_match(header: str | None) -> Tags:
    """As `parse_if_match`, comparing weakly (RFC 9110 13.1.2): `W/"3"` names version 3."""
    if header is None or header.strip() == ANY:
        return None if header is None else ANY
    found = (_WEAK_VERSION_TAG.fullmatch(tag.strip()) for tag in header.split(","))
    return frozenset(int(m.group(1)) for m in found if m)


def none_match(unexpected: Tags, current: int | None) -> bool:
    """Whether If-None-Match (parsed) names the booking as it is: `*` and it exists, or a
    tag of its current version."""
    return unexpected is not None and current is not None and (
        unexpected == ANY or current in unexpected)


class PreconditionFailed(ApiError):
    def __init__(self, current: int | None, *, none_match: bool = False) -> None:
        shown = f"version {current}" if current is not None else "no such booking"
        message = (f"If-None-Match names the booking as it is ({shown}): nothing was changed"
                   if none_match else f"If-Match does not name the current version ({shown}); "
                   "read the booking again and re-apply the change")
        super().__init__(412, message,
                         headers={"ETag": etag(current)} if current is not None else None)


class _Upsert(Store):
    """One upsert, checking the stored version inside its own transaction.

    A copy of the app's store (client, scripts, clinic hooks and all: whatever the store
    holds), differing only in its `_reconcile` seam.
    """

    def __init__(self, store: Store, expected: Tags, unexpected: Tags = None) -> None:
        # No Store.__init__: take the configured store's state as it is.
        self.__dict__.update(store.__dict__)
        self.expected = expected
        self.unexpected = unexpected
        self.existed = False
        self.previous: str | None = None  # the stored version this upsert compared

    def _reconcile(  # type: ignore[override]  # the base is a staticmethod seam
        self, stored_booking: dict[str, str], *args: Any, **kwargs: Any
    ) -> Any:
        self.existed = bool(stored_booking)
        self.previous = stored_booking.get("version") if stored_booking else None
        check_version(self.expected, int(stored_booking["version"]) if stored_booking else None,
                      self.unexpected)
        return Store._reconcile(stored_booking, *args, **kwargs)


class _Cancel(Store):
    """One cancel, checking the stored version against the hash the cancel script fences on.

    The store's cancel applies only if the booking's hash is still the one it read ("[]"
    when missing); that read's version must match.
    """

    def __init__(self, store: Store, expected: Tags, unexpected: Tags = None) -> None:
        self.__dict__.update(store.__dict__)
        self.expected = expected
        self.unexpected = unexpected

    def _cancel_notices(self, clinic: str, booking_id: str, now: datetime
                        ) -> tuple[str, str, dict[str, str]]:
        check, adds, texts = Store._cancel_notices(self, clinic, booking_id, now)
        # The hash as read ("[]" missing: the script cancels no booking created since, one
        # whose version was never compared; it answers "missing" or "changed").
        flat = json.loads(check)
        if flat:  # a missing booking is the 404 it would be without If-Match (RFC 9110)
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            check_version(self.expected, int(fields["version"]), self.unexpected)
        return check, adds, texts


def cancel(store: Store, clinic: str, booking_id: str, now: datetime,
           expected: Tags, unexpected: Tags = None) -> dict[str, Any]:
    """Cancel the booking if `expected` (If-Match) and `unexpected` (If-None-Match) allow
    (checked in the cancel's own step)."""
    if expected is None and unexpected is None:
        return store.cancel(clinic, booking_id, now)
    return _Cancel(store, expected, unexpected).cancel(clinic, booking_id, now)


def check_version(expected: Tags, current: int | None, unexpected: Tags = None) -> None:
    """Raise PreconditionFailed (412) unless `expected` (parsed If-Match) allows `current`
    and `unexpected` (parsed If-None-Match) does not name it (RFC 9110 13.2.2's order)."""
    if expected is not None and (
        current is None or (expected != ANY and current not in expected)
    ):
        raise PreconditionFailed(current)
    if none_match(unexpected, current):
        raise PreconditionFailed(current, none_match=True)


def upsert(store: Store, booking: Booking, planned: Plan, now: datetime,
           expected: Tags, *, unexpected: Tags = None, release: bool = False,
           previous: list[str | None] | None = None) -> tuple[dict[str, Any], bool]:
    """Store the booking if `expected` (If-Match) and `unexpected` (If-None-Match) allow;
    return (timeline, whether it was new).

    `release`: the clinic's release of a held booking (`Store.upsert`'s); `previous`: a
    one-item list given the version it replaced (None: new), as `Store.upsert_many`'s."""
    if expected is not None or unexpected is not None:
        # First against what is stored now: a missing booking never matches (whether or not
        # the store reconciles a new booking); then again inside the transaction.
        try:
            current: int | None = int(store.timeline(*booking.key)["version"])
        except NotFound:
            current = None
        check_version(expected, current, unexpected)
    one = _Upsert(store, expected, unexpected)
    timeline = one.upsert(booking, planned, now, release=release)
    if previous is not None:
        previous[0] = one.previous
    return timeline, not one.existed
