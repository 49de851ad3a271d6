"""Model backends: a VLA policy behind one small interface (see base.PolicyBackend)."""
