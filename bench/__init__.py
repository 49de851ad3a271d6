"""Benchmarks (scripts and the closed-loop harness); each prints figures measured in one run."""
