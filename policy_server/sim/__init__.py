"""Simulator layers used for data collection and closed-loop evaluation (Meta-World)."""
