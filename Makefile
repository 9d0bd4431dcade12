# The README's commands. Everything is set up on first use: the venv, the install, the models.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 3000
GRPC_PORT ?= 8001
# test processes (pytest-xdist): CI has 2 cores; each worker builds the fixtures it needs
TEST_WORKERS ?= 2

.PHONY: install browser serve test models bench lint clean gpu-wheels gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU build and never a CUDA one
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,dev,spark]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## browser: Debian's chromium + chromium-driver for tests/test_page.py, installed when missing
## (apt-get, as root here and in CI); the page's tests fail loudly without them
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends chromium chromium-driver; }

## serve: the default models on loopback (HTTP $(PORT), gRPC $(GRPC_PORT))
serve: install
	$(BIN)/genserve serve --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT)

## test: the executable specification, 2 processes (an xdist_group's tests share one). Fails
## on pytest's exit 5 (no tests), and on any skipped test that is not marked gpu
## (tests/conftest.py): the spec runs whole.
test: install browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=15

## models: rebuild the committed default artifacts in exported_models/ (seeded)
models: install
	$(BIN)/python -m training.default_models --out exported_models

## bench: the benchmarks that write docs/BENCHMARKS.md (long: run them one at a time)
bench: install
	$(BIN)/python -m bench.flows
	$(BIN)/python -m bench.families
	$(BIN)/python -m bench.runtimes --threads 1 2
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.grpc
	$(BIN)/python -m bench.anomaly
	$(BIN)/python -m bench.images
	$(BIN)/python -m bench.soak

## gpu-wheels: the wheels the GPU path imports that the lent GPU machine lacks (CPython 3.12,
## x86-64), at the versions installed here, into $(GPU_WHEELS) (git-ignored; docs/DEPLOY.md)
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3
GPU_SITE   ?= /tmp/genserve-gpu-site
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/python -m bench.gpu_check --requirements > $(GPU_WHEELS)/requirements.txt
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d $(GPU_WHEELS) \
	  -r $(GPU_WHEELS)/requirements.txt
	du -sh $(GPU_WHEELS)

## gpu-check: on the lent GPU machine (its own python3; the tree carries $(GPU_WHEELS)): the
## gpu-marked tests and the CPU-vs-CUDA benchmark, one table, JSON to $$OUT (bench/gpu_check.py)
gpu-check:
	@if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
	    --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
	  $(GPU_PYTHON) -m bench.gpu_check --out $${OUT:-.}/gpu-check.json

lint: install
	$(BIN)/python -m ruff check numerics artifact service training genserve report cli tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
