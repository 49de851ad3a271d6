"""Error types shared by the merge engine, the state store and the CLI.

Every error carries a message that names the offending file, tensor or field, so a user can fix the
input without reading a traceback. The CLI maps them to exit codes (see ``exit_code``).
"""


class CarveError(Exception):
    """Base class of every error carve-serve raises on purpose."""

    exit_code = 1


class InputError(CarveError):
    """Bad user input: missing file, key/shape/dtype mismatch, refused pickle, bad option."""

    exit_code = 2


class StateError(CarveError):
    """The merge state cannot do what was asked (unknown skill, duplicate skill, no version...)."""

    exit_code = 3


class IntegrityError(StateError):
    """A stored file does not match its recorded sha256, or a manifest is malformed."""

    exit_code = 4


# Serving errors. They live here, not in the runtime, so the transport (gRPC servicer) can map
# them to statuses without importing the torch-side runtime.

class BatcherFull(RuntimeError):
    """The micro-batcher's request queue is at ``max_queue``; retry later (RESOURCE_EXHAUSTED)."""


class BatcherClosed(RuntimeError):
    """A request arrived after the micro-batcher was closed (the server is shutting down)."""


class NonFiniteActions(RuntimeError):
    """The policy produced NaN/inf actions for some batch rows; nothing of that batch is returned."""
