# Two commands do all the set-up: `make demo` and `make test`.
# Both create .venv on first use: torch==2.13.0 first (so no requirement pulls another build),
# then this package in editable mode with its test extra.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pathm3-installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	@if [ -x $(VENV)/bin/pathm3-demo ]; then $(VENV)/bin/pathm3-demo $(DEMO_ARGS); \
	else echo "pathm3-demo is not available yet: the environment is installed in $(VENV)"; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
