# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch lies on these machines' disk; a bare `torch` would pull CUDA.
TORCH_SPEC ?= torch==2.13.0
DEMO_BUDGET ?= 5m

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffusekit train --preset mnist --out runs/demo --budget $(DEMO_BUDGET) --overwrite
	$(VENV)/bin/diffusekit sample runs/demo --n 64 --steps 50 --sampler ddim --seed 0 --out runs/demo/demo_grid.png
	@echo "Demo sample grid: runs/demo/demo_grid.png"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
