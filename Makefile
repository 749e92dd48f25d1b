# `make demo` and `make test` set everything up first (see scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test lint typecheck unit bench bench-dist bench-hpo clean

$(STAMP): scripts/setup.sh scripts/build_horovod.sh requirements-dev.txt pyproject.toml
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m study scaling --config jobs/configs/studies/demo.toml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest

test: lint typecheck unit

bench: setup
	$(PY) -m benchmarks.step_time

bench-dist: setup
	$(PY) -m benchmarks.distributed

bench-hpo: setup
	$(PY) -m benchmarks.hpo_dispatch

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
