"""Checkpoint reading/writing and full-expert task vectors, on real safetensors files."""

import json
import pickle

import pytest
import torch
from ckpt_utils import write_checkpoint

from policy_server.errors import InputError
from policy_server.tensors.checkpoint import open_checkpoint, save_checkpoint
from policy_server.merge.task_vectors import iter_task_vectors, open_expert


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.q_proj.weight": torch.randn(6, 4, generator=g),
        "model.layers.0.q_proj.bias": torch.randn(6, generator=g),
        "model.layers.1.mlp.weight": torch.randn(5, 6, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.float16),
        "model.position_ids": torch.arange(7, dtype=torch.int64),
        "head.weight": torch.randn(3, 5, generator=g),
    }


def test_sharded_and_single_read_identically(tmp_path):
    t = _tensors()
    single = open_checkpoint(write_checkpoint(tmp_path / "single", t))
    sharded = open_checkpoint(write_checkpoint(tmp_path / "sharded", t, shards=3))
    assert len(sharded.files) == 3
    assert single.keys() == sharded.keys() == sorted(t)
    for k in t:
        assert single.shape(k) == sharded.shape(k) == tuple(t[k].shape)
        assert single.dtype(k) == sharded.dtype(k) == t[k].dtype
        assert torch.equal(single.get(k), t[k]) and torch.equal(sharded.get(k), t[k])
    assert single.num_params() == sharded.num_params() == sum(v.numel() for v in t.values())
    # a returned tensor is an owned copy: editing it in place does not change later reads
    sharded.get("head.weight").add_(5.0)
    single.get("head.weight").add_(5.0)
    assert torch.equal(sharded.get("head.weight"), t["head.weight"])
    assert torch.equal(single.get("head.weight"), t["head.weight"])
    # direct file path reads the same tensors
    direct = open_checkpoint(tmp_path / "single" / "model.safetensors")
    assert direct.keys() == single.keys()


def test_fingerprint_stable_and_sensitive(tmp_path):
    t = _tensors()
    a = write_checkpoint(tmp_path / "a", t)
    b = write_checkpoint(tmp_path / "b", t)
    assert open_checkpoint(a).fingerprint() == open_checkpoint(a).fingerprint()
    assert open_checkpoint(a).fingerprint() == open_checkpoint(b).fingerprint()
    t2 = dict(t)
    t2["head.weight"] = t["head.weight"] + 1e-3
    c = write_checkpoint(tmp_path / "c", t2)
    assert open_checkpoint(c).fingerprint() != open_checkpoint(a).fingerprint()
    t3 = dict(t)
    t3["head.weight"] = t["head.weight"].to(torch.float16)
    d = write_checkpoint(tmp_path / "d", t3)
    assert open_checkpoint(d).fingerprint() != open_checkpoint(a).fingerprint()


def test_open_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no weights file"):
        open_checkpoint(tmp_path / "empty")
    d = write_checkpoint(tmp_path / "sh", _tensors(), shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="missing shard 'model-00002-of-00002.safetensors'"):
        open_checkpoint(d)
    # corrupt header: garbage JSON, and a truncated data section
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    with pytest.raises(InputError, match="corrupt safetensors header"):
        open_checkpoint(bad)
    tr = write_checkpoint(tmp_path / "tr", _tensors())
    raw = (tr / "model.safetensors").read_bytes()
    (tr / "model.safetensors").write_bytes(raw[:-16])
    with pytest.raises(InputError, match="truncated or corrupt"):
        open_checkpoint(tr)
    r = open_checkpoint(write_checkpoint(tmp_path / "ok", _tensors()))
    with pytest.raises(InputError, match="no tensor 'nope'"):
        r.get("nope")


def test_pickle_refused_then_loaded_with_opt_in(tmp_path):
    t = _tensors()
    d = tmp_path / "pkl"
    d.mkdir()
    torch.save(t, d / "pytorch_model.bin")
    with pytest.raises(InputError, match="allow_pickle=True.*--allow-pickle"):
        open_checkpoint(d)
    with pytest.raises(InputError, match="allow_pickle"):
        open_checkpoint(d / "pytorch_model.bin")
    r = open_checkpoint(d, allow_pickle=True)
    assert r.keys() == sorted(t)
    for k in t:
        assert torch.equal(r.get(k), t[k]) and r.dtype(k) == t[k].dtype
    # Lightning-style wrapper is unwrapped
    torch.save({"state_dict": t}, tmp_path / "wrapped.pt")
    assert open_checkpoint(tmp_path / "wrapped.pt", allow_pickle=True).keys() == sorted(t)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path, capsys):
    f = tmp_path / "evil.pt"
    with open(f, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    with pytest.raises(InputError, match="cannot load with torch.load\\(weights_only=True\\)"):
        open_checkpoint(f, allow_pickle=True)
    assert "pwned" not in capsys.readouterr().out


def test_save_checkpoint_shards_copies_template_and_roundtrips(tmp_path):
    t = _tensors()
    tmpl = write_checkpoint(tmp_path / "tmpl", t, extra_files={
        "tokenizer.json": "{}", "generation_config.json": "{}"})
    out = save_checkpoint(((k, t[k]) for k in sorted(t)), tmp_path / "out", max_shard_bytes=100,
                          template_dir=tmpl)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "generation_config.json",
            "model.safetensors.index.json"} <= names
    assert "model.safetensors" not in names  # template weights are not copied
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    r = open_checkpoint(out)
    assert len(r.files) > 1
    for k in t:
        assert torch.equal(r.get(k), t[k]) and r.dtype(k) == t[k].dtype
    # no temp dirs left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # large shard limit -> single file
    one = save_checkpoint(t, tmp_path / "one")
    assert (one / "model.safetensors").is_file() and not (one / "model.safetensors.index.json").exists()


