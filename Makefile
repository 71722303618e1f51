# deqrobust — two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deqrobust-installed

.PHONY: demo test bench gpu-check venv clean

venv: $(STAMP)

# torch is installed first with its exact pin (the local CPU wheel); torchattacks declares
# torchvision and an old requests but imports without them, so it goes in with --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	touch $@

demo: $(STAMP)
	$(BIN)/deqrobust demo

# One pytest worker per core (pytest-xdist); each test module stays on one worker, so a module's
# shared trained model and evaluation run are computed once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadscope

bench: $(STAMP)
	$(BIN)/pip install -q --no-deps torchdeq==0.1.0
	$(BIN)/python -m benchmarks

# The CUDA paths and the paper's recipes priced on one GPU (on a bare GPU machine without this venv:
# PYTHONPATH=src python3 -m benchmarks.gpu_check). On a CPU it runs at tiny sizes.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
