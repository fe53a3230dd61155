"""GET /v1/models[/{id}] and the original openai-server's GET /v1/engines[/{id}]: routes.py."""
