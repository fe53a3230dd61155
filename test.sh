#!/usr/bin/env bash
# Installs the project with its test extras into .venv (first run only) and runs lint + the whole test suite.
# Extra arguments go to pytest, e.g. `bash test.sh -k sampler`.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.gpt2jax-test-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch==2.13.0 is pinned in the test extra: the CPU wheel (a plain `torch` would pull a CUDA build).
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
