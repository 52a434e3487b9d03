"""Stage: measuring — latency, memory, cold start, task metrics and their confidence."""
