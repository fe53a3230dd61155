#!/usr/bin/env bash
# Endless completions: each completion becomes the next prompt, the screen redrawn each time
# (the original's 003_completions.sh). Ctrl+C to stop.
#   bash examples/003_completions.sh 'Yo dawg, we implemented OpenAI API'
# Env: as 002_test_completion.sh (T, M, E, PORT, OPENAI_API_BASE, OPENAI_API_KEY); N: stop after N rounds.
# On an error it stops with the server's message (from 002_test_completion.sh) and its exit status.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prompt="${1:-Hello, my name is}"
round=0
while [ -z "${N:-}" ] || [ "$round" -lt "$N" ]; do
  prompt="$(bash "$here/002_test_completion.sh" "$prompt")"
  printf '\033c'
  echo "$prompt"
  round=$((round + 1))
done
