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
    # stream preset (harder manipulation; see policy_server.sim.suites.STREAM_SUITES)
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pull the peg out of the hole and lift it to the goal",
    "door-close-v3": "swing the door closed",
    "door-lock-v3": "turn the door lock down to lock it",
    "door-unlock-v3": "turn the door lock up to unlock it",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side of the box",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-pull-v3": "pull the handle up",
    "assembly-v3": "fit the ring over the peg",
    "disassemble-v3": "lift the ring off the peg",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "hammer-v3": "hammer the nail into the wall",
    "stick-push-v3": "grab the stick and push the thermos to the goal with it",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "bin-picking-v3": "move the cube from one bin into the other",
    "box-close-v3": "put the lid on the box",
    "shelf-place-v3": "place the block on the shelf",
}


def instruction_for(task: str) -> str:
    """The instruction of ``task`` (a v3 name such as "push-v3"); SimError for an unknown task."""
    if task not in INSTRUCTIONS:
        raise SimError(f"no instruction for task {task!r}; known: {sorted(INSTRUCTIONS)}")
    return INSTRUCTIONS[task]


def all_tasks() -> list[str]:
    """Every task that has an instruction."""
    return list(INSTRUCTIONS)
