#!/bin/bash
# The Python interpreter for Bazel's py_binary/py_test: the repository's own
# virtualenv, <repo>/.venv/bin/python (created by `make test` / `make demo`).
#
# Bazel runs this script from a runfiles tree whose files are symlinks back to
# the source tree; resolving our own real path finds the repository root, so no
# absolute path is baked into committed files and any clone finds its own .venv.
# DPQUANT_PYTHON, if set (pass it with --action_env/--test_env), overrides it.
set -euo pipefail
if [[ -n "${DPQUANT_PYTHON:-}" ]]; then
  exec "${DPQUANT_PYTHON}" "$@"
fi
self="$(readlink -f "${BASH_SOURCE[0]}")"
repo="$(cd "$(dirname "${self}")/../.." && pwd -P)"
python="${repo}/.venv/bin/python"
if [[ ! -x "${python}" ]]; then
  echo "error: dpquant_tf's Bazel targets run on the project's virtualenv, but" \
       "${python} does not exist. Create it first with 'make test' (or" \
       "'make demo') in ${repo}, or point DPQUANT_PYTHON at a Python 3.11 that" \
       "has the pinned stack (see docs/BAZEL.md)." >&2
  exit 1
fi
exec "${python}" "$@"
