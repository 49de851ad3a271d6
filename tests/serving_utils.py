"""Builds a small but real serving stack on disk for the service/end-to-end tests: a random-weight
demo VLA base, perturbed experts (low-rank + sparse updates, like fine-tunes), admitted with the
real engine into a real CARVE merge state."""

from __future__ import annotations

from pathlib import Path

import torch

from policy_server.state.admission import admit
from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig

SKILLS = {
    "drawer": ["open the top drawer", "pull the drawer open"],
    "button": ["press the red button", "push the button down"],
    "window": ["slide the window closed", "close the window"],
}


def make_stack(root: Path, cameras: dict | None = None, skills: dict | None = None,
               rank: int = 8, seed: int = 0, hooks_for=None) -> dict:
    """-> {"base", "state", "experts": {skill: dir}, "skills": {skill: instructions}}."""
    skills = skills or SKILLS
    cfg = DemoVLAConfig(cameras=cameras or {}, chunk_length=4, hidden_dim=64, mlp_dim=128,
                        num_heads=4, vocab_size=512, text_dim=32)
    base = DemoVLABackend(cfg, seed=seed)
    base_dir = base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(seed + 1)
    experts = {}
    for i, (name, _instr) in enumerate(skills.items()):
        expert = DemoVLABackend(cfg, seed=seed)
        with torch.no_grad():
            for pname, p in expert.module.named_parameters():
                if p.ndim == 2 and min(p.shape) >= 4:
                    r = 3
                    a = torch.randn(p.shape[0], r, generator=g) * 0.15
                    b = torch.randn(r, p.shape[1], generator=g) * 0.15
                    sparse = (torch.rand(p.shape, generator=g) < 0.02) * torch.randn(p.shape, generator=g) * 0.05
                    p.add_(a @ b / r + sparse)
                else:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        experts[name] = expert.save_pretrained(root / f"expert-{name}")
    state = root / "state"
    for name, instr in skills.items():
        admit(state, base_dir, experts[name], name, instructions=instr, method="carve",
              options={"rank": rank}, progress=False,
              hooks=hooks_for(name, instr) if hooks_for else ())
    return {"base": Path(base_dir), "state": state, "experts": experts, "skills": skills,
            "config": cfg}
