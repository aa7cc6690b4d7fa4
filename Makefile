# dpquant_tf: set-up, demo and tests in a local virtualenv (.venv), reused across runs.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dpquant_installed
# pytest-xdist workers for `make test` / `make test-all` (TEST_WORKERS=0 runs serially).
TEST_WORKERS ?= 2

.PHONY: demo test test-all bazel-test check-python clean

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found. dpquant_tf needs Python 3.11 (tensorflow-privacy 0.9.0 requires Python < 3.12); install it or run 'make PYTHON=/path/to/python3.11 ...'." >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'), but dpquant_tf needs Python 3.11. Run 'make PYTHON=/path/to/python3.11 ...'." >&2; exit 1; }

$(STAMP): setup.cfg pyproject.toml constraints.txt | check-python
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[all]'
	$(PY) -m pip check
	touch $(STAMP)

## The main job: DP training with DPQuant on real MNIST digits (offline), prints accuracy and epsilon.
demo: $(STAMP)
	$(PY) examples/train.py

## The default (fast) test suite.
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" tests

## Every test, slow end-to-end ones included.
test-all: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) tests

## Bazel build and tests (needs Bazel; offline: apt-get install -y bazel-bootstrap).
bazel-test: $(STAMP)
	@command -v bazel >/dev/null 2>&1 || { echo "error: bazel not found. Install it offline from Debian: 'apt-get update && apt-get install -y bazel-bootstrap' (see docs/BAZEL.md)." >&2; exit 1; }
	PATH="$(abspath $(VENV))/bin:$$PATH" bazel test //...

clean:
	rm -rf $(VENV) *.egg-info
