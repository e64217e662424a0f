"""Catalog.fresh: a running process reads config/ again once its files changed and held still
for one look (not in the middle of an editor's save, which may remove a file a moment); an
edit that does not load keeps what was loaded before, logged once naming the file."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from worker import catalog as catalog_module
from worker.catalog import Catalog
from worker.settings import Settings


def test_fresh_reads_a_changed_config_and_keeps_the_old_one_when_broken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    settings = Settings(config_dir=tmp_path / "config", templates_dir=ROOT / "templates",
                        _env_file=None)
    first = Catalog.load(settings)
    monkeypatch.setattr(catalog_module, "CONFIG_RECHECK_SECONDS", 0.0)
    assert first.fresh(settings) is first  # nothing changed
    peel = tmp_path / "config" / "protocols" / "chemical-peel.toml"
    peel.write_text(peel.read_text(encoding="utf-8").replace("spf = 30", "spf = 50", 1),
                    encoding="utf-8")
    assert first.fresh(settings) is first  # not in the middle of an edit: once it holds still
    second = first.fresh(settings)
    assert second is not first and second.protocols["chemical-peel"].advice["spf"] == 50
    assert first.protocols["chemical-peel"].advice["spf"] == 30
    peel.write_text(peel.read_text(encoding="utf-8") + "\n[[steps]]\nid = 'x'\n",
                    encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="worker.catalog"):
        assert second.fresh(settings) is second
        assert second.fresh(settings) is second
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(peel) in errors[0], errors
    (tmp_path / "config" / "clinics" / "demo.toml").unlink()  # fixed otherwise: read again
    peel.write_text(peel.read_text(encoding="utf-8").split("\n[[steps]]\nid = 'x'")[0],
                    encoding="utf-8")
    assert second.fresh(settings) is second
    third = second.fresh(settings)
    assert set(third.clinics) == {"glow"}
