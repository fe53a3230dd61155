"""POST /v1/completions: routes.py (the route), schema.py (the request body), response.py (prompts to
engine requests, engine events to `text_completion` objects)."""
