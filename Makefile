# CT-SMA: two commands for a fresh machine (Python 3.11 and make):
#   make demo   -> end-to-end demo on the embedded digital knee phantom
#   make test   -> the whole test suite
# Both create ./.venv on first use; later runs reinstall nothing unless
# pyproject.toml or constraints.txt changed.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ctsma-installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test venv clean-venv

venv: $(STAMP)

# The numerical core is installed first, so that its numba kernels compile (python -m ctsma.jit, 40-50 s
# of one core) while pip installs the rest on the other core; no later process compiles them again.
CORE := numpy scipy numba edt SimpleITK pyyaml tqdm

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt $(CORE)
	@PYTHONPATH=src $(PY) -m ctsma.jit & jit=$$!; \
	  $(PY) -m pip install --quiet -c constraints.txt -e '.[test]' || { kill $$jit; exit 1; }; \
	  wait $$jit
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ctsma demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
