"""Realistic bookings for the benchmark: distinct patients, times and treatments.

`realistic(n, now, seed)` returns `n` booking documents (the JSON `reminders book`
reads) as clinics would send them: two clinics (Spanish and English), the shipped
treatments in a plausible mix (microneedling, chemical peel, tretinoin start), each
patient with their own name, email address and mobile number, a timezone near their
clinic, their locale, the channels they agreed to, and the skin medications they take;
appointments at clinic hours 14-90 days ahead. Deterministic for a given seed and `now`.

Each booking is drawn from its own random generator (seeded by the seed and its
index), so any slice `realistic(count, now, seed, start=k)` is the same bookings as in
one long list: the harness generates a large set chunk by chunk.
"""

from __future__ import annotations

import random
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

# (clinic id, its timezone, locale, patients' timezones with weights)
CLINICS: list[tuple[str, str, str, list[tuple[str, int]]]] = [
    ("bench-es", "Europe/Madrid", "es",
     [("Europe/Madrid", 85), ("Atlantic/Canary", 10), ("Europe/Lisbon", 5)]),
    ("bench-en", "Europe/London", "en",
     [("Europe/London", 85), ("Europe/Dublin", 10), ("Europe/Paris", 5)]),
]
TREATMENTS = [("microneedling", 45), ("chemical-peel", 35), ("tretinoin-start", 20)]
CHANNELS = [(["sms", "email"], 50), (["email"], 30), (["sms"], 20)]

FIRST = {
    "es": ["Ana", "Lucía", "María", "Carmen", "Paula", "Sofía", "Laura", "Marta", "Elena",
           "Sara", "Irene", "Alba", "Nuria", "Cristina", "Raquel", "Pilar", "Javier", "Carlos",
           "David", "Pablo", "Álvaro", "Sergio", "Jorge", "Andrés", "Íñigo", "Begoña"],
    "en": ["Olivia", "Amelia", "Isla", "Ava", "Emily", "Grace", "Sophie", "Chloe", "Hannah",
           "Lucy", "Ella", "Freya", "Ruby", "Megan", "Charlotte", "Niamh", "Oliver", "Harry",
           "George", "Jack", "Noah", "Liam", "Thomas", "James", "Siobhán", "Zoë"],
}
LAST = {
    "es": ["García", "López", "Martínez", "Sánchez", "Pérez", "Gómez", "Fernández", "Ruiz",
           "Díaz", "Moreno", "Muñoz", "Álvarez", "Romero", "Navarro", "Torres", "Ortega",
           "Castillo", "Iglesias", "Núñez", "Vázquez"],
    "en": ["Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies",
           "Patel", "Robinson", "Wright", "Thompson", "Evans", "Walker", "O'Brien", "Murphy",
           "Hughes", "Edwards", "Green", "Khan"],
}
DOMAINS = ["example.com", "example.org", "example.net"]
# Mobile number ranges valid for their country (libphonenumber), one per clinic: every
# number they give below 300,000 patients is valid (+447 as a whole holds pager and
# personal-number blocks, which refused the 63,519th English patient of a large run).
MOBILE = {"es": ("+346", 8), "en": ("+4478", 8)}
SLOTS = [time(h, m) for h in range(9, 20) for m in (0, 15, 30, 45)]  # 09:00-19:45


def _ascii(text: str) -> str:
    table = str.maketrans("áéíóúñüÁÉÍÓÚÑÜë'", "aeiounuAEIOUNUe-")
    return text.translate(table).lower().replace(" ", "")


def mobile(locale: str, i: int) -> str:
    """Return the `i`-th patient's mobile number: distinct for every i below 10**8."""
    prefix, digits = MOBILE[locale]
    return f"{prefix}{(10 ** (digits - 1) + i * 7919) % 10 ** digits:0{digits}d}"


def _pick(rng: random.Random, weighted: list[tuple[Any, int]]) -> Any:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def realistic(count: int, now: datetime, seed: int = 7, prefix: str = "B",
              start: int = 0) -> list[dict[str, Any]]:
    """Return bookings number `start` to `start + count - 1` (see the module docstring)."""
    docs = []
    for i in range(start, start + count):
        rng = random.Random(f"{seed}/{i}")
        clinic, _, locale, zones = CLINICS[i % len(CLINICS)]
        tz = _pick(rng, zones)
        first, last = rng.choice(FIRST[locale]), rng.choice(LAST[locale])
        if rng.random() < 0.3:  # a second surname (es) or a double-barrelled name (en)
            last = f"{last} {rng.choice(LAST[locale])}" if locale == "es" else \
                f"{last}-{rng.choice(LAST[locale])}"
        channels = list(_pick(rng, CHANNELS))
        day = (now + timedelta(days=rng.randint(14, 90))).date()
        starts = datetime.combine(day, rng.choice(SLOTS), tzinfo=ZoneInfo(tz))
        meds: dict[str, Any] = {"tretinoin": rng.random() < 0.25, "retinol": rng.random() < 0.15}
        if rng.random() < 0.03:  # an isotretinoin course long finished (outside the washout)
            meds["isotretinoin_last_dose"] = (now.date() - timedelta(
                days=rng.randint(200, 900))).isoformat()
        docs.append({
            "clinic": clinic,
            "booking_id": f"{prefix}-{now:%y%m}-{i:07d}",
            "treatment": _pick(rng, TREATMENTS),
            "starts_at": starts.isoformat(),
            "patient": {
                "name": f"{first} {last}",
                # Every patient their own address and number: i makes them unique.
                "email": f"{_ascii(first)}.{_ascii(last)}.{i}@{rng.choice(DOMAINS)}",
                "phone": mobile(locale, i),
                "timezone": tz,
                "locale": locale,
                "channels": channels,
            },
            "medications": meds,
        })
    return docs
