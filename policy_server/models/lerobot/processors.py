"""Per-skill LeRobot processor pipelines: stored at admission, rebuilt at serve time.

Every fine-tuned LeRobot expert carries its dataset's normalisation statistics in its processor
files, not in ``model.safetensors``. Once admitted the expert directory may be deleted, so the
admission hook copies those files (small: JSON + a few statistics tensors) into the skill's
artifacts, where the store checksums them like every other file. Each file is kept byte for byte
as a uint8 tensor named ``lerobot_processor::<file name>``; the server writes them back into a
private temporary directory and loads them with LeRobot's own ``make_pre_post_processors``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from policy_server.errors import InputError
from policy_server.merge.hooks import ArtifactOnlyHook
from policy_server.models.lerobot.config import (
    architecture_diff, check_policy_dir, processor_files)

ARTIFACT_PREFIX = "lerobot_processor::"


def encode_processor_files(policy_dir: str | Path) -> dict[str, torch.Tensor]:
    """{``lerobot_processor::<name>``: uint8 (nbytes,)} for every processor file of
    ``policy_dir``; InputError when one is missing."""
    return {ARTIFACT_PREFIX + p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
            for p in processor_files(policy_dir)}


def has_processor_artifacts(artifacts: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(ARTIFACT_PREFIX) for k in artifacts)


def write_processor_files(artifacts: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write the processor files held in ``artifacts`` into ``out_dir`` (inverse of
    :func:`encode_processor_files`)."""
    for key, t in artifacts.items():
        if key.startswith(ARTIFACT_PREFIX):
            name = key[len(ARTIFACT_PREFIX):]
            if Path(name).name != name:
                raise InputError(f"processor artifact {key!r}: not a plain file name")
            (out_dir / name).write_bytes(t.to(torch.uint8).contiguous().numpy().tobytes())


class ProcessorArtifactsHook(ArtifactOnlyHook):
    """Admission hook storing the expert's processor files with its skill.

    Built (and validated) before any tensor streams: the expert must be a LeRobot directory of
    the base's policy type whose architecture fields equal the base's (a task vector between two
    different architectures means nothing), and must have its processor files. Reads no tensor.
    """

    name = "lerobot_processors"

    def __init__(self, base_dir: str | Path, expert_dir: str | Path):
        base_cfg = check_policy_dir(base_dir)
        expert_cfg = check_policy_dir(expert_dir)
        if base_cfg["type"] != expert_cfg["type"]:
            raise InputError(f"{expert_dir}/config.json: type {expert_cfg['type']!r} differs from "
                             f"the base's {base_cfg['type']!r}")
        diff = architecture_diff(base_cfg, expert_cfg)
        if diff:
            shown = ", ".join(f"{k}: base {base_cfg.get(k)!r} vs expert {expert_cfg.get(k)!r}"
                              for k in diff[:4])
            raise InputError(f"{expert_dir}/config.json: architecture field(s) {diff} differ from "
                             f"the base's ({shown}); CARVE merges experts fine-tuned from one "
                             "common base checkpoint")
        self._artifacts = encode_processor_files(expert_dir)

    def artifacts(self) -> dict[str, torch.Tensor]:
        return dict(self._artifacts)


def load_processors(cfg, source_dir: str | Path, vlm_dir: str | None):
    """(preprocessor, postprocessor) from ``source_dir`` with LeRobot's
    ``make_pre_post_processors``.

    Both run on the CPU (``device_processor`` overridden): the backend moves the batch to the
    model's device itself, so one pipeline serves any placement. A tokenizer step is pointed at
    the resolved local VLM directory (the saved ``tokenizer_name`` may be a hub id or a path on
    another machine)."""
    from lerobot.policies.factory import make_pre_post_processors

    pre_over = {"device_processor": {"device": "cpu"}}
    if vlm_dir is not None:
        pre_over["tokenizer_processor"] = {"tokenizer_name": vlm_dir}
    try:
        return make_pre_post_processors(
            cfg, pretrained_path=str(source_dir), preprocessor_overrides=pre_over,
            postprocessor_overrides={"device_processor": {"device": "cpu"}})
    except ImportError as e:  # e.g. num2words, which only SmolVLA's processor needs
        raise InputError(f"{source_dir}: the processors of policy type {cfg.type!r} need a "
                         f"package that is not installed ({e}); install requirements-lerobot.txt"
                         ) from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{source_dir}: cannot load the LeRobot processors: "
                         f"{type(e).__name__}: {e}") from None


def load_processors_from_artifacts(cfg, artifacts: dict[str, torch.Tensor], vlm_dir: str | None,
                                   what: str):
    """(pre, post) rebuilt from a skill's stored processor artifacts (``what`` names the skill
    in errors); the temporary directory is removed once LeRobot has read it."""
    tmp = Path(tempfile.mkdtemp(prefix="carve-lerobot-proc-"))
    try:
        write_processor_files(artifacts, tmp)
        try:
            processor_files(tmp)
        except InputError as e:
            raise InputError(f"{what}: stored processor artifacts incomplete: {e}") from None
        return load_processors(cfg, tmp, vlm_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
