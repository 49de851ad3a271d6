"""Routers: text (real all-MiniLM-L6-v2), value-subspace, hybrid, the factory.

The sentence-transformers model is loaded once per session (``embedder`` fixture, ~8 s on 2 cores).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from policy_server.errors import InputError, StateError
from policy_server.models.base import ObservationBatch
from policy_server.runtime import PolicyRuntime
from router.base import ExactRouter
from router.embedder import Embedder, default_model_path, fingerprint_tensor, shared_embedder
from router.factory import build_router
from router.hybrid import (KEY_OBS_PROTOTYPES, HybridRouter, ObservationPrototypeScorer,
                           observation_prototype_artifacts)
from router.text import (KEY_EMBEDDINGS, KEY_MODEL, KEY_TEXTS, TextEmbeddingHook, TextRouter,
                         text_router_artifacts)
from router.vsubspace import ARTIFACT_PREFIX, VSubspaceHook, VSubspaceRouter, module_feature_fn
from router.memory_snapshot import InMemorySnapshot

BENCH = Path(__file__).resolve().parents[1] / "bench" / "routing"
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    # the process-wide instance: the CLI tests (same session) reuse the loaded model
    return shared_embedder()


@pytest.fixture(scope="session")
def libero():
    lib = json.loads((BENCH / "libero_instructions.json").read_text())["suites"]
    para = json.loads((BENCH / "heldout_paraphrases.json").read_text())["paraphrases"]
    return lib, para


@pytest.fixture(scope="session")
def libero_embeddings(embedder, libero) -> dict[str, torch.Tensor]:
    """task -> (1, 384) embedding of its registered instruction, one batched call for all 40."""
    lib, _ = libero
    tasks = [t for s in SUITES for t in lib[s]]
    e = embedder.encode([t["language"] for t in tasks])
    return {t["task"]: e[i:i + 1] for i, t in enumerate(tasks)}


@pytest.fixture(scope="session")
def suite_router(embedder, libero, libero_embeddings) -> TextRouter:
    lib, _ = libero
    return TextRouter({s: [t["language"] for t in lib[s]] for s in SUITES}, embedder,
                      embeddings={s: torch.cat([libero_embeddings[t["task"]] for t in lib[s]])
                                  for s in SUITES})


# ------------------------------------------------------------------------------ embedder

def test_embedder_shapes_and_norm(embedder):
    e = embedder.encode(["put the bowl on the plate", "turn on the stove", "x"])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # paraphrase closer than an unrelated instruction: the model is really loaded
    p = embedder.encode(["place the bowl onto the plate"])[0]
    assert float(p @ e[0]) > float(p @ e[1]) + 0.2


def test_embedder_local_path_and_errors(tmp_path):
    # the same directory given by path has the same fingerprint (no model load needed)
    assert Embedder(default_model_path()).fingerprint == Embedder().fingerprint
    with pytest.raises(InputError, match="not a local directory"):
        Embedder(tmp_path / "missing")
    with pytest.raises(InputError, match="not a sentence-transformers model"):
        Embedder(tmp_path)
    with pytest.raises(TypeError):
        Embedder().encode("one string")


# ------------------------------------------------------------------------------ text router

def test_registered_instructions_route_100_percent(embedder, libero, suite_router,
                                                   libero_embeddings):
    lib, _ = libero
    tasks = [(s, t) for s in SUITES for t in lib[s]]
    per_task = TextRouter({t["task"]: [t["language"]] for _, t in tasks}, embedder,
                          embeddings=libero_embeddings)
    ds = suite_router.route_many([t["language"] for _, t in tasks])
    # case/whitespace variants of a registered instruction are the same instruction
    ds2 = per_task.route_many(["  " + t["language"].upper() + " " for _, t in tasks])
    for (s, t), d, d2 in zip(tasks, ds, ds2):
        assert (d.skill, d.abstained) == (s, False), (t["language"], d)
        assert d2.skill == t["task"] and d2.confidence == 1.0, d2


def test_heldout_paraphrases_route_by_suite(suite_router, libero):
    """The routing metric on text never registered: most held-out paraphrases must route right
    (bench_routing.py reports the exact figures; this guards against regressions)."""
    lib, para = libero
    texts, truth = [], []
    for s in SUITES:
        for t in lib[s]:
            texts += para[t["task"]]
            truth += [s] * len(para[t["task"]])
    ds = suite_router.route_many(texts)
    acc = np.mean([d.skill == s for d, s in zip(ds, truth)])
    wrong = np.mean([(not d.abstained) and d.skill != s for d, s in zip(ds, truth)])
    assert acc >= 0.9, acc
    assert wrong <= 0.03, wrong  # errors should be abstentions, not wrong skills


def test_out_of_domain_abstains(suite_router):
    for text in ("make me a coffee", "what is the weather tomorrow", "walk the dog"):
        d = suite_router.route(text)
        assert d.abstained and d.skill is None, d
        assert "min_confidence" in d.reason or "min_margin" in d.reason
        assert len(d.candidates) == 4 and d.runner_up is not None
    d = suite_router.route("make me a coffee")
    assert d.to_json()["skill"] is None and d.to_json()["abstained"] is True


def test_confidence_calibration_and_candidates(suite_router):
    d = suite_router.route("grab the ketchup and put it in the basket")
    assert d.skill == "libero_object" and not d.abstained
    confs = [c for _, c in d.candidates]
    assert confs == sorted(confs, reverse=True)
    assert abs(d.margin - (confs[0] - confs[1])) < 1e-9
    assert 0.0 <= sum(confs) <= 1.0 + 1e-6  # the null logit takes the rest
    # a hot softmax flattens the confidence below the threshold: the same text now abstains
    hot = TextRouter(suite_router.instructions, suite_router.embedder, temperature=1.0)
    d_hot = hot.route("grab the ketchup and put it in the basket")
    assert d_hot.abstained and d_hot.confidence < d.confidence and d_hot.candidates[0][0] == d.skill


def test_shared_instruction_abstains_on_text(embedder):
    r = TextRouter({"a": ["put the bowl on the plate"], "b": ["put the bowl on the plate"],
                    "c": ["open the drawer"]}, embedder)
    d = r.route("put the bowl on the plate")
    assert d.abstained and "min_margin" in d.reason
    assert {d.candidates[0][0], d.runner_up} == {"a", "b"}


def test_text_router_bad_options(embedder):
    with pytest.raises(InputError, match="temperature"):
        TextRouter({"a": ["x"]}, embedder, temperature=0)
    with pytest.raises(InputError, match="no instruction"):
        TextRouter({"a": []}, embedder)
    with pytest.raises(InputError, match="at least one skill"):
        TextRouter({}, embedder)


# ------------------------------------------------------------------------------ embedding cache

def _libero_snapshot(libero, embedder, cache=True):
    lib, _ = libero
    skills = {s: {"instructions": [t["language"] for t in lib[s]], "description": ""}
              for s in SUITES}
    arts = {s: text_router_artifacts(v["instructions"], embedder) for s, v in skills.items()} \
        if cache else {}
    return InMemorySnapshot(skills, arts)


def test_artifacts_layout(embedder):
    a = text_router_artifacts(["put the bowl on the plate", "turn on the stove"], embedder)
    assert a[KEY_EMBEDDINGS].shape == (2, 384) and a[KEY_EMBEDDINGS].dtype == torch.float32
    assert a[KEY_MODEL].dtype == torch.uint8 and a[KEY_MODEL].shape == (32,)
    assert a[KEY_TEXTS].shape == (32,)
    hook = TextEmbeddingHook(["turn on the stove"], embedder, description="cooking")
    assert not hook.wants("any.weight") and hook.artifacts()[KEY_EMBEDDINGS].shape == (2, 384)


def test_cache_hit_avoids_reembedding(embedder, libero, suite_router):
    snap = _libero_snapshot(libero, embedder)
    before = embedder.sentences
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache hit must not warn
        r = TextRouter.from_snapshot(snap, embedder)
    assert embedder.sentences == before  # nothing re-embedded at start
    q = "grab the ketchup and put it in the basket"
    d1, d2 = r.route(q), suite_router.route(q)
    assert embedder.sentences == before + 2  # only the two queries
    # same decision as a router that embedded from scratch (batching changes the embeddings by
    # float rounding only, so compare the confidences approximately)
    assert d1.skill == d2.skill == "libero_object"
    assert [s for s, _ in d1.candidates] == [s for s, _ in d2.candidates]
    assert np.allclose([c for _, c in d1.candidates], [c for _, c in d2.candidates],
                       rtol=1e-3, atol=1e-9)


def test_cache_miss_reembeds_with_warning(embedder, libero):
    snap = _libero_snapshot(libero, embedder)
    # instructions changed after the cache was written -> that skill alone is re-embedded
    snap._skills["libero_goal"]["instructions"].append("wipe the stove clean")
    # a cache made by another model -> re-embedded too
    snap._arts["libero_10"][KEY_MODEL] = fingerprint_tensor("00" * 32)
    before = embedder.sentences
    with pytest.warns(RuntimeWarning, match=r"libero_goal.*libero_10|libero_10.*libero_goal"):
        r = TextRouter.from_snapshot(snap, embedder)
    assert embedder.sentences - before == 11 + 10
    assert r.route("wipe the stove clean").skill == "libero_goal"


# ------------------------------------------------------------------------------ value subspace

D, K = 48, 8


class TinyExpertBlock(nn.Module):
    """An action-expert-like block: context -> v_proj (the hooked projection) -> out."""

    def __init__(self):
        super().__init__()
        self.cross_attn = nn.Module()
        self.cross_attn.v_proj = nn.Linear(D, D)
        self.out = nn.Linear(D, 4)

    def forward(self, ctx):
        return self.out(self.cross_attn.v_proj(ctx)).mean(1)


def _synthetic_experts(n_skills=4, seed=0):
    """Experts whose value projections read from disjoint K-dim input subspaces U_s (D, K)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, n_skills * K, generator=g)).Q  # orthonormal columns
    base = torch.randn(D, D, generator=g) * 0.01
    experts = {}
    for s in range(n_skills):
        Us = U[:, s * K:(s + 1) * K]
        tau = torch.randn(D, K, generator=g) @ Us.T  # fine-tuning wrote into U_s only
        experts[f"skill{s}"] = (base + tau, tau, Us)
    return experts


