"""Simulator layers used for data collection and closed-loop evaluation (Meta-World).

The environment and the task instructions are simulator-side (``clients.sim``, shared with the
Meta-World client); this package adds the expert factory's suites, demonstrations and rollouts.
"""

from contextlib import contextmanager

from clients.sim import SimError
from policy_server.errors import InputError


@contextmanager
def input_errors():
    """Re-raise the simulator's ``SimError`` as ``InputError`` (the CLI's exit code 2); usable as
    a ``with`` block or a decorator."""
    try:
        yield
    except SimError as e:
        raise InputError(str(e)) from None