def test_save_checkpoint_is_atomic(tmp_path):
    def gen():
        yield "a", torch.ones(3)
        raise RuntimeError("expert stream broke")

    with pytest.raises(RuntimeError, match="stream broke"):
        save_checkpoint(gen(), tmp_path / "out", max_shard_bytes=4)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "out")
    with pytest.raises(InputError, match="already exists"):
        save_checkpoint({"a": torch.zeros(2)}, tmp_path / "out")
    save_checkpoint({"a": torch.zeros(2)}, tmp_path / "out", overwrite=True)
    assert torch.equal(open_checkpoint(tmp_path / "out").get("a"), torch.zeros(2))


# ------------------------------------------------------------------ full experts
def _expert_of(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    e = {}
    for k, v in t.items():
        e[k] = (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) \
            if v.is_floating_point() else v.clone()
    return e


def test_full_expert_task_vectors(tmp_path):
    t = _tensors()
    e = _expert_of(t)
    base = open_checkpoint(write_checkpoint(tmp_path / "base", t))
    ex = open_expert(write_checkpoint(tmp_path / "ex", e, shards=2), base)
    assert ex.kind == "full" and ex.fingerprint() != base.fingerprint()
    assert "model.position_ids" not in ex.keys()
    seen = dict(iter_task_vectors(base, ex, progress=False))
    assert set(seen) == set(t)
    assert seen["model.position_ids"] is None
    for k, v in t.items():
        if v.is_floating_point():
            assert seen[k].dtype == torch.float32
            assert torch.equal(seen[k], e[k].float() - v.float())


def test_full_expert_mismatch_errors_name_the_tensor(tmp_path):
    t = _tensors()
    base = open_checkpoint(write_checkpoint(tmp_path / "base", t))
    e = _expert_of(t)
    e.pop("head.weight")
    e["extra.weight"] = torch.zeros(2)
    with pytest.raises(InputError, match="missing from the expert: 'head.weight'.*not in the base: 'extra.weight'"):
        open_expert(write_checkpoint(tmp_path / "e1", e), base)
    e = _expert_of(t)
    e["head.weight"] = torch.zeros(3, 6)
    with pytest.raises(InputError, match=r"'head.weight' has shape \(3, 6\).*has \(3, 5\)"):
        open_expert(write_checkpoint(tmp_path / "e2", e), base)
    e = _expert_of(t)
    e["head.weight"] = e["head.weight"].to(torch.bfloat16)
    with pytest.raises(InputError, match="'head.weight' is torch.bfloat16 but torch.float32"):
        open_expert(write_checkpoint(tmp_path / "e3", e), base)
    ex = open_expert(tmp_path / "e3", base, allow_dtype_mismatch=True)
    assert ex.task_vector("head.weight").dtype == torch.float32
    e = _expert_of(t)
    e["model.position_ids"] = torch.arange(7) + 1
    with pytest.raises(InputError, match="non-floating tensor 'model.position_ids' differs"):
        open_expert(write_checkpoint(tmp_path / "e4", e), base)


def test_sharded_pickle_index_with_opt_in(tmp_path):
    t = _tensors()
    d = tmp_path / "pk"
    d.mkdir()
    keys = sorted(t)
    torch.save({k: t[k] for k in keys[:3]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({k: t[k] for k in keys[3:]}, d / "pytorch_model-00002-of-00002.bin")
    wm = {k: "pytorch_model-00001-of-00002.bin" for k in keys[:3]}
    wm.update({k: "pytorch_model-00002-of-00002.bin" for k in keys[3:]})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(InputError, match="--allow-pickle"):
        open_checkpoint(d)
    r = open_checkpoint(d, allow_pickle=True)
    assert r.keys() == keys and all(torch.equal(r.get(k), t[k]) for k in keys)


def test_non_finite_expert_is_refused_naming_the_tensor(tmp_path):
    t = _tensors()
    base = open_checkpoint(write_checkpoint(tmp_path / "base", t))
    e = _expert_of(t)
    e["head.weight"][1, 2] = float("nan")
    ex = open_expert(write_checkpoint(tmp_path / "e", e), base)
    with pytest.raises(InputError, match="'head.weight' has 1 non-finite"):
        ex.task_vector("head.weight")


def test_get_rows_reads_exactly_those_rows(tmp_path):
    t = {"a": torch.randn(37, 5).to(torch.bfloat16), "b": torch.randn(9)}
    reader = open_checkpoint(write_checkpoint(tmp_path / "c", t, shards=2))
    for start, stop in ((0, 37), (3, 11), (36, 37), (5, 5)):
        assert torch.equal(reader.get_rows("a", start, stop), t["a"][start:stop])
    assert torch.equal(reader.get_rows("b", 2, 4), t["b"][2:4])
    with pytest.raises(InputError, match="out of range"):
        reader.get_rows("a", 30, 38)
    assert reader.tensor_bytes() == 37 * 5 * 2 + 9 * 4
    files = (tmp_path / "c").glob("*.safetensors")
    assert reader.file_bytes() == sum(p.stat().st_size for p in files)
