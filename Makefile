# Setup is idempotent: the venv and the install are made once and reused
# until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m research compare

# Two processes, a test module each at a time (the modules share one
# TensorFlow session and its fixtures): most tests are single-core Python
# tracing, so two cores halve the suite.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
