"""Observation routing is race-free: many episodes starting at once with the value-subspace (and
hybrid) router, while other episodes stream observations through the same model, are each routed
on their own hidden states, exactly as if they ran alone.

Real gRPC server on loopback, real demo VLA, real CARVE merge state admitted with the
value-subspace and text-embedding hooks. A spy around the router's feature function records what
each episode was scored on, keyed by its first observation.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
from carve_client import PolicyClient

from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig
from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, build_engine
from router.embedder import shared_embedder
from router.text import TextEmbeddingHook
from router.vsubspace import VSubspaceHook, VSubspaceRouter
from serving_utils import make_stack

CAM = {"front": [16, 16]}
STARTERS = 16       # episodes starting concurrently, each with its own first observation
STREAMERS = 6       # episodes streaming observations meanwhile (mixed skills: side path + fused)
ROUNDS = 4          # concurrent start waves per server
ROUTES = 6          # Route calls per starter and wave (the same feature path, cheaper than a start)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    emb = shared_embedder()
    features = DemoVLABackend(DemoVLAConfig()).routing_features  # same expert layout as the stack
    return make_stack(tmp_path_factory.mktemp("race"), cameras=CAM,
                      hooks_for=lambda name, instr: [VSubspaceHook.from_features(features),
                                                     TextEmbeddingHook(instr, emb)])


class FeatureSpy:
    """Wraps a router feature function; records every result under (first state bytes, skill)."""

    def __init__(self, fn):
        self.fn, self.seen, self._lock = fn, {}, threading.Lock()

    def __call__(self, observation, *skill):
        x = self.fn(observation, *skill)
        with self._lock:
            self.seen.setdefault((observation.state.tobytes(), *skill), []).append(
                torch.as_tensor(x).clone())
        return x


def _serve(stack, router: str, per_skill: bool):
    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]), router=router,
                       abstain="core-only", max_wait_ms=1.0,
                       router_options={"vsubspace_per_skill": per_skill})
    spies = []

    def factory():
        engine = build_engine(cfg)
        vs = engine.router if router == "vsubspace" else engine.router.obs
        assert isinstance(vs, VSubspaceRouter) and vs.per_skill == per_skill
        vs.feature_fn = FeatureSpy(vs.feature_fn)
        spies.append(vs.feature_fn)
        return engine

    server = PolicyServer(factory, ServerConfig(port=0, max_workers=STARTERS + STREAMERS + 8))
    port = server.start()
    return server, port, spies[0]


def _observations(spec, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(spec.state_dim).astype(np.float32) * (1 + i % 3),
             {k: rng.integers(0, 255, (v.height, v.width, v.channels), dtype=np.uint8)
              for k, v in spec.images.items()}) for i in range(n)]


def _decision(route: dict) -> tuple:
    return (route["skill"], route["abstained"],
            [(c["skill"], c["score"]) for c in route["candidates"]])


@pytest.mark.parametrize("router,per_skill", [("vsubspace", False), ("vsubspace", True),
                                              ("hybrid", False)])
def test_concurrent_starts_route_on_their_own_features(stack, router, per_skill):
    server, port, spy = _serve(stack, router, per_skill)
    try:
        client = PolicyClient(f"127.0.0.1:{port}", retries=0)
        client.wait_ready(60)
        spec = client.server_info()["spec"]
        skills = list(stack["skills"])
        instr = [stack["skills"][skills[i % len(skills)]][0] for i in range(STARTERS)]
        starts = _observations(spec, STARTERS, seed=1)
        streams = _observations(spec, STREAMERS, seed=2)

        # every episode alone: its decision and the features it was routed on
        alone = []
        for text, (state, imgs) in zip(instr, starts):
            with client.episode(text, first_state=state, first_images=imgs) as ep:
                alone.append(_decision(ep.route))
        reference = {k: v[0] for k, v in spy.seen.items()}
        assert len(reference) == STARTERS * (len(skills) if per_skill else 1)
        spy.seen.clear()

        stop = threading.Event()
        errors: list = []
        streamed = [0] * STREAMERS

        def stream(i):
            state, imgs = streams[i]
            try:
                with client.episode("", skill=skills[i % len(skills)]) as ep:
                    while not stop.is_set():
                        ep.infer(state, imgs)
                        streamed[i] += 1
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        together = threading.Barrier(STARTERS)
        got: dict[int, list] = {i: [] for i in range(STARTERS)}

        def start(i):
            state, imgs = starts[i]
            try:
                for _ in range(ROUNDS):
                    together.wait(30)
                    with client.episode(instr[i], first_state=state, first_images=imgs) as ep:
                        got[i].append(_decision(ep.route))
                        ep.infer(state, imgs)
                    for _ in range(ROUTES):
                        got[i].append(_decision(client.route(instr[i], state, imgs)))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # interleave threads finely: a racy capture shows up at once
        streamers = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMERS)]
        starters = [threading.Thread(target=start, args=(i,)) for i in range(STARTERS)]
        try:
            for t in streamers + starters:
                t.start()
            for t in starters:
                t.join(120)
        finally:
            stop.set()
            for t in streamers:
                t.join(30)
            sys.setswitchinterval(old_interval)
        client.close()
        assert not errors, errors[:3]

        assert set(spy.seen) == set(reference)
        for key, xs in spy.seen.items():
            for x in xs:
                assert torch.equal(x, reference[key]), \
                    f"an episode was routed on features that are not its own ({key[1:]})"
        for i in range(STARTERS):
            assert got[i] == [alone[i]] * (ROUNDS * (1 + ROUTES)), i
        # not vacuous: the model served the streams meanwhile, and the observation mattered
        assert min(streamed) > 0, streamed
        assert len({d[0] for d in alone}) > 1 or len({d[2][0][1] for d in alone}) > 1
    finally:
        server.stop(1.0)
