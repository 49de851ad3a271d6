"""Merge engine: streaming task vectors, the CARVE admission and the baseline merges."""
