"""What a model offers the observation routers, described apart from the backend interface.

A backend's job is preprocessing and the forward pass; which of its modules carry routing
information is a property of the architecture, read by the admission hooks and the composition
root (never by a router, which only gets a feature function).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingFeatures:
    """Routing-relevant modules of one architecture.

    value_projections: weight keys of the action expert's value projections, in forward order
    (each an ``nn.Linear`` weight (out, in); the value-subspace router scores the (T, in) hidden
    states entering one of them). Empty when the architecture has none.
    """

    value_projections: tuple[str, ...] = ()

    def default_value_projection(self) -> str | None:
        """The last value projection (the expert head's: the most skill-specific), or None."""
        return self.value_projections[-1] if self.value_projections else None


NO_ROUTING_FEATURES = RoutingFeatures()
