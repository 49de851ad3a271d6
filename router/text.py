"""Text router: picks a skill from the episode instruction with sentence embeddings.

Scoring (per skill k with registered instruction embeddings E_k, (n_k, d), unit rows, and the query
embedding q, (d,), unit):

    best_k  = max_i  q . E_k[i]                      (nearest registered instruction)
    proto_k = q . normalize(mean_i E_k[i])           (skill prototype: the "centre" of the skill)
    score_k = (1 - w) * best_k + w * proto_k         (w = prototype_weight, default 0.1)

The nearest-instruction term is what makes a registered instruction route exactly (cos = 1); the
prototype term smooths it for paraphrases that sit between several registered instructions of one
skill, and is what lets a skill with many instructions win over a single accidental near match.

Confidence (calibration): a softmax with temperature T over the skill scores plus one *null*
("none of these") logit fixed at ``null_score``:

    p_k    = exp(score_k / T) / (sum_j exp(score_j / T) + exp(null_score / T))

A plain softmax is shift-invariant, so an out-of-domain instruction ("make me a coffee"), whose
cosines to all skills are uniformly low, could still get a confident winner; the null logit makes
the confidence fall when the best score is not clearly above ``null_score`` (the cosine at which an
instruction is as likely unrelated as related). T sets how fast confidence rises with a score gap:
with T = 0.02 a cosine gap of 0.02 is a factor e between two skills. The defaults were tuned on the
LIBERO held-out paraphrases and an out-of-domain set (``bench/routing``, see docs/ROUTING.md).

Registered instructions: an instruction equal to a registered one (case and whitespace folded) and
registered by only one skill is routed to its skill with confidence 1.0, like ``ExactRouter``: near-duplicate registered instructions
(LIBERO-spatial's ten "pick up the black bowl ... and place it on the plate" differ by a few words,
cos ~0.95) would otherwise split the softmax and abstain on an instruction the router knows exactly.

Abstention: skill None, abstained True, with a reason, when the winner's confidence is below
``min_confidence`` or its margin over the runner-up (in confidence) is below ``min_margin``.

Embedding cache: ``text_router_artifacts`` returns the per-skill tensors stored with the skill in the
merge state (``router::text::*``); ``TextRouter.from_snapshot`` reuses them when the model
fingerprint and the instruction list match, so a server start does not re-embed.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch

from policy_server.errors import InputError
from policy_server.merge.hooks import ArtifactOnlyHook
from router.base import RouteDecision, Router, _normalise
from router.embedder import Embedder, fingerprint_tensor, tensor_fingerprint, texts_digest

log = logging.getLogger(__name__)

# Artifact keys (stored in skills/<skill>.safetensors next to the residuals).
KEY_EMBEDDINGS = "router::text::embeddings"      # float32 (n, d), unit rows
KEY_MODEL = "router::text::model_sha256"         # uint8 (32,): Embedder.fingerprint
KEY_TEXTS = "router::text::instructions_sha256"  # uint8 (32,): texts_digest(instructions)

# Tuned on the "dev" half of bench/routing (first 2 of 5 paraphrases per task), reported on the rest:
# see docs/ROUTING.md. Prototype weight above ~0.25 hurt there (libero_10's tasks are heterogeneous,
# so its prototype is a blurry centre that attracts other suites' paraphrases).
DEFAULTS = {"min_confidence": 0.4, "min_margin": 0.05, "temperature": 0.02,
            "prototype_weight": 0.1, "null_score": 0.5}


def skill_texts(record: dict) -> list[str]:
    """The texts a skill registers for routing: its instructions, then its description if any
    (a description is routed like one more instruction)."""
    texts = [str(t) for t in (record.get("instructions") or []) if str(t).strip()]
    desc = str(record.get("description") or "").strip()
    if desc and desc not in texts:
        texts.append(desc)
    return texts


def text_router_artifacts(instructions: list[str], embedder: Embedder) -> dict[str, torch.Tensor]:
    """Embed one skill's instructions once, for storage with the skill.

    Returns {KEY_EMBEDDINGS: float32 (n, d), KEY_MODEL: uint8 (32,), KEY_TEXTS: uint8 (32,)}.
    """
    texts = [str(t) for t in instructions]
    if not texts:
        raise InputError("a skill needs at least one instruction (or a description) to be routed "
                         "by text")
    return {KEY_EMBEDDINGS: embedder.encode(texts).contiguous(),
            KEY_MODEL: fingerprint_tensor(embedder.fingerprint),
            KEY_TEXTS: fingerprint_tensor(texts_digest(texts))}


def cached_embeddings(artifacts: dict[str, torch.Tensor], instructions: list[str],
                      embedder: Embedder) -> torch.Tensor | None:
    """The stored embeddings if they were made by the same model for the same instruction list,
    else None (the caller re-embeds)."""
    try:
        emb, model, texts = artifacts[KEY_EMBEDDINGS], artifacts[KEY_MODEL], artifacts[KEY_TEXTS]
    except KeyError:
        return None
    if tensor_fingerprint(model) != embedder.fingerprint:
        return None
    if tensor_fingerprint(texts) != texts_digest(instructions):
        return None
    if emb.ndim != 2 or emb.shape[0] != len(instructions):
        return None
    return emb.to(torch.float32)


class TextRouter(Router):
    """Routes an instruction to the skill whose registered instructions it matches best.

    skill_instructions: skill -> registered instructions (admission order is kept for ties);
    embedder: the sentence embedder (queries are embedded with it at route time);
    embeddings: optional skill -> float32 (n_k, d) precomputed unit embeddings of exactly those
    instructions (from the merge state); missing skills are embedded now.
    See the module docstring for the score, the calibration and the abstention rule.
    """

    name = "text"

    def __init__(self, skill_instructions: dict[str, list[str]], embedder: Embedder,
                 min_confidence: float = DEFAULTS["min_confidence"],
                 min_margin: float = DEFAULTS["min_margin"],
                 temperature: float = DEFAULTS["temperature"],
                 prototype_weight: float = DEFAULTS["prototype_weight"],
                 null_score: float | None = DEFAULTS["null_score"],
                 embeddings: dict[str, torch.Tensor] | None = None):
        if not skill_instructions:
            raise InputError("the text router needs at least one skill with instructions")
        if temperature <= 0:
            raise InputError(f"router temperature must be > 0, got {temperature}")
        if not 0.0 <= prototype_weight <= 1.0:
            raise InputError(f"prototype_weight must be in [0, 1], got {prototype_weight}")
        for k, v in (("min_confidence", min_confidence), ("min_margin", min_margin)):
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{k} must be in [0, 1], got {v}")
        self.embedder = embedder
        self.min_confidence = float(min_confidence)
        self.min_margin = float(min_margin)
        self.temperature = float(temperature)
        self.prototype_weight = float(prototype_weight)
        self.null_score = None if null_score is None else float(null_score)
        self.skills = list(skill_instructions)
        self.instructions = {s: [str(t) for t in v] for s, v in skill_instructions.items()}
        embeddings = dict(embeddings or {})
        todo = [s for s in self.skills if s not in embeddings]
        for s in self.skills:
            if not self.instructions[s]:
                raise InputError(f"skill {s!r} has no instruction to route by")
        if todo:
            # One batched call for every skill without a cache (much faster than one per skill).
            flat = [t for s in todo for t in self.instructions[s]]
            emb = embedder.encode(flat)
            i = 0
            for s in todo:
                n = len(self.instructions[s])
                embeddings[s] = emb[i:i + n]
                i += n
        mats, owner = [], []
        protos = []
        for j, s in enumerate(self.skills):
            e = embeddings[s].to(torch.float32)
            if e.ndim != 2 or e.shape[0] != len(self.instructions[s]):
                raise InputError(f"embeddings for skill {s!r} have shape {tuple(e.shape)}, "
                                 f"expected ({len(self.instructions[s])}, d)")
            e = torch.nn.functional.normalize(e, dim=1)
            mats.append(e)
            owner += [j] * e.shape[0]
            protos.append(torch.nn.functional.normalize(e.mean(0), dim=0))
        dims = {m.shape[1] for m in mats}
        if len(dims) != 1:
            raise InputError(f"skills were embedded with different dimensions {sorted(dims)}: "
                             f"the cache mixes models")
        self._E = torch.cat(mats)                        # (N, d) all registered instructions
        self._owner = torch.tensor(owner)                # (N,) skill index of each row
        self._P = torch.stack(protos)                    # (S, d) skill prototypes
        self._texts = [t for s in self.skills for t in self.instructions[s]]
        owners: dict[str, set[int]] = {}
        for j, s in enumerate(self.skills):
            for t in self.instructions[s]:
                owners.setdefault(_normalise(t), set()).add(j)
        # Only instructions registered by exactly one skill are certain; one shared by several
        # skills goes through the softmax (and abstains on the tie, or the hybrid router breaks it
        # with the observation).
        self._exact = {t: next(iter(js)) for t, js in owners.items() if len(js) == 1}

    # ---------------------------------------------------------------- construction from the state
    @classmethod
    def from_snapshot(cls, snapshot, embedder: Embedder, **options) -> "TextRouter":
        """Build from a merge-state snapshot, reusing each skill's cached embeddings when the model
        fingerprint and instruction list match (warns and re-embeds the skills that do not)."""
        skill_instr, cached = {}, {}
        stale = []
        for name in snapshot.skill_names():
            texts = skill_texts(_record(snapshot.skill(name)))
            if not texts:
                continue  # a skill with no instruction can only be selected by id
            skill_instr[name] = texts
            # an unreadable/corrupt artifacts file is not swallowed: it is the skill's residual
            # file too, so the state is broken and the store's IntegrityError must surface
            emb = cached_embeddings(snapshot.skill_artifacts(name) or {}, texts, embedder)
            if emb is None:
                stale.append(name)
            else:
                cached[name] = emb
        if not skill_instr:
            raise InputError("no skill in the merge state has instructions to route by")
        if stale:
            warnings.warn(f"text router: no valid cached embeddings for skills {stale} (missing, "
                          f"made by another model, or instructions changed); re-embedding them "
                          f"with {embedder.name}", RuntimeWarning, stacklevel=2)
        return cls(skill_instr, embedder, embeddings=cached, **options)

    # ---------------------------------------------------------------- scoring
    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """q: float32 (B, d) unit query embeddings -> (B, S) skill scores (cosine scale)."""
        sims = q @ self._E.T                                         # (B, N)
        best = torch.full((q.shape[0], len(self.skills)), -2.0)
        best = best.scatter_reduce(1, self._owner.expand(q.shape[0], -1), sims, "amax")
        proto = q @ self._P.T                                        # (B, S)
        w = self.prototype_weight
        return (1.0 - w) * best + w * proto

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, S) scores -> (B, S) confidences: tempered softmax with the null logit (the
        probabilities of the skills sum to 1 minus the null's mass)."""
        logits = scores / self.temperature
        if self.null_score is None:
            return torch.softmax(logits, dim=1)
        null = torch.full((scores.shape[0], 1), self.null_score / self.temperature)
        return torch.softmax(torch.cat([logits, null], 1), dim=1)[:, :-1]

    def route(self, instruction: str, observation=None) -> RouteDecision:
        return self.route_many([instruction])[0]

    def route_many(self, instructions: list[str]) -> list[RouteDecision]:
        """Route several instructions with one batched embedding call."""
        if not instructions:
            return []
        q = self.embedder.encode([str(t) for t in instructions])
        sc = self.scores(q)
        pr = self.probabilities(sc)
        sims = q @ self._E.T
        return [self._decide(sc[i], pr[i], sims[i], self._exact.get(_normalise(instructions[i])))
                for i in range(len(instructions))]

    def _decide(self, scores: torch.Tensor, probs: torch.Tensor, sims: torch.Tensor,
                exact: int | None = None) -> RouteDecision:
        if exact is not None:
            probs = probs.clone()
            probs[exact] = 1.0  # known verbatim: certain, whatever its near-duplicates score
            others = [j for j in range(len(self.skills)) if j != exact]
            order = [exact] + sorted(others, key=lambda j: -float(probs[j]))
            cands = [(self.skills[j], float(probs[j])) for j in order]
            margin = 1.0 - (cands[1][1] if len(cands) > 1 else 0.0)
            return RouteDecision(self.skills[exact], 1.0, cands, margin, False,
                                 "registered instruction (verbatim)", self.name)
        order = torch.argsort(probs, descending=True, stable=True).tolist()
        cands = [(self.skills[j], float(probs[j])) for j in order]
        conf = cands[0][1]
        margin = conf - (cands[1][1] if len(cands) > 1 else 0.0)
        top = order[0]
        nearest = int(torch.argmax(torch.where(self._owner == top, sims, -2.0)))
        matched = (f"nearest registered instruction {self._texts[nearest]!r} "
                   f"(cos {float(sims[nearest]):.3f}), skill score {float(scores[top]):.3f}")
        if conf < self.min_confidence:
            return RouteDecision(None, conf, cands, margin, True,
                                 f"confidence {conf:.3f} < min_confidence {self.min_confidence} "
                                 f"(best: {cands[0][0]}, {matched})", self.name)
        if margin < self.min_margin:
            return RouteDecision(None, conf, cands, margin, True,
                                 f"margin {margin:.3f} over {cands[1][0]} < min_margin "
                                 f"{self.min_margin} (best: {cands[0][0]}, {matched})", self.name)
        return RouteDecision(cands[0][0], conf, cands, margin, False, matched, self.name)

    def exact_skill(self, instruction: str) -> int | None:
        """Index of the one skill that registered ``instruction`` verbatim (case/whitespace
        folded), else None."""
        return self._exact.get(_normalise(instruction))

    def skill_scores(self, instruction: str) -> dict[str, float]:
        """Raw (cosine-scale) scores per skill, for the hybrid router and diagnostics."""
        sc = self.scores(self.embedder.encode([instruction]))[0]
        return {s: float(sc[j]) for j, s in enumerate(self.skills)}


def _record(rec) -> dict:
    """Accept the store's SkillRecord (dataclass/object) or a plain dict."""
    if isinstance(rec, dict):
        return rec
    return {"instructions": getattr(rec, "instructions", None) or [],
            "description": getattr(rec, "description", "") or ""}


def timed_route(router: Router, instruction: str, observation=None) -> tuple[RouteDecision, float]:
    """Route once and return (decision, seconds)."""
    t0 = time.perf_counter()
    d = router.route(instruction, observation)
    return d, time.perf_counter() - t0


class TextEmbeddingHook(ArtifactOnlyHook):
    """Admission hook (an ``ArtifactOnlyHook``) that embeds the skill's
    instructions once at admission, so servers load ``router::text::*`` instead of re-embedding.
    It reads no tensor (``wants`` is always False)."""

    name = "text_embeddings"

    def __init__(self, instructions: list[str], embedder: Embedder, description: str = ""):
        self.texts = skill_texts({"instructions": list(instructions), "description": description})
        self.embedder = embedder

    def artifacts(self) -> dict[str, torch.Tensor]:
        return text_router_artifacts(self.texts, self.embedder) if self.texts else {}
