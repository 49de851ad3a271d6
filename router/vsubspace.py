"""Value-subspace router (MergeVLA): route by the first observation, no text needed.

Requires a model whose action expert has value projections (its ``RoutingFeatures``, see
``policy_server.models.features``, lists them, e.g. the demo VLA's
``action_expert.{blocks.i,head}.cross_attn.v_proj.weight``).

At admission (the expert is discarded afterwards, so this is the only chance) ``VSubspaceHook`` keeps,
for one chosen value projection ``W_v`` (out, in) of the *expert* (base + tau), the top-k (default 8)
right singular vectors ``V_s = Vh[:k]`` (k, in) float32: the input directions that skill's value
projection responds to most. They are stored with the skill as ``value_subspace::<key>`` (plus the
singular values ``value_subspace_s::<key>``), the artifact layout of
``policy_server.merge.hooks.ValueSubspaceHook``, which this hook extends.

At episode start, ``VSubspaceRouter`` gets the hidden states X (T, in) entering that value
projection for the first observation from its feature function and scores every skill by the mean
relative projection norm

    score_s = mean_t ||V_s x_t|| / ||x_t||        in [0, 1]

(MergeVLA uses the mean projection norm; dividing by ||x_t|| makes the score independent of the
activation scale, so one temperature fits every model), then confidence = softmax(score / T) and
argmax, with the same abstention thresholds as the text router.

"With that skill's parameters" (MergeVLA): MergeVLA computes X with each skill's own model, which
costs one forward per skill. By default (``per_skill=False``) we run ONE forward with the served
weights (base + core, no residual) and score every skill on the same X. This is an approximation:
the hidden states entering the chosen block differ between skills only through the residuals of the
*earlier* layers, which CARVE keeps small (the shared part lives in the core); choosing the first
action-expert block's value projection makes it exact for layers upstream of that block that no
residual touches. Pass ``per_skill=True`` with a ``feature_fn(observation, skill)`` that runs the
model with that skill active to get the exact MergeVLA rule at S forwards per episode.

The router never sees the runtime or the backend. A served model's features come from a *capture*
callable ``capture(observation, keys, skill=None) -> {key: float32 (N, in)}`` (the runtime's
lock-safe ``PolicyRuntime.capture``, through the micro-batcher), which ``capture_feature_fn`` turns
into a feature function; ``module_feature_fn`` does the same for a standalone module that nothing
else runs concurrently (offline tools, tests).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from policy_server.errors import InputError, StateError
from policy_server.merge.hooks import ValueSubspaceHook
from policy_server.runtime.capture import InputCapture
from router.base import RouteDecision, Router

log = logging.getLogger(__name__)

ARTIFACT_PREFIX = "value_subspace::"
DEFAULTS = {"temperature": 0.05, "min_confidence": 0.0, "min_margin": 0.0}


class VSubspaceHook(ValueSubspaceHook):
    """Admission hook keeping the top-k right singular vectors of ONE value projection.

    key: an exact weight key or a glob (every match is kept); default: the model's last value
    projection (``value_projection_names[-1]``: the expert head's, the most skill-specific).
    Artifacts: ``value_subspace::<key>`` float32 (k, in), ``value_subspace_s::<key>`` float32 (k,).
    """

    name = "vsubspace"

    def __init__(self, key: str | None = None, k: int = 8,
                 value_projection_names: Sequence[str] | None = None):
        if key is None:
            if not value_projection_names:
                raise InputError("value-subspace routing needs an action expert with value "
                                 "projections: pass key= (a weight name or glob) or a model "
                                 "whose routing features list value projections")
            key = list(value_projection_names)[-1]
        super().__init__(patterns=(key,), k=k)
        self.key = key

    @classmethod
    def from_features(cls, features, key: str | None = None, k: int = 8) -> "VSubspaceHook":
        """Hook for a model described by ``features`` (a ``RoutingFeatures``, e.g.
        ``backend.routing_features``)."""
        return cls(key, k, features.value_projections)


def bases_from_artifacts(artifacts: dict[str, torch.Tensor], key: str | None = None
                         ) -> tuple[str, torch.Tensor] | None:
    """Pick the stored basis (k, in) for ``key`` (exact or glob) from one skill's artifacts; with
    key None the skill must hold exactly one. Returns (weight key, basis) or None."""
    found = {n[len(ARTIFACT_PREFIX):]: t for n, t in artifacts.items()
             if n.startswith(ARTIFACT_PREFIX)}
    if key is not None:
        found = {k: v for k, v in found.items() if k == key or fnmatch.fnmatchcase(k, key)}
    if not found:
        return None
    if len(found) > 1:
        raise InputError(f"several value-subspace bases stored ({sorted(found)}): choose one with "
                         f"vsubspace_key")
    (k, v), = found.items()
    return k, v.to(torch.float32)


Capture = Callable[..., Mapping[str, torch.Tensor]]
"""capture(observation, keys, skill=None) -> {key: float32 (N, in)}: the inputs of the modules
owning ``keys`` while ``observation`` runs with ``skill`` (None = base + core)."""


def capture_feature_fn(capture: Capture, weight_key: str, per_skill: bool = False
                       ) -> Callable[..., torch.Tensor]:
    """The router's feature function over a capture callable: ``fn(observation)`` -> float32
    (T, in) entering ``weight_key`` with base + core, or with ``per_skill`` ``fn(observation,
    skill)`` with that skill's residuals (the exact MergeVLA rule, one forward per skill)."""
    if per_skill:
        def fn_skill(observation, skill: str) -> torch.Tensor:
            return capture(observation, [weight_key], skill)[weight_key]
        return fn_skill

    def fn(observation) -> torch.Tensor:
        return capture(observation, [weight_key], None)[weight_key]
    return fn


def module_feature_fn(model: nn.Module, weight_key: str, forward: Callable[[object], object]
                      ) -> Callable[[object], torch.Tensor]:
    """feature_fn(observation) -> float32 (T, in): runs ``forward(observation)`` (e.g. a
    standalone ``backend.predict``) and returns what entered the module owning ``weight_key``.
    Not safe when other threads run ``model`` meanwhile: for a served model use the runtime's
    ``capture`` through ``capture_feature_fn``."""

    def fn(observation) -> torch.Tensor:
        with InputCapture(model, [weight_key]) as cap, torch.no_grad():
            forward(observation)
        return cap.result()[weight_key]

    return fn


class VSubspaceRouter(Router):
    """Routes the first observation by value-subspace affinity (see the module docstring).

    bases: skill -> float32 (k, in) right singular vectors (rows need not be orthonormal after a
    dtype round trip: they are re-orthonormalised with a QR);
    feature_fn: observation -> float32 (T, in) hidden states entering the value projection, or
    (observation, skill) -> ... when ``per_skill`` is True.
    The instruction is ignored; without an observation the router abstains.
    """

    name = "vsubspace"

    def __init__(self, bases: dict[str, torch.Tensor],
                 feature_fn: Callable[..., torch.Tensor] | None,
                 temperature: float = DEFAULTS["temperature"],
                 min_confidence: float = DEFAULTS["min_confidence"],
                 min_margin: float = DEFAULTS["min_margin"], per_skill: bool = False,
                 key: str = ""):
        if not bases:
            raise InputError("the value-subspace router needs at least one skill basis")
        if temperature <= 0:
            raise InputError(f"router temperature must be > 0, got {temperature}")
        dims = {int(b.shape[-1]) for b in bases.values()}
        if len(dims) != 1 or any(b.ndim != 2 for b in bases.values()):
            raise InputError(f"value-subspace bases must all be (k, d) with one d; got shapes "
                             f"{ {s: tuple(b.shape) for s, b in bases.items()} }")
        self.skills = list(bases)
        self.dim = dims.pop()
        # QR of V^T (d, k): Q has orthonormal columns spanning the same subspace, so
        # ||Q^T x|| is the exact projection norm even after a float16 storage round trip.
        self._Q = [torch.linalg.qr(b.to(torch.float32).T).Q for b in bases.values()]
        self.feature_fn = feature_fn
        self.temperature = float(temperature)
        self.min_confidence = float(min_confidence)
        self.min_margin = float(min_margin)
        self.per_skill = bool(per_skill)
        self.key = key

    @classmethod
    def from_snapshot(cls, snapshot, feature_fn, key: str | None = None, **options
                      ) -> "VSubspaceRouter":
        """Read every skill's stored basis; skills admitted without the hook are left out (warned),
        and none at all is a StateError."""
        bases, keys, missing = {}, set(), []
        for name in snapshot.skill_names():
            got = bases_from_artifacts(snapshot.skill_artifacts(name) or {}, key)
            if got is None:
                missing.append(name)
                continue
            keys.add(got[0])
            bases[name] = got[1]
        if not bases:
            raise StateError("no skill in the merge state has a value-subspace basis: admit the "
                             "experts with the value-subspace hook (carve admit --router-hook "
                             "vsubspace) on a model with action-expert value projections")
        if len(keys) > 1:
            raise StateError(f"skills store bases of different value projections {sorted(keys)}; "
                             f"choose one with vsubspace_key")
        if missing:
            warnings.warn(f"value-subspace router: skills {missing} have no stored basis and can "
                          f"only be selected by id", RuntimeWarning, stacklevel=2)
        return cls(bases, feature_fn, key=keys.pop(), **options)

    def features(self, observation, skill: str | None = None) -> torch.Tensor:
        if self.feature_fn is None:
            raise InputError("the value-subspace router was built without a feature function "
                             "(it needs the served model)")
        x = self.feature_fn(observation, skill) if self.per_skill else self.feature_fn(observation)
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, self.dim)
        return x

    @staticmethod
    def _score(Q: torch.Tensor, x: torch.Tensor) -> float:
        """mean_t ||Q^T x_t|| / ||x_t||; x: (T, d), Q: (d, k)."""
        num = (x @ Q).norm(dim=1)
        return float((num / x.norm(dim=1).clamp_min(1e-12)).mean())

    def scores(self, observation) -> dict[str, float]:
        """Raw scores in [0, 1] per skill for the first observation."""
        if self.per_skill:
            return {s: self._score(Q, self.features(observation, s))
                    for s, Q in zip(self.skills, self._Q)}
        x = self.features(observation)
        return {s: self._score(Q, x) for s, Q in zip(self.skills, self._Q)}

    def probabilities(self, observation) -> dict[str, float]:
        sc = self.scores(observation)
        p = torch.softmax(torch.tensor([sc[s] for s in self.skills]) / self.temperature, 0)
        return {s: float(v) for s, v in zip(self.skills, p)}

    def route(self, instruction: str, observation=None) -> RouteDecision:
        if observation is None:
            return RouteDecision(None, 0.0, [(s, 0.0) for s in self.skills], 0.0, True,
                                 "the value-subspace router needs the first observation",
                                 self.name)
        sc = self.scores(observation)
        pr = torch.softmax(torch.tensor([sc[s] for s in self.skills]) / self.temperature, 0)
        order = torch.argsort(pr, descending=True, stable=True).tolist()
        cands = [(self.skills[j], float(pr[j])) for j in order]
        conf = cands[0][1]
        margin = conf - (cands[1][1] if len(cands) > 1 else 0.0)
        why = (f"value-subspace score {sc[cands[0][0]]:.3f} "
               f"(runner-up {sc[cands[1][0]]:.3f})" if len(cands) > 1 else "only skill")
        if conf < self.min_confidence or margin < self.min_margin:
            return RouteDecision(None, conf, cands, margin, True,
                                 f"confidence {conf:.3f} / margin {margin:.3f} below thresholds "
                                 f"({self.min_confidence}, {self.min_margin}); {why}", self.name)
        return RouteDecision(cands[0][0], conf, cands, margin, False, why, self.name)
