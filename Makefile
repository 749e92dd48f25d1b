# `make demo` and `make test` set everything up first (see scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test lint typecheck unit test-images images bench bench-dist bench-hpo clean

$(STAMP): scripts/setup.sh scripts/build_horovod.sh requirements.txt requirements-dev.txt pyproject.toml
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
	$(PY) -m pytest -m "not images"

# The container images (docker/, docs/containers.md) built with podman and run: about 10 minutes the first time on a
# fresh machine, under a minute when build/images/ and podman's layer cache are warm.
test-images: setup
	$(PY) -m pytest -m images

test: lint typecheck unit test-images

# The CPU image and the GPU Dockerfile up to its CUDA stage, as the tests build them (scripts/build_images.sh).
images: setup
	bash scripts/build_images.sh

bench: setup
	$(PY) -m benchmarks.step_time

bench-dist: setup
	$(PY) -m benchmarks.distributed

bench-hpo: setup
	$(PY) -m benchmarks.hpo_dispatch

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
