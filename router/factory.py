"""``build_router(kind, snapshot, config)``: the one way the server and the CLI construct routers, so
a decision is identical through ``carve route``, the Python API and the gRPC ``Route`` call.

kind: "exact" | "text" | "vsubspace" | "hybrid".
config (a dict; every key optional):
  embedder          an ``Embedder`` to use (else the process-wide ``shared_embedder(router_model)``)
  router_model      local sentence-transformers directory (default: packaged all-MiniLM-L6-v2)
  min_confidence, min_margin, temperature, prototype_weight, null_score   text router options
  capture           ``capture(observation, keys, skill=None) -> {key: float32 (N, in)}``: the
                    served model's lock-safe feature capture (the composition root passes the
                    runtime's, through the micro-batcher); or
  feature_fn        observation -> (T, in) hidden states entering the value projection
  vsubspace_per_skill  with a capture: score each skill on hidden states computed with its own
                    residuals (exact MergeVLA rule, one forward per skill) instead of base + core
Routers never get the runtime or the backend ('runtime'/'backend' keys are refused).
  vsubspace_key     which stored value projection to use (exact or glob) when several
  vsubspace_temperature, vsubspace_min_confidence, vsubspace_min_margin
  observation       hybrid's observation scorer: "vsubspace" | "descriptor" | "prototypes" |
                    "auto" (default: vsubspace when the skills have bases and a model is given,
                    else first-frame descriptors (router.descriptor) when stored, else prototypes)
  text_weight, obs_temperature   hybrid weighting (see router.hybrid); obs_temperature is the
                    temperature of whichever observation scorer is used (each has its default)
"""

from __future__ import annotations

from policy_server.errors import InputError, StateError
from router.base import ExactRouter, Router

KINDS = ("exact", "text", "vsubspace", "hybrid")
_TEXT_KEYS = ("min_confidence", "min_margin", "temperature", "prototype_weight", "null_score")


def _skill_instructions(snapshot) -> dict[str, list[str]]:
    from router.text import _record, skill_texts

    out = {}
    for name in snapshot.skill_names():
        texts = skill_texts(_record(snapshot.skill(name)))
        if texts:
            out[name] = texts
    return out


def get_embedder(config: dict):
    """The shared embedder of ``config`` (created once and put back into it)."""
    emb = config.get("embedder")
    if emb is None:
        from router.embedder import shared_embedder

        emb = shared_embedder(config.get("router_model"))
        config["embedder"] = emb
    return emb


def _text(snapshot, config: dict, **override):
    from router.text import TextRouter

    opts = {k: config[k] for k in _TEXT_KEYS if config.get(k) is not None}
    opts.update(override)
    return TextRouter.from_snapshot(snapshot, get_embedder(config), **opts)


def _vsubspace(snapshot, config: dict):
    from router.vsubspace import VSubspaceRouter, capture_feature_fn

    opts = {k.removeprefix("vsubspace_"): config[k]
            for k in ("vsubspace_temperature", "vsubspace_min_confidence", "vsubspace_min_margin")
            if config.get(k) is not None}
    capture = config.get("capture")
    per_skill = bool(config.get("vsubspace_per_skill")) and capture is not None
    r = VSubspaceRouter.from_snapshot(snapshot, None, key=config.get("vsubspace_key"),
                                      per_skill=per_skill, **opts)
    # the feature function needs the stored key to know which projection to capture
    if capture is not None:
        r.feature_fn = capture_feature_fn(capture, r.key, per_skill)
    else:
        r.feature_fn = config.get("feature_fn")
    return r


def build_router(kind: str, snapshot, config: dict | None = None) -> Router:
    """Construct the router ``kind`` for a merge-state snapshot (see the module docstring)."""
    config = config if config is not None else {}
    stale = sorted(k for k in ("runtime", "backend") if config.get(k) is not None)
    if stale:
        raise InputError(f"router config {stale}: routers never get the runtime or the backend; "
                         f"pass 'capture' (the runtime's lock-safe feature capture) instead")
    kind = (kind or "text").lower()
    if kind == "exact":
        return ExactRouter(_skill_instructions(snapshot))
    if kind == "text":
        return _text(snapshot, config)
    if kind == "vsubspace":
        r = _vsubspace(snapshot, config)
        if r.feature_fn is None:
            raise InputError("the vsubspace router needs the served model (config 'capture' or "
                             "'feature_fn'): it scores the first observation's hidden states")
        return r
    if kind == "hybrid":
        from router.hybrid import DEFAULTS, HybridRouter, ObservationPrototypeScorer

        # The hybrid router applies its own thresholds to the pooled confidence; the text part
        # must not abstain on its own (it only supplies probabilities).
        text = _text(snapshot, config, min_confidence=0.0, min_margin=0.0)
        which = config.get("observation", "auto")
        scorer = None
        if which in ("vsubspace", "auto"):
            try:
                scorer = _vsubspace(snapshot, config)
            except StateError:
                if which == "vsubspace":
                    raise
            if scorer is not None and scorer.feature_fn is None:
                if which == "vsubspace":
                    raise InputError("hybrid router with observation='vsubspace' needs the served "
                                     "model (config 'capture' or 'feature_fn')")
                scorer = None
        opts = {"temperature": config["obs_temperature"]} if config.get("obs_temperature") \
            else {}
        if scorer is None and which in ("descriptor", "auto"):
            from router.descriptor import DescriptorScorer

            try:
                scorer = DescriptorScorer.from_snapshot(snapshot, **opts)
            except InputError as e:
                if which == "descriptor":
                    raise StateError("hybrid router with observation='descriptor' needs first-"
                                     "frame descriptors stored at admission "
                                     f"(ObservationDescriptorHook) ({e})") from e
        if scorer is None:
            try:
                scorer = ObservationPrototypeScorer.from_snapshot(snapshot, **opts)
            except InputError as e:
                raise StateError("the hybrid router needs observation data: value-subspace bases "
                                 "(with the served model), first-frame descriptors or "
                                 f"demonstration-frame prototypes stored at admission ({e})") from e
        def opt(k):
            return DEFAULTS[k] if config.get(k) is None else config[k]

        return HybridRouter(text, scorer, text_weight=opt("text_weight"),
                            min_confidence=opt("min_confidence"), min_margin=opt("min_margin"))
    raise InputError(f"unknown router kind {kind!r}; choose one of {', '.join(KINDS)}")
