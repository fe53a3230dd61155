# Sourced by the example scripts: the server from the environment, and `api`, which sends one request.
# Env: PORT (9000) or OPENAI_API_BASE (http://localhost:$PORT, with or without /v1); OPENAI_API_KEY if the
# server has API_KEYS.
base="${OPENAI_API_BASE:-http://localhost:${PORT:-9000}}"
base="${base%/}"
base="${base%/v1}"
auth=()
if [ -n "${OPENAI_API_KEY:-}" ]; then
  auth=(-H "Authorization: Bearer ${OPENAI_API_KEY}")
fi

# api PATH [curl options...]: prints the response body. On an HTTP error it prints the server's own
# message instead ("error: HTTP 401 (invalid_api_key): ...") on stderr and returns 1, so that no later step
# parses an error body as an answer; curl's own failures (no server) keep curl's message and status.
api() {
  local path="$1" out status
  shift
  out="$(curl -sS -w '\n%{http_code}' "${auth[@]}" "$@" "$base$path")" || return
  status="${out##*$'\n'}"
  out="${out%$'\n'*}"
  if [ "$status" -lt 400 ]; then
    printf '%s\n' "$out"
    return 0
  fi
  STATUS="$status" python3 -c '
import json, os, sys
text, status = sys.stdin.read(), os.environ["STATUS"]
try:
    error = json.loads(text)["error"]
    code, why = error.get("code"), error["message"]
except (ValueError, KeyError, TypeError):  # not an OpenAI-shaped error (a proxy page?): what came
    code, why = None, text.strip()[:500] or "(no body)"
print(f"error: HTTP {status}" + (f" ({code})" if code else "") + f": {why}", file=sys.stderr)' <<<"$out"
  return 1
}
