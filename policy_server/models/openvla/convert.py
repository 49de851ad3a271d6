"""Convert a published OpenVLA-OFT checkpoint directory into a pickle-free one (``carve convert``).

The OFT repo saves its L1-regression action head and proprio projector as
``action_head--<step>_checkpoint.pt`` / ``proprio_projector--<step>_checkpoint.pt`` (``torch.save``
of a DDP-wrapped ``state_dict``, keys prefixed ``module.``) beside the safetensors shards of the
VLA. Converting reads them once with ``torch.load(weights_only=True)`` (only with
``allow_pickle``), writes them as ``oft_heads.safetensors`` under the keys ``action_head.<k>`` /
``proprio_projector.<k>``, hard-links (or copies) every other non-pickle file, writes a
``model.safetensors.index.json`` that covers the shards *and* the heads (so admission sees the
heads as ordinary tensors and merges them like any other), and records the OFT constants as
``carve_oft`` in config.json. The output directory appears atomically; the source is unchanged.

FiLM (OFT+, ``--use_film True``): fine-tuning then also saves ``vision_backbone--<step>_checkpoint.pt``,
the ``state_dict`` of the whole ``FiLMedPrismaticVisionBackbone`` *after* PEFT wrapped its linears
(``vision_backbone.featurizer.blocks.N.block.attn.qkv.base_layer.weight`` + ``lora_A/B.default``,
``vision_backbone.featurizer.blocks.N.scale.weight`` ...). The published eval code loads that file
over the whole vision backbone, so it is authoritative: converting folds each LoRA pair into its
base weight, drops the wrapper's ``.block`` level so the keys are the checkpoint's own
(``vision_backbone.featurizer.blocks.N.attn.qkv.weight``) plus ``blocks.N.scale/shift.*``, writes
them to ``oft_vision_backbone.safetensors`` and points every ``vision_backbone.*`` key of the index
there (the shards' stale copies stay linked but unreferenced); ``carve_oft.use_film`` = true.

    python -m policy_server.models.openvla.convert SRC --out OUT --allow-pickle [--num-images 2]
        [--chunk 8] [--normalization bounds_q99] [--lora-alpha A]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from policy_server.errors import InputError

HEADS_FILE = "oft_heads.safetensors"
VISION_FILE = "oft_vision_backbone.safetensors"
FILM_KEY = re.compile(r"^vision_backbone\.(fused_)?featurizer\.blocks\.\d+\.(scale|shift)\.(weight|bias)$")
_LORA_A = ".lora_A.default.weight"
INDEX = "model.safetensors.index.json"
# the published OFT constants per robot platform (prismatic/vla/constants.py)
PLATFORMS = {"libero": (8, "bounds_q99"), "aloha": (25, "bounds"), "bridge": (5, "bounds_q99")}


def _one(src: Path, pattern: str, required: bool) -> Path | None:
    found = sorted(src.glob(pattern))
    if len(found) > 1:
        raise InputError(f"{src}: several {pattern} files {[f.name for f in found]}; keep one")
    if not found and required:
        raise InputError(f"{src}: no {pattern} (an OpenVLA-OFT checkpoint ships its action head so)")
    return found[0] if found else None


def _read_pickled_state(path: Path, allow_pickle: bool, prefix: str) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise InputError(f"{path}: is a pickle; converting it needs --allow-pickle (it is then read "
                         "once with torch.load(weights_only=True); the server never unpickles)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: not a state_dict of tensors")
    # DDP saves "module.<k>"; the eval code strips it the same way
    return {prefix + (k[len("module."):] if k.startswith("module.") else k): v.contiguous()
            for k, v in sd.items()}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _weight_map(src: Path) -> dict[str, str]:
    from policy_server.tensors.checkpoint import open_checkpoint

    if (src / INDEX).is_file():
        return dict(json.loads((src / INDEX).read_text())["weight_map"])
    with open_checkpoint(src) as r:  # unsharded: one file holds every key
        return {k: r.file_of(k).name for k in r.keys()}


def lora_scaling(src: Path, rank: int, lora_alpha: float | None) -> float:
    """PEFT's LoRA multiplier ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for the FiLM run's
    vision linears: ``lora_alpha`` if given, else ``lora_adapter/adapter_config.json`` (which
    finetune.py writes beside the pickles), else the published scripts' ``min(r, 16)``."""
    rs = False
    if lora_alpha is None and (src / "lora_adapter" / "adapter_config.json").is_file():
        ac = json.loads((src / "lora_adapter" / "adapter_config.json").read_text())
        if int(ac.get("r", rank)) != rank:
            raise InputError(f"{src}/lora_adapter/adapter_config.json: r={ac.get('r')} but the "
                             f"vision backbone's lora_A has rank {rank}")
        lora_alpha, rs = ac.get("lora_alpha"), bool(ac.get("use_rslora"))
    alpha = float(min(rank, 16) if lora_alpha is None else lora_alpha)
    return alpha / (rank ** 0.5 if rs else rank)


