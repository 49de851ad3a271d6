"""Hybrid router: text scores combined with an observation score.

For instructions text alone cannot separate (two skills registered with the same "put the bowl on
the plate" but trained in different scenes), the first observation decides. The observation score
comes from either

* ``VSubspaceRouter`` (value-subspace affinity of the hidden states, needs the served model),
* ``router.descriptor.DescriptorScorer``: the model-free first-frame descriptor (colour layout +
  colour histogram) of frames registered at admission by ``ObservationDescriptorHook``, for bases
  without pretrained vision (LIBERO per-task routing: bench/routing/bench_libero_frames.py), or
* ``ObservationPrototypeScorer``: per-skill prototypes of simple observation features (state vector
  plus 8x8 thumbnails of every camera) collected at admission from demonstration frames and stored
  as the artifact ``router::obs::prototypes`` (n, f) float32.

Weighting (log-linear pooling, a product of experts): with the text router's skill probabilities
p_t(k) (its softmax including the null "none of these" logit, so sum_k p_t(k) = 1 - p_null) and the
observation probabilities p_o(k) (sum 1):

    q(k) proportional to (p_t(k) / (1 - p_null)) ** a  *  p_o(k) ** (1 - a),    a = text_weight
    confidence(k) = (1 - p_null) * q(k) / sum_j q(j)

So: when the text is decisive (p_t ~ 1 for one skill) the observation barely matters unless it is as
decisive the other way; when the text ties two skills the observation breaks the tie; and an
out-of-domain instruction (p_null ~ 1) keeps a low confidence whatever the observation says, so the
hybrid router abstains on "make me a coffee" like the text router. a = 0.5 by default (both sources
equally trusted); p_o is floored at 1e-6 so one confident observation cannot veto the text outright.
An instruction registered verbatim by exactly one skill is certain (p_t one-hot), as in TextRouter;
without an observation a = 1 (text only).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from policy_server.errors import InputError
from router.base import RouteDecision, Router

KEY_OBS_PROTOTYPES = "router::obs::prototypes"  # float32 (n, f): features of demo frames
THUMB = 8  # thumbnail side: coarse layout/colour of the scene, robust to small pose changes

DEFAULTS = {"text_weight": 0.5, "obs_temperature": 0.1, "min_confidence": 0.4,
            "min_margin": 0.05}


def observation_features(observation) -> torch.Tensor:
    """ObservationBatch of size 1 (or a dict with "state"/"images") -> float32 (f,) feature:
    the state vector followed by each camera (sorted keys) block-averaged to 8x8xC in [-0.5, 0.5].
    Cheap on purpose (no network): it runs on every episode start on the robot's CPU."""
    if isinstance(observation, dict):
        state, images = observation.get("state"), observation.get("images") or {}
    else:
        state, images = observation.state, observation.images or {}
    parts = []
    if state is not None:
        parts.append(torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(-1))
    for key in sorted(images):
        img = np.asarray(images[key])
        if img.ndim == 4:
            img = img[0]
        if img.ndim != 3:
            raise InputError(f"camera {key!r}: expected (H, W, C) or (1, H, W, C) uint8, got "
                             f"shape {img.shape}")
        x = torch.as_tensor(img, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0) / 255.0 - 0.5
        parts.append(torch.nn.functional.adaptive_avg_pool2d(x, THUMB).reshape(-1))
    if not parts:
        raise InputError("observation has neither state nor images to route by")
    return torch.cat(parts)


def observation_prototype_artifacts(frames: list) -> dict[str, torch.Tensor]:
    """Features of a skill's demonstration frames (first frames of its demos), stored with the
    skill: {KEY_OBS_PROTOTYPES: float32 (n, f)}."""
    if not frames:
        raise InputError("observation prototypes need at least one demonstration frame")
    return {KEY_OBS_PROTOTYPES: torch.stack([observation_features(f) for f in frames])}


