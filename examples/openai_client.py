"""The same server from the current `openai` package (pip install openai): models, a completion, a chat.

python examples/openai_client.py                # against http://localhost:9000
OPENAI_BASE_URL=http://host:8000/v1 OPENAI_API_KEY=sk-... python examples/openai_client.py

On an error (a wrong key, say) it prints the server's message and exits 1.
"""

from __future__ import annotations

import os
import sys

import openai


def main() -> int:
    client = openai.OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", f"http://localhost:{os.environ.get('PORT', '9000')}/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),  # any value unless the server sets API_KEYS
    )
    try:
        run(client)
    except openai.APIStatusError as e:  # the server's answer: its message, without the traceback
        body = e.body if isinstance(e.body, dict) else {}
        code = f" ({body['code']})" if body.get("code") else ""
        print(f"error: HTTP {e.status_code}{code}: {body.get('message') or e.message}", file=sys.stderr)
        return 1
    except openai.APIError as e:  # no answer (connection refused...) or an error event mid-stream
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    return 0


def run(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    print("models:", [m.id for m in client.models.list().data])

    completion = client.completions.create(model=model, prompt="Hello, my name is", max_tokens=16, n=2)
    for choice in completion.choices:
        print(f"completion {choice.index}: {choice.text!r} ({choice.finish_reason})")

    print("chat: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=32, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    sys.exit(main())
