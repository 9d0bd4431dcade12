"""Benchmarks: each module writes its own section of docs/BENCHMARKS.md (never timed tests)."""
