"""Merging: the method registry (``methods/``), validation and planning (``plan``), per-tensor
streaming (``stream``), task vectors of experts and adapters. Writes nothing to a merge state:
``policy_server.state`` commits what this package computes (it never imports the state)."""
