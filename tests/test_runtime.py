"""PolicyRuntime: fused and side-path skill application against independently built reference
weights ``base + entries.skill_delta(core, entry)``, exact unmerge, routing of parameter kinds the
side path cannot serve, and the guard rails (unknown skill, non-finite actions, clipping)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from policy_server.errors import InputError, StateError
from policy_server.tensors.entries import Dense, LowRank, Masked, skill_delta
from policy_server.models.base import ImageSpec, ObservationBatch, PolicyBackend, PolicySpec
from policy_server.runtime import PolicyRuntime, ResidualEmbedding, ResidualLinear, SidePathError
from policy_server.runtime.skill_bank import ResidualStack

STATE, HID, TOK, CHUNK, ACT, VOCAB = 6, 32, 5, 4, 3, 50


class ToyVLA(nn.Module):
    """Small VLA-shaped net: instruction token embedding, conv image stem, state encoder,
    cross-attention of the state query over tokens + image, LayerNorm, MLP, action head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HID)
        self.stem = nn.Conv2d(3, HID, 4, stride=4)  # not per-row capable: fused-group fallback
        self.state_proj = nn.Linear(STATE, HID)
        self.q = nn.Linear(HID, HID)
        self.k = nn.Linear(HID, HID)
        self.v = nn.Linear(HID, HID)
        self.o = nn.Linear(HID, HID)
        self.norm = nn.LayerNorm(HID)
        self.fc1 = nn.Linear(HID, 2 * HID)
        self.fc2 = nn.Linear(2 * HID, HID)
        self.head = nn.Linear(HID, CHUNK * ACT)

    def forward(self, state, ids, img):
        tok = self.embed(ids)                                    # (B, T, H)
        patches = self.stem(img).flatten(2).transpose(1, 2)      # (B, 4, H)
        ctx = torch.cat([tok, patches], dim=1)
        q = self.q(torch.tanh(self.state_proj(state))).unsqueeze(1)   # (B, 1, H)
        att = torch.softmax(q @ self.k(ctx).transpose(1, 2) / HID ** 0.5, dim=-1)
        h = self.norm(self.o(att @ self.v(ctx)).squeeze(1))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h).view(-1, CHUNK, ACT)


class ToyBackend(PolicyBackend):
    def __init__(self, seed: int = 0, bound: float = 100.0):
        torch.manual_seed(seed)
        self.module = ToyVLA()
        self.spec = PolicySpec(state_dim=STATE, action_dim=ACT, chunk_length=CHUNK,
                               action_low=[-bound] * ACT, action_high=[bound] * ACT,
                               images={"cam": ImageSpec(8, 8)}, name="toy")

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32):
        return cls()

    def predict(self, batch: ObservationBatch) -> torch.Tensor:
        p = next(self.module.parameters())
        ids = torch.tensor([[sum(map(ord, w)) % VOCAB for w in (s.split() + ["<pad>"] * TOK)[:TOK]]
                            for s in batch.instructions])
        img = torch.from_numpy(batch.images["cam"]).permute(0, 3, 1, 2).to(p.dtype) / 255.0
        state = torch.from_numpy(batch.state).to(p.device, p.dtype)
        return self.module(state, ids.to(p.device), img.to(p.device)).float()


class MemSnapshot:
    """In-memory stand-in for state.store.StateSnapshot."""

    def __init__(self, core, residuals, version="v000001"):
        self._core, self._res, self.version = core, residuals, version
        self.manifest = {"skills": list(residuals)}

    def skill_names(self):
        return list(self._res)

    def core(self):
        return dict(self._core)

    def residuals(self, name):
        return dict(self._res[name])


def lowrank(shape, r, g, scale=0.05):
    return LowRank(torch.randn(shape[0], r, generator=g) * scale,
                   torch.randn(r, shape[1], generator=g) * scale)


