# `make demo` and `make test` set themselves up in .venv on a fresh clone (Python 3.11 + pip).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-cpu.txt | cksum | cut -d' ' -f1)

.PHONY: setup demo test browser bench clean

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

test: setup browser
	$(BIN)/lint-imports  # the import rules in pyproject.toml
	$(BIN)/python -m pytest

# the chat page's test drives a real browser: Debian's chromium, installed when missing
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || { echo "installing Debian's chromium (for tests/serve/test_page.py)"; \
	       $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	       $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null; }

bench: setup
	$(BIN)/python -m pip install -q -e '.[dev,bench]'  # lm-evaluation-harness, the reference of bench/eval_vs_lmeval.py
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
