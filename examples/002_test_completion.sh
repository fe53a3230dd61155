#!/usr/bin/env bash
# One completion, printed with its prompt (the original's 002_test_completion.sh, with curl).
#   bash examples/002_test_completion.sh 'Hello, my name is'
#   T=0.8 M=32 bash examples/002_test_completion.sh 'Hello there. My name is'
#   T=0.8 M=32 bash examples/002_test_completion.sh README.md     # a file name: the file is the prompt
# Env: T temperature (0.6), M max tokens (32), E engine / model (davinci: the served model of that size),
# PORT (9000) or OPENAI_API_BASE, OPENAI_API_KEY if the server has API_KEYS.
# On these legacy routes a prompt too long for the context keeps its last n_ctx - M tokens.
# On an error (a wrong key or engine, M too large...) it prints the server's message on stderr and exits 1.
set -euo pipefail
source "$(dirname "$0")/_api.sh"
prompt="${1:-Hello, my name is}"
if [ -f "$prompt" ]; then
  prompt="$(cat -- "$prompt")"
fi
body="$(PROMPT="$prompt" T="${T:-0.6}" M="${M:-32}" python3 -c '
import json, os
print(json.dumps({"prompt": os.environ["PROMPT"], "temperature": float(os.environ["T"]),
                  "max_tokens": int(os.environ["M"]), "echo": True}))')"
answer="$(api "/v1/engines/${E:-davinci}/completions" -H "Content-Type: application/json" -d "$body")"
python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["text"])' <<<"$answer"
