"""Load testing: the benchmark harness (bench.py) and, later, Locust scenarios."""
