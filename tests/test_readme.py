"""The README stays true: its console examples print exactly what it shows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent


def console_blocks() -> list[tuple[str, str]]:
    """Return (command, expected output) for each ```console block."""
    blocks = re.findall(r"```console\n\$ (.*?)\n(.*?)```", README, flags=re.S)
    return [(cmd, out) for cmd, out in blocks]


def test_readme_has_the_examples_the_issue_asks_for():
    commands = [cmd for cmd, _ in console_blocks()]
    assert any(c.startswith(".venv/bin/reminders plan --now") for c in commands)
    assert any("| .venv/bin/reminders plan -" in c for c in commands)


@pytest.mark.parametrize(("command", "expected"), console_blocks())
def test_console_example_prints_what_the_readme_shows(command, expected, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    # The README's commands are written for the repository root with .venv/ in it.
    command = command.replace(".venv/bin/", f"{BIN}/")
    result = subprocess.run(
        ["bash", "-c", command + " 2>&1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.rstrip() == expected.rstrip()


def test_first_section_is_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, flags=re.S)[1]
    assert first_block.splitlines()[0].startswith("make run")
    assert first_block.splitlines()[1].startswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_layout_names_every_module_and_only_real_ones():
    layout = re.search(r"worker/ +(.*?)\nconfig/", README, flags=re.S)[1]
    named = set(re.findall(r"[a-z_]+", re.sub(r"\(.*?\)", "", layout)))
    modules = {p.stem for p in (ROOT / "worker").glob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in (ROOT / "worker").glob("*/__init__.py")}
    assert named == modules | packages


def test_files_the_readme_points_to_exist():
    for path in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / path).exists(), path
    for path in (
        "examples/demo_booking.py",
        "examples/booking.json",
        ".env.example",
        "docker-compose.yml",
        "Dockerfile",
    ):
        assert path in README and (ROOT / path).exists()


def test_try_it_says_when_the_demo_messages_reach_the_outbox(catalog):
    # "Try it" said the "late" stop-tretinoin messages appear at once with the confirmation:
    # the demo booking starts 90 s ahead and stops tretinoin a minute before, so they come
    # 30 s later; what comes at once besides the confirmation is the clinic's late-pause alert.
    demo = catalog.protocols["demo"]
    ahead = float(re.search(r"else (\d+(?:\.\d+)?)\n",
                            (ROOT / "examples/demo_booking.py").read_text())[1])
    steps = {s.id: s for s in demo.steps}
    stop = ahead + steps["stop-retinoids"].offset.total_seconds()
    last = max(ahead + s.offset.total_seconds() for s in demo.steps if s.offset is not None)
    section = re.search(r"## Try it\n(.*?)\n## ", README, flags=re.S)[1]
    said = " ".join(section.split())
    assert f"the \"stop tretinoin\" messages {stop:g} seconds later" in said, said
    assert f"a minute before the visit, which the demo booking puts {ahead:g} seconds" in said
    assert f"{-steps['stop-retinoids'].offset.total_seconds():g}" == "60"
    assert "late_pause" in said and last <= 120 and "within the next two minutes" in said


def test_each_metric_observe_names_is_defined_where_it_says():
    # "all defined in worker/metrics.py" while the API's two live in worker/api/metrics.py.
    section = re.search(r"## Observe: metrics, health, logs\n(.*?)\n## ", README, flags=re.S)[1]
    files = set(re.findall(r"`(worker/[a-z_/]*metrics\.py)`", section))
    source = "".join((ROOT / f).read_text(encoding="utf-8") for f in files)
    for metric in sorted(set(re.findall(r"\breminders_[a-z_]+", section))):
        name = metric.removesuffix("_total")
        assert f'"{name}"' in source or f'"{metric}"' in source, (metric, sorted(files))


def test_the_plan_json_fields_are_the_readmes():
    said = re.search(r"`--json` prints the machine form:\n`(\{.*?\})` with UTC", README,
                     flags=re.S)[1]
    top, inner = re.fullmatch(r'\{(.*), "reminders":\s*\[\{(.*)\}\]\}', " ".join(said.split()),
                              flags=re.S).groups()
    done = subprocess.run([str(BIN / "reminders"), "plan", "--json", "--now",
                           "2026-11-21T12:00:00Z", "examples/booking.json"], cwd=ROOT,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("REMINDERS_")},
                          capture_output=True, text=True, timeout=60, check=True)
    timeline = json.loads(done.stdout)
    assert list(timeline) == [*re.findall(r'"(\w+)"', top), "reminders"]
    assert {tuple(r) for r in timeline["reminders"]} == {tuple(re.findall(r'"(\w+)"', inner))}
