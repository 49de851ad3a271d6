"""LeRobot's async-inference protocol (lerobot 0.4.4), rebuilt on its own generated gRPC stubs.

The stubs (``lerobot/transport/services_pb2*.py``) are loaded from an unpacked or packed lerobot
wheel, or from an installed ``lerobot``, without importing the rest of lerobot (which pins torch).
The message flow follows ``lerobot/async_inference/{policy_server,robot_client}.py``: the client
calls ``Ready`` and ``SendPolicyInstructions`` once, then per step sends one pickled
``TimedObservation`` in <= 2 MiB chunks on the ``SendObservations`` client stream and polls
``GetActions``, which answers a pickled list of 50 ``TimedAction`` (timestamp, timestep, torch
action row).

PICKLE: this peer pickles and unpickles network data BY DESIGN -- that is the protocol being
measured. It binds only to 127.0.0.1 and talks only to this benchmark's own processes. Product
code (carve-serve) never unpickles anything from the network.

Difference from LeRobot as shipped: one observation queue per client (keyed by ``context.peer()``)
instead of one shared queue that ``Ready`` resets, so 8 clients can be measured at all; the
4-worker thread pool of ``policy_server.serve`` is kept.
"""

from __future__ import annotations

import importlib.util
import os
import pickle  # nosec B403 - the measured protocol pickles by design (see the module docstring)
import sys
import tempfile
import threading
import time
import types
import zipfile
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any

_STUB_FILES = ("services_pb2.py", "services_pb2_grpc.py")
CHUNK_BYTES = 2 * 1024 * 1024     # lerobot.transport.utils.CHUNK_SIZE
MAX_MESSAGE = 4 * 1024 * 1024     # lerobot.transport.utils.MAX_MESSAGE_SIZE
OBS_QUEUE_TIMEOUT = 2.0           # lerobot.async_inference.constants.DEFAULT_OBS_QUEUE_TIMEOUT
SERVER_WORKERS = 4                # grpc.server(ThreadPoolExecutor(max_workers=4)) in serve()


# --- the pickled payloads (same fields as lerobot.async_inference.helpers) ----------------------
@dataclass
class TimedObservation:
    timestamp: float
    timestep: int
    observation: dict[str, Any]
    must_go: bool = False


@dataclass
class TimedAction:
    timestamp: float
    timestep: int
    action: Any


@dataclass
class RemotePolicyConfig:
    policy_type: str
    pretrained_name_or_path: str
    lerobot_features: dict[str, Any]
    actions_per_chunk: int
    device: str = "cpu"
    rename_map: dict[str, str] = field(default_factory=dict)


# --- locating and loading the generated stubs ---------------------------------------------------
def find_stub_dir(wheel: str | None) -> tuple[str | None, str]:
    """Directory holding ``services_pb2*.py``, or (None, why not). ``wheel``: a .whl file, an
    unpacked wheel / site-packages dir, or its ``lerobot/transport`` dir; None: an importable
    ``lerobot`` (found without importing it)."""
    if wheel:
        if os.path.isfile(wheel) and wheel.endswith(".whl"):
            out = tempfile.mkdtemp(prefix="lerobot-stubs-")
            with zipfile.ZipFile(wheel) as z:
                names = set(z.namelist())
                for f in _STUB_FILES:
                    member = f"lerobot/transport/{f}"
                    if member not in names:
                        return None, f"{wheel} has no {member}"
                    with open(os.path.join(out, f), "wb") as fh:
                        fh.write(z.read(member))
            return out, f"stubs from {wheel}"
        for d in (wheel, os.path.join(wheel, "lerobot", "transport")):
            if all(os.path.isfile(os.path.join(d, f)) for f in _STUB_FILES):
                return d, f"stubs from {d}"
        return None, f"no lerobot/transport/services_pb2*.py under {wheel}"
    try:
        spec = importlib.util.find_spec("lerobot")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, ("lerobot is not importable and --lerobot-wheel was not given "
                      "(pip download --no-deps lerobot==0.4.4 -d /tmp; pass the .whl)")
    d = os.path.join(list(spec.submodule_search_locations)[0], "transport")
    if all(os.path.isfile(os.path.join(d, f)) for f in _STUB_FILES):
        return d, f"stubs from the installed lerobot ({d})"
    return None, f"installed lerobot has no {d}/services_pb2*.py"


