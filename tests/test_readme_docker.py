"""The README's Docker and Health text agrees with docker-compose.yml and the Dockerfile:
the healthcheck example's timings are the compose file's, the Redis check it names is the
compose file's, and the commands it lists pass no --loglevel (REMINDERS_LOG_LEVEL sets it)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SERVICES = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]


def test_the_health_example_has_the_compose_files_timings():
    block = README.split("As Docker healthchecks:", 1)[1].split("```yaml", 1)[1].split("```")[0]
    example = yaml.safe_load(block)
    for role in ("worker",):
        shown, real = example[role]["healthcheck"], SERVICES[role]["healthcheck"]
        assert shown == real, (role, shown, real)
    assert SERVICES["beat"]["healthcheck"] | {"test": None} == (
        SERVICES["worker"]["healthcheck"] | {"test": None})  # "same timings"


def test_the_redis_check_named_is_the_compose_files():
    kind, command = SERVICES["redis"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and f"**Health**: `{command}`" in README


def test_the_commands_listed_pass_no_loglevel_and_the_readme_says_what_sets_it():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    commands = [SERVICES[name]["command"] for name in ("worker", "beat", "api")]
    assert not any("loglevel" in c or "log-level" in c for c in [*commands, dockerfile])
    docker_section = README.split("## Run in Docker", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"no `--loglevel`:\s+`REMINDERS_LOG_LEVEL`, any case, sets it",
                     docker_section)
