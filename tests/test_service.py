"""End-to-end service tests: a real gRPC server on loopback serving a real merge state through the
real runtime, driven by the real client library."""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from carve_client import PolicyClient, PolicyError
from carve_client.codec import encode_tensor
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_server.models.base import ObservationBatch
from policy_server.models.registry import load_backend
from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, build_engine
from policy_server.state.export import export_skill
from serving_utils import make_stack

CAM = {"front": [16, 16]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return make_stack(tmp_path_factory.mktemp("stack"), cameras=CAM)


def _server(stack, **cfg_kw):
    server_kw = {k: cfg_kw.pop(k) for k in list(cfg_kw)
                 if k in ("auth_token", "tls_cert", "tls_key", "max_image_pixels")}
    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                       router=cfg_kw.pop("router", "exact"), **cfg_kw)
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0, **server_kw))
    port = server.start()
    return server, port


@pytest.fixture(scope="module")
def served(stack):
    server, port = _server(stack, max_image_pixels=1_000_000)
    client = PolicyClient(f"127.0.0.1:{port}", retries=0)
    client.wait_ready(30)
    yield server, client, port
    client.close()
    server.stop(1.0)


def _obs(rng, images=True):
    state = rng.standard_normal(39).astype(np.float32)
    imgs = {"front": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)} if images else None
    return state, imgs


def test_health_not_serving_until_loaded(stack):
    gate = threading.Event()
    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]), router="exact")

    def slow_factory():
        gate.wait(20)
        return build_engine(cfg)

    server = PolicyServer(slow_factory, ServerConfig(port=0))
    port = server.start(wait_loaded=False)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = health_pb2_grpc.HealthStub(ch)
        st = stub.Check(health_pb2.HealthCheckRequest(service="carve.policy.v1.PolicyService"))
        assert st.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.PolicyServiceStub(ch).ListSkills(pb.ListSkillsRequest())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        PolicyClient(f"127.0.0.1:{port}").wait_ready(30)
        st = stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert st.status == health_pb2.HealthCheckResponse.SERVING
        ch.close()
    finally:
        gate.set()
        server.stop(1.0)


def test_episode_round_trip_and_metadata(served, stack):
    _server, client, _ = served
    rng = np.random.default_rng(0)
    with client.episode("press the red button", info={"robot": "test"}) as ep:
        assert ep.skill == "button" and ep.confidence == pytest.approx(1.0)
        assert ep.spec.action_dim == 4 and ep.spec.chunk_length == 4
        assert set(ep.spec.images) == {"front"}
        for _ in range(3):
            state, imgs = _obs(rng)
            chunk = ep.infer(state, imgs)
            assert chunk.shape == (4, 4) and chunk.dtype == np.float32
            assert np.all(np.isfinite(chunk)) and np.all(np.abs(chunk) <= 1.0)
    names = [s["name"] for s in client.list_skills()]
    assert names == ["drawer", "button", "window"]
    info = client.server_info()
    assert info["num_skills"] == 3 and info["state_version"] == "v000003"


def test_served_actions_equal_exported_full_checkpoint(served, stack, tmp_path):
    """The runtime (fused or side path) serves exactly base + core + P Q: compare with the
    skill's exported full checkpoint run through a plain backend."""
    _server, client, _ = served
    export_skill(stack["state"], "window", stack["base"], tmp_path / "window", format="full")
    ref = load_backend(tmp_path / "window")
    rng = np.random.default_rng(1)
    state, imgs = _obs(rng)
    with client.episode("close the window", skill="window") as ep:
        got = ep.infer(state, imgs)
    batch = ObservationBatch(state=state[None], instructions=["close the window"],
                             images={"front": imgs["front"][None]})
    want = np.clip(ref.predict(batch).detach().numpy()[0], -1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_eight_concurrent_mixed_skill_episodes_equal_sequential(served):
    _server, client, _ = served
    skills = ["drawer", "button", "window", None, "drawer", "button", "window", "button"]
    rng = np.random.default_rng(2)
    inputs = [[_obs(rng) for _ in range(3)] for _ in skills]

    def run(i):
        out = []
        instr = "" if skills[i] else "open the top drawer"
        with client.episode(instr, skill=skills[i]) as ep:
            for state, imgs in inputs[i]:
                out.append(ep.infer(state, imgs))
        return np.stack(out)

    sequential = [run(i) for i in range(len(skills))]
    results = [None] * len(skills)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(i)))
               for i in range(len(skills))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(len(skills)):
        np.testing.assert_allclose(results[i], sequential[i], rtol=1e-4, atol=1e-5)
    # different skills really act differently (the test would pass vacuously otherwise)
    assert not np.allclose(sequential[0], sequential[1])


