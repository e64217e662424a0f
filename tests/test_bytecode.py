"""`make run`, `make bench` and `make test` bring the package's bytecode up to date first.

The package is installed editable (`pip install -e`): its modules are imported from
worker/, and where PYTHONDONTWRITEBYTECODE is set (this project's Docker image sets it, and
so may a developer's or CI's machine) Python writes no bytecode for them, so every process
compiled them from source as it imported them: each worker pool process too, which kept
about 3.5 MB more resident (benchmarks/rss_probe.py: 187.4 against 180.2 MB for the idle
worker) and started slower. A regular install has it compiled by pip; the Docker image
compiles the copy its processes import at its build (the last test).
Here on a copy of worker/ (the repository's own is left as it is): after the Makefile's
`bytecode` target, a process with PYTHONDONTWRITEBYTECODE=1 compiles none of the send
path's modules; a module edited since is compiled again by the next `make bytecode`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

IMPORTS = """
import importlib._bootstrap_external as external, json, sys
compiled = []
source_to_code = external.SourceLoader.source_to_code
def recorded(self, data, path, *args, **kwargs):
    compiled.append(path)
    return source_to_code(self, data, path, *args, **kwargs)
external.SourceLoader.source_to_code = recorded
import worker.dispatch, worker.tasks, worker.event_senders
print(json.dumps([p for p in compiled if "/worker/" in p]))
"""


def compiled_by_import(folder: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1",
           "REMINDERS_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-c", IMPORTS], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [Path(p).name for p in json.loads(result.stdout.strip().splitlines()[-1])]


def make_bytecode(folder: Path) -> None:
    result = subprocess.run(["make", "-s", "bytecode", f"BIN={Path(sys.executable).parent}"],
                            cwd=folder, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_compiles_the_packages_bytecode_before_the_service_starts(tmp_path) -> None:
    shutil.copytree(ROOT / "worker", tmp_path / "worker",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    # Without it, every module of the send path is compiled by each process.
    assert {"dispatch.py", "store.py", "delivery.py"} <= set(compiled_by_import(tmp_path))
    make_bytecode(tmp_path)
    assert compiled_by_import(tmp_path) == []
    # A module edited after is compiled again by the next `make bytecode`, and only then.
    planner = tmp_path / "worker" / "planner.py"
    planner.write_text(planner.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    assert compiled_by_import(tmp_path) == ["planner.py"]
    make_bytecode(tmp_path)
    assert compiled_by_import(tmp_path) == []
    # `make run`, `make bench` and `make test` do it first.
    rules = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("run", "bench", "test", "faults"):
        line = next(x for x in rules.splitlines() if x.startswith(f"{target}:"))
        assert "bytecode" in line.split(":", 1)[1].split(), line


def test_the_images_processes_find_the_bytecode_of_the_copy_they_import(tmp_path) -> None:
    """The image's processes start in its WORKDIR, /app (`python -m worker.celery_main`,
    `uvicorn worker.api:app`: the working directory first on sys.path), so they import
    /app/worker, the copy `COPY worker/ ./worker/` made (.dockerignore leaves its
    __pycache__ out), not the one `pip install .` compiled into site-packages. Nothing can
    write its bytecode at run time (PYTHONDONTWRITEBYTECODE, a read-only root filesystem,
    an unprivileged user): the build must. Here /app as the build leaves it: the copy, then
    the Dockerfile's compile steps of RUN (as root, after that COPY and before USER) run in
    it; then a process started there, as in the image, compiles nothing of the send path."""
    from tests.test_docker import DOCKERFILE, dockerfile_env, dockerfile_instructions

    instructions = dockerfile_instructions()
    assert ("WORKDIR", "/app") in instructions
    copied = instructions.index(("COPY", "worker/ ./worker/"))
    user = next(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    app = tmp_path / "app"
    app.mkdir()
    shutil.copytree(ROOT / "worker", app / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    steps = [step.split() for keyword, rest in instructions[copied + 1:user] if keyword == "RUN"
             for step in rest.split("&&") if "compileall" in step]
    for argv in steps:
        assert argv[0] == "python", argv  # the image's interpreter: here, this one
        done = subprocess.run([sys.executable, *argv[1:]], cwd=app,
                              env={**os.environ, **dockerfile_env()}, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    assert compiled_by_import(app) == [], f"{DOCKERFILE.name} leaves /app/worker uncompiled"
