"""GET /health and GET /metrics: routes.py; metrics.py (the Prometheus metrics of the HTTP layer)."""
