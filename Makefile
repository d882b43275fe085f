# Every target installs what it needs into .venv first (pinned requirements, featmap in editable mode).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := data geometric masking semantic layers backbones summary intro
STAGE := _build/stage

.PHONY: install book test lint bench browser clean-book

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q

# ruff (configured in pyproject.toml): pyflakes, pycodestyle with lines of at most 120 characters, import order;
# the package, tests, bench, scripts and the notebooks.
lint: $(STAMP)
	$(BIN)/ruff check featmap tests bench scripts book

# The browser test (tests/test_browser.py) opens the book in headless Chromium, driven by Playwright (pinned in
# requirements.txt) through the system browser's path: `playwright install` is never needed and nothing is
# downloaded but Debian's package. Install it where root and apt-get allow; elsewhere say so and go on: the
# browser test then skips with the same message. (Any of chromium, chromium-browser, google-chrome on PATH will do.)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	command -v google-chrome >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null) || echo "browser: apt-get could not install chromium; the browser test will skip"; \
	else \
	  echo "browser: no chromium and no root apt-get to install it; the browser test will skip"; \
	fi

# Sizes are environment or make variables, e.g. make bench BENCH_IMAGES=120 (python bench/run.py --help).
bench: $(STAMP)
	$(BIN)/python bench/run.py

# Run each chapter with papermill into a staging copy of the book (progress and times in the terminal, never in
# the pages), then render it (execution off). Independent chapters run side by side, one per core (at most three;
# make book JOBS=1 runs them one after another), each with cores / JOBS torch threads; summary and intro run last.
book: $(STAMP)
	rm -rf $(STAGE) && mkdir -p $(STAGE)/book
	cp _config.yml _toc.yml $(STAGE)/ && cp -r book/_ext $(STAGE)/book/ && cp book/*.md $(STAGE)/book/
	$(BIN)/python -m featmap book $(STAGE) $(NOTEBOOKS) $(if $(JOBS),--jobs $(JOBS)) --json _build/book-timings.json
	$(BIN)/jupyter-book build $(STAGE) --path-output . --warningiserror --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html"

clean-book:
	rm -rf _build
