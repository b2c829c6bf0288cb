# `make demo` and `make test` set themselves up in .venv on a fresh clone (Python 3.11 + pip).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-cpu.txt | cksum | cut -d' ' -f1)

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first (GPU users: see README "Install"), then the package
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/babyllama demo

test: setup
	$(BIN)/lint-imports  # the import rules in pyproject.toml
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m pip install -q -e '.[dev,bench]'  # lm-evaluation-harness, the reference of bench/eval_vs_lmeval.py
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