def test_vsubspace_hook_keeps_expert_right_singular_vectors():
    key = "blocks.1.cross_attn.v_proj.weight"
    names = ["blocks.0.cross_attn.v_proj.weight", key]
    hook = VSubspaceHook(value_projection_names=names)  # default: the last value projection
    assert hook.wants(key) and not hook.wants(names[0]) and not hook.wants("blocks.1.fc1.weight")
    expert, tau, Us = _synthetic_experts()["skill2"]
    hook.on_tensor(key, expert, tau)
    a = hook.artifacts()
    V = a[ARTIFACT_PREFIX + key]
    assert V.shape == (K, D) and V.dtype == torch.float32
    # the stored rows span U_s: projecting U_s onto them keeps (almost) all of its energy
    assert float((V @ Us).norm() ** 2) > 0.99 * K
    with pytest.raises(InputError, match="value projections"):
        VSubspaceHook()


def test_vsubspace_router_picks_right_skill_on_synthetic_experts():
    experts = _synthetic_experts()
    key = "cross_attn.v_proj.weight"
    bases = {}
    for name, (w, tau, _) in experts.items():
        hook = VSubspaceHook(key)
        hook.on_tensor(key, w, tau)  # the expert is discarded after this
        bases[name] = hook.artifacts()[ARTIFACT_PREFIX + key]
    model = TinyExpertBlock()
    fn = module_feature_fn(model, key, lambda obs: model(obs))
    r = VSubspaceRouter(bases, fn, key=key)
    g = torch.Generator().manual_seed(1)
    for name, (_, _, Us) in experts.items():
        for _ in range(5):
            # first observation: 6 context tokens mostly in the skill's input subspace + noise
            ctx = ((torch.randn(1, 6, K, generator=g) @ Us.T)
                   + 0.3 * torch.randn(1, 6, D, generator=g))
            d = r.route("ignored", ctx)
            assert d.skill == name and not d.abstained, (name, d)
            assert d.confidence > 0.9
    assert r.route("no observation").abstained