def fold_lora(sd: dict[str, torch.Tensor], scaling_of) -> dict[str, torch.Tensor]:
    """PEFT-wrapped linears -> plain ones: ``X.base_layer.weight`` (out, in), ``X.lora_A.default.weight``
    (r, in), ``X.lora_B.default.weight`` (out, r) -> ``X.weight = W + scaling_of(r) * B @ A``
    (float32 product, stored in W's dtype); ``X.base_layer.bias`` -> ``X.bias``. Exactly what
    the unmerged PEFT layer computes in eval mode (dropout off). Other keys pass unchanged."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".lora_B.default." in k or k.endswith(_LORA_A):
            continue
        if ".lora_" in k:
            raise InputError(f"vision backbone: unsupported LoRA tensor {k!r} (only lora_A/lora_B "
                             "of the 'default' adapter are folded)")
        out[k.replace(".base_layer.", ".")] = v
    for ka in (k for k in sd if k.endswith(_LORA_A)):
        mod = ka[:-len(_LORA_A)]
        a, b = sd[ka].float(), sd.get(mod + ".lora_B.default.weight")
        w = sd.get(mod + ".base_layer.weight")
        if b is None or w is None:
            raise InputError(f"vision backbone: LoRA module {mod!r} lacks lora_B or base_layer")
        out[mod + ".weight"] = (w.float() + scaling_of(a.shape[0]) * (b.float() @ a)).to(w.dtype)
    return out


def film_vision_state(path: Path, allow_pickle: bool, wmap: dict[str, str], scaling_of
                      ) -> dict[str, torch.Tensor]:
    """The FiLM run's ``vision_backbone--*_checkpoint.pt`` -> {checkpoint key: tensor}: LoRA folded,
    the wrapper's ``blocks.N.block.`` level dropped. Its plain keys must be exactly the
    checkpoint's ``vision_backbone.*`` keys, and it must carry FiLM projectors; else ``InputError``."""
    sd = fold_lora(_read_pickled_state(path, allow_pickle, ""), scaling_of)
    sd = {re.sub(r"(\.blocks\.\d+)\.block\.", r"\1.", k): v for k, v in sd.items()}
    film = {k for k in sd if FILM_KEY.match(k)}
    if not film:
        raise InputError(f"{path}: no FiLM projectors (vision_backbone.featurizer.blocks.N.scale/shift)")
    want = {k for k in wmap if k.startswith("vision_backbone.")}
    missing, extra = sorted(want - set(sd)), sorted(set(sd) - film - want)
    if missing or extra:
        raise InputError(f"{path}: does not match the checkpoint's vision backbone: missing "
                         f"{len(missing)} {missing[:3]}, unexpected {len(extra)} {extra[:3]}")
    return sd


def oft_config(heads: dict[str, torch.Tensor], llm_dim: int, chunk: int, num_images: int,
               normalization: str, use_film: bool = False) -> dict:
    """``carve_oft`` from the head shapes (action_dim, proprio_dim) and the given constants."""
    try:
        action_dim = int(heads["action_head.model.fc2.weight"].shape[0])
        in_dim = int(heads["action_head.model.fc1.weight"].shape[1])
    except KeyError as e:
        raise InputError(f"action head lacks {e.args[0]!r} (not an L1-regression MLPResNet head; "
                         "diffusion heads are not supported)") from None
    if in_dim != llm_dim * action_dim:
        raise InputError(f"action head fc1 takes {in_dim} inputs, expected llm hidden {llm_dim} x "
                         f"action_dim {action_dim}")
    proprio = heads.get("proprio_projector.fc1.weight")
    return {"num_actions_chunk": chunk, "action_dim": action_dim,
            "proprio_dim": int(proprio.shape[1]) if proprio is not None else 0,
            "num_images_in_input": num_images, "normalization": normalization, "use_film": use_film}


