"""Meta-World task suites; each task's written instruction lives in ``clients.sim.metaworld_tasks``
(shared with the Meta-World client) and is re-exported here.

``BASE_TASKS`` pretrain the base demo VLA; each ``EXPERT_SUITES`` entry is one skill expert's
fine-tuning set. Suites are disjoint from each other and from the base. Every task here is one the
scripted policies of ``metaworld.policies`` solve reliably (4/4 seeded episodes each, checked on
2026-11-23 with metaworld 3.1.1), so the demonstrations are clean.

Presets fix what ``carve train`` builds: ``demo`` must finish in about 90 s on 2 CPU cores
(including data collection), ``bench`` in about 30 minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from clients.sim import metaworld_tasks as _tasks
from clients.sim.metaworld_tasks import INSTRUCTIONS, all_tasks  # noqa: F401  (re-exported)
from policy_server.errors import InputError
from policy_server.sim import input_errors

BASE_TASKS: list[str] = ["reach-v3", "push-v3", "drawer-open-v3", "door-open-v3"]

EXPERT_SUITES: dict[str, list[str]] = {
    "buttons": ["button-press-topdown-v3", "button-press-v3", "coffee-button-v3"],
    "windows": ["window-open-v3", "window-close-v3"],
    "faucets": ["faucet-open-v3", "faucet-close-v3"],
    "push_close": ["drawer-close-v3", "handle-press-v3", "plate-slide-v3"],
    "walls": ["reach-wall-v3", "button-press-wall-v3"],
}


@dataclass
class Preset:
    """Everything that determines a factory build (hashed for the cache key).

    episodes_*: successful scripted demonstrations per task; steps_*: optimiser steps;
    eval_episodes: held-out episodes per task for the success report (0 = skip evaluation).
    """

    name: str
    base_tasks: list[str]
    suites: dict[str, list[str]]
    episodes_base: int
    episodes_expert: int
    max_steps: int = 150
    base_steps: int = 1500
    expert_steps: int = 600
    batch_size: int = 256
    lr_base: float = 1e-3
    lr_expert: float = 5e-4
    lr_lora: float = 2e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    eval_episodes: int = 0
    replan_every: int = 2
    model: dict = field(default_factory=dict)   # DemoVLAConfig overrides

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        name="demo", base_tasks=BASE_TASKS,
        suites={k: EXPERT_SUITES[k] for k in ("buttons", "windows", "faucets")},
        episodes_base=10, episodes_expert=10, base_steps=500, expert_steps=200, batch_size=128,
        eval_episodes=0),
    "bench": Preset(
        name="bench", base_tasks=BASE_TASKS, suites=dict(EXPERT_SUITES),
        episodes_base=40, episodes_expert=40, base_steps=3000, expert_steps=1200,
        eval_episodes=10),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


instruction_for = input_errors()(_tasks.instruction_for)
