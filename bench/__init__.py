"""Benchmarks: strangler against direct-to-origin and NGINX as a proxy (`bench/run.py`)."""
