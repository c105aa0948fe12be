# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv, install elo-ray with its test extras, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this project tests against; GPU images bring their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all bench clean offline-archive

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,report,eval,search]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/elo-ray demo

# test: what CI runs (under 30 minutes on 2 cores); test-all adds the tests marked slow.
test: $(VENV)/.installed
	$(PY) -m pytest tests -m "not slow" --durations=15

test-all: $(VENV)/.installed
	$(PY) -m pytest tests --durations=30

# Ray and what a PyTorch GPU image lacks, for hosts without a package index (scripts/offline_archive.py).
OFFLINE_PYTHON ?= 3.12
offline-archive: $(VENV)/.installed
	$(PY) scripts/offline_archive.py --python-version $(OFFLINE_PYTHON)

clean:
	rm -rf $(VENV) work
