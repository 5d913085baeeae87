# The two commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv quickstart test clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The quickstart is a demo: each run starts afresh (a real search would be resumed instead).
quickstart: venv
	rm -rf results/ray/quickstart results/quickstart
	$(BIN)/python -m ssam_tune.run search_spaces/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) results/quickstart results/ray/quickstart