def convert_oft(src, out, *, allow_pickle: bool = False, num_images: int = 2,
                chunk: int | None = None, normalization: str | None = None,
                platform: str = "libero", lora_alpha: float | None = None) -> Path:
    """SRC (published OFT dir) -> OUT (pickle-free, loadable by ``OpenVLABackend``). Returns OUT.
    A ``vision_backbone--*_checkpoint.pt`` (saved only by FiLM runs) makes it a FiLM model;
    lora_alpha: that run's LoRA alpha, overriding ``lora_adapter/adapter_config.json`` and the
    published default ``min(r, 16)`` (see ``lora_scaling``)."""
    from policy_server.models.openvla.config import read_config

    src, out = Path(src), Path(out)
    if out.exists():
        raise InputError(f"{out}: already exists")
    if platform not in PLATFORMS:
        raise InputError(f"--platform {platform!r}: one of {sorted(PLATFORMS)}")
    cfg = read_config(src)
    heads = _read_pickled_state(_one(src, "action_head--*checkpoint.pt", True), allow_pickle, "action_head.")
    pp = _one(src, "proprio_projector--*checkpoint.pt", False)
    if pp is not None:
        heads.update(_read_pickled_state(pp, allow_pickle, "proprio_projector."))
    wmap = _weight_map(src)
    vb = _one(src, "vision_backbone--*checkpoint.pt", False)
    if cfg.raw.get("use_film") and vb is None:
        raise InputError(f"{src}: config says use_film but there is no vision_backbone--*_checkpoint.pt "
                         "(the FiLM projectors live only there)")
    vision = {} if vb is None else film_vision_state(
        vb, allow_pickle, wmap, lambda r: lora_scaling(src, r, lora_alpha))
    c, norm = PLATFORMS[platform]
    oft = oft_config(heads, int(cfg.text_config["hidden_size"]), chunk or c, num_images,
                     normalization or norm, use_film=vb is not None)
    clash = sorted(set(heads) & set(wmap))
    if clash:
        raise InputError(f"{src}: head keys {clash[:3]} already in the checkpoint")
    raw = dict(cfg.raw)
    raw.pop("use_film", None)  # recorded where the loader reads it, in carve_oft
    raw["carve_oft"] = oft
    _publish(src, out, {HEADS_FILE: heads, VISION_FILE: vision}, wmap, raw)
    return out


def _publish(src: Path, out: Path, new_files: dict[str, dict[str, torch.Tensor]],
             wmap: dict[str, str], raw: dict) -> None:
    """Write OUT atomically: SRC's non-pickle files linked, each non-empty ``new_files`` entry as a
    safetensors file, the index re-pointed at them, ``raw`` as config.json (validated first)."""
    from safetensors.torch import save_file

    from policy_server.models.openvla.config import read_config

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in sorted(src.iterdir()):
            pickled = f.suffix in (".pt", ".pth", ".bin")
            if f.is_file() and not pickled and f.name not in ("config.json", INDEX):
                _link_or_copy(f, tmp / f.name)
        total = 0
        for name, tensors in new_files.items():
            if tensors:
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
                wmap.update({k: name for k in tensors})
                total += sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"carve_converted_heads": total},
                                             "weight_map": wmap}, indent=2))
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        read_config(tmp)  # validate what we wrote before publishing it
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def register(sub) -> None:
    """Add ``convert`` to an argparse sub-parser set (the ``carve`` CLI's convention)."""
    p = sub.add_parser("convert", help="make an OpenVLA-OFT checkpoint pickle-free "
                                       "(heads, FiLM vision backbone -> safetensors)")
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--allow-pickle", action="store_true",
                   help="read the *.pt heads (and a FiLM vision backbone) once with "
                        "torch.load(weights_only=True)")
    p.add_argument("--num-images", type=int, default=2, help="images per observation (LIBERO OFT: 2)")
    p.add_argument("--platform", default="libero", choices=sorted(PLATFORMS))
    p.add_argument("--chunk", type=int, default=None, help="actions per chunk (default: the platform's)")
    p.add_argument("--normalization", choices=("bounds_q99", "bounds"), default=None)
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="FiLM runs: the LoRA alpha of the vision_backbone pickle (default: "
                        "lora_adapter/adapter_config.json, else the published min(r, 16))")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = convert_oft(args.src, args.out, allow_pickle=args.allow_pickle, num_images=args.num_images,
                      chunk=args.chunk, normalization=args.normalization, platform=args.platform,
                      lora_alpha=args.lora_alpha)
    film = " + FiLM vision backbone in " + VISION_FILE if (out / VISION_FILE).is_file() else ""
    print(f"converted {args.src} -> {out} (heads in {HEADS_FILE}{film}; carve_oft recorded in config.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
