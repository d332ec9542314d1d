"""What the platform tells its operators: Prometheus metrics (metrics.py) and structured logs with a
request id that follows a request through every service (logs.py)."""
