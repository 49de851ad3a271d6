"""Baseline merge methods on tiny hand-made tensors with hand-computed expectations.

Every expected value below is written out by hand (or with the closed-form formula of the method
on literal numbers), never by calling the code under test a second way.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from policy_server.errors import InputError, StateError
from policy_server.tensors.entries import Dense, Masked, skill_delta
from policy_server.merge.methods import (
    METHODS,
    TensorContext,
    TensorState,
    build_options,
    get_method,
)
from policy_server.merge.methods.dare import dare_drop
from policy_server.merge.methods.opcm import LAM_KEY, NORM_SUM_KEY, opcm_project
from policy_server.merge.methods.tsv import tsv_factors

BASELINES = ("task_arithmetic", "ties", "dare", "tall_mask", "tsv", "resmerge", "magmax", "opcm")

T = torch.tensor


def make(name: str, seed: int = 0, **options):
    cls = get_method(name)
    return cls(build_options(cls, options), seed=seed)


def ctx_for(name: str, tau: torch.Tensor, dense: bool = False) -> TensorContext:
    return TensorContext(name=name, shape=tuple(tau.shape), dense=dense)


def assert_close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=0), f"\n{actual}\n!=\n{expected}"


def admit_all(method, name, taus):
    """Admit taus in order through the continual interface; return the list of AdmitResults."""
    state, results = TensorState(), []
    for t, tau in enumerate(taus, start=1):
        res = method.admit_tensor(ctx_for(name, tau), tau, state, t, f"skill{t}")
        results.append(res)
        state = TensorState(core=res.core, aux=res.aux)
    return results


# ---------------------------------------------------------------------------------------------
# registry, options


def test_registry_lookup_by_name_and_alias():
    assert get_method("ta") is get_method("task_arithmetic") is get_method("task-arithmetic")
    assert get_method("tall") is get_method("tall-mask") is get_method("mergevla-mask")
    assert get_method("tall_mask").name == "tall_mask"
    assert get_method("TIES").name == "ties"
    for name in BASELINES:
        assert name in METHODS


def test_registry_unknown_name_lists_known_methods():
    with pytest.raises(InputError, match="unknown merge method 'tiez'.*ties"):
        get_method("tiez")


def test_method_flags():
    assert get_method("tall_mask").per_skill
    for name in ("task_arithmetic", "magmax", "opcm"):
        assert get_method(name).continual, name
    for name in ("ties", "dare", "tall_mask", "tsv", "resmerge"):
        assert not get_method(name).continual, name


@pytest.mark.parametrize("name", BASELINES)
def test_every_option_has_help(name):
    cls = get_method(name)
    for f in dataclasses.fields(cls.options_cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    cls(None).options_dict()  # defaults construct and serialise


@pytest.mark.parametrize("name, options, message", [
    ("ta", {"lam": "abc"}, "lam must be a number"),
    ("ta", {"lam": float("nan")}, "lam must be finite"),
    ("ties", {"density": 0.0}, r"density must be in \(0.0, 1.0\]"),
    ("ties", {"trim_scope": "layer"}, "trim_scope must be one of"),
    ("ties", {"merge_func": "median"}, "merge_func must be one of"),
    ("dare", {"p": 1.0}, r"p must be in \[0.0, 1.0\)"),
    ("dare", {"combine": "magmax"}, "combine must be one of"),
    ("tall", {"lam": -0.1}, "lam must be in"),
    ("tall", {"head_patterns": [3]}, "head_patterns must be a list"),
    ("tsv", {"keep_fraction": 1.5}, "keep_fraction must be in"),
    ("resmerge", {"rank_topk": 0}, "rank_topk must be an integer >= 1"),
    ("resmerge", {"beta_min": 0.9, "beta_max": 0.5}, "beta_min .* must be <= beta_max"),
    ("magmax", {"lam": 0.0}, "lam must be in"),
    ("opcm", {"alpha": 1.0}, r"alpha must be in \[0.0, 1.0\)"),
    ("ties", {"threshold": 20}, "has no option"),
    ("dare", {"rescale": "maybe"}, "rescale must be true or false"),
    ("opcm", {"zero_diagonal": 2}, "zero_diagonal must be true or false"),
    ("resmerge", {"rank_topk": 1.5}, "rank_topk must be an integer"),
])
def test_bad_options_raise_input_error(name, options, message):
    cls = get_method(name)
    with pytest.raises(InputError, match=message):
        build_options(cls, options)


def test_string_option_values_are_parsed_not_truthy():
    # a CLI / JSON layer may hand over strings: "false" must not become True
    assert make("dare", rescale="false").options.rescale is False
    assert make("opcm", zero_diagonal="0").options.zero_diagonal is False
    assert make("resmerge", rank_topk="3").options.rank_topk == 3
    assert make("ties", density="0.3").options.density == 0.3
    assert make("tall", head_patterns="a.*, b.*").options.head_patterns == ["a.*", "b.*"]


def test_shape_mismatch_names_tensor():
    m = make("ties")
    ctx = TensorContext("layer.w", (2, 3))
    with pytest.raises(InputError, match=r"'layer.w' has shape \(3, 2\), expected \(2, 3\)"):
        m.merge_tensor(ctx, [torch.zeros(2, 3), torch.zeros(3, 2)])
    with pytest.raises(InputError, match="no task vectors"):
        m.merge_tensor(ctx, [])


# ---------------------------------------------------------------------------------------------
# task arithmetic


def test_task_arithmetic_one_shot_hand_computed():
    m = make("ta", lam=0.5)
    taus = [T([[1.0, 2.0], [3.0, 4.0]]), T([[1.0, -2.0], [0.0, 0.5]])]
    res = m.merge_tensor(ctx_for("w", taus[0]), taus)
    assert_close(res.core, [[1.0, 0.0], [1.5, 2.25]])
    assert res.entries == [None, None]


def test_task_arithmetic_default_lam_and_continual_equals_one_shot():
    assert make("ta").options.lam == 0.3
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(4, 3, generator=g) for _ in range(3)]
    m = make("ta", lam=0.3)
    one_shot = m.merge_tensor(ctx_for("w", taus[0]), taus).core
    results = admit_all(m, "w", taus)
    assert_close(results[-1].core, one_shot, atol=1e-6)
    # after the first admission the core is lam * tau_1 and the skill has no entry
    assert_close(results[0].core, 0.3 * taus[0])
    assert all(r.entry is None for r in results)


# ---------------------------------------------------------------------------------------------
# TIES

TIES_TAUS = [
    T([[3.0, -1.0, 0.5], [-2.0, 4.0, -0.2]]),   # top-3 |.|: 4, 3, 2
    T([[-1.0, 2.0, -3.0], [0.1, 5.0, 1.0]]),    # top-3 |.|: 5, 3, 2
    T([[2.0, -4.0, 1.0], [-1.5, -0.5, 0.3]]),   # top-3 |.|: 4, 2, 1.5
]
# trimmed: [[3,0,0],[-2,4,0]], [[0,2,-3],[0,5,0]], [[2,-4,0],[-1.5,0,0]]
# mass:    [[5,-2,-3],[-3.5,9,0]] -> signs [[+,-,-],[-,+,0]]


@pytest.mark.parametrize("options, expected", [
    ({}, [[2.5, -4.0, -3.0], [-1.75, 4.5, 0.0]]),                        # disjoint mean
    ({"merge_func": "sum"}, [[5.0, -4.0, -3.0], [-3.5, 9.0, 0.0]]),
    ({"merge_func": "max"}, [[3.0, -4.0, -3.0], [-2.0, 5.0, 0.0]]),
    # count: (0,1) has signs {0, +, -} -> elected 0 -> merged 0
    ({"consensus": "count"}, [[2.5, 0.0, -3.0], [-1.75, 4.5, 0.0]]),
    ({"lam": 2.0}, [[5.0, -8.0, -6.0], [-3.5, 9.0, 0.0]]),
])
def test_ties_trim_elect_disjoint_hand_computed(options, expected):
    m = make("ties", density=0.5, **options)
    res = m.merge_tensor(ctx_for("w", TIES_TAUS[0]), TIES_TAUS)
    assert_close(res.core, expected)
    assert res.entries == [None, None, None]
    assert res.info["kept_fraction"] == pytest.approx(9 / 18)


def test_ties_density_one_keeps_everything_but_zeros():
    taus = [T([1.0, -2.0, 0.0]), T([3.0, 1.0, 0.0])]
    res = make("ties", density=1.0).merge_tensor(ctx_for("b", taus[0]), taus)
    # signs: +, - (mass -1), 0 -> coordinate 2 stays 0
    assert_close(res.core, [2.0, -2.0, 0.0])


GLOBAL_A = [T([8.0, 7.0, 6.0, 5.0]), T([0.1, 0.2, 0.3, 0.4])]
GLOBAL_B = [T([1.0, 0.5, 2.0, -0.25]), T([5.0, 6.0, 7.0, 8.0])]


def test_ties_global_trim_ranks_over_all_tensors():
    # density 0.5 over 8 entries per task -> k = 4: task 0 keeps all of A, task 1 all of B
    m = make("ties", density=0.5, trim_scope="global")
    assert m.needs_observe_pass
    ca, cb = TensorContext("a", (4,)), TensorContext("b", (4,))
    m.observe_tensor(ca, GLOBAL_A)
    m.observe_tensor(cb, GLOBAL_B)
    # merge order must not matter
    assert_close(m.merge_tensor(cb, GLOBAL_B).core, [5.0, 6.0, 7.0, 8.0])
    assert_close(m.merge_tensor(ca, GLOBAL_A).core, [8.0, 7.0, 6.0, 5.0])


def test_ties_tensor_trim_differs_from_global():
    m = make("ties", density=0.5)  # per tensor: k = 2 of 4
    assert not m.needs_observe_pass
    assert_close(m.merge_tensor(TensorContext("a", (4,)), GLOBAL_A).core, [8.0, 7.0, 0.3, 0.4])
    # task 0 keeps 2 and 1 of B, task 1 keeps 7 and 8
    assert_close(m.merge_tensor(TensorContext("b", (4,)), GLOBAL_B).core, [1.0, 0.0, 4.5, 8.0])


def test_ties_trim_keeps_entries_tied_with_the_kth_largest():
    # k = int(0.5 * 4) = 2 -> threshold |.| = 1, both 1s survive (FusionBench's >= kthvalue rule)
    res = make("ties", density=0.5).merge_tensor(TensorContext("v", (4,)),
                                                 [T([3.0, 1.0, -1.0, 0.5])])
    assert_close(res.core, [3.0, 1.0, -1.0, 0.0])


def test_ties_global_observe_pass_checks_and_restarts():
    m = make("ties", density=0.5, trim_scope="global")
    ca = TensorContext("a", (4,))
    m.observe_tensor(ca, GLOBAL_A)
    with pytest.raises(StateError, match="observed twice"):
        m.observe_tensor(ca, GLOBAL_A)
    with pytest.raises(StateError, match="has 1 task vectors"):
        m.observe_tensor(TensorContext("b", (4,)), GLOBAL_B[:1])
    m.merge_tensor(ca, GLOBAL_A)
    with pytest.raises(StateError, match="not in the observe pass"):
        m.merge_tensor(TensorContext("c", (4,)), GLOBAL_A)
    # a second run with the same instance starts a fresh histogram: now A alone is ranked
    # (k = 2 of 4 per task) and task 1 keeps 0.3 and 0.4
    m.observe_tensor(ca, GLOBAL_A)
    assert_close(m.merge_tensor(ca, GLOBAL_A).core, [8.0, 7.0, 0.3, 0.4])


def test_ties_global_trim_without_observe_pass_is_an_error():
    m = make("ties", trim_scope="global")
    with pytest.raises(StateError, match="observe pass"):
        m.merge_tensor(TensorContext("a", (4,)), GLOBAL_A)


# ---------------------------------------------------------------------------------------------
# DARE


def test_dare_drop_rate_and_rescale():
    tau = torch.ones(200, 100)
    m = make("dare", p=0.3, lam=1.0)
    core = m.merge_tensor(ctx_for("w", tau), [tau]).core
    kept = core != 0
    # kept entries are rescaled by exactly 1/(1-p); dropped ones are 0
    assert_close(core[kept], torch.full((int(kept.sum()),), 1.0 / 0.7))
    # Binomial(20000, 0.7): sd of the fraction = sqrt(0.21 / 20000) ~ 0.0032; 5 sd bound
    assert abs(float(kept.float().mean()) - 0.7) < 0.016
    # rescaling keeps the expected value: mean of the dropped vector ~ 1
    assert abs(float(core.mean()) - 1.0) < 0.016 / 0.7
    no_rescale = make("dare", p=0.3, lam=1.0, rescale=False).merge_tensor(ctx_for("w", tau), [tau])
    assert set(no_rescale.core.unique().tolist()) == {0.0, 1.0}


def test_dare_is_deterministic_per_seed_and_tensor_name_not_order():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    ca, cb = TensorContext("layer.a", (30, 20)), TensorContext("layer.b", (30, 20))
    m1, m2 = make("dare", seed=7, p=0.5), make("dare", seed=7, p=0.5)
    ra1, rb1 = m1.merge_tensor(ca, [a, b]).core, m1.merge_tensor(cb, [b, a]).core
    rb2, ra2 = m2.merge_tensor(cb, [b, a]).core, m2.merge_tensor(ca, [a, b]).core  # other order
    assert torch.equal(ra1, ra2) and torch.equal(rb1, rb2)
    other_seed = make("dare", seed=8, p=0.5).merge_tensor(ca, [a, b]).core
    assert not torch.equal(ra1, other_seed)
    # the same values under another tensor name get another mask
    same_values_other_name = make("dare", seed=7, p=0.5).merge_tensor(cb, [a, b]).core
    assert not torch.equal(ra1, same_values_other_name)
    # dare_drop itself is a pure function of its seed
    assert torch.equal(dare_drop(a, 0.5, True, 1), dare_drop(a, 0.5, True, 1))
    assert not torch.equal(dare_drop(a, 0.5, True, 1), dare_drop(a, 0.5, True, 2))


def test_dare_p0_equals_task_arithmetic_and_ties():
    taus = TIES_TAUS
    ctx = ctx_for("w", taus[0])
    dare_ta = make("dare", p=0.0).merge_tensor(ctx, taus).core        # default lam 0.3 for ta
    assert_close(dare_ta, 0.3 * (taus[0] + taus[1] + taus[2]))
    dare_ties = make("dare", p=0.0, combine="ties", ties_density=0.5).merge_tensor(ctx, taus).core
    assert_close(dare_ties, [[2.5, -4.0, -3.0], [-1.75, 4.5, 0.0]])  # = the TIES hand example


# ---------------------------------------------------------------------------------------------
# TALL / MergeVLA masks

TALL_TAUS = [T([1.0, 0.0, 2.0, -1.0]), T([1.0, 3.0, -2.0, 0.0]), T([0.0, 0.0, 1.0, 1.0])]
# tau_MTL = [2, 3, 1, 0]; lam * |tau_MTL - tau_i| with lam 0.6:
#  1: [0.6, 1.8, 0.6, 0.6] vs |tau_1| [1, 0, 2, 1] -> [T, F, T, T]
#  2: [0.6, 0.0, 1.8, 0.0] vs |tau_2| [1, 3, 2, 0] -> [T, T, T, F]   (0 > 0 is false)
#  3: [1.2, 1.8, 0.0, 0.6] vs |tau_3| [0, 0, 1, 1] -> [F, F, T, T]
TALL_MASKS = [[True, False, True, True], [True, True, True, False], [False, False, True, True]]


def test_tall_mask_formula_hand_computed():
    m = make("tall")
    assert m.options.lam == 0.6
    res = m.merge_tensor(ctx_for("vlm.q_proj.lora_B", TALL_TAUS[0]), TALL_TAUS)
    assert_close(res.core, [2.0, 3.0, 1.0, 0.0])
    for entry, expected in zip(res.entries, TALL_MASKS):
        assert isinstance(entry, Masked) and entry.mask.dtype == torch.bool
        assert entry.mask.tolist() == expected
    # skill 2 runs theta0 + m_2 * tau_MTL
    assert_close(skill_delta(res.core, res.entries[1], (4,)), [2.0, 3.0, 1.0, 0.0])
    assert_close(skill_delta(res.core, res.entries[2], (4,)), [0.0, 0.0, 1.0, 0.0])
    assert res.info["mask_density"] == [0.75, 0.75, 0.5]


def test_tall_mask_lambda_and_mtl_scale():
    # lam = 0.2: thresholds [0.2, 0.6, 0.2, 0.2] / [0.2, 0, 0.6, 0] / [0.4, 0.6, 0, 0.2]
    res = make("tall", lam=0.2).merge_tensor(TensorContext("w", (4,)), TALL_TAUS)
    assert [e.mask.tolist() for e in res.entries] == [
        [True, False, True, True], [True, True, True, False], [False, False, True, True]]
    # mtl_scale 0.5: tau_MTL = [1, 1.5, 0.5, 0]; skill 1: 0.6*|[0, 1.5, -1.5, 1]| = [0, .9, .9, .6]
    res = make("tall", mtl_scale=0.5).merge_tensor(TensorContext("w", (4,)), TALL_TAUS)
    assert_close(res.core, [1.0, 1.5, 0.5, 0.0])
    assert res.entries[0].mask.tolist() == [True, False, True, True]
    # skill 3: 0.6*|[1, 1.5, -0.5, -1]| = [0.6, 0.9, 0.3, 0.6] vs [0, 0, 1, 1]
    assert res.entries[2].mask.tolist() == [False, False, True, True]


def test_tall_mask_expert_head_and_averaged_blocks():
    m = make("tall", head_patterns=["action_expert.blocks.3.*"],
             average_patterns="action_expert.blocks.0.*,action_expert.blocks.1.*")
    head = m.merge_tensor(TensorContext("action_expert.blocks.3.out.weight", (4,)), TALL_TAUS)
    assert_close(head.core, [2 / 3, 1.0, 1 / 3, 0.0])
    for entry, tau in zip(head.entries, TALL_TAUS):
        assert isinstance(entry, Dense)
        # each skill runs its own head exactly
        assert_close(skill_delta(head.core, entry, (4,)), tau)
    avg = m.merge_tensor(TensorContext("action_expert.blocks.1.ff.weight", (4,)), TALL_TAUS)
    assert_close(avg.core, [2 / 3, 1.0, 1 / 3, 0.0])
    assert avg.entries == [None, None, None]
    other = m.merge_tensor(TensorContext("action_expert.blocks.2.ff.weight", (4,)), TALL_TAUS)
    assert [e.mask.tolist() for e in other.entries] == TALL_MASKS


# ---------------------------------------------------------------------------------------------
# TSV-Merge


def test_tsv_orthogonal_tasks_reduce_to_sum():
    # tau_1 = 3 e1 f1^T, tau_2 = 2 e2 f2^T: k = int(3 / 2) = 1 each, already orthogonal
    tau1 = torch.zeros(3, 3); tau1[0, 1] = 3.0
    tau2 = torch.zeros(3, 3); tau2[2, 0] = -2.0
    res = make("tsv").merge_tensor(TensorContext("w", (3, 3)), [tau1, tau2])
    assert_close(res.core, tau1 + tau2, atol=1e-5)
    assert res.info["rank_per_task"] == 1


def test_tsv_single_task_full_spectrum_is_exact():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(5, 4, generator=g)
    res = make("tsv", lam=2.0).merge_tensor(TensorContext("w", (5, 4)), [tau])
    assert_close(res.core, 2.0 * tau, atol=1e-5)


def test_tsv_whitened_factors_are_orthonormal():
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(8, 6, generator=g)
    taus = [shared + 0.5 * torch.randn(8, 6, generator=g) for _ in range(3)]  # interfering tasks
    u_o, s, v_o = tsv_factors(taus)                   # k = int(6 / 3) = 2 per task
    assert u_o.shape == (8, 6) and s.shape == (6,) and v_o.shape == (6, 6)
    eye = torch.eye(6)
    assert_close(u_o.T @ u_o, eye, atol=1e-5)
    assert_close(v_o.T @ v_o, eye, atol=1e-5)
    # the polar factor is U (U^T U)^{-1/2} (independent formula via eigh)
    u_cat = torch.cat([torch.linalg.svd(t, full_matrices=False)[0][:, :2] for t in taus], 1)
    w, q = torch.linalg.eigh(u_cat.T @ u_cat)
    assert_close(u_o, u_cat @ (q * w.rsqrt()) @ q.T, atol=1e-4)
    # hence the merged matrix has exactly the kept task singular values as its spectrum
    res = make("tsv").merge_tensor(TensorContext("w", (8, 6)), taus)
    assert_close(torch.linalg.svdvals(res.core), s.sort(descending=True).values, atol=1e-4)


def test_tsv_more_tasks_than_directions_still_whitens_rows():
    # min(m, n) = 2 < N = 3: one direction per task, 3 > 2 columns -> orthonormal rows
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(2, 5, generator=g) for _ in range(3)]
    u_o, s, v_o = tsv_factors(taus)
    assert u_o.shape == (2, 3) and s.shape == (3,) and v_o.shape == (5, 3)
    assert_close(u_o @ u_o.T, torch.eye(2), atol=1e-5)
    assert_close(v_o.T @ v_o, torch.eye(3), atol=1e-5)
    # each task's leading singular value is kept
    assert_close(s, torch.stack([torch.linalg.svdvals(t)[0] for t in taus]), atol=1e-5)


def test_tsv_vectors_and_mean_patterns_are_averaged():
    res = make("tsv").merge_tensor(TensorContext("b", (2,)), [T([1.0, 2.0]), T([3.0, 4.0])])
    assert_close(res.core, [2.0, 3.0])
    m = make("tsv", mean_patterns=["*text_projection*"])
    taus = [T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 3.0]])]
    assert_close(m.merge_tensor(TensorContext("text_projection", (2, 2)), taus).core,
                 [[0.5, 0.0], [0.0, 1.5]])


# ---------------------------------------------------------------------------------------------
# ResMerge

ATTN = "layers.0.self_attn.q_proj.weight"


def test_resmerge_identical_experts_attenuate_the_head():
    # tau = diag(3, 1): head diag(3, 0), residual diag(0, 1); consensus keeps the residual, the
    # head returns only as 0.2 * |backbone| along the mean head direction
    tau = T([[3.0, 0.0], [0.0, 1.0]])
    res = make("resmerge").merge_tensor(TensorContext(ATTN, (2, 2)), [tau, tau.clone()])
    assert_close(res.core, [[0.2, 0.0], [0.0, 1.0]], atol=1e-6)
    assert res.info["head_agreement"] == pytest.approx(1.0)


def test_resmerge_conflicting_heads_get_no_correction():
    taus = [T([[3.0, 0.0], [0.0, 1.0]]), T([[-3.0, 0.0], [0.0, 1.0]])]
    res = make("resmerge").merge_tensor(TensorContext(ATTN, (2, 2)), taus)
    assert_close(res.core, [[0.0, 0.0], [0.0, 1.0]], atol=1e-6)
    assert res.info["head_agreement"] == 0.0


@pytest.mark.parametrize("name, family", [(ATTN, True), ("layers.0.conv.weight", False)])
def test_resmerge_spherical_consensus_hand_computed(name, family):
    # heads 5 E11 (both); residuals R1 = E22 (|1|), R2 = 1.2 E22 + 1.6 E33 (|2|)
    taus = [torch.diag(T([5.0, 1.0, 0.0])), torch.diag(T([5.0, 1.2, 1.6]))]
    cos12 = 0.6
    q = torch.diag(T([0.0, 1.6, 0.8])) / math.sqrt(3.2)   # normalised q1 + q2
    c = 2 / math.sqrt(5)                                   # mean_i <q_i, q> = 1.6 / sqrt(3.2)
    score = 0.5 * ((cos12 + 1) / 2 + (c + 1) / 2) if family else 0.0
    beta = 1.0 - (1.0 - 0.7) * score
    eff = c ** beta * 1.5                                  # 1.5 = mean residual norm
    expected = q * eff
    expected[0, 0] = 0.2 * eff                             # head correction, agreement 1
    res = make("resmerge").merge_tensor(TensorContext(name, (3, 3)), taus)
    assert_close(res.core, expected, atol=1e-5)
    assert res.info["srca"] == "consensus"
    assert res.info["beta"] == pytest.approx(beta, abs=1e-5)


def test_resmerge_partial_head_agreement_scales_the_correction():
    # tau_1 = 5 E11 + E22; tau_2 rows (3, 4, 0) and (-0.8, 0.6, 0) are orthogonal, so its head is
    # e1 (3, 4, 0) (s = 5) and residual e2 (-0.8, 0.6, 0) (s = 1); heads' cosine = 3/5
    taus = [torch.diag(T([5.0, 1.0, 0.0])),
            T([[3.0, 4.0, 0.0], [-0.8, 0.6, 0.0], [0.0, 0.0, 0.0]])]
    r1 = torch.zeros(3, 3); r1[1, 1] = 1.0
    r2 = torch.zeros(3, 3); r2[1, 0], r2[1, 1] = -0.8, 0.6
    c = 1.6 / math.sqrt(3.2)                 # <q_i, q> for q = (r1 + r2) / sqrt(2 + 2 * 0.6)
    eff = c ** 1.0 * 1.0                     # non-attention key: beta = beta_max; mean norm 1
    expected = (r1 + r2) / math.sqrt(3.2) * eff
    head_dir = torch.zeros(3, 3); head_dir[0, 0], head_dir[0, 1] = 4.0, 2.0   # mean head
    expected += head_dir / math.sqrt(20.0) * (0.2 * 0.6 * eff)
    res = make("resmerge").merge_tensor(TensorContext("layers.0.conv.weight", (3, 3)), taus)
    assert res.info["head_agreement"] == pytest.approx(0.6, abs=1e-6)
    assert_close(res.core, expected, atol=1e-5)


def test_resmerge_incoherent_residuals_fall_back_to_mean():
    # residuals E22, 2 E33, -0.6 E22 + 0.8 E44: coherence ~0.447 <= 1/sqrt(3) -> mean
    taus = [torch.diag(T([5.0, 1.0, 0.0, 0.0])), torch.diag(T([5.0, 0.0, 2.0, 0.0])),
            torch.diag(T([5.0, -0.6, 0.0, 0.8]))]
    res = make("resmerge").merge_tensor(TensorContext(ATTN, (4, 4)), taus)
    mean_r = torch.diag(T([0.0, 0.4, 2.0, 0.8])) / 3
    expected = mean_r.clone()
    expected[0, 0] = 0.2 * math.sqrt(0.16 + 4.0 + 0.64) / 3
    assert_close(res.core, expected, atol=1e-6)
    assert res.info["srca"] == "mean"


def test_resmerge_embeddings_and_vectors_are_averaged():
    taus = [T([[1.0, 2.0], [3.0, 4.0]]), T([[3.0, 0.0], [1.0, 0.0]])]
    res = make("resmerge").merge_tensor(TensorContext("model.embed_tokens.weight", (2, 2)), taus)
    assert_close(res.core, [[2.0, 1.0], [2.0, 2.0]])
    res = make("resmerge").merge_tensor(TensorContext("x.bias", (2,)),
                                        [T([1.0, 0.0]), T([0.0, 1.0])])
    assert_close(res.core, [0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# MagMax

MAGMAX_TAUS = [T([1.0, -3.0, 0.5, 2.0]), T([-2.0, 1.0, 0.5, -1.0]), T([0.5, 4.0, -3.0, -2.0])]
# max |.|: coord 0 -> -2 (t2), 1 -> 4 (t3), 2 -> -3 (t3), 3 -> tie 2 / -2: first (t1) wins -> 2
MAGMAX_EXPECTED = [-1.0, 2.0, -1.5, 1.0]  # * lam 0.5


def test_magmax_one_shot_hand_computed():
    res = make("magmax").merge_tensor(TensorContext("w", (4,)), MAGMAX_TAUS)
    assert_close(res.core, MAGMAX_EXPECTED)


def test_magmax_online_matches_offline_and_ties_keep_the_earlier_expert():
    results = admit_all(make("magmax"), "w", MAGMAX_TAUS)
    assert_close(results[0].core, [0.5, -1.5, 0.25, 1.0])
    assert_close(results[1].core, [-1.0, -1.5, 0.25, 1.0])     # only coord 0 beats the core
    assert_close(results[2].core, MAGMAX_EXPECTED)
    assert results[1].info["replaced_fraction"] == 0.25
    res = make("magmax", lam=1.0).admit_tensor(TensorContext("w", (4,)), MAGMAX_TAUS[2],
                                               TensorState(core=T([1.0, -5.0, 3.0, 2.0])), 2, "s")
    assert_close(res.core, [1.0, -5.0, 3.0, 2.0])               # 0.5<1, 4<5, |-3| = 3, |-2| = 2


# ---------------------------------------------------------------------------------------------
# OPCM


def test_opcm_projection_hand_computed():
    merged = T([[3.0, 0.0], [0.0, 1.0]])           # U = V = I, S = [3, 1]: cum shares 0.75, 1
    tau = T([[1.0, 2.0], [3.0, 4.0]])
    out, r = opcm_project(tau, merged, alpha=0.8, zero_diagonal=False)
    assert r == 1
    assert_close(out, [[0.0, 2.0], [3.0, 4.0]], atol=1e-6)
    out, r = opcm_project(tau, merged, alpha=0.8, zero_diagonal=True)
    assert_close(out, [[0.0, 2.0], [3.0, 0.0]], atol=1e-6)
    out, r = opcm_project(tau, merged, alpha=0.5, zero_diagonal=False)   # 0.75 > 0.5: nothing
    assert r == 0
    assert_close(out, tau)


def test_opcm_projected_update_is_orthogonal_to_previous_subspace():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(7, 5, generator=g))
    v, _ = torch.linalg.qr(torch.randn(6, 5, generator=g))
    s = T([8.0, 4.0, 2.0, 1.0, 0.5])
    merged = (u * s) @ v.T                          # cum shares 0.52, 0.78, 0.91, 0.97, 1
    tau = torch.randn(7, 6, generator=g)
    for zero_diagonal in (False, True):
        out, r = opcm_project(tau, merged, alpha=0.8, zero_diagonal=zero_diagonal)
        assert r == 2
        ur, vr = u[:, :2], v[:, :2]
        assert float((ur.T @ out @ vr).abs().max()) < 1e-5
        # only the protected block (and the diagonal) is removed: other directions survive
        kept = u[:, 2:].T @ out @ v[:, 2:]
        full = u[:, 2:].T @ tau @ v[:, 2:]
        if zero_diagonal:
            full = full - torch.diag(torch.diagonal(full))
        assert_close(kept, full, atol=1e-5)
        # projecting twice changes nothing
        again, _ = opcm_project(out, merged, alpha=0.8, zero_diagonal=zero_diagonal)
        assert_close(again, out, atol=1e-5)


def test_opcm_admission_scales_to_mean_task_norm():
    m = make("opcm", alpha=0.8)
    tau1, tau2 = T([[3.0, 0.0], [0.0, 1.0]]), T([[1.0, 2.0], [3.0, 4.0]])
    r1, r2 = admit_all(m, "w", [tau1, tau2])
    assert_close(r1.core, tau1)
    assert float(r1.aux[LAM_KEY][0]) == 1.0
    # S = M_1 + [[0,2],[3,0]] = [[3,2],[3,1]], |S| = sqrt(23); mean norm (sqrt(10)+sqrt(30))/2
    avg = (math.sqrt(10) + math.sqrt(30)) / 2
    assert_close(r2.core, T([[3.0, 2.0], [3.0, 1.0]]) * (avg / math.sqrt(23)), atol=1e-5)
    assert float(r2.aux[LAM_KEY][0]) == pytest.approx(math.sqrt(23) / avg, rel=1e-5)
    assert float(r2.aux[NORM_SUM_KEY][0]) == pytest.approx(math.sqrt(10) + math.sqrt(30), rel=1e-6)
    assert r2.info["rank"] == 1


def test_opcm_vectors_sum_then_rescale_with_carried_lambda():
    b1, b2, b3 = T([3.0, 4.0]), T([0.0, 5.0]), T([4.0, -3.0])   # all of norm 5
    results = admit_all(make("opcm"), "x.bias", [b1, b2, b3])
    assert_close(results[1].core, T([3.0, 9.0]) * (5 / math.sqrt(90)), atol=1e-5)
    # lam_2 * M_2 + b3 = b1 + b2 + b3 = [7, 6]
    assert_close(results[2].core, T([7.0, 6.0]) * (5 / math.sqrt(85)), atol=1e-5)
    one_shot = make("opcm").merge_tensor(TensorContext("x.bias", (2,)), [b1, b2, b3])
    assert_close(one_shot.core, results[2].core)


def test_opcm_tensor_first_touched_later_counts_earlier_zero_task_vectors():
    # earlier experts left the tensor untouched (zero tau): mean norm = 5 / 2 at t = 2
    m = make("opcm")
    res = m.admit_tensor(TensorContext("x.bias", (2,)), T([3.0, 4.0]), TensorState(), 2, "s2")
    assert_close(res.core, [1.5, 2.0])
    assert float(res.aux[LAM_KEY][0]) == pytest.approx(2.0)
    with pytest.raises(StateError, match="lacks"):
        m.admit_tensor(TensorContext("x.bias", (2,)), T([3.0, 4.0]),
                       TensorState(core=T([1.0, 1.0])), 2, "s2")