def load_stubs(stub_dir: str):
    """(services_pb2, services_pb2_grpc) loaded from files under the names the generated code
    expects (``lerobot.transport.*``) without running lerobot's own package ``__init__``."""
    if "lerobot.transport.services_pb2_grpc" in sys.modules:
        return sys.modules["lerobot.transport.services_pb2"], \
            sys.modules["lerobot.transport.services_pb2_grpc"]
    for name in ("lerobot", "lerobot.transport"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = []
            sys.modules[name] = pkg
    sys.modules["lerobot"].transport = sys.modules["lerobot.transport"]
    mods = []
    for f in _STUB_FILES:
        name = "lerobot.transport." + f[:-3]
        spec = importlib.util.spec_from_file_location(name, os.path.join(stub_dir, f))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(sys.modules["lerobot.transport"], f[:-3], mod)
        mods.append(mod)
    return mods[0], mods[1]


def _send_in_chunks(pb, data: bytes):
    """lerobot.transport.utils.send_bytes_in_chunks without its logging."""
    size = len(data)
    sent = 0
    while sent < size:
        state = pb.TRANSFER_MIDDLE
        if sent + CHUNK_BYTES >= size:
            state = pb.TRANSFER_END
        elif sent == 0:
            state = pb.TRANSFER_BEGIN
        n = min(CHUNK_BYTES, size - sent)
        yield pb.Observation(transfer_state=state, data=data[sent:sent + n])
        sent += n


def _receive_chunks(pb, iterator) -> bytes | None:
    """lerobot.transport.utils.receive_bytes_in_chunks (queue=None): bytes up to TRANSFER_END."""
    parts: list[bytes] = []
    for item in iterator:
        if item.transfer_state == pb.TRANSFER_BEGIN:
            parts = [item.data]
        elif item.transfer_state == pb.TRANSFER_MIDDLE:
            parts.append(item.data)
        elif item.transfer_state == pb.TRANSFER_END:
            parts.append(item.data)
            return b"".join(parts)
        else:
            raise ValueError(f"unknown transfer state {item.transfer_state}")
    return None


def _channel_options() -> list:
    """lerobot.transport.utils.grpc_channel_options() (4 MiB, retries on UNAVAILABLE)."""
    import json
    cfg = {"methodConfig": [{"name": [{}], "retryPolicy": {
        "maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "DEADLINE_EXCEEDED"]}}]}
    return [("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(cfg))]


# --- server ---------------------------------------------------------------------------------------
def serve(stub_dir: str, policy_ms: float, conn, max_seconds: float) -> None:
    """Subprocess entry: serve AsyncInference on 127.0.0.1:0, send the port on ``conn``, run until
    ``conn`` receives anything (or closes), at most ``max_seconds``."""
    from bench.transport.common import noop_policy, set_threads, watch_parent
    set_threads(torch_too=True)
    watch_parent(max_seconds)
    from concurrent import futures

    import grpc
    import torch
    pb, pb_grpc = load_stubs(stub_dir)
    env_dt = 1 / 30  # RobotClientConfig default fps 30

    class Servicer(pb_grpc.AsyncInferenceServicer):
        def __init__(self):
            self._lock = threading.Lock()
            self._queues: dict[str, Queue] = {}   # per client; LeRobot as shipped: one shared queue

        def _queue(self, peer: str, reset: bool = False) -> Queue:
            with self._lock:
                if reset or peer not in self._queues:
                    self._queues[peer] = Queue(maxsize=1)
                return self._queues[peer]

        def Ready(self, request, context):  # noqa: N802
            self._queue(context.peer(), reset=True)
            return pb.Empty()

        def SendPolicyInstructions(self, request, context):  # noqa: N802
            spec = pickle.loads(request.data)  # nosec B301 - the measured protocol (see docstring)
            if not isinstance(spec, RemotePolicyConfig):
                raise TypeError(f"Policy specs must be a RemotePolicyConfig. Got {type(spec)}")
            return pb.Empty()  # no policy to load: the no-op policy is built in

        def SendObservations(self, request_iterator, context):  # noqa: N802
            data = _receive_chunks(pb, request_iterator)
            if data is None:
                return pb.Empty()
            obs = pickle.loads(data)  # nosec B301 - the measured protocol (see docstring)
            # the client always sends must_go=True (its action queue is empty), so LeRobot's
            # similarity filter never drops it: keep only the newest observation, as LeRobot does
            q = self._queue(context.peer())
            if q.full():
                try:
                    q.get_nowait()
                except Empty:
                    pass
            q.put(obs)
            return pb.Empty()

        def GetActions(self, request, context):  # noqa: N802
            try:
                obs = self._queue(context.peer()).get(timeout=OBS_QUEUE_TIMEOUT)
            except Empty:
                return pb.Empty()  # LeRobot answers Empty (not Actions) on a timeout
            chunk = torch.from_numpy(noop_policy(policy_ms))
            timed = [TimedAction(timestamp=obs.timestamp + i * env_dt, timestep=obs.timestep + i,
                                 action=a) for i, a in enumerate(list(chunk))]
            return pb.Actions(data=pickle.dumps(timed))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS))
    pb_grpc.add_AsyncInferenceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send({"port": port})
    try:
        conn.poll(max_seconds)
    except (EOFError, OSError):
        pass
    server.stop(0.5).wait(5)


# --- client ---------------------------------------------------------------------------------------
class LerobotClient:
    """One robot client: Ready + SendPolicyInstructions once, then send-one-observation /
    poll-GetActions per call (RobotClient.send_observation + receive_actions, in one thread)."""

    name = "lerobot"

    def __init__(self, target: str, stub_dir: str, state, images, timeout: float = 10.0):
        import grpc
        self._grpc = grpc
        self._pb, pb_grpc = load_stubs(stub_dir)
        self._channel = grpc.insecure_channel(target, options=_channel_options())
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        self._stub = pb_grpc.AsyncInferenceStub(self._channel)
        self._timeout = timeout
        self._stub.Ready(self._pb.Empty(), timeout=timeout)
        cfg = RemotePolicyConfig("act", "noop", {}, actions_per_chunk=50)
        self._stub.SendPolicyInstructions(self._pb.PolicySetup(data=pickle.dumps(cfg)),
                                          timeout=timeout)
        self._obs = {"observation.state": state,
                     **{f"observation.images.{k}": v for k, v in images.items()}, "task": "noop"}
        self._step = 0

    def call(self):
        obs = TimedObservation(timestamp=time.time(), timestep=self._step, observation=self._obs,
                               must_go=True)
        self._stub.SendObservations(_send_in_chunks(self._pb, pickle.dumps(obs)),
                                    timeout=self._timeout)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            resp = self._stub.GetActions(self._pb.Empty(), timeout=self._timeout)
            if resp.data:
                actions = pickle.loads(resp.data)  # nosec B301 - the measured protocol
                self._step += 1
                return actions
        raise TimeoutError("no actions from the LeRobot peer")

    def close(self):
        self._channel.close()
