# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test matrix lint bench bench-quick venv system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The C speedups are optional for users; here a failed build is an error.
$(STAMP): $(PY) pyproject.toml setup.py ws_monitoring/_speedups.c
	WS_MONITORING_REQUIRE_SPEEDUPS=1 $(PY) -m pip install -q -e '.[dev,bench]'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ws-monitoring demo $(DEMO_ARGS)

system-deps:
	@bash .ci/system-deps

lint: $(STAMP)
	$(VENV)/bin/ruff check ws_monitoring tests benchmarks
	$(VENV)/bin/ruff format --check ws_monitoring tests benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	rm -f .coverage .coverage.*
	WS_MONITORING_REQUIRE_SPEEDUPS=1 COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml $(VENV)/bin/coverage run -m pytest -p no:cacheprovider $(PYTEST_ARGS)
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report
	$(PY) -m benchmarks --quick
	$(VENV)/bin/nox -t matrix -- --reduced $(MATRIX_ARGS)

# Every session of noxfile.py (README: Supported versions) runs the whole suite.
matrix: $(STAMP) system-deps
	$(VENV)/bin/nox -t matrix -- $(MATRIX_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .nox .coverage .coverage.* .mypy_cache .ruff_cache build ws_monitoring/_speedups*.so
