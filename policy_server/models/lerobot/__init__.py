"""LeRobot pretrained policies (SmolVLA, ACT, diffusion) as a carve-serve backend.

Importing this package never imports LeRobot: the registry calls :func:`detect` on every
``config.json`` it cannot place by ``model_type``, and only a LeRobot directory pulls in
``backend.py`` (which imports LeRobot inside ``load``). See docs/BACKENDS.md.
"""

from __future__ import annotations

from pathlib import Path

from policy_server.models.lerobot.config import looks_like_lerobot


def detect(path: Path, config: dict):
    """The backend class for a LeRobot policy directory (``config.json`` with LeRobot's ``type``
    and features, no ``model_type``), else None."""
    if not looks_like_lerobot(config):
        return None
    from policy_server.models.lerobot.backend import LeRobotBackend

    return LeRobotBackend
