# `make demo` and `make test` set everything up on a fresh machine (the venv is made once).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here, not in pyproject: 2.14.1 + 0.29.1 is the pair that
# installs from this machine's local wheels and imports together (see pyproject comments).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean

$(BIN)/cssbench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/cssbench

demo: venv
	$(BIN)/cssbench run --protocol synth-15-1-overlap --method ft,joint --overwrite

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
