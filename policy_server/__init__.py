"""carve-serve: continual CARVE merging of VLA skill experts and a gRPC policy server."""

__version__ = "0.1.0"
