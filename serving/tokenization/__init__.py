"""POST /tokenize and /detokenize (vLLM's shapes): routes.py, with their request fields."""
