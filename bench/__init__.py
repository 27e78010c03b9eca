"""Benchmarks behind ``driftloop bench``: each prints figures and ends with one JSON line."""
