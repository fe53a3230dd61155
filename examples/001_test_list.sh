#!/usr/bin/env bash
# Lists the served models as the legacy engines list (the original's 001_test_list.sh, with curl).
#   bash examples/001_test_list.sh
# Env: PORT (9000) or OPENAI_API_BASE (http://localhost:$PORT); OPENAI_API_KEY if the server has API_KEYS.
# On an error it prints the server's message on stderr and exits 1.
set -euo pipefail
source "$(dirname "$0")/_api.sh"
api /v1/engines
