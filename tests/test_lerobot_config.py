"""LeRobot directory handling that needs no LeRobot (runs in every environment): the registry's
detector, the directory checks, architecture comparison, offline VLM resolution, and that the
default code paths never import LeRobot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from policy_server.errors import InputError
from policy_server.models.lerobot.config import (
    architecture_diff, check_policy_dir, resolve_vlm_dir)
from policy_server.models.registry import backend_admission_hooks, detect_backend

CONFIG = {"type": "act", "input_features": {"observation.state": {"type": "STATE", "shape": [6]}},
          "output_features": {"action": {"type": "ACTION", "shape": [6]}}, "dim_model": 64,
          "optimizer_lr": 1e-5, "device": "cpu"}


def _lerobot_dir(tmp_path, config=CONFIG, files=True):
    d = tmp_path / "pol"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if files:
        (d / "model.safetensors").write_bytes(b"")
        for name, step in (("policy_preprocessor", 3), ("policy_postprocessor", 0)):
            sf = f"{name}_step_{step}_normalizer_processor.safetensors"
            (d / f"{name}.json").write_text(json.dumps(
                {"name": name, "steps": [{"registry_name": "x", "state_file": sf}]}))
            (d / sf).write_bytes(b"")
    return d


def test_registry_detects_a_lerobot_dir_without_importing_lerobot(tmp_path):
    d = _lerobot_dir(tmp_path)
    code = ("import sys; from policy_server.models.registry import detect_backend; "
            f"c = detect_backend({str(d)!r}); "
            "print(c.__name__, 'lerobot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["LeRobotBackend", "False"]


def test_directory_checks_name_the_problem(tmp_path):
    d = _lerobot_dir(tmp_path)
    assert check_policy_dir(d)["type"] == "act"
    next(d.glob("policy_postprocessor_step_*")).unlink()
    with pytest.raises(InputError, match="state_file"):
        check_policy_dir(d)
    (d / "policy_preprocessor.json").unlink()
    with pytest.raises(InputError, match="no policy_preprocessor.json"):
        check_policy_dir(d)
    cfg = dict(CONFIG, type="pi0")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="'pi0' is not supported"):
        check_policy_dir(d)


def test_not_a_model_dir_is_an_input_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(InputError, match="model_type"):
        detect_backend(tmp_path)
    assert backend_admission_hooks(tmp_path, tmp_path) == []  # bare checkpoints admit as before


def test_architecture_diff_ignores_training_knobs():
    other = dict(CONFIG, optimizer_lr=1.0, device="cuda", n_action_steps=3)
    assert architecture_diff(CONFIG, other) == []
    assert architecture_diff(CONFIG, dict(CONFIG, dim_model=32)) == ["dim_model"]


def test_hub_id_vlm_is_refused_offline_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("CARVE_LEROBOT_VLM_DIR", raising=False)
    cfg = dict(CONFIG, type="smolvla", vlm_model_name="HuggingFaceTB/SmolVLM2-500M-Video-Instruct")
    with pytest.raises(InputError, match=r"'vlm_model_name'.*hub id.*--vlm-dir"):
        resolve_vlm_dir(tmp_path, cfg)
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    for f in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        (vlm / f).write_text("{}")
    assert resolve_vlm_dir(tmp_path, cfg) == str(vlm.resolve())  # <checkpoint>/vlm
    with pytest.raises(InputError, match="not a VLM directory"):
        resolve_vlm_dir(tmp_path, cfg, vlm_dir=str(tmp_path / "nope"))
