"""Benchmarks that print figures and never pass or fail on the clock (see bench/README.md)."""
