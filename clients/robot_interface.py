"""The minimal robot protocol the arm client drives, mirroring LeRobot's ``Robot`` classes.

``lerobot.robots.so101_follower.SO101Follower`` (LeRobot 0.4.x) satisfies :class:`Robot` unchanged:

* ``observation_features`` -> ``{"shoulder_pan.pos": float, ..., "<camera>": (H, W, 3)}``,
* ``action_features`` -> ``{"shoulder_pan.pos": float, ...}``,
* ``connect(calibrate=True)``, ``is_connected``, ``disconnect()``,
* ``get_observation()`` -> ``{"<motor>.pos": float, "<camera>": np.ndarray (H, W, 3) uint8 RGB}``,
* ``send_action({"<motor>.pos": float})`` -> the action actually sent (possibly clipped by the
  robot's own ``max_relative_target``).

Joint units follow LeRobot's calibration: body joints in ``[-100, 100]`` (``RANGE_M100_100``) or
degrees (``use_degrees=True``), the gripper in ``[0, 100]``. LeRobot pins ``torch<2.11`` and so cannot
live in the server's environment: :func:`make_so101` imports it lazily (see docs/CLIENTS.md and
requirements-robot.txt). :class:`FakeRobot` is a simulated arm with the same interface (first-order
joint dynamics in real time + rendered camera frames) for tests and dry runs without hardware.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

#: SO-100/SO-101 motor order (bus ids 1..6); the state/action vectors sent to the server use it.
SO101_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


@runtime_checkable
class Robot(Protocol):
    """What the arm client needs from a robot (a structural subset of ``lerobot.robots.Robot``)."""

    @property
    def observation_features(self) -> dict[str, Any]: ...

    @property
    def action_features(self) -> dict[str, Any]: ...

    @property
    def is_connected(self) -> bool: ...

    def connect(self, calibrate: bool = True) -> None: ...

    def get_observation(self) -> dict[str, Any]: ...

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]: ...

    def disconnect(self) -> None: ...


class RobotNotConnectedError(RuntimeError):
    """Raised by :class:`FakeRobot` like LeRobot's ``DeviceNotConnectedError``."""


def motor_names(robot: Robot) -> list[str]:
    """Motor names in the robot's declared order, from its ``action_features`` keys
    (``"<motor>.pos"``)."""
    names = [k[: -len(".pos")] for k in robot.action_features if k.endswith(".pos")]
    if not names:
        raise ValueError(f"robot declares no '<motor>.pos' action features: "
                         f"{list(robot.action_features)}")
    return names


def camera_names(robot: Robot) -> list[str]:
    """Camera keys: observation features whose value is an ``(H, W, C)`` shape tuple."""
    return [k for k, v in robot.observation_features.items() if isinstance(v, tuple)]


def default_limits(motors: list[str] | tuple[str, ...], use_degrees: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 (J,) joint limits in LeRobot's calibrated units: body joints
    [-100, 100] (or [-180, 180] degrees), the gripper [0, 100]."""
    body = 180.0 if use_degrees else 100.0
    low = np.array([0.0 if m == "gripper" else -body for m in motors], np.float32)
    high = np.array([100.0 if m == "gripper" else body for m in motors], np.float32)
    return low, high


class FakeRobot:
    """A simulated arm with LeRobot's robot interface, for tests and dry runs.

    Each joint follows its goal with first-order dynamics integrated over *wall-clock* time since
    the previous call (``pos += (1 - exp(-dt / time_constant)) * (goal - pos)``), with an optional
    speed limit (units/s), so a client that sends late or jerky commands sees it in the state, as on
    hardware. Goals are clipped to ``limits`` like the servo firmware does. Cameras return
    ``(H, W, 3)`` uint8 RGB frames rendering the joint state (one bar per joint) so they change with
    the motion. ``send_log`` keeps every goal received (for tests).

    motors: motor names; cameras: key -> (height, width); initial: (J,) start positions;
    fail_after: raise ``RobotNotConnectedError`` after that many observations (fault injection).
    """

    name = "fake_arm"

    def __init__(self, motors: tuple[str, ...] | list[str] = SO101_MOTORS,
                 cameras: dict[str, tuple[int, int]] | None = None,
                 time_constant: float = 0.05, max_speed: float | None = 300.0,
                 initial: np.ndarray | None = None, limits: tuple[np.ndarray, np.ndarray] | None = None,
                 clock: Callable[[], float] = time.monotonic, fail_after: int | None = None):
        self.motors = list(motors)
        self.cameras = dict(cameras if cameras is not None else {"front": (96, 128)})
        self.time_constant = float(time_constant)
        self.max_speed = max_speed
        self.low, self.high = limits if limits is not None else default_limits(self.motors)
        j = len(self.motors)
        self.pos = (np.zeros(j) if initial is None else np.asarray(initial, np.float64)).copy()
        if self.pos.shape != (j,):
            raise ValueError(f"initial must have shape ({j},), got {self.pos.shape}")
        self.pos = np.clip(self.pos, self.low, self.high)
        self.goal = self.pos.copy()
        self._clock = clock
        self._t = clock()
        self._connected = False
        self._lock = threading.Lock()
        self.fail_after = fail_after
        self.n_observations = 0
        self.send_log: list[np.ndarray] = []
        self.disconnect_count = 0

    # --- LeRobot interface -------------------------------------------------------------------
    @property
    def observation_features(self) -> dict[str, Any]:
        feats: dict[str, Any] = {f"{m}.pos": float for m in self.motors}
        feats.update({k: (h, w, 3) for k, (h, w) in self.cameras.items()})
        return feats

    @property
    def action_features(self) -> dict[str, Any]:
        return {f"{m}.pos": float for m in self.motors}

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, calibrate: bool = True) -> None:
        if self._connected:
            raise RuntimeError(f"{self.name} already connected")
        self._connected = True
        self._t = self._clock()

    def get_observation(self) -> dict[str, Any]:
        self._require()
        with self._lock:
            self.n_observations += 1
            if self.fail_after is not None and self.n_observations > self.fail_after:
                raise RobotNotConnectedError(f"{self.name}: simulated bus failure")
            self._integrate()
            obs: dict[str, Any] = {f"{m}.pos": float(p) for m, p in zip(self.motors, self.pos)}
            pos = self.pos.copy()
        for key, (h, w) in self.cameras.items():
            obs[key] = self._render(pos, h, w)
        return obs

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        self._require()
        missing = [m for m in self.motors if f"{m}.pos" not in action]
        if missing:
            raise KeyError(f"{self.name}: action lacks {[m + '.pos' for m in missing]}")
        goal = np.array([float(action[f"{m}.pos"]) for m in self.motors])
        with self._lock:
            self._integrate()
            self.goal = np.clip(goal, self.low, self.high)
            self.send_log.append(self.goal.copy())
            sent = self.goal.copy()
        return {f"{m}.pos": float(v) for m, v in zip(self.motors, sent)}

    def disconnect(self) -> None:
        self._require()
        self._connected = False
        self.disconnect_count += 1

    # --- simulation --------------------------------------------------------------------------
    def _require(self) -> None:
        if not self._connected:
            raise RobotNotConnectedError(f"{self.name} is not connected")

    def _integrate(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._t)
        self._t = now
        if dt == 0.0:
            return
        step = (1.0 - math.exp(-dt / max(self.time_constant, 1e-6))) * (self.goal - self.pos)
        if self.max_speed is not None:
            step = np.clip(step, -self.max_speed * dt, self.max_speed * dt)
        self.pos = self.pos + step

    def _render(self, pos: np.ndarray, h: int, w: int) -> np.ndarray:
        """(h, w, 3) uint8: a grey background with one bar per joint whose height is the joint's
        normalised position (so frames are a deterministic function of the state)."""
        img = np.full((h, w, 3), 40, np.uint8)
        frac = (pos - self.low) / np.maximum(self.high - self.low, 1e-6)
        bw = max(1, w // (2 * len(pos) + 1))
        for i, f in enumerate(np.clip(frac, 0, 1)):
            x0 = (2 * i + 1) * bw
            top = int(round((1.0 - f) * (h - 1)))
            img[top:, x0:x0 + bw] = (60 + 30 * i % 190, 200, 255 - 30 * i % 200)
        return img


def make_so101(port: str, cameras: dict[str, dict] | None = None, robot_id: str | None = None,
               use_degrees: bool | None = None, max_relative_target: float | None = None,
               disable_torque_on_disconnect: bool = True) -> Robot:
    """Build a real ``SO101Follower``, importing LeRobot only now.

    LeRobot 0.4.4 (the last for Python 3.11) ships it as ``lerobot.robots.so_follower``
    (``SO101FollowerConfig`` is an alias of ``SOFollowerRobotConfig``, ``use_degrees`` defaults to
    True); older/newer layouts have ``lerobot.robots.so101_follower``: both are tried.
    cameras: key -> ``{"index_or_path": 0 | "/dev/video0", "width": 640, "height": 480, "fps": 30}``
    (``OpenCVCameraConfig`` fields); use_degrees None = LeRobot's default;
    disable_torque_on_disconnect=False keeps the servos holding after a stop (LeRobot's default
    True lets an unsupported arm drop under gravity once the client disconnects). Raises ``ImportError``
    with install instructions when LeRobot is missing (it cannot live beside the server's torch)."""
    try:
        from lerobot.cameras.opencv.configuration_opencv import OpenCVCameraConfig
        try:
            from lerobot.robots.so_follower import SO101Follower, SO101FollowerConfig
        except ImportError:
            from lerobot.robots.so101_follower import SO101Follower, SO101FollowerConfig
    except ImportError as e:  # pragma: no cover - depends on the separate robot environment
        raise ImportError(
            "--robot so101 needs LeRobot, which pins torch<2.11 and lives in its own client "
            "environment: python3.11 -m venv .venv-robot && .venv-robot/bin/pip install "
            "-r requirements-robot.txt && .venv-robot/bin/pip install --no-deps -e . "
            f"(see docs/CLIENTS.md). Import failed: {e}") from e
    cams = {k: OpenCVCameraConfig(**v) for k, v in (cameras or {}).items()}
    kwargs: dict[str, Any] = dict(port=port, cameras=cams, max_relative_target=max_relative_target,
                                  disable_torque_on_disconnect=disable_torque_on_disconnect)
    if use_degrees is not None:
        kwargs["use_degrees"] = use_degrees
    if robot_id is not None:
        kwargs["id"] = robot_id
    return SO101Follower(SO101FollowerConfig(**kwargs))


def uses_degrees(robot: Robot) -> bool:
    """Whether a LeRobot arm reports body joints in degrees (``config.use_degrees``); False for
    robots without that setting (e.g. :class:`FakeRobot`, which uses [-100, 100])."""
    return bool(getattr(getattr(robot, "config", None), "use_degrees", False))
