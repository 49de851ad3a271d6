"""Client-side safety layer between the policy's action chunks and a real arm.

The server clips actions to the policy's bounds, but the robot side must not trust the network: a
stale, corrupted or simply wrong chunk must never reach the motors unchecked. Per control tick the
:class:`SafetyFilter` (1) rejects non-finite targets and robot states (``SafetyStop``), (2) clamps
every joint to its limits, (3) limits the change per tick relative to the previous command (a rate
limit: ``max_delta`` units per tick = ``max_delta * hz`` units/s) and (4) optionally keeps the
command within ``max_tracking_error`` of the measured position, so a stalled or blocked joint is
not wound up. On any stop the client calls :func:`hold_position` (command the measured position)
and disconnects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SafetyStop(RuntimeError):
    """The control loop must stop: hold position, then disconnect. ``reason`` is a short tag
    (``"nan_action"``, ``"nan_state"``, ``"server_lost"``, ``"starved"``, ``"robot_error"``...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class SafetyConfig:
    """Joint limits low/high: (J,) in the robot's units; max_delta: scalar or (J,) max change of the
    command per control tick; max_tracking_error: scalar/(J,) max distance of the command from the
    measured position (None = off)."""

    low: np.ndarray
    high: np.ndarray
    max_delta: float | np.ndarray = 2.0
    max_tracking_error: float | np.ndarray | None = None

    def __post_init__(self):
        self.low = np.asarray(self.low, np.float64).reshape(-1)
        self.high = np.asarray(self.high, np.float64).reshape(-1)
        if self.low.shape != self.high.shape:
            raise ValueError(f"joint limits differ in length: {self.low.shape} vs {self.high.shape}")
        if np.any(self.low > self.high):
            raise ValueError(f"joint limits with low > high: low={self.low}, high={self.high}")
        md = np.broadcast_to(np.asarray(self.max_delta, np.float64), self.low.shape)
        if np.any(md <= 0) or not np.all(np.isfinite(md)):
            raise ValueError(f"max_delta must be positive and finite, got {self.max_delta}")
        self.max_delta = md.copy()
        if self.max_tracking_error is not None:
            self.max_tracking_error = np.broadcast_to(
                np.asarray(self.max_tracking_error, np.float64), self.low.shape).copy()


class SafetyFilter:
    """Stateful per-tick filter: ``filter(target, measured) -> safe command`` (J,) float64.

    The rate limit is applied relative to the previous *command* (first tick: the measured
    position), so a big jump in the policy output becomes a ramp of ``max_delta`` per tick."""

    def __init__(self, config: SafetyConfig):
        self.config = config
        self.last_command: np.ndarray | None = None
        self.n_clamped = 0
        self.n_rate_limited = 0

    def reset(self) -> None:
        self.last_command = None

    def check_state(self, measured: np.ndarray) -> np.ndarray:
        m = np.asarray(measured, np.float64).reshape(-1)
        if m.shape != self.config.low.shape:
            raise SafetyStop("bad_state", f"robot state has {m.size} joints, limits have "
                                          f"{self.config.low.size}")
        if not np.all(np.isfinite(m)):
            raise SafetyStop("nan_state", f"non-finite robot state {m}")
        return m

    def filter(self, target: np.ndarray, measured: np.ndarray) -> np.ndarray:
        c = self.config
        m = self.check_state(measured)
        t = np.asarray(target, np.float64).reshape(-1)
        if t.shape != c.low.shape:
            raise SafetyStop("bad_action", f"action has {t.size} joints, expected {c.low.size}")
        if not np.all(np.isfinite(t)):
            raise SafetyStop("nan_action", f"non-finite action {t}")
        clamped = np.clip(t, c.low, c.high)
        if np.any(clamped != t):
            self.n_clamped += 1
        ref = m if self.last_command is None else self.last_command
        out = np.clip(clamped, ref - c.max_delta, ref + c.max_delta)
        if c.max_tracking_error is not None:
            out = np.clip(out, m - c.max_tracking_error, m + c.max_tracking_error)
        if np.any(out != clamped):
            self.n_rate_limited += 1
        # Both clips keep the command inside the limits when ref is inside them.
        out = np.clip(out, c.low, c.high)
        self.last_command = out
        return out


def hold_position(robot, motors: list[str]) -> np.ndarray | None:
    """Command every motor to its measured position (stop moving). Returns the held (J,) position,
    or None when the robot could not be read (then nothing is sent: a blind command is worse)."""
    try:
        obs = robot.get_observation()
        pos = np.array([float(obs[f"{m}.pos"]) for m in motors])
        if not np.all(np.isfinite(pos)):
            return None
        robot.send_action({f"{m}.pos": float(p) for m, p in zip(motors, pos)})
        return pos
    except Exception:  # noqa: BLE001 - best effort on the way down; the caller disconnects
        return None
