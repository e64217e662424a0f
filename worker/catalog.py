"""The loaded configuration: protocols, clinics and the locales templates exist for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .clinics import Clinic, load_clinics
from .errors import ConfigError
from .protocols import Protocol, load_protocols
from .settings import Settings


@dataclass(frozen=True)
class Catalog:
    """Everything a booking is validated and planned against."""

    protocols: dict[str, Protocol]
    clinics: dict[str, Clinic]
    locales: frozenset[str]
    templates_dir: Path

    @classmethod
    def load(cls, settings: Settings) -> Catalog:
        """Read config/ and templates/; raise ConfigError naming the first bad file."""
        templates_dir = settings.templates_dir
        if not templates_dir.is_dir():
            raise ConfigError(templates_dir, "templates folder not found")
        locales = frozenset(
            p.name for p in templates_dir.iterdir() if p.is_dir() and not p.name.startswith("_")
        )
        return cls(
            protocols=load_protocols(settings.protocols_dir),
            clinics=load_clinics(settings.clinics_dir),
            locales=locales,
            templates_dir=templates_dir,
        )