def make_snapshot(seed: int = 1, nan_skill: bool = False) -> MemSnapshot:
    """Core on most tensors; four skills covering LowRank (mixed ranks), Dense (Linear weight,
    biases, LayerNorm, embedding), Masked, and one conv residual (side-path fallback)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in ToyVLA().state_dict().items()}
    core = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items() if k != "o.bias"}
    d = lambda k, sc=0.05: Dense(torch.randn(shapes[k], generator=g) * sc)  # noqa: E731
    res = {
        "pick": {"q.weight": lowrank(shapes["q.weight"], 4, g), "fc1.weight":
                 lowrank(shapes["fc1.weight"], 8, g), "fc1.bias": d("fc1.bias"),
                 "norm.weight": d("norm.weight"), "norm.bias": d("norm.bias"),
                 "embed.weight": lowrank(shapes["embed.weight"], 3, g)},
        "place": {"q.weight": lowrank(shapes["q.weight"], 2, g),
                  "v.weight": Masked(torch.rand(shapes["v.weight"], generator=g) > 0.5),
                  "head.weight": d("head.weight"), "embed.weight": d("embed.weight"),
                  "o.bias": d("o.bias")},
        "push": {"fc2.weight": lowrank(shapes["fc2.weight"], 16, g),
                 "state_proj.weight": d("state_proj.weight"),
                 "k.weight": Masked(torch.rand(shapes["k.weight"], generator=g) > 0.2)},
        "wipe": {"stem.weight": d("stem.weight"),
                 "fc1.weight": lowrank(shapes["fc1.weight"], 5, g)},
    }
    if nan_skill:
        res["broken"] = {"head.bias": Dense(torch.full(shapes["head.bias"], float("nan")))}
    return MemSnapshot(core, res)


def make_batch(n: int, seed: int = 0) -> ObservationBatch:
    rng = np.random.default_rng(seed)
    words = ["pick", "red", "cube", "place", "bowl", "open", "drawer", "the"]
    return ObservationBatch(
        state=rng.standard_normal((n, STATE)).astype(np.float32),
        instructions=[" ".join(rng.choice(words, 4)) for _ in range(n)],
        images={"cam": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)})


def reference_actions(snap: MemSnapshot, batch: ObservationBatch, skills) -> np.ndarray:
    """Row i from a fresh model with weights base + skill_delta(core, entry) (float32)."""
    out = []
    for i, s in enumerate(skills):
        be = ToyBackend()
        res = snap.residuals(s) if s else {}
        core = snap.core()
        with torch.no_grad():
            for k, p in be.module.state_dict(keep_vars=True).items():
                if k in core or k in res:
                    p.copy_(p + skill_delta(core.get(k), res.get(k), p.shape))
        sub = ObservationBatch(batch.state[i:i + 1], batch.instructions[i:i + 1],
                               {k: v[i:i + 1] for k, v in batch.images.items()})
        out.append(be.predict(sub).detach().numpy()[0])
    return np.clip(np.stack(out), -100, 100)


def _rows(batch: ObservationBatch, rows: list[int]) -> ObservationBatch:
    return ObservationBatch(batch.state[rows], [batch.instructions[i] for i in rows],
                            {k: v[rows] for k, v in batch.images.items()})


MIXED = ["pick", None, "place", "push", "pick", "wipe", "place", None, "push"]


@pytest.mark.parametrize("mode", ["fused", "side", "auto"])
def test_mixed_batch_matches_reference_weights(mode):
    snap, batch = make_snapshot(), make_batch(len(MIXED))
    ref = reference_actions(snap, batch, MIXED)
    rt = PolicyRuntime(ToyBackend(), snap, mode=mode)
    got = rt.infer(batch, MIXED)
    # every row a different skill: the side path gathers factors per row (BGMV), not segments
    np.testing.assert_allclose(rt.infer(_rows(batch, [0, 2, 3]), ["pick", "place", "push"]),
                               ref[[0, 2, 3]], rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (len(MIXED), CHUNK, ACT)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the skills really differ from each other and from core-only (the comparison has teeth)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3 and np.abs(ref[2] - ref[1]).max() > 1e-3
    # single-skill batches (fused under auto) agree too, and leave the skill merged under auto
    for s in ("push", None, "pick"):
        rows = [i for i, m in enumerate(MIXED) if m == s]
        sub = _rows(batch, rows)
        np.testing.assert_allclose(rt.infer(sub, [s] * len(rows)), ref[rows], rtol=1e-5, atol=1e-5)
        if mode != "side":
            assert rt.active_skill == s


def test_side_path_routes_unsupported_parameters_to_fused_groups():
    rt = PolicyRuntime(ToyBackend(), make_snapshot(), mode="side")
    assert rt.side_fallback_keys() == {"stem.weight"}
    m = rt.backend.module
    assert isinstance(m.fc1, ResidualLinear) and type(m.stem) is nn.Conv2d
    # wrapping keeps checkpoint keys and shares the very same tensors
    assert set(m.state_dict()) == set(ToyVLA().state_dict())
    assert m.state_dict(keep_vars=True)["fc1.weight"] is m.fc1.weight
    rt.close()
    assert type(m.fc1) is nn.Linear and rt.active_skill is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_switching_is_bitwise_exact_over_100_switches(dtype):
    rt = PolicyRuntime(ToyBackend(), make_snapshot(), mode="fused", dtype=dtype)
    params = rt.backend.module.state_dict(keep_vars=True)
    snap_w = lambda: {k: v.detach().clone() for k, v in params.items()}  # noqa: E731
    seen = {None: snap_w()}
    assert all(v.dtype == dtype for v in seen[None].values())
    rng = random.Random(0)
    names = [None, *rt.skill_names]
    batch = make_batch(1)
    for step in range(100):
        s = rng.choice(names)
        rt.bank.switch(rt.skill_index(s))
        now = snap_w()
        if s not in seen:
            seen[s] = now
            if s is not None:  # merging really changed the weights it touches
                assert any(not torch.equal(now[k], seen[None][k]) for k in rt.bank.touched(
                    rt.skill_index(s)))
        for k in now:
            assert torch.equal(now[k], seen[s][k]), (step, s, k)
        if step % 25 == 0:
            rt.infer(batch, [s])
    rt.bank.switch(0)
    assert all(torch.equal(v, seen[None][k]) for k, v in snap_w().items())


def test_core_is_folded_once_in_float32_then_cast():
    be, snap = ToyBackend(), make_snapshot()
    base = {k: v.clone() for k, v in be.module.state_dict().items()}
    rt = PolicyRuntime(be, snap, mode="fused", dtype=torch.bfloat16)
    for k, v in rt.backend.module.state_dict().items():
        want = (base[k] + snap.core()[k]).to(torch.bfloat16) if k in snap.core() else \
            base[k].to(torch.bfloat16)
        assert torch.equal(v, want), k
    with pytest.raises(StateError, match="already has a merge-state core"):
        PolicyRuntime(be, snap)


@pytest.mark.parametrize("rows,segmented", [([3, 0, 1, 2, 3], True),   # shared skills: SGMV
                                             ([3, 1, 2], False),         # all distinct: BGMV
                                             ([1, 1, 1, 1], True)])      # one skill, no gather
def test_residual_linear_applies_each_rows_residual_for_3d_inputs(rows, segmented):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    g = torch.Generator().manual_seed(3)
    skills = {1: lowrank((10, 12), 2, g, 1.0), 3: lowrank((10, 12), 5, g, 1.0)}
    st = ResidualStack("w", base.weight, 3, skills, {2: torch.randn(10, 12, generator=g)})
    assert st.P.shape == (3, 10, 5) and st.D.shape == (2, 10, 12)   # zero slot + padding
    layer = ResidualLinear.wrap(base, "lin", st, None)
    x = torch.randn(len(rows), 7, 12)
    st.bind(rows, torch.tensor(rows), {g: torch.tensor([i for i, r in enumerate(rows) if r == g])
                                       for g in set(rows)})
    assert (st.lr_segments is not None) == segmented
    y = layer(x)
    for i, g_ in enumerate(rows):
        w = base.weight.detach().clone()
        if g_ in skills:
            w += skills[g_].materialize()
        elif g_ == 2:
            w += st.D[1]
        torch.testing.assert_close(y[i], F.linear(x[i], w, base.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(SidePathError, match="leading dimension"):
        layer(x.reshape(-1, 12))
    st.unbind()
    torch.testing.assert_close(layer(x), base(x))


def test_residual_embedding_one_token_per_row():
    torch.manual_seed(0)
    base = nn.Embedding(10, 6)
    g = torch.Generator().manual_seed(4)
    lr, dense = lowrank((10, 6), 3, g, 1.0), torch.randn(10, 6, generator=g)
    st = ResidualStack("e", base.weight, 2, {1: lr}, {2: dense})
    layer = ResidualEmbedding.wrap(base, "emb", st)
    ids, rows = torch.tensor([4, 4, 7]), [1, 2, 0]
    st.bind(rows, torch.tensor(rows))
    y = layer(ids)
    w = base.weight.detach()
    want = torch.stack([(w + lr.materialize())[4], (w + dense)[4], w[7]])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


class FlatBackend(ToyBackend):
    """Feeds fc1 a (B*2, H) input: not batch-major, so the side path must refuse it."""

    def __init__(self):
        super().__init__()
        m = self.module
        m.forward = lambda state, ids, img: m.head(
            m.fc2(m.fc1(torch.cat([m.state_proj(state)] * 2))).view(2, -1, HID).mean(0)
        ).view(-1, CHUNK, ACT)


def test_side_path_refuses_non_batch_major_layers_and_auto_falls_back():
    snap, batch = make_snapshot(), make_batch(3)
    skills = ["pick", "wipe", None]
    with pytest.raises(SidePathError, match="fc1"):
        PolicyRuntime(FlatBackend(), snap, mode="side").infer(batch, skills)
    auto = PolicyRuntime(FlatBackend(), snap, mode="auto")
    fused = PolicyRuntime(FlatBackend(), snap, mode="fused")
    np.testing.assert_allclose(auto.infer(batch, skills), fused.infer(batch, skills),
                               rtol=1e-6, atol=1e-6)


def test_unknown_skill_nonfinite_and_clipping():
    rt = PolicyRuntime(ToyBackend(), make_snapshot(nan_skill=True))
    batch = make_batch(3)
    with pytest.raises(StateError, match="'nope'"):
        rt.infer(batch, ["pick", "nope", None])
    with pytest.raises(RuntimeError, match=r"rows \[1\].*'broken'"):
        rt.infer(batch, ["pick", "broken", None])
    assert np.isfinite(rt.infer(batch, ["pick", "push", None])).all()  # still serving
    tight = PolicyRuntime(ToyBackend(bound=0.05), make_snapshot())
    a = tight.infer(batch, ["pick", "push", None])
    assert a.max() <= 0.05 and a.min() >= -0.05 and (np.abs(a) == np.float32(0.05)).any()


def test_state_errors_name_the_tensor():
    snap = make_snapshot()
    snap._res["pick"]["nonexistent.weight"] = Dense(torch.zeros(3))
    with pytest.raises(StateError, match="nonexistent.weight"):
        PolicyRuntime(ToyBackend(), snap)
    snap = make_snapshot()
    snap._res["pick"]["fc2.bias"] = Dense(torch.zeros(7))
    with pytest.raises(StateError, match=r"skill 'pick'.*fc2.bias"):
        PolicyRuntime(ToyBackend(), snap)


def test_no_snapshot_serves_the_base_model():
    be = ToyBackend()
    batch = make_batch(2)
    want = np.clip(be.predict(batch).detach().numpy(), -100, 100)
    rt = PolicyRuntime(be, None)
    assert rt.skill_names == []
    np.testing.assert_array_equal(rt.infer(batch, [None, None]), want)


def test_demo_vla_backend_modes_match_reference():
    """The built-in demo VLA (EmbeddingBag text, CNN camera, cross-attention action expert):
    residuals on its Linear / LayerNorm layers ride the side path, those on the EmbeddingBag and
    the learned query parameter fall back to fused groups; all modes equal the reference."""
    import policy_server.models.demo_vla as demo

    cfg = demo.DemoVLAConfig(state_dim=5, action_dim=3, chunk_length=2, hidden_dim=32, mlp_dim=48,
                             num_heads=4, num_trunk_tokens=2, num_expert_blocks=1, vocab_size=97,
                             text_dim=16, cameras={"front": [16, 16]}, cnn_channels=4,
                             action_low=[-50.0] * 3, action_high=[50.0] * 3)
    make = lambda: demo.DemoVLABackend(cfg, seed=0)  # noqa: E731
    sd = {k: tuple(v.shape) for k, v in make().module.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    core = {k: torch.randn(s, generator=g) * 0.02 for k, s in sd.items()}
    blk = "action_expert.blocks.0."
    res = {"open": {blk + "cross_attn.v_proj.weight": lowrank(sd[blk + "cross_attn.v_proj.weight"],
                                                             4, g, 0.2),
                    "action_expert.head.norm_out.weight": Dense(torch.randn(32, generator=g)),
                    "action_expert.head.out_proj.weight": lowrank((3, 32), 2, g, 0.2)},
           "close": {"text_embed.weight": Dense(torch.randn(sd["text_embed.weight"], generator=g)),
                     blk + "fc1.weight": Masked(torch.rand(sd[blk + "fc1.weight"], generator=g)
                                                > 0.5)},
           "push": {"action_expert.action_queries": Dense(torch.randn(2, 32, generator=g) * 0.5),
                    blk + "fc2.bias": Dense(torch.randn(32, generator=g) * 0.3)}}
    snap = MemSnapshot(core, res)
    rng = np.random.default_rng(0)
    skills = ["open", "close", None, "push", "open", "push"]
    batch = ObservationBatch(rng.standard_normal((6, 5)).astype(np.float32),
                             [f"open the drawer {i}" for i in range(6)],
                             {"front": rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)})
    want = []
    for i, s in enumerate(skills):
        be = make()
        with torch.no_grad():
            for k, p in be.module.state_dict(keep_vars=True).items():
                p.copy_(p + skill_delta(core[k], res[s].get(k) if s else None, p.shape))
        want.append(be.predict(_rows(batch, [i])).numpy()[0])
    want = np.clip(np.stack(want), -50, 50)
    for mode in ("fused", "side", "auto"):
        rt = PolicyRuntime(make(), snap, mode=mode)
        if mode != "fused":
            assert rt.side_fallback_keys() == {"text_embed.weight", "action_expert.action_queries"}
        np.testing.assert_allclose(rt.infer(batch, skills), want, rtol=1e-5, atol=1e-5)


class TiedBackend(PolicyBackend):
    """Output head tied to the token embedding (weight shared by two modules)."""

    def __init__(self):
        torch.manual_seed(2)
        m = nn.Module()
        m.inp, m.embed, m.head = nn.Linear(STATE, 8), nn.Embedding(CHUNK * ACT, 8), \
            nn.Linear(8, CHUNK * ACT, bias=False)
        m.head.weight = m.embed.weight
        self.module = m
        self.spec = PolicySpec(STATE, ACT, CHUNK, [-1e3] * ACT, [1e3] * ACT)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32):
        return cls()

    def predict(self, batch):
        m = self.module
        tok = m.embed(torch.zeros(len(batch), dtype=torch.long))
        h = m.inp(torch.from_numpy(batch.state)) + tok
        return m.head(h).view(-1, CHUNK, ACT)


def test_tied_weights_take_one_delta_and_use_fused_groups():
    base = TiedBackend().module.state_dict()
    assert "embed.weight" in base and "head.weight" in base
    g = torch.Generator().manual_seed(0)
    c = torch.randn(CHUNK * ACT, 8, generator=g) * 0.1
    r = lowrank((CHUNK * ACT, 8), 2, g, 0.3)
    # a checkpoint lists a tied tensor under both keys: the delta must be applied once
    snap = MemSnapshot({"embed.weight": c, "head.weight": c.clone()},
                       {"a": {"embed.weight": r, "head.weight": LowRank(r.P.clone(), r.Q.clone())}})
    rt = PolicyRuntime(TiedBackend(), snap, mode="auto")
    assert rt.side_fallback_keys() == {"embed.weight"}  # two owner modules: not per row
    batch = make_batch(2)
    want_a, want_core = TiedBackend(), TiedBackend()
    with torch.no_grad():
        want_a.module.embed.weight.add_(skill_delta(c, r, c.shape))
        want_core.module.embed.weight.add_(c)
        want = np.stack([want_a.predict(batch)[0].numpy(), want_core.predict(batch)[1].numpy()])
    # mixed batch: the tied skill runs as a fused group next to the core-only row
    np.testing.assert_allclose(rt.infer(batch, ["a", None]), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(StateError, match="tied tensors"):
        PolicyRuntime(TiedBackend(), MemSnapshot({"embed.weight": c, "head.weight": 2 * c}, {}))


def test_auto_merges_only_when_the_single_skill_changes(monkeypatch):
    rt = PolicyRuntime(ToyBackend(), make_snapshot(), mode="auto")
    merged = []
    orig = ResidualStack.add_into
    monkeypatch.setattr(ResidualStack, "add_into",
                        lambda self, w, g: (merged.append((self.key, g)), orig(self, w, g)))
    b2 = make_batch(2)
    pick = rt.skill_index("pick")
    rt.infer(b2, ["pick", "pick"])
    assert len(merged) == len(rt.bank.touched(pick)) and rt.active_skill == "pick"
    rt.infer(b2, ["pick", "pick"])  # same skill again: no switch, no weight edit
    assert len(merged) == len(rt.bank.touched(pick))
    rt.infer(b2, ["pick", "push"])  # mixed: back to base + core, side path
    assert rt.active_skill is None and len(merged) == len(rt.bank.touched(pick))
    rt.infer(b2, [None, None])      # core-only batch while at base + core: nothing to do
    assert rt.active_skill is None and len(merged) == len(rt.bank.touched(pick))
    rt.infer(b2, ["push", "push"])
    assert rt.active_skill == "push" and {g for _, g in merged} == {pick, rt.skill_index("push")}


@pytest.mark.parametrize("mode", ["fused", "side"])
def test_bfloat16_model_tracks_the_float32_reference(mode):
    snap, batch = make_snapshot(), make_batch(len(MIXED))
    ref = reference_actions(snap, batch, MIXED)
    skill_effect = np.abs(ref - reference_actions(snap, batch, [None] * len(MIXED))).max()
    rt = PolicyRuntime(ToyBackend(), snap, mode=mode, dtype=torch.bfloat16)
    assert all(st.P is None or st.P.dtype == torch.bfloat16 for st in rt.bank.stacks.values())
    err = np.abs(rt.infer(batch, MIXED) - ref).max()
    # bf16 rounding (~2^-8 relative) stays well below what the skills change
    assert err < 0.05 * skill_effect, (err, skill_effect)


def _hooked_inputs(module: nn.Module, name: str, run) -> torch.Tensor:
    """What entered ``module.<name>`` while ``run()`` ran (an independent plain hook)."""
    seen = []
    h = module.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
    try:
        run()
    finally:
        h.remove()
    return seen[-1]


@pytest.mark.parametrize("mode", ["fused", "side", "auto"])
def test_capture_returns_this_batchs_inputs_under_the_skills_weights(mode):
    """capture = the inputs a plain hook sees when that batch runs alone with that skill, in
    every mode; the hooks are gone afterwards; bad keys and skills are named."""
    snap, batch = make_snapshot(), make_batch(3, seed=7)
    rt = PolicyRuntime(ToyBackend(), snap, mode=mode)
    ref = PolicyRuntime(ToyBackend(), snap, mode="fused")
    for skill in (None, "pick", "place", "wipe"):
        got = rt.capture(batch, ["v.weight", "fc1"], skill)
        assert set(got) == {"v.weight", "fc1"}
        want_v = _hooked_inputs(ref.backend.module, "v", lambda: ref.infer(batch, [skill] * 3))
        want_fc1 = _hooked_inputs(ref.backend.module, "fc1",
                                  lambda: ref.infer(batch, [skill] * 3))
        assert got["v.weight"].dtype == torch.float32 and got["v.weight"].shape == (3 * 9, HID)
        torch.testing.assert_close(got["v.weight"], want_v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["fc1"], want_fc1, rtol=1e-5, atol=1e-6)
    for name, mod in rt.backend.module.named_modules():
        assert not mod._forward_pre_hooks, name
    with pytest.raises(InputError, match="no module 'nope'"):
        rt.capture(batch, ["nope.weight"])
    with pytest.raises(StateError, match="unknown skill"):
        rt.capture(batch, ["v.weight"], "fly")
    # the captured skill's weights do not leak into the next inference
    np.testing.assert_allclose(rt.infer(batch, [None] * 3),
                               reference_actions(snap, batch, [None] * 3), rtol=1e-5, atol=1e-5)


def test_runtime_places_the_backend_through_to(monkeypatch):
    """The runtime moves/casts only through ``PolicyBackend.to`` and never writes attributes."""
    be = ToyBackend()
    calls = []
    real_to = PolicyBackend.to
    monkeypatch.setattr(ToyBackend, "to", lambda self, device=None, dtype=None: (
        calls.append((device, dtype)), real_to(self, device, dtype))[1], raising=False)
    before = dict(vars(be))
    rt = PolicyRuntime(be, make_snapshot(), mode="fused", dtype=torch.bfloat16)
    assert calls == [(torch.device("cpu"), None), (None, torch.bfloat16)]
    assert {k for k in vars(be) if k not in before or vars(be)[k] is not before[k]} == set()
    assert {p.dtype for p in be.module.parameters()} == {torch.bfloat16}
    assert rt.infer(make_batch(2), ["pick", None]).dtype == np.float32
