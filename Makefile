# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exact versions this machine holds on disk (pyproject keeps the ranges a board can satisfy).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean compose-file flwr-run bench-layers bench-accuracy test-compose test-slow wheelhouse \
	bench-deploy test-unit test-stages lint test-board

$(VENV)/.installed: pyproject.toml
	# Fashion-MNIST comes from Debian's dataset-fashion-mnist, and the report's browser test uses
	# Debian's chromium, where apt and root are at hand.
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium || echo "chromium not installed: the browser test will say so"; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[data,efficientnet,simulation,server,test,bench]' $(TORCH_PINS)
	touch $@

setup: $(VENV)/.installed

# The backbone the demo fleet starts from: ResNet-18 pretrained on real Fashion-MNIST (offline).
BACKBONE := runs/resnet18-fashion.pt
# How it is made, here and by the compose file's one-shot `backbone` service (make compose-file).
BACKBONE_ARGS := --model resnet18 --dataset fashion-mnist --epochs 2 --image-size 32 --limit-train 6000 \
	--limit-test 1000

$(BACKBONE): | setup
	$(PY) -m odl_fed.cli pretrain $(BACKBONE_ARGS) --out $@

# The committed docker-compose.yml: the demo fleet, generated (a test checks it is up to date).
compose-file: setup
	$(PY) -m odl_fed.cli compose --fleet configs/fleets/demo.yaml --backbone="$(BACKBONE_ARGS)" > docker-compose.yml

demo: setup $(BACKBONE)
	$(PY) -m odl_fed.cli simulate --fleet configs/fleets/demo.yaml --out-dir runs/demo

# The same fleet through `flwr run .` (project-local Flower home in .flwr/, SuperLink stopped after).
flwr-run: setup $(BACKBONE)
	$(PY) -m odl_fed.deploy.flwr_local --fleet configs/fleets/demo.yaml --out-dir runs/flwr

bench-layers: setup
	$(PY) -m bench.asi_layers

bench-accuracy: setup
	$(PY) -m bench.accuracy

# The default suite: every test not marked slow or compose (pyproject's addopts).
test: setup
	$(PY) -m pytest -q

# The inner loop while editing (about a minute here): the default suite without the tests marked `fleet`
# (they start a simulated fleet, or read the one conftest.py shares), `process` (they start other
# processes: the entries, a SuperLink, Chromium, a child python) or `sweep` (one check over every model
# or method). `make test` runs those too.
test-unit: setup
	$(PY) -m pytest -q -m 'not slow and not compose and not board and not fleet and not process and not sweep'

# Every test is run by some stage of .ci/run: the union of the stages' selections is every test
# collected (pytest --collect-only per stage; tests/stages.py).
test-stages: setup
	$(PY) tests/stages.py

# The lint configuration in pyproject.toml ([tool.ruff]) over the package, tests, benchmarks and tools.
lint: setup
	$(PY) -m ruff check .

# The image's wheels (CPU torch included) for an offline `docker build` (build/wheelhouse/).
wheelhouse: setup
	$(PY) -c "from tools.docker_engine import wheelhouse; print(wheelhouse())"

# The committed docker-compose.yml as a user runs it: a clean copy, `docker compose up` twice, with a dockerd
# of its own; it tears everything down (skipped, with the reason, where no engine can start). -s: its
# timings and the images' sizes.
test-compose: setup
	$(PY) -m pytest -q -s -m compose tests/test_docker_compose.py

# An emulated Raspberry Pi 4 (an arm64 Debian root under qemu-user, a Cortex-A72 with a Pi 4's /proc/cpuinfo):
# `pip install .` of this checkout in it from the registries, then its client trains 2 rounds against a server
# on this machine (tools/board_root.py; the root and the board's venv kept in /var/cache/odl-fed). Needs root;
# skipped, with the reason, where binfmt_misc or qemu cannot be set up. -s: its timings and memory figures.
test-board: setup
	$(PY) -m pytest -q -s -m board tests/test_board_emulated.py

# Runs of real processes that take minutes: the deployed fleet, its fault drills, TLS with node
# authentication, a killed and resumed run, `flwr run .`, a second simulated run to compare, and the
# minute-long accuracy check (its own stage in .ci/run).
test-slow: setup
	$(PY) -m pytest -q -m slow

# A deployed round against the same round in simulation, and the image's size and build times.
bench-deploy: setup
	$(PY) -m bench.deploy

clean:
	rm -rf $(VENV)
