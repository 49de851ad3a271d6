"""``carve route``: the CLI's decisions are the Python API's decisions (same factory, same model).

The CLI runs in-process (``policy_server.cli.main``) so it shares the session's loaded MiniLM model
through ``router.embedder.shared_embedder``; one subprocess test checks the installed entry point's
exit code on bad input (it fails before loading any model).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from policy_server.cli import main
from router.embedder import shared_embedder
from router.factory import build_router
from router.text import KEY_EMBEDDINGS, text_router_artifacts
from router.memory_snapshot import InMemorySnapshot

SKILLS = {
    "kitchen": ["turn on the stove", "put the bowl on the stove", "put the moka pot on the stove"],
    "basket": ["pick up the ketchup and place it in the basket",
               "pick up the milk and place it in the basket"],
    "drawer": ["open the top drawer of the cabinet", "close the bottom drawer"],
}
QUERIES = ["switch on the stove", "put the milk carton into the basket", "make me a coffee",
           "please open the upper drawer", "TURN ON THE STOVE", "put the bowl somewhere"]


@pytest.fixture(scope="module")
def embedder():
    return shared_embedder()


def _real_state(path, embedder):
    """A merge state written with the real StateStore (router data only, no residuals)."""
    from policy_server.state.store import StateStore

    store = StateStore(path)
    with store.transaction("router test state") as tx:
        for i, (name, instr) in enumerate(SKILLS.items()):
            tx.write_skill(name, {}, {"name": name, "order": i + 1, "instructions": instr,
                                      "description": ""})
            tx.write_artifacts(name, text_router_artifacts(instr, embedder))
    return store.open()


def _install_fake_store(monkeypatch, snap):
    class FakeStore:
        def __init__(self, path):
            self.path = path

        def open(self, version=None):
            return snap

    mod = types.ModuleType("policy_server.state.store")
    mod.StateStore = FakeStore
    monkeypatch.setitem(sys.modules, "policy_server.state.store", mod)


@pytest.fixture()
def fake_store(monkeypatch, embedder, tmp_path):
    """Installs a stand-in ``policy_server.state.store`` whose StateStore(path).open() returns a
    snapshot built from SKILLS (used when the real store is not importable, and to test the CLI
    independently of it)."""
    snap = InMemorySnapshot({n: {"instructions": v, "description": ""} for n, v in SKILLS.items()},
                         {n: text_router_artifacts(v, embedder) for n, v in SKILLS.items()})
    _install_fake_store(monkeypatch, snap)
    return snap


def _cli_json(capsys, state_dir, *extra):
    capsys.readouterr()
    rc = main(["route", str(state_dir), *QUERIES, "--json", *extra])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [x["instruction"] for x in lines] == QUERIES
    return lines


def _assert_same(lines, router):
    for line in lines:
        d = router.route(line["instruction"])
        assert line["skill"] == d.skill
        assert line["abstained"] == d.abstained
        assert line["confidence"] == d.confidence  # exact: same code path, JSON floats round-trip
        assert [(c["skill"], c["score"]) for c in line["candidates"]] == d.candidates
        assert line["reason"] == d.reason


def test_cli_equals_python_api(capsys, embedder, fake_store, tmp_path):
    lines = _cli_json(capsys, tmp_path)
    _assert_same(lines, build_router("text", fake_store, {"embedder": embedder}))
    by = {x["instruction"]: x for x in lines}
    assert by["switch on the stove"]["skill"] == "kitchen"
    assert by["put the milk carton into the basket"]["skill"] == "basket"
    assert by["make me a coffee"]["abstained"] and by["make me a coffee"]["skill"] is None
    assert {"instruction", "skill", "confidence", "abstained", "candidates", "margin",
            "runner_up", "reason"} <= set(lines[0])


def test_cli_thresholds_file_and_table(capsys, embedder, fake_store, tmp_path):
    # options reach the router: a hot softmax (T=0.5) flattens every confidence below the
    # threshold, so all but the verbatim instruction abstain
    lines = _cli_json(capsys, tmp_path, "--temperature", "0.5", "--min-confidence", "0.5")
    _assert_same(lines, build_router("text", fake_store, {"embedder": embedder,
                                                          "temperature": 0.5,
                                                          "min_confidence": 0.5}))
    assert [x["abstained"] for x in lines if x["instruction"] != "TURN ON THE STOVE"] == [True] * 5
    f = tmp_path / "instr.txt"
    f.write_text("# comment\nswitch on the stove\n\nmake me a coffee\n")
    capsys.readouterr()
    assert main(["route", str(tmp_path), "--file", str(f)]) == 0
    out = capsys.readouterr().out
    assert "kitchen" in out and "(abstained)" in out and "2 instruction(s), 1 abstained" in out
    assert main(["route", str(tmp_path), "x", "--router", "exact", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["abstained"] is True


def test_cli_bad_input_exit_codes(tmp_path):
    # no instruction: InputError -> exit code 2, before any model is loaded
    carve = Path(sys.executable).with_name("carve")
    r = subprocess.run([str(carve), "route", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no instruction given" in r.stderr
    assert main(["route", str(tmp_path), "--file", str(tmp_path / "missing.txt")]) == 2
    # a directory that is no merge state: StateError -> exit code 3
    assert main(["route", str(tmp_path / "no-state"), "turn on the stove"]) == 3


def test_cli_equals_api_on_real_store(capsys, embedder, tmp_path):
    snap = _real_state(tmp_path / "state", embedder)
    assert KEY_EMBEDDINGS in snap.skill_artifacts("kitchen")
    before = embedder.sentences
    lines = _cli_json(capsys, tmp_path / "state")
    assert embedder.sentences - before == len(QUERIES)  # cached embeddings were used
    _assert_same(lines, build_router("text", snap, {"embedder": embedder}))


def test_cli_hybrid_with_image_and_state_equals_api(capsys, monkeypatch, embedder, tmp_path):
    """--image/--obs-state build the same first observation the API gets: same hybrid decision;
    the deprecated --state spelling still works and warns."""
    import cv2
    import numpy as np

    from policy_server.models.base import ObservationBatch
    from router.hybrid import observation_prototype_artifacts

    def frame(scene):
        img = np.zeros((1, 32, 32, 3), np.uint8)
        img[..., 0 if scene == 0 else 2] = 200
        st = np.full((1, 4), 1.0 if scene == 0 else -1.0, np.float32)
        return ObservationBatch(state=st, instructions=[""], images={"agentview": img})

    skills = {"stove_scene": ["put the bowl on the plate"],
              "cabinet_scene": ["put the bowl on the plate"]}
    arts = {n: {**text_router_artifacts(v, embedder),
                **observation_prototype_artifacts([frame(i), frame(i)])}
            for i, (n, v) in enumerate(skills.items())}
    snap = InMemorySnapshot({n: {"instructions": v} for n, v in skills.items()}, arts)
    _install_fake_store(monkeypatch, snap)
    png = tmp_path / "first.png"
    obs = frame(1)
    cv2.imwrite(str(png), cv2.cvtColor(obs.images["agentview"][0], cv2.COLOR_RGB2BGR))
    capsys.readouterr()
    rc = main(["route", str(tmp_path), "put the bowl on the plate", "--router", "hybrid",
               "--image", f"agentview={png}", "--obs-state=-1,-1,-1,-1", "--json"])
    assert rc == 0
    out = capsys.readouterr()
    line = json.loads(out.out)
    assert "deprecated" not in out.err
    d = build_router("hybrid", snap, {"embedder": embedder}).route("put the bowl on the plate", obs)
    assert line["skill"] == d.skill == "cabinet_scene"
    assert line["confidence"] == d.confidence and line["reason"] == d.reason

    rc = main(["route", str(tmp_path), "put the bowl on the plate", "--router", "hybrid",
               "--image", f"agentview={png}", "--state=-1,-1,-1,-1", "--json"])
    assert rc == 0
    old = capsys.readouterr()
    assert json.loads(old.out) == line
    assert "--state is deprecated; use --obs-state" in old.err


def test_cli_version_alias_warns(capsys, embedder, fake_store, tmp_path):
    new = _cli_json(capsys, tmp_path, "--version", "v000001")
    capsys.readouterr()
    assert main(["route", str(tmp_path), *QUERIES, "--json", "--version-id", "v000001"]) == 0
    old = capsys.readouterr()
    assert [json.loads(x) for x in old.out.splitlines() if x.strip()] == new
    assert "--version-id is deprecated; use --version" in old.err
    _assert_same(new, build_router("text", fake_store, {"embedder": embedder}))


@pytest.fixture(scope="module")
def vsubspace_stack(tmp_path_factory):
    """A real demo-VLA merge state admitted with the value-subspace hook, and a second base."""
    from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig
    from router.vsubspace import VSubspaceHook
    from serving_utils import make_stack

    root = tmp_path_factory.mktemp("route-vs")
    features = DemoVLABackend(DemoVLAConfig()).routing_features
    stack = make_stack(root, hooks_for=lambda name, instr: [VSubspaceHook.from_features(features)])
    other = make_stack(root / "other", skills={"x": ["do x"]}, seed=5)["base"]
    return stack, other


def test_cli_vsubspace_with_base_equals_served_engine(capsys, vsubspace_stack):
    """--base builds the model through the composition root: the decision is the served engine's
    (base + core, as carve serve runs it); --model is the deprecated spelling of --base."""
    import numpy as np

    from policy_server.models.base import ObservationBatch
    from policy_server.serving import EngineConfig, build_engine

    stack, _ = vsubspace_stack
    state = np.linspace(-2, 2, stack["config"].state_dim).astype(np.float32)
    flag = "--obs-state=" + ",".join(f"{v:.6g}" for v in state)
    args = ["route", str(stack["state"]), "do the task", "--router", "vsubspace", flag, "--json"]
    capsys.readouterr()
    assert main([*args, "--base", str(stack["base"])]) == 0
    line = json.loads(capsys.readouterr().out)
    engine = build_engine(EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                                       router="vsubspace"))
    try:
        obs = ObservationBatch(state=np.array([[float(f"{v:.6g}") for v in state]], np.float32),
                               instructions=[""])
        d = engine.route("do the task", obs)
    finally:
        engine.close()
    assert line["skill"] == d.skill and line["confidence"] == d.confidence
    assert [(c["skill"], c["score"]) for c in line["candidates"]] == d.candidates
    assert main([*args, "--model", str(stack["base"])]) == 0
    old = capsys.readouterr()
    assert json.loads(old.out) == line and "--model is deprecated; use --base" in old.err


def test_cli_refuses_a_mismatched_base(capsys, vsubspace_stack):
    stack, other = vsubspace_stack
    args = ["route", str(stack["state"]), "do the task", "--router", "vsubspace",
            "--obs-state=0", "--base", str(other), "--json"]
    capsys.readouterr()
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "is not the base of" in err and "--allow-base-mismatch" in err
