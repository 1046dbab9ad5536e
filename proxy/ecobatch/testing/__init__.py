"""Helpers for tests and benchmarks: random-weight models built locally (no hub downloads)."""
