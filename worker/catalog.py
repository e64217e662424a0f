"""The loaded configuration: protocols, clinics and the locales templates exist for."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
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

    @cached_property
    def critical_steps(self) -> str:
        """The care-critical steps of every protocol, as the store's opt-out checks take
        them: "<treatment>/<step>", space-separated (worked out once, read at every send)."""
        return " ".join(f"{p.id}/{s.id}" for p in self.protocols.values() for s in p.steps
                        if s.care_critical)

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