def _raw_episode(port, requests):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.PolicyServiceStub(ch)
    try:
        return list(stub.Episode(iter(requests), timeout=20))
    finally:
        ch.close()


def _start(**kw):
    return pb.EpisodeRequest(start=pb.EpisodeStart(**kw))


def _obs_msg(state=None, images=None):
    from carve_client.codec import observation_proto

    rng = np.random.default_rng(3)
    s, im = _obs(rng)
    return pb.EpisodeRequest(observation=observation_proto(
        s if state is None else state, im if images is None else images, 0, "raw"))


@pytest.mark.parametrize("case,code,field", [
    ("obs_first", grpc.StatusCode.FAILED_PRECONDITION, "EpisodeStart"),
    ("unknown_skill", grpc.StatusCode.NOT_FOUND, "start.skill"),
    ("empty_instruction", grpc.StatusCode.INVALID_ARGUMENT, "start.instruction"),
    ("abstain", grpc.StatusCode.FAILED_PRECONDITION, "start.instruction"),
    ("chunk_too_long", grpc.StatusCode.INVALID_ARGUMENT, "start.chunk_length"),
    ("bad_state_shape", grpc.StatusCode.INVALID_ARGUMENT, "observation.state"),
    ("bad_state_dtype", grpc.StatusCode.INVALID_ARGUMENT, "observation.state"),
    ("nan_state", grpc.StatusCode.INVALID_ARGUMENT, "observation.state"),
    ("missing_camera", grpc.StatusCode.INVALID_ARGUMENT, "images['front']"),
    ("unknown_camera", grpc.StatusCode.INVALID_ARGUMENT, "images['side']"),
    ("wrong_image_shape", grpc.StatusCode.INVALID_ARGUMENT, "images['front']"),
    ("oversized_image", grpc.StatusCode.RESOURCE_EXHAUSTED, "images['front']"),
    ("bad_bytes", grpc.StatusCode.INVALID_ARGUMENT, "observation.state"),
    ("second_start", grpc.StatusCode.FAILED_PRECONDITION, "start"),
])
def test_episode_errors_are_typed_and_name_the_field(served, case, code, field):
    _server, _client, port = served
    ok_start = _start(instruction="open the top drawer")
    good_img = {"front": np.zeros((16, 16, 3), np.uint8)}
    reqs = {
        "obs_first": [_obs_msg()],
        "unknown_skill": [_start(instruction="x", skill="nope")],
        "empty_instruction": [_start(instruction="  ")],
        "abstain": [_start(instruction="make me a coffee")],
        "chunk_too_long": [_start(instruction="open the top drawer", chunk_length=99)],
        "bad_state_shape": [ok_start, _obs_msg(state=np.zeros(7, np.float32))],
        "bad_state_dtype": [ok_start, pb.EpisodeRequest(observation=pb.Observation(
            state=encode_tensor(np.zeros(39, np.int32)),
            images=_obs_msg().observation.images))],
        "nan_state": [ok_start, _obs_msg(state=np.full(39, np.nan, np.float32))],
        "missing_camera": [ok_start, pb.EpisodeRequest(observation=pb.Observation(
            state=_obs_msg().observation.state))],
        "unknown_camera": [ok_start, _obs_msg(images={**good_img,
                                                      "side": np.zeros((16, 16, 3), np.uint8)})],
        "wrong_image_shape": [ok_start, _obs_msg(images={"front": np.zeros((8, 16, 3), np.uint8)})],
        "oversized_image": [ok_start, _obs_msg(images={"front": np.zeros((2100, 2100, 3),
                                                                        np.uint8)})],
        "bad_bytes": [ok_start, pb.EpisodeRequest(observation=pb.Observation(
            state=pb.Tensor(data=b"\x00" * 10, dtype="float32", shape=[39])))],
        "second_start": [ok_start, ok_start],
    }[case]
    with pytest.raises(grpc.RpcError) as e:
        _raw_episode(port, reqs)
    assert e.value.code() == code, e.value.details()
    assert field in e.value.details()


