"""Routing decisions are identical through the Python API, `carve route` and the gRPC Route call
(and an episode gets the decision Route announced), on a real state with cached embeddings."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from carve_client import PolicyClient

from policy_server.cli import main as cli_main
from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, build_engine
from policy_server.state.store import StateStore
from router.embedder import shared_embedder
from router.factory import build_router
from router.text import KEY_EMBEDDINGS, TextEmbeddingHook
from serving_utils import make_stack

QUERIES = ["please open the top drawer", "push down the button", "shut the window",
           "make me a coffee", "OPEN THE TOP DRAWER", "close the windwo please"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    emb = shared_embedder()
    return make_stack(tmp_path_factory.mktemp("route"),
                      hooks_for=lambda name, instr: [TextEmbeddingHook(instr, emb)])


def test_embeddings_cached_at_admission(stack):
    snap = StateStore(stack["state"]).open()
    for name in snap.skill_names():
        assert KEY_EMBEDDINGS in snap.skill_artifacts(name)


def test_api_cli_grpc_agree(stack):
    snap = StateStore(stack["state"]).open()
    api = [build_router("text", snap, {}).route(q) for q in QUERIES]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["route", str(stack["state"]), *QUERIES, "--json"]) == 0
    cli = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]

    server = PolicyServer(lambda: build_engine(EngineConfig(
        base_dir=str(stack["base"]), state_dir=str(stack["state"]), router="text")),
        ServerConfig(port=0))
    port = server.start()
    try:
        client = PolicyClient(f"127.0.0.1:{port}", retries=0)
        rpc = [client.route(q) for q in QUERIES]
        # an episode opened with the instruction gets the same skill Route announced
        with client.episode(QUERIES[0]) as ep:
            assert ep.skill == rpc[0]["skill"]
        client.close()
    finally:
        server.stop(1.0)

    assert len(cli) == len(api) == len(rpc) == len(QUERIES)
    for q, a, c, r in zip(QUERIES, api, cli, rpc):
        assert c["instruction"] == q
        assert a.skill == c["skill"] == r["skill"], q
        assert a.abstained == c["abstained"] == r["abstained"], q
        assert a.confidence == pytest.approx(c["confidence"], abs=1e-6)
        assert a.confidence == pytest.approx(r["confidence"], abs=1e-6)
        assert [s for s, _ in a.candidates] == [x["skill"] for x in r["candidates"]]
    assert api[0].skill == "drawer" and api[3].abstained  # the test is not vacuous


def test_carve_admit_caches_instruction_embeddings(stack, tmp_path):
    """`carve admit --instruction` stores the text-router embeddings with the skill, so a server
    start does not re-embed (the router warns and re-embeds when they are missing)."""
    import warnings

    state = tmp_path / "s"
    for name, instr in stack["skills"].items():
        args = ["admit", str(state), "--base", str(stack["base"]), "--expert",
                str(stack["experts"][name]), "--skill", name, "--rank", "4", "--no-progress"]
        for text in instr:
            args += ["--instruction", text]
        assert cli_main(args) == 0
    snap = StateStore(state).open()
    assert all(KEY_EMBEDDINGS in snap.skill_artifacts(n) for n in snap.skill_names())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache miss would warn
        d = build_router("text", snap, {}).route("please open the top drawer")
    assert d.skill == "drawer"