def test_vsubspace_router_with_demo_vla():
    """End to end on the demo VLA: the captured inputs of the head's value projection decide."""
    import policy_server.models.demo_vla as demo

    cfg = demo.DemoVLAConfig()
    backend = demo.DemoVLABackend(cfg)
    key = backend.routing_features.value_projections[-1]
    fn = module_feature_fn(backend.module, key, backend.predict)
    rng = np.random.default_rng(0)
    spec = backend.spec

    def obs(scene: int):
        state = rng.normal(scene * 3.0 - 1.5, 0.05, (1, spec.state_dim)).astype(np.float32)
        imgs = {k: np.full((1, v.height, v.width, v.channels), 40 + 150 * scene, np.uint8)
                for k, v in spec.images.items()}
        return ObservationBatch(state=state, instructions=["do it"], images=imgs)

    # "fine-tune" each skill's head v_proj toward the principal input directions of its scene
    bases = {}
    w0 = backend.module.get_parameter(key).detach().clone()
    for scene in (0, 1):
        X = torch.cat([fn(obs(scene)) for _ in range(8)])
        Xc = X - X.mean(0)
        top = torch.linalg.svd(torch.cat([X.mean(0, keepdim=True), Xc]), full_matrices=False)[2][:K]
        expert = w0 + 5.0 * torch.randn(w0.shape[0], K) @ top
        hook = VSubspaceHook.from_features(backend.routing_features)
        hook.on_tensor(key, expert, expert - w0)
        bases[f"scene{scene}"] = hook.artifacts()[ARTIFACT_PREFIX + key]
    r = VSubspaceRouter(bases, fn, key=key)
    for scene in (0, 1):
        assert r.route("", obs(scene)).skill == f"scene{scene}"