def test_abstention_message_lists_candidates_and_core_only_fallback(stack):
    server, port = _server(stack, abstain="core-only", router="text")
    try:
        c = PolicyClient(f"127.0.0.1:{port}", retries=0)
        with c.episode("make me a coffee") as ep:
            assert ep.skill is None and ep.core_only
            state, imgs = _obs(np.random.default_rng(4))
            assert ep.infer(state, imgs).shape == (4, 4)
        # the text router also routes paraphrases, and Route == the episode's decision
        d = c.route("please pull open the top drawer")
        assert d["skill"] == "drawer" and not d["abstained"]
        c.close()
    finally:
        server.stop(1.0)
    server, port = _server(stack, abstain="refuse", router="text")
    try:
        c = PolicyClient(f"127.0.0.1:{port}", retries=0)
        with pytest.raises(PolicyError) as e:
            c.episode("make me a coffee")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "candidates" in e.value.details and "drawer" in e.value.details
        c.close()
    finally:
        server.stop(1.0)


def test_token_auth(stack, tmp_path):
    server, port = _server(stack, auth_token="s3cret")
    try:
        bad = PolicyClient(f"127.0.0.1:{port}", token="wrong", retries=0)
        with pytest.raises(PolicyError) as e:
            bad.list_skills()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(PolicyError) as e:
            bad.episode("open the top drawer")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        bad.wait_ready(10)  # health stays open for orchestrator probes
        good = PolicyClient(f"127.0.0.1:{port}", token="s3cret", retries=0)
        assert len(good.list_skills()) == 3
        bad.close()
        good.close()
    finally:
        server.stop(1.0)


def test_tls(stack, tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(crt), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server, port = _server(stack, tls_cert=str(crt), tls_key=str(key))
    try:
        c = PolicyClient(f"localhost:{port}", tls_root_cert=str(crt), retries=0)
        assert len(c.list_skills()) == 3
        c.close()
        plain = PolicyClient(f"localhost:{port}", retries=0, timeout=3)
        with pytest.raises(PolicyError):
            plain.list_skills()
        plain.close()
    finally:
        server.stop(1.0)


def test_graceful_shutdown_finishes_running_episode(stack):
    server, port = _server(stack)
    c = PolicyClient(f"127.0.0.1:{port}", retries=0)
    rng = np.random.default_rng(5)
    ep = c.episode("open the top drawer")
    ep.infer(*_obs(rng))
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 10.0})
    stopper.start()
    time.sleep(0.3)
    # the running episode keeps being served while the server drains ...
    assert ep.infer(*_obs(rng)).shape == (4, 4)
    # ... but new episodes are refused
    c2 = PolicyClient(f"127.0.0.1:{port}", retries=0)
    with pytest.raises(PolicyError) as e:
        c2.episode("open the top drawer")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    ep.close()
    stopper.join(15)
    assert not stopper.is_alive()
    c.close()
    c2.close()


