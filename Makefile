# Two commands for a new user: `make demo` and `make test`. Everything runs from .venv in this folder.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install proto proto-check lint typecheck bench clean image image-offline e2e chaos

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dsi.demo

test: $(STAMP) proto-check lint
	$(PY) -m pytest -q -m "not chaos"

# The chaos and soak tier (tests/chaos): processes killed and stopped mid-request, 200 cancels, 64 streams.
chaos: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m chaos tests/chaos

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/dsi/v1/*.proto

# Generated code is committed; fail when regenerating it would change anything.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && $(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp \
	  --grpc_python_out=$$tmp protos/dsi/v1/*.proto && \
	  for f in $$tmp/dsi/v1/*.py*; do cmp -s $$f dsi/v1/$$(basename $$f) || \
	  { echo "dsi/v1/$$(basename $$f) is stale: run 'make proto'"; exit 1; }; done; rm -rf $$tmp

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy dsi

bench: $(STAMP)
	$(PY) -m dsi.cli bench

# The image, either way (scripts/build-image.sh): `make image` from python:3.11-slim, PyPI and the
# PyTorch index; `make image-offline` (or PIP_SOURCE=wheelhouse) with no network in the build: a
# debootstrap base where python:3.11-slim can't be pulled, and the host's wheels. Both use an engine
# that answers, or a private one (scripts/docker-engine.sh: root + CI=true or DSI_DOCKER_START=1).
IMAGE ?= dsi:cpu
PIP_SOURCE ?= index
image:
	scripts/docker-engine.sh run -- scripts/build-image.sh -t $(IMAGE) --$(PIP_SOURCE) --env-file build/image.env

image-offline: $(STAMP)
	$(MAKE) image PIP_SOURCE=wheelhouse

# The compose cluster across containers (tests/e2e), with phase times; skips, saying why, where no
# Docker engine can be had.
e2e: $(STAMP)
	scripts/e2e.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
