# Two commands for a new user: `make demo` and `make test`. Everything runs from .venv in this folder.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install proto proto-check lint typecheck bench clean

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
	$(PY) -m pytest -q

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
	$(VENV)/bin/mypy dsi services

bench: $(STAMP)
	$(PY) -m dsi.cli bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
