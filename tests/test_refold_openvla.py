"""The live-reload rebuild (``serving.rebuild_engine`` / ``runtime/refold.py``) on the OpenVLA
backend: a real (tiny) Llama + fused-ViT model, its layers wrapped for the side path, two versions
of a real state. The rebuilt engine equals a fresh ``build_engine`` of the new version, shares the
tensors no residual touches, the tokenizer and the text router's embedding model, and the served
engine keeps serving its own version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="timm is the OpenVLA backend's optional dependency")

import openvla_utils as U  # noqa: E402
from policy_server.models.base import ObservationBatch  # noqa: E402

torch.set_num_threads(1)
SKILLS = U.SKILLS


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return U.build_bank_stack(tmp_path_factory.mktemp("openvla_refold"))


def _obs(instr, seed):
    imgs = np.random.default_rng(seed).integers(0, 256, (len(instr), 224, 224, 3), dtype=np.uint8)
    return ObservationBatch(np.zeros((len(instr), 0), np.float32), list(instr), {"image": imgs})


@pytest.mark.parametrize("mode", ["side", "fused"])
def test_openvla_rebuild_beside_equals_a_fresh_build(stack, mode):
    from policy_server.models.openvla.backend import OpenVLABackend
    from policy_server.serving import EngineConfig, StateSource, build_engine

    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                       state_version="v000001", router="text", mode=mode, max_wait_ms=0.0)
    served = build_engine(cfg)
    new = fresh = None
    try:
        spatial = _obs([SKILLS["spatial"][1]], 3)
        before = served.infer(spatial, "spatial")  # in the fused mode: merged into the weights
        new = StateSource(cfg).build("v000002", beside=served)
        report = new.refold_report
        assert report.shared and report.rebuilt
        old_t, new_t = served.runtime.bank.index.tensors, new.runtime.bank.index.tensors
        for k in report.shared:  # e.g. the vision tower the experts never touched
            assert new_t[k].data_ptr() == old_t[k].data_ptr(), k
        for k in report.rebuilt:
            assert new_t[k].data_ptr() != old_t[k].data_ptr(), k
        backend_old, backend_new = served.runtime.backend, new.runtime.backend
        assert backend_new.module is not backend_old.module
        assert backend_new.tokenizer is backend_old.tokenizer
        assert new.router.embedder is served.router.embedder  # one text embedding model
        assert sorted(backend_new.skill_stats) == ["object", "spatial"]
        assert sorted(backend_old.skill_stats) == ["spatial"]  # the served one is untouched

        fresh = build_engine(EngineConfig(**{**cfg.__dict__, "state_version": "v000002"}))
        for k, t in fresh.runtime.bank.index.tensors.items():
            assert torch.equal(new_t[k], t), k
        for name, (_, instr) in SKILLS.items():
            o = _obs([instr], 5)
            np.testing.assert_array_equal(new.infer(o, name), fresh.infer(o, name))
        own = OpenVLABackend.load(stack["experts"]["object"]).predict(_obs([SKILLS["object"][1]],
                                                                          5))[0].numpy()
        np.testing.assert_allclose(new.infer(_obs([SKILLS["object"][1]], 5), "object"), own,
                                   rtol=1e-5, atol=1e-5)
        # the served engine still serves v000001, bitwise as before the rebuild
        np.testing.assert_array_equal(served.infer(spatial, "spatial"), before)
        assert served.runtime.skill_names == ["spatial"]
    finally:
        for e in (served, new, fresh):
            if e is not None:
                e.close()
