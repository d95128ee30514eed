# cpmtool: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create .venv and install everything (torch pinned first, then the package, then the
# embedded models) when needed; the install is redone only when pyproject.toml or setup.py change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cpmtool-installed
# The CPU build of torch 2.13.0 lies on this machine's disk; an unpinned torch pulls a CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint clean-venv

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/cpmtool models pull smollm2-135m
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/demo.py

test: $(STAMP)
	$(BIN)/pytest -q --timeout 900 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cpmtool kernels tests pipelines

clean-venv:
	rm -rf $(VENV)

# man pages: generated from the CLI plus man/src/*.md (tests/cli/test_manpages.py checks they are current)
PREFIX ?= $(HOME)/.local
.PHONY: man install-man

man: $(STAMP)
	$(BIN)/python -m cpmtool.cli.manpages man/

install-man:
	install -d $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 644 man/*.1 $(DESTDIR)$(PREFIX)/share/man/man1/
