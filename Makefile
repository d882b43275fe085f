# Every target installs what it needs into .venv first (pinned requirements, featmap in editable mode).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := data geometric masking semantic layers summary
STAGE := _build/stage

.PHONY: install book test clean-book

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Run each chapter with papermill into a staging copy of the book, then render it (execution off).
book: $(STAMP)
	rm -rf $(STAGE) && mkdir -p $(STAGE)/book
	cp _config.yml _toc.yml $(STAGE)/ && cp book/*.md $(STAGE)/book/
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/papermill --cwd $(STAGE)/book book/$$nb.ipynb $(STAGE)/book/$$nb.ipynb || exit 1; \
	done
	$(BIN)/jupyter-book build $(STAGE) --path-output . --warningiserror --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html"

clean-book:
	rm -rf _build
