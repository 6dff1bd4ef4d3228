"""Benchmarks of the cost of encryption; run with scripts/bench (see docs/performance.md)."""
