"""Benchmarks against the peers: `python -m bench` (see bench/__main__.py)."""
