# Two commands do all set-up on a fresh machine (see README):
#   make demo   -- create .venv, install bnwd, run `bnwd inspect` on a bundled sample run
#   make test   -- create .venv, install bnwd with its dev tools, run ruff, mypy and pytest
# pip installs with constraints-dev.txt, which pins torch==2.13.0 so no step pulls a newer
# (multi-GB CUDA) torch. uv/poetry are not used: they do not see the local CPU wheel.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints-dev.txt

.PHONY: demo test lint typecheck unit clean

$(BIN)/.bnwd-installed: pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	# Bytecode for the editable package, as a regular install writes it: with
	# PYTHONDONTWRITEBYTECODE set, every `bnwd` call would otherwise compile it (about 60 ms).
	$(BIN)/python -m compileall -q bnwd_cli
	touch $@

demo: $(BIN)/.bnwd-installed
	$(BIN)/bnwd inspect sample_checkpoints/sgd_no_conv_wd

lint: $(BIN)/.bnwd-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.bnwd-installed
	$(BIN)/mypy

unit: $(BIN)/.bnwd-installed
	$(BIN)/pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
