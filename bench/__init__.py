"""Benchmarks (run as ``python -m bench.peers`` / ``python -m bench.load``); they report, never gate tests."""

import service  # noqa: F401  (first: service sets numpy's BLAS threads before numpy is imported)
