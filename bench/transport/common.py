"""What every peer shares: the observation, the no-op policy, thread settings, a parent watchdog."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

CHUNK = (50, 7)         # action chunk every policy returns
STATE_DIM = 8
IMAGE_SIZE = 224
CAMERAS = ("cam0", "cam1")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def set_threads(torch_too: bool = False) -> None:
    """One BLAS / OpenMP thread per process (set before numpy is used); torch likewise if asked."""
    for k in THREAD_ENV:
        os.environ[k] = "1"
    if torch_too:
        import torch
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass


def observation(n_images: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same observation for every peer: n 224x224x3 uint8 frames + an 8-D float32 state."""
    rng = np.random.default_rng(seed)
    state = rng.standard_normal(STATE_DIM).astype(np.float32)
    images = {CAMERAS[i]: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
              for i in range(n_images)}
    return state, images


def noop_policy(policy_ms: float) -> np.ndarray:
    """The policy of every peer: optionally sleep (an emulated forward pass), return zeros."""
    if policy_ms > 0:
        time.sleep(policy_ms / 1e3)
    return np.zeros(CHUNK, np.float32)


def watch_parent(max_seconds: float) -> None:
    """Exit this process when its parent goes away or after ``max_seconds`` (never left running)."""
    parent = os.getppid()
    deadline = time.monotonic() + max_seconds

    def run():
        while True:
            if os.getppid() != parent or time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=run, daemon=True, name="watch-parent").start()
