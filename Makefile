# Two commands do everything on a fresh machine:
#   make demo   set up .venv, train + segment on the built-in phantom
#   make test   set up .venv (with test extras), run the test suite
# TORCH=cpu (default) pins the CPU build of torch (requirements-cpu.txt); TORCH=keep uses the torch
# already installed in .venv (install the CUDA build there first on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-cpu.txt
	@if [ "$(TORCH)" = cpu ]; then $(BIN)/pip install -q -r requirements-cpu.txt; fi
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/semiseg demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) semiseg-demo
