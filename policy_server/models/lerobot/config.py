"""Reading a LeRobot pretrained-policy directory without importing LeRobot.

Everything here is plain JSON work, so the registry can recognise a LeRobot directory, admission
can compare an expert's architecture with its base's, and a hub-id ``vlm_model_name`` is refused
with a clear message, all before (and without) ``import lerobot``.

A LeRobot policy directory (``PreTrainedPolicy.save_pretrained`` + the processors'
``save_pretrained``)::

    config.json                       {"type": "smolvla" | "act" | "diffusion", ...}
    model.safetensors                 the policy's state dict (normalisation is NOT in here)
    policy_preprocessor.json          + policy_preprocessor_step_<i>_<name>.safetensors
    policy_postprocessor.json         + policy_postprocessor_step_<i>_<name>.safetensors
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from policy_server.errors import InputError
from policy_server.models.config_json import read_config_json

#: policy types this backend serves; pi0 / pi05 / pi0_fast need LeRobot's unreleased transformers
#: fork (docs/BACKENDS.md), so they are refused with that reason instead of failing deep inside.
SUPPORTED_TYPES = ("smolvla", "act", "diffusion")
UNSUPPORTED_TYPES = {
    t: "needs LeRobot's transformers fork (transformers.models.siglip.check), which no released "
       "transformers has; see docs/BACKENDS.md"
    for t in ("pi0", "pi05", "pi0_fast")}

PREPROCESSOR = "policy_preprocessor"
POSTPROCESSOR = "policy_postprocessor"
PROCESSOR_NAMES = (PREPROCESSOR, POSTPROCESSOR)

#: env var pointing at a local VLM directory (config + tokenizer + processor) for every SmolVLA
#: checkpoint loaded in this process; the ``vlm_dir`` load option wins over it
VLM_DIR_ENV = "CARVE_LEROBOT_VLM_DIR"

# Config fields that do not change the weights' shapes or meaning: training knobs, bookkeeping,
# and the VLM location (a path, which differs between machines). Every other field is
# architecture and must equal the base's for a task vector to mean anything.
_NON_ARCH_FIELDS = frozenset({
    "device", "use_amp", "use_peft", "push_to_hub", "repo_id", "private", "tags", "license",
    "pretrained_path", "vlm_model_name", "load_vlm_weights", "compile_model", "compile_mode",
    "normalization_mapping", "dropout", "kl_weight", "freeze_vision_encoder",
    "train_expert_only", "train_state_proj", "n_action_steps", "temporal_ensemble_coeff",
    "rtc_config", "pretrained_backbone_weights"})
_NON_ARCH_PREFIXES = ("optimizer_", "scheduler_")


def read_config(path: str | Path) -> dict:
    """``path/config.json`` as a dict; InputError when missing or not JSON."""
    return read_config_json(path, "a LeRobot policy directory")


def looks_like_lerobot(config: dict) -> bool:
    """A LeRobot ``PreTrainedConfig`` dump: a string ``type`` plus ``input_features`` /
    ``output_features`` and no Hugging Face ``model_type``."""
    return (isinstance(config.get("type"), str) and "model_type" not in config
            and isinstance(config.get("input_features"), dict)
            and isinstance(config.get("output_features"), dict))


def check_policy_dir(path: str | Path) -> dict:
    """Validate a LeRobot policy directory's files -> its config dict.

    InputError naming the file or field: not a LeRobot config, an unsupported ``type``, no
    ``model.safetensors``, a missing processor JSON or one of the step files it names."""
    path = Path(path)
    config = read_config(path)
    if not looks_like_lerobot(config):
        raise InputError(f"{path / 'config.json'}: not a LeRobot policy config (needs 'type', "
                         "'input_features' and 'output_features')")
    ptype = config["type"]
    if ptype in UNSUPPORTED_TYPES:
        raise InputError(f"{path / 'config.json'}: type {ptype!r} is not supported: "
                         f"{UNSUPPORTED_TYPES[ptype]}")
    if ptype not in SUPPORTED_TYPES:
        raise InputError(f"{path / 'config.json'}: type {ptype!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    if not (path / "model.safetensors").is_file():
        raise InputError(f"{path}: no model.safetensors")
    processor_files(path)  # raises on a missing processor file
    return config


def processor_files(path: str | Path) -> list[Path]:
    """The processor JSONs and every ``state_file`` they reference (sorted, relative names
    unique). InputError naming the missing file: a LeRobot >= 0.4 checkpoint keeps its
    normalisation statistics only there, so serving without them would be wrong, not degraded."""
    path = Path(path)
    out = []
    for name in PROCESSOR_NAMES:
        js = path / f"{name}.json"
        if not js.is_file():
            raise InputError(f"{path}: no {js.name} (the policy's processor pipeline with its "
                             "normalisation statistics; save it with the processor's "
                             "save_pretrained, as lerobot-train does)")
        try:
            steps = json.loads(js.read_text()).get("steps", [])
        except (json.JSONDecodeError, AttributeError) as e:
            raise InputError(f"{js}: invalid processor JSON: {e}") from None
        out.append(js)
        for step in steps:
            sf = step.get("state_file") if isinstance(step, dict) else None
            if sf:
                if Path(sf).name != sf or not (path / sf).is_file():
                    raise InputError(f"{js}: step {step.get('registry_name')!r} names state_file "
                                     f"{sf!r}, which is not a file in {path}")
                out.append(path / sf)
    return sorted(set(out))


def architecture_diff(base: dict, expert: dict) -> list[str]:
    """Names of the architecture fields in which ``expert``'s config differs from ``base``'s."""
    keys = set(base) | set(expert)
    return sorted(k for k in keys
                  if k not in _NON_ARCH_FIELDS and not k.startswith(_NON_ARCH_PREFIXES)
                  and base.get(k) != expert.get(k))


def _is_vlm_dir(p: Path) -> bool:
    # what SmolVLA reads offline: AutoConfig (config.json), AutoProcessor (preprocessor_config),
    # AutoTokenizer (tokenizer_config.json + tokenizer.json); see docs/BACKENDS.md
    return all((p / f).is_file() for f in ("config.json", "preprocessor_config.json",
                                            "tokenizer_config.json"))


def resolve_vlm_dir(policy_dir: str | Path, config: dict, vlm_dir: str | None = None
                    ) -> str | None:
    """The local directory SmolVLA must read its VLM config/tokenizer from (None when the policy
    has no ``vlm_model_name``). Order: ``vlm_dir`` (the load option / ``--vlm-dir``), the
    ``CARVE_LEROBOT_VLM_DIR`` env var, ``vlm_model_name`` as a path (absolute, else relative to
    the cwd, then to the checkpoint), ``<policy_dir>/vlm``. Nothing is ever downloaded: an
    unresolvable name is an InputError naming the field and the fix."""
    name = config.get("vlm_model_name")
    if not name:
        return None
    policy_dir = Path(policy_dir)
    explicit = vlm_dir or os.environ.get(VLM_DIR_ENV)
    if explicit:
        if not _is_vlm_dir(Path(explicit)):
            raise InputError(f"--vlm-dir / {VLM_DIR_ENV} {explicit!r}: not a VLM directory (needs "
                             "config.json, preprocessor_config.json, tokenizer_config.json)")
        return str(Path(explicit).resolve())
    for cand in (Path(name), policy_dir / name, policy_dir / "vlm"):
        if _is_vlm_dir(cand):
            return str(cand.resolve())
    hub_like = "/" in name and not Path(name).exists()
    kind = "a Hugging Face hub id" if hub_like else "not a local VLM directory"
    raise InputError(
        f"{policy_dir / 'config.json'}: field 'vlm_model_name' is {name!r} ({kind}); carve-serve "
        f"never downloads at run time. Fix: pass --vlm-dir DIR (or set {VLM_DIR_ENV}=DIR, or put "
        f"the directory at {policy_dir / 'vlm'}) where DIR holds the VLM's config.json, "
        "tokenizer and processor files (e.g. `huggingface-cli download <id> --exclude "
        "'*.safetensors'` once, on a machine with network access)")
