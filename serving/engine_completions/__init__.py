"""The original openai-server's /v1/engines/{id}/completions (GET or POST), over completions' handler."""
