"""POST /v1/chat/completions: routes.py (the route), schema.py (the request body), template.py (a
conversation as GPT-2 text), response.py (the engine request, engine events to `chat.completion` objects)."""
