#!/usr/bin/env bash
# Serves the OpenAI API on port $PORT (9000), as the original openai-server's prod.sh did:
#   bash prod.sh                 # every model under checkpoints/ (MODELS_DIR)
#   MODELS=117M bash prod.sh     # one model (a folder name under MODELS_DIR, or a path)
#   PORT=8000 bash prod.sh
# On the first run it makes .venv at the repo root and installs the project into it.
# Other settings (HOST, MAX_TOKENS, MAX_N, API_KEYS, CORS_ORIGINS, ...): see README.md.
set -euo pipefail
cd "$(dirname "$0")"

export PORT="${PORT:-9000}"
PYTHON=${PYTHON:-python3}
if ! .venv/bin/python -c "import serving.app, gpt2jax" >/dev/null 2>&1; then
  echo "prod.sh: installing the project into .venv (first run)" >&2
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
fi
exec .venv/bin/python -m serving "$@"
