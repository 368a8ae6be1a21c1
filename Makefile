# styleblend: `make demo` to see it work, `make test` to check it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
SAMPLES := clients/samples

.PHONY: install protos models demo up test test-slow lint typecheck chromium clean

# --- setup -------------------------------------------------------------------------------
$(VENV)/.tools:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q grpcio-tools==1.85.1 mypy-protobuf==5.1.0
	touch $@

# The generated stubs: one command, never edited, never committed.
gen/.stamp: $(VENV)/.tools $(PROTOS)
	rm -rf gen && mkdir -p gen
	PATH=$(BIN):$$PATH $(PY) -m grpc_tools.protoc -I protos \
		--python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	find gen/styleblend -type d -exec touch {}/__init__.py \;
	touch $@

$(VENV)/.installed: $(VENV)/.tools gen/.stamp pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The Node client and the buf CLI (one `npm ci`, from the lock file).
NODE_CLIENT := clients/node
$(NODE_CLIENT)/node_modules/.stamp: $(NODE_CLIENT)/package-lock.json
	npm ci --prefix $(NODE_CLIENT) --no-audit --no-fund
	touch $@

install: $(VENV)/.installed $(NODE_CLIENT)/node_modules/.stamp
protos: gen/.stamp

# Feature models: exported once into models/ (git ignores it).
models: install
	$(BIN)/styleblend export --model vgg19
	$(BIN)/styleblend export --model efficientnet-lite0

# --- use ---------------------------------------------------------------------------------
up: install
	$(BIN)/styleblend up

# Start the graph, blend two paintings onto a photo, write out/, stop the graph.
demo: install
	$(BIN)/styleblend export --model vgg19
	@mkdir -p out
	@set -e; \
	$(BIN)/styleblend up --gateway-port 50151 --features-port 50152 --blending-port 50153 \
		--reconstruction-port 50154 --http-port 50155 > out/graph.log 2>&1 & graph=$$!; \
	trap 'kill -TERM $$graph 2>/dev/null; wait $$graph 2>/dev/null || true' EXIT; \
	echo "starting the graph (log: out/graph.log)..."; \
	for i in $$(seq 300); do \
		$(BIN)/styleblend info --gateway 127.0.0.1:50151 > out/info.txt 2>/dev/null && break; \
		kill -0 $$graph 2>/dev/null || { cat out/graph.log; exit 1; }; sleep 1; \
	done; \
	cat out/info.txt; \
	$(BIN)/styleblend blend --gateway 127.0.0.1:50151 \
		--source $(SAMPLES)/content/astronaut.jpg:content=1 \
		--source $(SAMPLES)/style/starry_night.jpg:style=0.7 \
		--source $(SAMPLES)/style/the_scream.jpg:style=0.3 \
		--size 256 --iterations 150 --seed 7 --previews out/previews -o out/demo.png; \
	echo "result: $$(pwd)/out/demo.png   previews: $$(pwd)/out/previews/"

# --- checks ------------------------------------------------------------------------------
lint: install
	$(BIN)/ruff check services export clients tests
	$(BIN)/ruff format --check services export clients tests
	cd protos && ../$(NODE_CLIENT)/node_modules/.bin/buf lint

typecheck: install
	$(BIN)/mypy

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
chromium:
	test -x /usr/bin/chromium || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: lint typecheck chromium
	$(BIN)/pytest

test-slow: install
	$(BIN)/pytest -m slow

clean:
	rm -rf gen out .pytest_cache .mypy_cache .ruff_cache
