"""Demo VLA backend: shapes, save/load round trip, registry dispatch and errors."""

import json

import numpy as np
import pytest
import torch

from policy_server.errors import InputError
from policy_server.models.base import ObservationBatch, PolicyBackend
from policy_server.models.demo_vla import (MODEL_TYPE, DemoVLABackend, DemoVLAConfig,
                                           hash_tokenize)
from policy_server.models.registry import load_backend, register_backend

torch.set_num_threads(1)


def _batch(b=3, state_dim=39, seed=0, images=None):
    rng = np.random.default_rng(seed)
    return ObservationBatch(rng.normal(size=(b, state_dim)).astype(np.float32),
                            ["press the button", "open the drawer", "slide the window open"][:b],
                            images or {})


def _stats_cfg(**kw):
    rng = np.random.default_rng(1)
    return DemoVLAConfig(state_mean=rng.normal(size=39).tolist(),
                         state_std=(rng.random(39) + 0.5).tolist(),
                         action_mean=[0.1, -0.2, 0.0, 0.3], action_std=[0.5, 0.4, 0.3, 0.9], **kw)


def test_forward_shapes_and_spec():
    be = DemoVLABackend(_stats_cfg(chunk_length=5))
    out = be.predict(_batch())
    assert out.shape == (3, 5, 4) and out.dtype == torch.float32
    assert be.spec.state_dim == 39 and be.spec.action_dim == 4 and be.spec.chunk_length == 5
    assert be.spec.action_low == [-1.0] * 4 and be.spec.action_high == [1.0] * 4
    assert be.spec.normalization["action_std"] == [0.5, 0.4, 0.3, 0.9]
    # the instruction changes the output (conditioning is wired through)
    b1, b2 = _batch(1), _batch(1)
    b2.instructions = ["a completely different sentence"]
    assert not torch.allclose(be.predict(b1), be.predict(b2))


def test_unnormalisation_uses_config_stats():
    cfg = _stats_cfg()
    be = DemoVLABackend(cfg)
    norm = be.forward_normalized(_batch()).detach()
    expect = norm * torch.tensor(cfg.action_std) + torch.tensor(cfg.action_mean)
    torch.testing.assert_close(be.predict(_batch()), expect)


def test_save_load_round_trip_identical(tmp_path):
    be = DemoVLABackend(_stats_cfg(), seed=3)
    with torch.no_grad():  # perturb so the test doesn't pass on a fresh init only
        for p in be.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    be.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE and len(cfg["state_mean"]) == 39
    loaded = load_backend(tmp_path / "m")
    assert isinstance(loaded, DemoVLABackend)
    assert torch.equal(be.predict(_batch()), loaded.predict(_batch()))
    assert set(loaded.module.state_dict()) == set(be.module.state_dict())
    # stats live in config.json, never as tensors (merging must not touch them)
    assert not any("mean" in k or "std" in k for k in loaded.module.state_dict())


def test_value_projections_are_real_parameters():
    be = DemoVLABackend(DemoVLAConfig(num_expert_blocks=3))
    names = be.routing_features.value_projections
    assert be.routing_features.default_value_projection() == names[-1]
    params = dict(be.module.named_parameters())
    assert len(names) == 4 and names[-1] == "action_expert.head.cross_attn.v_proj.weight"
    for n in names:
        assert n in params and params[n].shape == (128, 128)


def test_glob_friendly_names_and_widths():
    keys = DemoVLABackend(DemoVLAConfig()).module.state_dict().keys()
    assert "action_expert.blocks.0.cross_attn.q_proj.weight" in keys
    assert "action_expert.head.out_proj.weight" in keys
    assert not any("self_attn" in k for k in keys)  # queries never attend to each other


def test_seeded_init_is_reproducible():
    a = DemoVLABackend(DemoVLAConfig(), seed=7).module.state_dict()
    b = DemoVLABackend(DemoVLAConfig(), seed=7).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_deterministic_and_bigram_sensitive():
    assert hash_tokenize("Open the Drawer", 4096) == hash_tokenize("open the drawer!", 4096)
    assert sorted(hash_tokenize("close open", 4096)) != sorted(hash_tokenize("open close", 4096))
    assert hash_tokenize("", 4096) == [0]


def test_image_encoder_when_cameras_configured():
    be = DemoVLABackend(DemoVLAConfig(cameras={"front": [32, 32]}))
    assert be.spec.images["front"].height == 32
    imgs = {"front": np.zeros((2, 32, 32, 3), np.uint8)}
    assert be.predict(_batch(2, images=imgs)).shape == (2, 4, 4)
    with pytest.raises(InputError, match="front"):
        be.predict(_batch(2))
    with pytest.raises(InputError, match="uint8"):
        be.predict(_batch(2, images={"front": np.zeros((2, 16, 16, 3), np.uint8)}))


def test_bad_inputs_raise_input_error():
    be = DemoVLABackend(DemoVLAConfig())
    with pytest.raises(InputError, match="state has shape"):
        be.predict(ObservationBatch(np.zeros((2, 10), np.float32), ["a", "b"]))
    with pytest.raises(InputError, match="instructions"):
        be.predict(ObservationBatch(np.zeros((2, 39), np.float32), ["a"]))
    with pytest.raises(InputError, match="NaN"):
        be.predict(ObservationBatch(np.full((1, 39), np.nan, np.float32), ["a"]))
    with pytest.raises(InputError, match="hidden_dim"):
        DemoVLABackend(DemoVLAConfig(hidden_dim=130, num_heads=4))
    with pytest.raises(InputError, match="state_mean"):
        DemoVLABackend(DemoVLAConfig(state_mean=[0.0] * 3))


def test_registry_errors(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_backend(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nope"}))
    with pytest.raises(InputError, match="unknown model_type 'nope'"):
        load_backend(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        load_backend(tmp_path)
    with pytest.raises(InputError, match="not a model directory"):
        load_backend(tmp_path / "missing")
    with pytest.raises(InputError, match="not a PolicyBackend"):
        register_backend("x", object)
    with pytest.raises(InputError, match="already registered"):
        register_backend(MODEL_TYPE, type("Other", (DemoVLABackend,), {}))


def test_load_rejects_mismatched_weights(tmp_path):
    DemoVLABackend(DemoVLAConfig()).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_dim"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="shape"):
        load_backend(tmp_path / "m")


def test_custom_backend_registration(tmp_path):
    class Fake(PolicyBackend):
        @classmethod
        def load(cls, path, device="cpu", dtype=torch.float32):
            obj = cls()
            obj.path = path
            return obj

        def predict(self, batch):
            return torch.zeros(len(batch), 1, 4)

    register_backend("fake_for_test", Fake)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fake_for_test"}))
    assert isinstance(load_backend(tmp_path), Fake)


def test_to_moves_and_casts_and_updates_input_placement():
    """The backend owns its placement: ``to`` casts the module and the inputs follow."""
    be = DemoVLABackend(DemoVLAConfig(cameras={}))
    assert be.to(dtype=torch.bfloat16) is be
    assert be.dtype == torch.bfloat16 and be.device == torch.device("cpu")
    assert {p.dtype for p in be.module.parameters()} == {torch.bfloat16}
    st = np.zeros((2, be.spec.state_dim), np.float32)
    assert be.normalize_state(st).dtype == torch.bfloat16
    out = be.predict(ObservationBatch(state=st, instructions=["a", "b"]))
    assert out.shape == (2, be.spec.chunk_length, be.spec.action_dim) and out.dtype == torch.float32
    be.to("cpu", torch.float32)
    assert be.dtype == torch.float32 and {p.dtype for p in be.module.parameters()} == {torch.float32}
