"""The expert factory: scripted Meta-World demos -> base demo VLA -> per-suite skill experts."""
