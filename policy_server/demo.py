"""The built-in demo: demo-VLA experts trained on Meta-World, admitted into a CARVE state.

``ensure_demo_state()`` builds (or reuses from the cache) the demo expert factory and a merge state
holding every expert, so ``carve demo`` and ``carve serve --demo`` start from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from policy_server.state.store import StateStore


def ensure_demo_state(preset: str = "demo", rank: int = 16, force: bool = False,
                      progress: bool = True, log=print) -> dict:
    """-> {"base_dir", "state_dir", "factory"}; admits each expert once (cached by the factory
    hash and the rank). The text-router embeddings are computed at admission."""
    from policy_server.state.admission import admit
    from policy_server.training.train import build_factory

    factory = build_factory(preset, force=force, progress=progress)
    state_dir = Path(factory["out"]) / f"state-carve-r{rank}"
    store = StateStore(state_dir)
    have = set(store.open().skill_names()) if store.exists() else set()
    hooks_for = _hooks_factory()
    for expert in factory["experts"]:
        if expert["name"] in have:
            continue
        log(f"[demo] admitting expert {expert['name']!r} ({expert['kind']}) into {state_dir}")
        admit(state_dir, factory["base"]["dir"], expert["dir"], expert["name"],
              instructions=expert["instructions"], description=f"suite {expert.get('suite', '')}",
              method="carve", options={"rank": rank}, hooks=hooks_for(expert),
              progress=progress)
    return {"base_dir": factory["base"]["dir"], "state_dir": str(state_dir), "factory": factory}


def _hooks_factory():
    from router.embedder import shared_embedder
    from router.text import TextEmbeddingHook

    emb = shared_embedder()
    return lambda expert: [TextEmbeddingHook(expert["instructions"], emb,
                                             f"suite {expert.get('suite', '')}")]


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(ensure_demo_state(), indent=1, default=str))