# ------------------------------------------------------------------------------ hybrid

def _scene_obs(scene: int, rng) -> ObservationBatch:
    """Scene 0: robot near the stove (state ~ +1), warm image; scene 1: near the cabinet (~ -1),
    cold image. Same instruction, different observation."""
    state = rng.normal(1.0 if scene == 0 else -1.0, 0.1, (1, 8)).astype(np.float32)
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[..., 0 if scene == 0 else 2] = 200
    img = np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
    return ObservationBatch(state=state, instructions=[""], images={"agentview": img})


def test_hybrid_disambiguates_shared_instruction(embedder):
    rng = np.random.default_rng(0)
    instr = {"bowl_stove_scene": ["put the bowl on the plate", "turn on the stove"],
             "bowl_cabinet_scene": ["put the bowl on the plate", "open the top drawer"],
             "ketchup": ["pick up the ketchup and place it in the basket"]}
    demos = {scene: [_scene_obs(scene, rng) for _ in range(4)] for scene in (0, 1)}
    arts = {"bowl_stove_scene": observation_prototype_artifacts(demos[0]),
            "bowl_cabinet_scene": observation_prototype_artifacts(demos[1]),
            "ketchup": observation_prototype_artifacts([_scene_obs(0, rng)])}
    assert arts["ketchup"][KEY_OBS_PROTOTYPES].shape == (1, 8 + 8 * 8 * 3)
    snap = InMemorySnapshot({s: {"instructions": v} for s, v in instr.items()}, arts)
    text = build_router("text", snap, {"embedder": embedder})
    hybrid = build_router("hybrid", snap, {"embedder": embedder})
    assert isinstance(hybrid, HybridRouter) and isinstance(hybrid.obs, ObservationPrototypeScorer)
    q = "put the bowl on the plate"
    assert text.route(q).abstained  # text alone cannot separate them
    for scene, want in ((0, "bowl_stove_scene"), (1, "bowl_cabinet_scene")):
        for _ in range(3):
            d = hybrid.route(q, _scene_obs(scene, rng))
            assert d.skill == want and not d.abstained, d
    # a decisive instruction is not overridden by a scene it shares with another skill
    d = hybrid.route("grab the ketchup, put it in the basket", _scene_obs(0, rng))
    assert d.skill == "ketchup"
    # out-of-domain text stays abstained whatever the observation
    assert hybrid.route("make me a coffee", _scene_obs(0, rng)).abstained
    # no observation: the text decision
    assert hybrid.route(q).abstained


# ------------------------------------------------------------------------------ factory

def test_factory_kinds_and_errors(embedder):
    snap = InMemorySnapshot({"a": {"instructions": ["turn on the stove"]},
                         "b": {"instructions": ["open the drawer"], "description": "drawers"}})
    ex = build_router("exact", snap)
    assert isinstance(ex, ExactRouter) and ex.route("Turn on the  stove").skill == "a"
    cfg = {"embedder": embedder, "min_confidence": 0.6}
    t = build_router("text", snap, cfg)
    assert t.min_confidence == 0.6 and t.instructions["b"] == ["open the drawer", "drawers"]
    with pytest.raises(InputError, match="unknown router kind"):
        build_router("magic", snap, cfg)
    with pytest.raises(StateError, match="value-subspace basis"):
        build_router("vsubspace", snap, cfg)
    with pytest.raises(StateError, match="observation data"):
        build_router("hybrid", snap, cfg)


