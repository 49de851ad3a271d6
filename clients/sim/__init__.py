"""Simulator-side helpers shared by the simulator clients and the training code (no server, no
torch): the seeded Meta-World environment and the Meta-World task instructions."""


class SimError(Exception):
    """The simulator cannot do what was asked (not installed, unknown task, bad argument); the
    message says which. ``policy_server.sim`` re-raises it as the CLI's InputError."""
