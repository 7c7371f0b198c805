"""Benchmarks that run against real local services (`python -m bench.<name>`); not part of the tests."""
