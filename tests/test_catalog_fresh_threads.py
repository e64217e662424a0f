"""Two threads of one worker process ask for config/ at once after an edit (the held-booking
alert and the webhook of the same booking, delivered side by side by two event-sender
threads; or two sends). The first reads config/ again; the second found the reload lock
taken and went on with the configuration as before the edit: the alert went to the
clinic's old address, seconds after the edit (a loaded full run of
tests/e2e/test_review_conf_events_reload.py saw exactly that). And a thread that had taken
the old catalog from the context before another thread replaced it got the old one back
for a second more. Now a thread that finds another reading waits for its answer, and an
old catalog hands on to the one read after it. Forced: the first thread is parked inside
the real `Catalog.load` while the second asks."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from worker import catalog as catalog_module
from worker.catalog import CONFIG_STILL_SECONDS, Catalog
from worker.settings import Settings


def test_a_thread_asking_while_another_reads_config_gets_what_it_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    settings = Settings(config_dir=tmp_path / "config", templates_dir=ROOT / "templates",
                        _env_file=None)
    old = Catalog.load(settings)
    clinic = tmp_path / "config" / "clinics" / "glow.toml"
    text = clinic.read_text(encoding="utf-8")
    assert old.clinics["glow"].email and "review@" not in old.clinics["glow"].email
    clinic.write_text(text.replace(f'email = "{old.clinics["glow"].email}"',
                                   'email = "review@glow.example"'), encoding="utf-8")
    time.sleep(CONFIG_STILL_SECONDS + 0.2)  # the edit held still: the next look reads it

    reading, release = threading.Event(), threading.Event()
    plain_load = Catalog.load.__func__  # type: ignore[attr-defined]

    def parked_load(cls: type[Catalog], settings: Settings) -> Catalog:
        if threading.current_thread().name == "first":
            reading.set()
            assert release.wait(10)
        return plain_load(cls, settings)

    monkeypatch.setattr(Catalog, "load", classmethod(parked_load))
    got: dict[str, Catalog] = {}
    first = threading.Thread(target=lambda: got.update(first=old.fresh(settings)),
                             name="first")
    second = threading.Thread(target=lambda: got.update(second=old.fresh(settings)),
                              name="second")
    first.start()
    assert reading.wait(10)
    second.start()
    time.sleep(0.3)  # the second asks while the first is reading
    release.set()
    first.join(10)
    second.join(10)
    assert got["first"].clinics["glow"].email == "review@glow.example"
    assert got["second"].clinics["glow"].email == "review@glow.example"
    # A thread that took the old catalog before it was replaced, asking within the second
    # in which no new look is made: the catalog read after it, not the old one.
    monkeypatch.setattr(catalog_module, "CONFIG_RECHECK_SECONDS", 60.0)
    assert old.fresh(settings).clinics["glow"].email == "review@glow.example"
