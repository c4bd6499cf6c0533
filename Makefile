# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create a project-local virtualenv (.venv) and install segsem into it with
# torch pinned to 2.13.0 (constraints.txt), so no CUDA packages are pulled on a CPU machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONSTRAINTS := -c constraints.txt
STAMP  := $(VENV)/.segsem-installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) setuptools wheel numpy hydra-core iopath omegaconf tqdm pillow
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation $(CONSTRAINTS) sam2==1.1.0
	$(PIP) install -q --no-build-isolation $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

test: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .demo .pytest_cache
