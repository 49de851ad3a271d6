"""carve-serve: the real ``PolicyServer`` over a no-op ``PolicyEngine``; the real ``PolicyClient``
episode stream as the robot."""

from __future__ import annotations

from bench.transport.common import CAMERAS, CHUNK, IMAGE_SIZE, STATE_DIM


def make_engine(n_images: int, policy_ms: float):
    from carve_client.spec import ImageSpec, PolicySpec

    from bench.noop_engine import NoopEngine
    from bench.transport.common import noop_policy

    spec = PolicySpec(state_dim=STATE_DIM, action_dim=CHUNK[1], chunk_length=CHUNK[0],
                      action_low=[-1.0] * CHUNK[1], action_high=[1.0] * CHUNK[1],
                      images={CAMERAS[i]: ImageSpec(IMAGE_SIZE, IMAGE_SIZE, 3)
                              for i in range(n_images)}, name="noop")
    # (50, 7) zeros after an optional sleep: transport, decoding and the stream only
    return NoopEngine(spec, lambda: noop_policy(policy_ms))


def serve(policy_ms: float, image_counts: list[int], conn, max_seconds: float) -> None:
    """Subprocess entry: one PolicyServer per image count on 127.0.0.1:0; sends {n_images: port}
    on ``conn``; runs until ``conn`` receives anything (or closes), at most ``max_seconds``."""
    from bench.transport.common import set_threads, watch_parent
    set_threads(torch_too=True)   # the server imports torch (policy_server.models)
    watch_parent(max_seconds)
    from policy_server.service.server import PolicyServer, ServerConfig

    servers = {}
    for n in image_counts:
        s = PolicyServer(make_engine(n, policy_ms), ServerConfig(host="127.0.0.1", port=0))
        servers[n] = (s, s.start())
    conn.send({"ports": {n: p for n, (_, p) in servers.items()}})
    try:
        conn.poll(max_seconds)
    except (EOFError, OSError):
        pass
    for s, _ in servers.values():
        s.stop(1.0)


class CarveClient:
    """One robot: ``PolicyClient`` + one open episode stream; a call is one ``Episode.infer``."""

    name = "carve"

    def __init__(self, port: int, state, images, timeout: float = 10.0):
        from carve_client import PolicyClient
        self._client = PolicyClient(f"127.0.0.1:{port}", timeout=timeout)
        self._client.wait_ready(timeout)
        self._ep = self._client.episode("noop", skill="noop")
        self._state, self._images = state, images

    def call(self):
        return self._ep.infer(self._state, self._images)

    def close(self):
        try:
            self._ep.close()
        finally:
            self._client.close()
