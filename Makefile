# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exact versions this machine holds on disk (pyproject keeps the ranges a board can satisfy).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[simulation,test]' $(TORCH_PINS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m bench.asi_layers

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