def test_reflection_lists_the_service(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _server, _client, port = served
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert "carve.policy.v1.PolicyService" in names and "grpc.health.v1.Health" in names
    ch.close()


@pytest.mark.parametrize("mode", ["fused", "side", "auto"])
def test_runtime_modes_equal_exported_checkpoint(stack, tmp_path, mode):
    """Merge-in (fused), the batched side path and auto all give the actions of the skill's
    exported full checkpoint, for a mixed-skill batch (real state, real demo VLA)."""
    skills = ["button", "window", None, "drawer"]
    rng = np.random.default_rng(7)
    states = rng.standard_normal((4, 39)).astype(np.float32)
    imgs = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    batch = ObservationBatch(state=states, instructions=["do it"] * 4, images={"front": imgs})
    # the served stack, built by the composition root
    engine = build_engine(EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                                       mode=mode, router="exact"))
    try:
        got = engine.runtime.infer(batch, skills)
    finally:
        engine.close()
    for i, skill in enumerate(skills):
        if skill is None:
            continue
        ref = load_backend(export_skill(stack["state"], skill, stack["base"], tmp_path / skill,
                                        format="full", progress=False)["out"])
        one = ObservationBatch(state=states[i:i + 1], instructions=["do it"],
                               images={"front": imgs[i:i + 1]})
        want = np.clip(ref.predict(one).detach().numpy()[0], -1, 1)
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5, err_msg=f"{mode} {skill}")


def test_build_engine_refuses_another_base_unless_allowed(stack, tmp_path, caplog):
    """The one base-fingerprint rule at the composition root: a state is served only on the base
    it was merged from, unless allow_base_mismatch (then with a warning)."""
    from policy_server.errors import InputError, StateError
    from policy_server.models.demo_vla import DemoVLABackend

    other = DemoVLABackend(stack["config"], seed=7).save_pretrained(tmp_path / "other")
    cfg = EngineConfig(base_dir=str(other), state_dir=str(stack["state"]), router="exact")
    with pytest.raises(StateError, match="is not the base of .*--allow-base-mismatch"):
        build_engine(cfg)
    cfg.allow_base_mismatch = True
    with caplog.at_level("WARNING", logger="carve.base_check"):
        engine = build_engine(cfg)
    try:
        assert "going on because --allow-base-mismatch" in caplog.text
        assert engine.info()["state_version"]
    finally:
        engine.close()
    with pytest.raises(InputError, match="--dtype 'float8'"):
        build_engine(EngineConfig(base_dir=str(stack["base"]), dtype="float8"))


def test_routing_errors_map_to_statuses():
    """Routing reads the model through the batcher too: overload, shutdown and bad input while
    routing come back as typed statuses naming the cause, like inference errors."""
    from policy_server.errors import BatcherClosed, BatcherFull, InputError
    from policy_server.models.base import PolicySpec
    from policy_server.service.engine_api import PolicyEngine

    raised = {"busy": BatcherFull("MicroBatcher queue full (3 pending requests)"),
              "closing": BatcherClosed("MicroBatcher is closed"),
              "bad": InputError("observation.state: wrong size")}

    class RouteFailsEngine(PolicyEngine):
        spec = PolicySpec(state_dim=2, action_dim=1, chunk_length=1, action_low=[-1.0],
                          action_high=[1.0])

        def skills(self):
            return []

        def route(self, instruction, observation=None):
            raise raised[instruction]

        def infer(self, observation, skill):
            return np.zeros((1, 1), np.float32)

    server = PolicyServer(RouteFailsEngine(), ServerConfig(port=0))
    port = server.start()
    try:
        client = PolicyClient(f"127.0.0.1:{port}", retries=0)
        for instruction, code, text in (
                ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "3 pending"),
                ("closing", grpc.StatusCode.UNAVAILABLE, "shutting down"),
                ("bad", grpc.StatusCode.INVALID_ARGUMENT, "observation.state")):
            with pytest.raises(PolicyError) as e:
                client.route(instruction)
            assert e.value.code == code and text in str(e.value), instruction
            with pytest.raises(PolicyError) as e:
                with client.episode(instruction):
                    pass
            assert e.value.code == code, instruction
        client.close()
    finally:
        server.stop(1.0)
