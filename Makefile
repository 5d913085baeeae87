# The two commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Files whose outcomes are numbers (optimizer and Fisher against float64 loops, FLOPs, exact
# resume): CI runs them a second time on the portable CPU kernels (no AVX2/AVX-512), because
# users' CPUs round differently from the machine that wrote the tests.
NUMERIC_TESTS := tests/test_optim.py tests/test_masks.py tests/test_flops.py tests/test_models.py \
                 tests/test_methods.py tests/test_train.py tests/test_structured.py tests/test_distributed.py \
                 tests/test_sharpness.py tests/test_own.py tests/test_schedule.py

.PHONY: venv quickstart test test-fast lint test-portable clean

# Two stamps: the package alone (what the quickstart needs), and with the test tools
# (pytest, ruff, import-linter, the S3 test server) for the tests.
$(BIN)/.installed-run: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed: $(BIN)/.installed-run
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The quickstart is a demo: each run starts afresh (a real search would be resumed instead).
# It installs only the package (no test tools).
quickstart: $(BIN)/.installed-run
	rm -rf results/ray/quickstart results/quickstart
	$(BIN)/python -m ssam_tune.run search_spaces/quickstart.yaml

lint: venv
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports --no-cache

# Everything, in two steps: the tests that start no Ray on two pytest-xdist workers with one
# torch thread each (one per core), then the end-to-end tier (tests that start Ray or a search
# subprocess, marked e2e by tests/conftest.py) in one process, alone on the machine, since its
# waits are sized for one search at a time on 2 cores. Each step lists its slowest tests.
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not e2e" tests --durations=15
	$(BIN)/python -m pytest -q -m e2e tests --durations=25

# The inner loop: every test that starts no Ray and is not marked slow (every module of the
# method and training layers is covered), on two workers.
test-fast: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not e2e and not slow" tests --durations=10

# One thread per process, so two xdist workers use the two cores of a CI machine.
test-portable: venv
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not e2e" $(NUMERIC_TESTS)

clean:
	rm -rf $(VENV) results/quickstart results/ray/quickstart
