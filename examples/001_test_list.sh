#!/usr/bin/env bash
# Lists the served models as the legacy engines list (the original's 001_test_list.sh, with curl).
#   bash examples/001_test_list.sh
# Env: PORT (9000) or OPENAI_API_BASE (http://localhost:$PORT); OPENAI_API_KEY if the server has API_KEYS.
set -euo pipefail
base="${OPENAI_API_BASE:-http://localhost:${PORT:-9000}}"
base="${base%/}"
base="${base%/v1}"
auth=()
[ -n "${OPENAI_API_KEY:-}" ] && auth=(-H "Authorization: Bearer ${OPENAI_API_KEY}")
exec curl -sS --fail-with-body "${auth[@]}" "$base/v1/engines"
