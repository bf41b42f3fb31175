# Two commands on a fresh machine: `make demo` runs the pipeline on the embedded default,
# `make test` runs the test suite. Each creates or updates .venv from pyproject.toml when needed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint clean

# pip, not uv or poetry: pip takes torch from this machine's local wheels instead of downloading.
$(VENV)/.installed-run: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed-run
	$(PY) pipelines/full.py

# `make test` leaves out the tests marked slow (the demo's whole run; stop or kill and rerun; compiled,
# FSDP; the pipeline on S3, through `ray job submit`, across nodes, under the autoscaler) to stay near
# 8 minutes on 2 cores, and tests/test_tiers.py checks that it still reaches every module;
# `make test-slow` runs just the slow ones, and CI runs both.
# PYTEST_RC_FILE lets .ci/run report pytest's own exit code (make would turn every failure into 2).
MARKS := not slow
test-slow: MARKS := slow
test test-slow: $(VENV)/.installed-test
	@$(PY) -m pytest -m "$(MARKS)" $(PYTEST_ARGS); rc=$$?; \
	if [ -n "$(PYTEST_RC_FILE)" ]; then echo $$rc > "$(PYTEST_RC_FILE)"; fi; exit $$rc

# The linter's rules and the formatter's line length live in pyproject.toml ([tool.ruff]); CI runs
# this after the tests. `ruff format .` rewrites what the second command flags.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf work .pytest_cache
