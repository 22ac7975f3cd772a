# kdcourse — the two commands a newcomer needs:
#   make lab    open the course in JupyterLab (creates .venv on first use)
#   make test   run the whole test suite       (creates .venv on first use)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdcourse-installed
PORT   ?= 8888

.PHONY: install lab test test-fast labs check-labs strip bench clean-cache chromium bubblewrap

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Headless-safe: no browser is opened (open the printed http://127.0.0.1 URL);
# --allow-root only when run as root (containers), where Jupyter refuses otherwise.
LAB_ARGS := --ip=127.0.0.1 --port=$(PORT) --no-browser --ServerApp.root_dir=. $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(BIN)/jupyter lab $(LAB_ARGS) labs/01_classic_kd.ipynb

# The browser test drives Debian's Chromium (installed here with apt-get when
# missing; Playwright never downloads a browser). CI sets
# KDCOURSE_REQUIRE_BROWSER=1 so that a missing browser fails the run.
chromium:
	@bash scripts/ensure_chromium.sh

# The grader runs each submission under Debian's bubblewrap (installed here
# when missing); CI sets KDCOURSE_REQUIRE_SANDBOX=1 so a missing sandbox fails.
bubblewrap:
	@bash scripts/ensure_bubblewrap.sh

test: $(STAMP) chromium bubblewrap
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not notebooks and not browser"

labs: $(STAMP)
	$(BIN)/python -m kdcourse labgen

check-labs: $(STAMP)
	$(BIN)/python -m kdcourse labgen --check

strip: $(STAMP)
	$(BIN)/python -m kdcourse strip solutions/*.ipynb labs/*.ipynb

bench: $(STAMP)
	$(BIN)/python -m kdcourse bench lab1

clean-cache:
	rm -rf $${KDCOURSE_CACHE:-$$HOME/.cache/kdcourse}/teacher-*