def test_factory_vsubspace_and_hybrid_with_value_subspace(embedder):
    """Bases stored as artifacts (as admission writes them) -> build_router reads them; the hybrid
    router then uses the value-subspace scores to split two skills sharing an instruction."""
    experts = _synthetic_experts(n_skills=2, seed=3)
    key = "cross_attn.v_proj.weight"
    arts = {}
    for name, (w, tau, _) in experts.items():
        hook = VSubspaceHook(key)
        hook.on_tensor(key, w, tau)
        arts[name] = hook.artifacts()
    snap = InMemorySnapshot({n: {"instructions": ["put the bowl on the plate"]} for n in experts}, arts)
    model = TinyExpertBlock()
    cfg = {"embedder": embedder, "feature_fn": module_feature_fn(model, key, model)}
    with pytest.raises(InputError, match="served model"):
        build_router("vsubspace", snap, {"embedder": embedder})
    vs = build_router("vsubspace", snap, cfg)
    hy = build_router("hybrid", snap, cfg)
    assert isinstance(vs, VSubspaceRouter) and vs.key == key and isinstance(hy.obs, VSubspaceRouter)
    g = torch.Generator().manual_seed(4)
    for name, (_, _, Us) in experts.items():
        ctx = (torch.randn(1, 5, K, generator=g) @ Us.T) + 0.3 * torch.randn(1, 5, D, generator=g)
        assert vs.route("", ctx).skill == name
        d = hy.route("put the bowl on the plate", ctx)
        assert d.skill == name and not d.abstained, d


def test_admission_hooks_end_to_end_with_demo_vla(tmp_path, embedder):
    """Admit two demo-VLA experts through the real engine with the router hooks, then route from
    the stored state: text from cached embeddings (no re-embedding), value subspace from the
    stored bases with the base + core model."""
    import policy_server.state.admission as engine
    import policy_server.models.demo_vla as demo
    import policy_server.state.store as store_mod

    torch.manual_seed(0)
    cfg = demo.DemoVLAConfig(state_dim=8, hidden_dim=32, mlp_dim=64, vocab_size=256, text_dim=16)
    base = demo.DemoVLABackend(cfg)
    base.save_pretrained(tmp_path / "base")
    key = base.routing_features.value_projections[-1]
    fn = module_feature_fn(base.module, key, base.predict)
    rng = np.random.default_rng(0)

    def obs(scene):
        st = rng.normal(2.0 if scene == 0 else -2.0, 0.1, (1, 8)).astype(np.float32)
        return ObservationBatch(state=st, instructions=["tidy the table"])

    instr = {"scene0": ["put the bowl in the sink", "tidy the table"],
             "scene1": ["put the mug on the shelf", "tidy the table"]}
    w0 = base.module.get_parameter(key).detach().clone()
    for i, skill in enumerate(instr):
        X = torch.cat([fn(obs(i)) for _ in range(6)])
        top = torch.linalg.svd(X, full_matrices=False)[2][:4]  # the scene's input directions
        expert = demo.DemoVLABackend(cfg, module=demo.DemoVLAModule(cfg))
        expert.module.load_state_dict(base.module.state_dict())
        with torch.no_grad():
            expert.module.get_parameter(key).add_(3.0 * torch.randn(w0.shape[0], 4) @ top)
        expert.save_pretrained(tmp_path / skill)
        hooks = [VSubspaceHook.from_features(base.routing_features), TextEmbeddingHook(instr[skill], embedder)]
        engine.admit(tmp_path / "state", tmp_path / "base", tmp_path / skill, skill,
                     instructions=instr[skill], hooks=hooks, progress=False)
    snap = store_mod.StateStore(tmp_path / "state").open()
    assert snap.skill_names() == ["scene0", "scene1"]
    assert ARTIFACT_PREFIX + key in snap.skill_artifacts("scene1")
    before = embedder.sentences
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = build_router("text", snap, {"embedder": embedder})
    assert embedder.sentences == before
    assert text.route("put the mug onto the shelf").skill == "scene1"
    assert text.route("tidy the table").abstained  # shared by both skills
    # the served weights (base + core) through the runtime's lock-safe capture
    served = PolicyRuntime(demo.DemoVLABackend.load(tmp_path / "base"), snap)
    vs = build_router("vsubspace", snap, {"capture": served.capture})
    for scene in (0, 1):
        assert vs.route("tidy the table", obs(scene)).skill == f"scene{scene}"