class ObservationPrototypeScorer:
    """Scores skills by the nearest stored demonstration-frame feature (cosine after z-scoring every
    feature dimension with the statistics of all skills' prototypes, so state and pixels weigh
    alike). prototypes: skill -> float32 (n_k, f)."""

    name = "obs-prototypes"

    def __init__(self, prototypes: dict[str, torch.Tensor],
                 feature_fn: Callable[[object], torch.Tensor] = observation_features,
                 temperature: float = DEFAULTS["obs_temperature"]):
        if not prototypes:
            raise InputError("observation prototypes: no skill has any")
        dims = {int(p.shape[-1]) for p in prototypes.values()}
        if len(dims) != 1:
            raise InputError(f"observation prototypes have different feature sizes {sorted(dims)} "
                             f"(skills admitted with different cameras/state sizes?)")
        if temperature <= 0:
            raise InputError(f"obs_temperature must be > 0, got {temperature}")
        self.skills = list(prototypes)
        dim = next(iter(dims))
        allp = torch.cat([p.to(torch.float32).reshape(-1, dim) for p in prototypes.values()])
        self._mean = allp.mean(0)
        # a dimension constant over all demos carries no information: unit std avoids 0/0
        std = allp.std(0, correction=0)
        self._std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self._protos = [torch.nn.functional.normalize(self._z(p.to(torch.float32)), dim=1)
                        for p in prototypes.values()]
        self.feature_fn = feature_fn
        self.temperature = float(temperature)

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    @classmethod
    def from_snapshot(cls, snapshot, **options) -> "ObservationPrototypeScorer":
        protos = {}
        for name in snapshot.skill_names():
            t = (snapshot.skill_artifacts(name) or {}).get(KEY_OBS_PROTOTYPES)
            if t is not None:
                protos[name] = t
        return cls(protos, **options)

    def scores(self, observation) -> dict[str, float]:
        f = self._z(torch.as_tensor(self.feature_fn(observation), dtype=torch.float32))
        if f.shape[-1] != self._mean.shape[0]:
            raise InputError(f"observation feature has size {f.shape[-1]}, prototypes "
                             f"{self._mean.shape[0]} (different cameras or state size)")
        f = torch.nn.functional.normalize(f, dim=0)
        return {s: float((p @ f).max()) for s, p in zip(self.skills, self._protos)}

    def probabilities(self, observation) -> dict[str, float]:
        sc = self.scores(observation)
        p = torch.softmax(torch.tensor([sc[s] for s in self.skills]) / self.temperature, 0)
        return {s: float(v) for s, v in zip(self.skills, p)}


class HybridRouter(Router):
    """Text router x observation scorer, log-linear pooled (see the module docstring).

    text_router: a ``TextRouter``; obs_scorer: anything with ``probabilities(observation) ->
    dict[skill, float]`` (``VSubspaceRouter``, ``DescriptorScorer``,
    ``ObservationPrototypeScorer``). Skills the scorer
    does not know get a uniform observation probability. Without an observation the decision is
    the text router's (reason says so).
    """

    name = "hybrid"

    def __init__(self, text_router, obs_scorer, text_weight: float = DEFAULTS["text_weight"],
                 min_confidence: float = DEFAULTS["min_confidence"],
                 min_margin: float = DEFAULTS["min_margin"]):
        if not 0.0 <= text_weight <= 1.0:
            raise InputError(f"text_weight must be in [0, 1], got {text_weight}")
        self.text = text_router
        self.obs = obs_scorer
        self.skills = list(text_router.skills)
        self.text_weight = float(text_weight)
        self.min_confidence = float(min_confidence)
        self.min_margin = float(min_margin)

    def route(self, instruction: str, observation=None) -> RouteDecision:
        q = self.text.embedder.encode([instruction])
        pt = self.text.probabilities(self.text.scores(q))[0].to(torch.float64)  # (S,)
        exact = self.text.exact_skill(instruction)
        if exact is not None:
            # registered verbatim by exactly one skill: certain, as in TextRouter
            pt = torch.zeros_like(pt)
            pt[exact] = 1.0
        in_domain = float(pt.sum())                                              # 1 - p_null
        uniform = 1.0 / len(self.skills)
        if observation is None:
            # text only (a = 1): the pooled confidence is exactly the text confidence
            po = torch.full((len(self.skills),), uniform, dtype=torch.float64)
            a = 1.0
        else:
            po_d = self.obs.probabilities(observation)
            po = torch.tensor([po_d.get(s, uniform) for s in self.skills], dtype=torch.float64)
            a = self.text_weight
        logq = (a * torch.log((pt / max(in_domain, 1e-300)).clamp_min(1e-300))
                + (1 - a) * torch.log(po.clamp_min(1e-6)))
        conf_all = in_domain * torch.softmax(logq, 0)
        order = torch.argsort(conf_all, descending=True, stable=True).tolist()
        cands = [(self.skills[j], float(conf_all[j])) for j in order]
        conf = cands[0][1]
        margin = conf - (cands[1][1] if len(cands) > 1 else 0.0)
        best = order[0]
        why = (f"text p={float(pt[best]):.3f}, observation p={float(po[best]):.3f} "
               f"({getattr(self.obs, 'name', 'observation')}), text weight {a}"
               if observation is not None else "no observation: text only")
        if conf < self.min_confidence:
            return RouteDecision(None, conf, cands, margin, True,
                                 f"confidence {conf:.3f} < min_confidence {self.min_confidence} "
                                 f"(in-domain mass {in_domain:.3f}; {why})", self.name)
        if margin < self.min_margin:
            return RouteDecision(None, conf, cands, margin, True,
                                 f"margin {margin:.3f} < min_margin {self.min_margin} ({why})",
                                 self.name)
        return RouteDecision(cands[0][0], conf, cands, margin, False, why, self.name)
