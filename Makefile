# Two commands: `make demo` (set up + run the end-to-end loop) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check
# torch==2.13.0 resolves to the CPU wheel on disk; constraints.txt pins every transitive version.
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test test-all test-reliability lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U "pip>=24" setuptools wheel

$(STAMP_RUN): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt -e .
	touch $@

$(STAMP_DEV): $(STAMP_RUN)
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

demo: $(STAMP_RUN)
	$(BIN)/driftloop demo

test: $(STAMP_DEV)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-reliability: $(STAMP_DEV)
	$(BIN)/pytest -q -m reliability tests/reliability

test-all: $(STAMP_DEV)
	$(BIN)/pytest -q -m ""

lint: $(STAMP_DEV)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .driftloop
