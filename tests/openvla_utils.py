"""Fixtures of the OpenVLA tests: the tiny published-layout checkpoint builders live in the package
(``policy_server.models.openvla.tiny``) so the benchmark can use them too."""

from policy_server.models.openvla.tiny import *  # noqa: F401,F403
from policy_server.models.openvla.tiny import (ACTION_DIM, CHUNK, OFT, PROPRIO_DIM, V_TOK,  # noqa: F401
                                               make_checkpoint, make_expert, norm_stats)

# Two LIBERO-style skills with their own dataset statistics (unnorm keys), as the served-stack
# tests admit them: skill -> (unnorm key, instruction).
SKILLS = {"spatial": ("libero_spatial_no_noops", "pick up the black bowl next to the plate"),
          "object": ("libero_object_no_noops", "pick up the ketchup and place it in the basket")}


def build_bank_stack(root):
    """A tiny OpenVLA base (two datasets, no default unnorm key), one expert per ``SKILLS`` entry
    and a bank state admitting them in order through the real ``carve admit`` (v000001 =
    {spatial}, v000002 = {spatial, object}). -> {"base", "state", "experts"}."""
    from policy_server.cli import main

    base = make_checkpoint(root / "base", seed=0)
    experts = {name: make_expert(base, root / f"expert-{name}", seed=i + 1,
                                 unnorm_key=key)
               for i, (name, (key, _)) in enumerate(SKILLS.items())}
    state = root / "state"
    for name, (_, instr) in SKILLS.items():
        rc = main(["admit", str(state), "--base", str(base), "--expert", str(experts[name]),
                   "--skill", name, "--instruction", instr, "--method", "bank", "--no-progress"])
        assert rc == 0, f"carve admit {name} exited {rc}"
    return {"base": base, "state": state, "experts": experts}
