# make run   - create .venv if missing, install cellmi, run the whole pipeline on the embedded default
# make test  - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override e.g. TORCH_SPEC='torch>=2.4' for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.cellmi-installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/cellmi run

test: install
	$(VENV)/bin/ruff check cellmi tests benchmarks
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf cellmi-work .pytest_cache
