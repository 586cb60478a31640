# Two commands do everything on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One thread per torch job: the CI machine has 2 shared cores.
export OMP_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup data test reproduce bench lab clean

setup: $(STAMP) data

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

data:
	@bash scripts/fetch_data.sh

# Two workers on the two cores, then the tests that assert measured speed alone (another process would skew them).
test: setup
	$(PY) -m pytest -q -rs -n 2 --dist loadfile -m "not timing"
	$(PY) -m pytest -q -m timing

reproduce: setup
	$(PY) -m experiments.reproduce --scale quick

bench: setup
	$(PY) -m experiments.benchmark --fast-path --quick

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache
