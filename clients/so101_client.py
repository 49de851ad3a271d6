"""Robot-side client for an SO-101 (or any LeRobot-style) arm: stream observations to the policy
server, execute the returned action chunks at a fixed rate, safely.

Control loop (one thread, monotonic-clock scheduling at ``hz``; tick k is due at ``t0 + k / hz``):

1. read the robot (``get_observation()``) -> state (J,) float32 in a fixed motor order + camera
   frames resized to the server's image spec (the service resizes nothing);
2. collect a finished inference: the chunk ``(T, J)`` predicted from the observation of tick s is
   added to a :class:`ChunkBlender` at ``start_step = s`` so that its row ``k - s`` is used at tick
   k (latency is absorbed by skipping the rows whose time has passed);
3. when at most ``prefetch_steps`` rows of the newest chunk remain and no request is in flight,
   submit the current observation to a background thread (``ep.infer``): the next chunk is
   computed while the current one executes (asynchronous prefetch);
4. blend the chunks covering tick k, pass the target through the :class:`SafetyFilter` (non-finite
   -> stop, joint limits, max delta per tick) and ``send_action`` it.

Stops (hold the measured position, close the episode, disconnect): server error or loss
(``PolicyError`` / any RPC failure), a request older than ``request_timeout_s``, no executable action
for ``starve_timeout_s``, NaN/Inf in an action or in the robot state, a robot I/O error, Ctrl-C.

The server's spec must match the arm: ``action_dim == state_dim == number of motors``; actions are
absolute joint goals in the robot's calibrated units (LeRobot convention).

CLI::

    python -m clients.so101_client --server HOST:PORT --robot fake|so101 --port /dev/ttyACM0 \\
        --instruction "pick up the cube" --hz 30 --duration 20 --camera front=0:640x480
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from carve_client import ChunkBlender, PolicyClient, TokenError, read_token

from clients.robot_interface import (FakeRobot, Robot, camera_names, default_limits, make_so101,
                                     motor_names, uses_degrees)
from clients.safety import SafetyConfig, SafetyFilter, SafetyStop, hold_position

log = logging.getLogger("carve.so101")

_BLEND_ALIASES = {"weighted": "weighted_average", "latest": "latest_only"}


def _make_blender(mode: str):
    """``carve_client.ChunkBlender`` for ``mode`` (latest_only | average | weighted_average |
    conservative; hyphens and the short forms "weighted"/"latest" accepted)."""
    mode = mode.replace("-", "_")
    return ChunkBlender(_BLEND_ALIASES.get(mode, mode))


def spec_value(spec: Any, name: str, default: Any = None) -> Any:
    """Read a field of the episode spec whether it is an object (``PolicySpec``-like) or a dict."""
    if isinstance(spec, dict):
        return spec.get(name, default)
    return getattr(spec, name, default)


def image_size(img_spec: Any) -> tuple[int, int]:
    """(height, width) from an ``ImageSpec``-like object, a dict or an ``(h, w[, c])`` tuple."""
    if isinstance(img_spec, dict):
        return int(img_spec["height"]), int(img_spec["width"])
    if hasattr(img_spec, "height"):
        return int(img_spec.height), int(img_spec.width)
    return int(img_spec[0]), int(img_spec[1])


@dataclass
class ArmRunConfig:
    """Parameters of one run. ``hz``: control rate; ``prefetch_steps``: request the next chunk when
    at most this many rows of the newest chunk remain (default: half a chunk, >= 1);
    ``max_steps``/``duration_s``: stop after that many ticks / seconds (None = until stopped);
    ``camera_map``: server image key -> robot camera key (default: same name or LeRobot's
    ``observation.images.<name>``, else declaration order); ``encode``: image transport ("raw" | "jpeg" | "png")."""

    instruction: str
    hz: float = 30.0
    skill: str | None = None
    chunk_length: int | None = None
    blend: str = "weighted_average"
    prefetch_steps: int | None = None
    max_steps: int | None = None
    duration_s: float | None = None
    request_timeout_s: float = 2.0
    starve_timeout_s: float = 1.0
    encode: str = "jpeg"
    camera_map: dict[str, str] = field(default_factory=dict)


@dataclass
class RunReport:
    """Outcome of :meth:`ArmPolicyRunner.run`. ``stop_reason``: "done" or a ``SafetyStop`` tag;
    ``startup_ticks``: ticks spent waiting for the first chunk; ``starved_ticks``: later ticks with
    no action to execute (prefetch too late for the server's latency); latencies in seconds;
    ``achieved_hz`` = ticks / wall time."""

    steps: int = 0
    requests: int = 0
    chunks: int = 0
    late_ticks: int = 0
    startup_ticks: int = 0
    starved_ticks: int = 0
    clamped_ticks: int = 0
    rate_limited_ticks: int = 0
    latency_mean_s: float = 0.0
    latency_max_s: float = 0.0
    achieved_hz: float = 0.0
    stop_reason: str = "done"
    error: str = ""
    skill: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class ArmPolicyRunner:
    """Drive ``robot`` with chunks from ``client`` (a ``PolicyClient`` or anything with its
    ``episode()`` API) under ``safety``. ``run()`` always leaves the robot holding position and
    disconnected (when ``disconnect=True``)."""

    def __init__(self, client: Any, robot: Robot, config: ArmRunConfig,
                 safety: SafetyConfig | None = None, disconnect: bool = True):
        if config.hz <= 0:
            raise ValueError(f"hz must be positive, got {config.hz}")
        self.client = client
        self.robot = robot
        self.config = config
        self.motors = motor_names(robot)
        self.cameras = camera_names(robot)
        if safety is None:
            low, high = default_limits(self.motors)
            safety = SafetyConfig(low, high, max_delta=2.0)
        if safety.low.size != len(self.motors):
            raise ValueError(f"safety limits cover {safety.low.size} joints, the robot has "
                             f"{len(self.motors)} motors {self.motors}")
        self.safety = SafetyFilter(safety)
        self.disconnect = disconnect
        self.report = RunReport()

    # --- observation plumbing ----------------------------------------------------------------
    def state_vector(self, obs: dict[str, Any]) -> np.ndarray:
        """(J,) float32 joint positions in motor order from a LeRobot observation dict."""
        try:
            return np.array([float(obs[f"{m}.pos"]) for m in self.motors], np.float32)
        except KeyError as e:
            raise SafetyStop("bad_state", f"observation lacks {e.args[0]!r}") from None

    def _image_plan(self, spec_images: dict[str, Any]) -> dict[str, tuple[str, tuple[int, int]]]:
        """server key -> (robot camera key, (h, w)); raises ValueError when cameras are missing."""
        plan = {}
        unnamed = [c for c in self.cameras if c not in spec_images]
        for i, (key, ispec) in enumerate(spec_images.items()):
            if key in self.config.camera_map:
                cam = self.config.camera_map[key]
            elif key in self.cameras:
                cam = key
            elif key.rsplit(".", 1)[-1] in self.cameras:  # LeRobot "observation.images.<cam>"
                cam = key.rsplit(".", 1)[-1]
                if cam in unnamed:
                    unnamed.remove(cam)
            elif unnamed:
                cam = unnamed.pop(0)
            else:
                raise ValueError(f"server wants camera {key!r}; robot cameras are {self.cameras} "
                                 f"(map them with camera_map / --camera-map {key}=<robot key>)")
            if cam not in self.cameras:
                raise ValueError(f"camera_map sends robot camera {cam!r} which the robot lacks "
                                 f"({self.cameras})")
            plan[key] = (cam, image_size(ispec))
        return plan

    def images(self, obs: dict[str, Any], plan) -> dict[str, np.ndarray]:
        """Server key -> (h, w, 3) uint8 RGB resized with area interpolation (downscaling)."""
        import cv2

        out = {}
        for key, (cam, (h, w)) in plan.items():
            img = np.asarray(obs[cam])
            if img.dtype != np.uint8 or img.ndim != 3:
                raise SafetyStop("bad_state", f"camera {cam!r} returned {img.dtype} {img.shape}")
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            out[key] = np.ascontiguousarray(img)
        return out

    # --- main loop ---------------------------------------------------------------------------
    def run(self) -> RunReport:
        cfg = self.config
        rep = self.report = RunReport()
        self._shut = False
        self.safety.reset()
        if not self.robot.is_connected:
            self.robot.connect()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carve-infer")
        latencies: list[float] = []
        t_start = time.monotonic()
        try:
            info = {"robot": type(self.robot).__name__, "motors": ",".join(self.motors),
                    "hz": str(cfg.hz)}
            with self.client.episode(cfg.instruction, skill=cfg.skill,
                                     chunk_length=cfg.chunk_length, info=info) as ep:
                rep.skill = getattr(ep, "skill", None)
                self._loop(ep, executor, latencies)
        except SafetyStop as e:
            rep.stop_reason, rep.error = e.reason, str(e)
            log.error("safety stop: %s", e)
        except KeyboardInterrupt:
            rep.stop_reason, rep.error = "interrupted", "Ctrl-C"
        except (ValueError, TypeError) as e:
            # contract mismatches (dims, cameras) are found before any motion: re-raise after stop
            rep.stop_reason, rep.error = "config_error", str(e)
            self._shutdown(executor)
            raise
        except Exception as e:  # noqa: BLE001 - any RPC/transport failure means the server is lost
            rep.stop_reason, rep.error = "server_lost", f"{type(e).__name__}: {e}"
            log.error("server lost: %s", rep.error)
        finally:
            self._shutdown(executor)
            wall = time.monotonic() - t_start
            rep.achieved_hz = rep.steps / wall if wall > 0 else 0.0
            if latencies:
                rep.latency_mean_s = float(np.mean(latencies))
                rep.latency_max_s = float(np.max(latencies))
            rep.clamped_ticks = self.safety.n_clamped
            rep.rate_limited_ticks = self.safety.n_rate_limited
        return rep

    def _shutdown(self, executor: ThreadPoolExecutor) -> None:
        if getattr(self, "_shut", False):
            return
        self._shut = True
        executor.shutdown(wait=False, cancel_futures=True)
        if self.robot.is_connected:
            held = hold_position(self.robot, self.motors)
            log.info("holding position %s", None if held is None else np.round(held, 2))
            if self.disconnect:
                try:
                    self.robot.disconnect()
                except Exception as e:  # noqa: BLE001
                    log.error("disconnect failed: %s", e)

    def _loop(self, ep, executor: ThreadPoolExecutor, latencies: list[float]) -> None:
        cfg, rep = self.config, self.report
        spec = ep.spec
        j = len(self.motors)
        a_dim, s_dim = spec_value(spec, "action_dim"), spec_value(spec, "state_dim")
        if a_dim != j or s_dim != j:
            raise ValueError(f"server policy has action_dim={a_dim}, state_dim={s_dim} but the arm "
                             f"has {j} motors {self.motors}: wrong skill/model for this robot")
        plan = self._image_plan(dict(spec_value(spec, "images", {}) or {}))
        chunk_len = int(spec_value(spec, "chunk_length", 1) or 1)
        prefetch = cfg.prefetch_steps if cfg.prefetch_steps is not None else max(1, chunk_len // 2)
        blender = _make_blender(cfg.blend)
        period = 1.0 / cfg.hz
        horizon_end = 0  # first tick not covered by any received chunk
        inflight: tuple[int, float, Future] | None = None
        t0 = time.monotonic()
        last_acted = t0
        k = 0
        while True:
            if cfg.max_steps is not None and k >= cfg.max_steps:
                break
            due = t0 + k * period
            now = time.monotonic()
            if cfg.duration_s is not None and now - t0 >= cfg.duration_s:
                break
            if due > now:
                time.sleep(due - now)
            elif now - due > period:
                rep.late_ticks += 1
            try:
                obs = self.robot.get_observation()
            except Exception as e:  # noqa: BLE001
                raise SafetyStop("robot_error", f"get_observation failed: {e}") from e
            state = self.state_vector(obs)
            self.safety.check_state(state)
            now = time.monotonic()

            if inflight is not None:
                obs_step, sent_at, fut = inflight
                if fut.done():
                    inflight = None
                    chunk = np.asarray(fut.result(), np.float32)  # re-raises server errors
                    latencies.append(now - sent_at)
                    if chunk.ndim != 2 or chunk.shape[1] != j or chunk.shape[0] == 0:
                        raise SafetyStop("bad_action", f"chunk of shape {chunk.shape}, expected "
                                                       f"(T, {j})")
                    if not np.all(np.isfinite(chunk)):
                        raise SafetyStop("nan_action", "server returned a non-finite chunk")
                    blender.add(obs_step, chunk)
                    horizon_end = max(horizon_end, obs_step + len(chunk))
                    rep.chunks += 1
                elif now - sent_at > cfg.request_timeout_s:
                    raise SafetyStop("timeout", f"no chunk {now - sent_at:.2f}s after the request "
                                                f"(limit {cfg.request_timeout_s}s)")
            if inflight is None and horizon_end - k <= prefetch:
                images = self.images(obs, plan) if plan else None
                fut = executor.submit(ep.infer, state, images, cfg.encode)
                inflight = (k, now, fut)
                rep.requests += 1

            target = blender.action(k) if k < horizon_end else None
            if target is not None:
                cmd = self.safety.filter(np.asarray(target, np.float64), state)
                try:
                    self.robot.send_action({f"{m}.pos": float(v) for m, v in zip(self.motors, cmd)})
                except Exception as e:  # noqa: BLE001
                    raise SafetyStop("robot_error", f"send_action failed: {e}") from e
                last_acted = now
            else:
                # Nothing to execute this tick: the servos keep their last goal (a hold).
                if rep.chunks == 0:
                    rep.startup_ticks += 1
                else:
                    rep.starved_ticks += 1
                if now - last_acted > cfg.starve_timeout_s:
                    raise SafetyStop("starved", f"no executable action for {now - last_acted:.2f}s")
            k += 1
            rep.steps = k


def _parse_camera(spec: str) -> tuple[str, dict]:
    """``front=0:640x480[@30]`` or ``wrist=/dev/video2:640x480`` -> (key, OpenCVCameraConfig kw)."""
    try:
        key, rest = spec.split("=", 1)
        src, _, geom = rest.rpartition(":")
        fps = 30
        if "@" in geom:
            geom, fps_s = geom.split("@")
            fps = int(fps_s)
        w, h = (int(x) for x in geom.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--camera {spec!r}: expected KEY=INDEX_OR_PATH:WxH[@FPS], e.g. front=0:640x480") from None
    index_or_path: int | str = int(src) if src.isdigit() else src
    return key, {"index_or_path": index_or_path, "width": w, "height": h, "fps": fps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.so101_client", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="policy server HOST:PORT")
    p.add_argument("--robot", choices=("fake", "so101"), default="fake")
    p.add_argument("--port", default="/dev/ttyACM0", help="serial port of the SO-101 bus")
    p.add_argument("--robot-id", default=None, help="LeRobot calibration id of the arm")
    p.add_argument("--camera", action="append", default=[], type=_parse_camera,
                   help="KEY=INDEX_OR_PATH:WxH[@FPS] (so101); repeatable")
    p.add_argument("--camera-map", action="append", default=[],
                   help="SERVER_KEY=ROBOT_KEY when the names differ; repeatable")
    p.add_argument("--instruction", required=True)
    p.add_argument("--skill", default=None, help="force a skill (default: the server's router)")
    p.add_argument("--hz", type=float, default=30.0)
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--blend", default="weighted_average",
                   help="latest_only | average | weighted_average | conservative")
    p.add_argument("--prefetch-steps", type=int, default=None)
    p.add_argument("--max-delta", type=float, default=2.0, help="max command change per tick")
    p.add_argument("--use-degrees", action=argparse.BooleanOptionalAction, default=None,
                   help="body joints in degrees (LeRobot 0.4.4 default) or [-100, 100]")
    p.add_argument("--keep-torque", action="store_true",
                   help="so101: leave torque on after a stop (the arm keeps holding its pose)")
    p.add_argument("--encode", default="jpeg", choices=("raw", "jpeg", "png"))
    p.add_argument("--token-file", default=None,
                   help="bearer token file (default: env CARVE_TOKEN, if set)")
    p.add_argument("--tls-root-cert", default=None)
    p.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, seconds")
    args = p.parse_args(argv)
    try:
        token = read_token(args.token_file)
    except TokenError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.robot == "so101":
        robot: Robot = make_so101(args.port, dict(args.camera), robot_id=args.robot_id,
                                  use_degrees=args.use_degrees,
                                  disable_torque_on_disconnect=not args.keep_torque)
    else:
        robot = FakeRobot(cameras={k: (v["height"], v["width"]) for k, v in args.camera} or None)
    motors = motor_names(robot)
    low, high = default_limits(motors, use_degrees=uses_degrees(robot))
    cfg = ArmRunConfig(instruction=args.instruction, hz=args.hz, skill=args.skill,
                       blend=args.blend, prefetch_steps=args.prefetch_steps,
                       max_steps=args.max_steps, duration_s=args.duration,
                       request_timeout_s=args.timeout, encode=args.encode,
                       camera_map=dict(m.split("=", 1) for m in args.camera_map))
    client = PolicyClient(args.server, token=token,
                          tls_root_cert=args.tls_root_cert, timeout=args.timeout)
    runner = ArmPolicyRunner(client, robot, cfg, SafetyConfig(low, high, max_delta=args.max_delta))
    try:
        report = runner.run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.to_json())
    return 0 if report.stop_reason in ("done", "interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
