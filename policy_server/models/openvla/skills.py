"""Per-skill action statistics: each OpenVLA expert carries the ``norm_stats`` of the dataset it was
fine-tuned on (e.g. ``libero_spatial_no_noops``), which the base may not have at all. Admission
stores the chosen key and its action statistics with the skill (an artifact: the tensors of a
merge state are all a skill keeps once the expert file is discarded); the served backend reads
them back in ``attach_state`` and un-normalises each row with its own skill's statistics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from policy_server.errors import InputError
from policy_server.merge.hooks import ArtifactOnlyHook

ARTIFACT = "openvla_action_stats"
# fields that must agree between base and expert: anything else would mean another architecture
_ARCH_FIELDS = ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "n_action_bins",
                "pad_to_multiple_of")


def choose_expert_key(expert_cfg, base_cfg, source: str) -> str:
    """The expert's ``unnorm_key``: its ``carve_unnorm_key``, else the one dataset it has and the
    base has not (what fine-tuning added), else its only dataset; ``InputError`` listing keys.
    (The hook tries a one-dataset ``dataset_statistics.json`` before the last two rules.)"""
    explicit = expert_cfg.raw.get("carve_unnorm_key")
    if explicit:
        return expert_cfg.check_unnorm_key(explicit)
    keys = sorted(expert_cfg.norm_stats)
    new = [k for k in keys if k not in base_cfg.norm_stats]
    if len(new) == 1:
        return new[0]
    if len(keys) == 1:
        return keys[0]
    raise InputError(f"{source}: cannot tell which norm_stats key this expert was fine-tuned on "
                     f"(keys {keys}); set 'carve_unnorm_key' in its config.json")


_KEEP = ("q01", "q99", "min", "max", "mask")


def encode_stats(unnorm_key: str, dataset: dict) -> torch.Tensor:
    """-> uint8 (nbytes,) JSON of {"unnorm_key", "stats": {"action": {...}, "proprio": {...}}}
    (only the fields the decoders read: q01, q99, min, max, mask)."""
    stats = {part: {k: dataset[part][k] for k in _KEEP if k in dataset[part]}
             for part in ("action", "proprio") if isinstance(dataset.get(part), dict)}
    blob = json.dumps({"unnorm_key": unnorm_key, "stats": stats})
    return torch.frombuffer(bytearray(blob.encode()), dtype=torch.uint8)


def decode_stats(t: torch.Tensor) -> tuple[str, dict]:
    """-> (unnorm_key, {"action": {...}, "proprio": {...}?})."""
    d = json.loads(t.to(torch.uint8).contiguous().numpy().tobytes().decode())
    return d["unnorm_key"], d["stats"]


class OpenVLAStatsHook(ArtifactOnlyHook):
    """Stores the expert's ``unnorm_key`` + action statistics as the skill artifact
    ``openvla_action_stats``; refuses an expert whose architecture fields differ from the base's.
    Reads only the two config.json files (no tensor is needed)."""

    name = "openvla_action_stats"

    def __init__(self, base_dir, expert_dir):
        from policy_server.models.openvla.config import read_config

        base = read_config(base_dir)
        exp_path = Path(expert_dir)
        if not (exp_path / "config.json").is_file():
            # a PEFT adapter dir has no config.json: the skill is served with the base's default
            self._blob = None
            return
        exp = read_config(exp_path)
        for f in _ARCH_FIELDS:
            if getattr(exp, f) != getattr(base, f):
                raise InputError(f"{exp_path / 'config.json'}: {f} is {getattr(exp, f)!r} but the "
                                 f"base's is {getattr(base, f)!r}")
        stats = dict(exp.norm_stats)
        ds = exp_path / "dataset_statistics.json"
        if not exp.raw.get("carve_unnorm_key") and ds.is_file():
            # OpenVLA's finetune.py writes the fine-tuning dataset's statistics here
            try:
                extra = json.loads(ds.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{ds}: invalid JSON: {e}") from None
            if isinstance(extra, dict) and len(extra) == 1:
                (key, value), = extra.items()
                stats[key] = value
                self._blob = encode_stats(key, value)
                return
        key = choose_expert_key(exp, base, str(exp_path / "config.json"))
        self._blob = encode_stats(key, stats[key])

    def artifacts(self) -> dict[str, torch.Tensor]:
        return {} if self._blob is None else {ARTIFACT: self._blob}
