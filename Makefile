# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exact versions this machine holds on disk (pyproject keeps the ranges a board can satisfy).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	# Fashion-MNIST comes from Debian's dataset-fashion-mnist where apt and root are at hand.
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[simulation,test,bench]' $(TORCH_PINS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m bench.asi_layers

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
