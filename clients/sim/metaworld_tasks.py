"""The written instruction of every Meta-World task the demo suites use (like LIBERO's task
language): what a client sends to the server's router for a task."""

from __future__ import annotations

from clients.sim import SimError

INSTRUCTIONS: dict[str, str] = {
    # base (pretraining) tasks
    "reach-v3": "reach the red goal point with the gripper",
    "push-v3": "push the puck to the goal",
    "drawer-open-v3": "open the drawer",
    "door-open-v3": "open the door by its handle",
    # expert suites
    "button-press-topdown-v3": "press the button from the top",
    "button-press-v3": "press the button from the front",
    "coffee-button-v3": "push the button on the coffee machine",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "faucet-open-v3": "turn the faucet handle to open it",
    "faucet-close-v3": "turn the faucet handle to close it",
    "drawer-close-v3": "push the drawer closed",
    "handle-press-v3": "press the handle down",
    "plate-slide-v3": "slide the plate into the goal",
    "reach-wall-v3": "reach over the wall to the goal point",
    "button-press-wall-v3": "press the button behind the wall",
}


def instruction_for(task: str) -> str:
    """The instruction of ``task`` (a v3 name such as "push-v3"); SimError for an unknown task."""
    if task not in INSTRUCTIONS:
        raise SimError(f"no instruction for task {task!r}; known: {sorted(INSTRUCTIONS)}")
    return INSTRUCTIONS[task]


def all_tasks() -> list[str]:
    """Every task that has an instruction."""
    return list(INSTRUCTIONS)
