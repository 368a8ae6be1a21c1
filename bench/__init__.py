"""Benchmarks: reports, not tests."""

import services  # noqa: F401  # before torch: OpenMP's wait policy (services/__init__.py)
