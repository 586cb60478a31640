"""Training, the proxy model zoo and benchmarks for the evit toolkit."""
