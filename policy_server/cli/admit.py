"""``carve admit``: admit one expert (checkpoint or PEFT adapter) into a merge state.

Method options are generated from every registered method's options dataclass: each field becomes
``--field-name`` with the help text from ``field.metadata["help"]``. Values are parsed as strings
and converted with the *chosen* method's field type (``int``, ``float``, ``str``, ``list[str]``,
``X | None`` where ``none`` means None; ``bool`` fields get ``--x/--no-x``), and a flag belonging to
another method is an error naming the method's own options. Only options given on the command line
are passed, so later admissions inherit the state's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from policy_server.dtypes import STORE_DTYPE_NAMES
from policy_server.errors import InputError

_PREFIX = "mopt__"


def _method_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """{field name: [(method name, field), ...]} over every registered method."""
    from policy_server.merge.methods import METHODS, get_method

    get_method("carve")  # imports every method module
    out: dict[str, list] = {}
    for name, cls in sorted(METHODS.items()):
        for f in dataclasses.fields(cls.options_cls):
            out.setdefault(f.name, []).append((name, f))
    return out


def _shared_help(owners: list[tuple[str, dataclasses.Field]]) -> str:
    """Help of a flag several methods share: one text when they agree, else each method's own
    (their defaults differ, e.g. resmerge's and tsv's ``mean_patterns``)."""
    helps = [(m, (f.metadata or {}).get("help", "")) for m, f in owners]
    if len({h for _, h in helps}) == 1:
        return f"[{', '.join(m for m, _ in helps)}] {helps[0][1]}"
    return "; ".join(f"[{m}] {h}" for m, h in helps)


def add_method_option_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--<field>`` flags for every registered method's options (see the module doc)."""
    group = parser.add_argument_group(
        "method options", "knobs of the merge methods (each applies to the methods listed)")
    for fname, owners in sorted(_method_fields().items()):
        flag = "--" + fname.replace("_", "-")
        help_ = _shared_help(owners).replace("%", "%%")
        dest = _PREFIX + fname
        types = {str(f.type) for _, f in owners}
        if types == {"bool"}:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        elif any(t.startswith("list[") for t in types):
            group.add_argument(flag, dest=dest, nargs="+", action="extend", metavar="GLOB",
                               default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, dest=dest, default=argparse.SUPPRESS,
                               metavar=fname.upper(), help=help_)


def _convert(method: str, field: dataclasses.Field, value):
    t = str(field.type).replace(" ", "")
    flag = "--" + field.name.replace("_", "-")
    if t.endswith("|None") or t.startswith("Optional["):
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        t = t.removesuffix("|None").removeprefix("Optional[").removesuffix("]")
    try:
        if t == "bool":
            if isinstance(value, bool):
                return value
            return {"true": True, "1": True, "yes": True, "false": False, "0": False,
                    "no": False}[str(value).lower()]
        if t == "int":
            return int(value)
        if t == "float":
            return float(value)
        if t.startswith("list["):
            return list(value) if isinstance(value, list) else [value]
        return str(value)
    except (ValueError, KeyError) as e:
        raise InputError(f"{flag} {value!r}: expected {t} for method {method!r}") from e


def collect_method_options(args: argparse.Namespace, method: str) -> dict:
    """The method options given on the command line, converted for ``method``."""
    from policy_server.merge.methods import get_method

    cls = get_method(method)
    own = {f.name: f for f in dataclasses.fields(cls.options_cls)}
    out = {}
    for key, value in vars(args).items():
        if not key.startswith(_PREFIX):
            continue
        name = key[len(_PREFIX):]
        if name not in own:
            flags = ", ".join("--" + n.replace("_", "-") for n in own) or "none"
            raise InputError(f"--{name.replace('_', '-')} is not an option of method "
                             f"{cls.name!r} (its options: {flags})")
        out[name] = _convert(cls.name, own[name], value)
    return out


def spec_camera_names(base_dir) -> list[str]:
    """The wire camera keys of the base's spec (what clients send and the server routes on),
    read from its config.json without loading weights for the built-in backends (demo VLA,
    OpenVLA, LeRobot); any other model directory is loaded to ask its spec."""
    from pathlib import Path

    from policy_server.models.config_json import read_config_json
    from policy_server.models.registry import detect_backend, load_backend

    cls = detect_backend(base_dir)
    name = cls.__name__
    if name == "DemoVLABackend":
        return sorted(read_config_json(Path(base_dir), "a demo-VLA directory").get("cameras") or {})
    if name == "OpenVLABackend":
        from policy_server.models.openvla.backend import image_keys
        from policy_server.models.openvla.config import read_config

        oft = read_config(base_dir).oft
        return sorted(image_keys(oft.num_images_in_input if oft else 1))
    if name == "LeRobotBackend":
        from policy_server.models.lerobot.backend import wire_camera_key

        feats = read_config_json(Path(base_dir), "a LeRobot policy").get("input_features") or {}
        return sorted(wire_camera_key(k) for k, v in feats.items()
                      if isinstance(v, dict) and v.get("type") == "VISUAL")
    return sorted(load_backend(base_dir).spec.images)


def _frames_hook(args):
    """``ObservationDescriptorHook`` over ``--frames`` (InputError for bad files or cameras the
    base's spec does not have: the server could never see them in an observation)."""
    from router.descriptor import ObservationDescriptorHook, load_frames

    frames = load_frames(args.frames)
    cams = sorted(frames[0]["images"])
    try:
        known = spec_camera_names(args.base)
    except InputError as e:  # e.g. a bare checkpoint: no spec, so no camera to route on
        raise InputError(f"--frames: cannot read the camera names of the base's spec ({e})") \
            from e
    unknown = [c for c in cams if c not in known]
    if unknown:
        raise InputError(f"--frames: cameras {unknown} are not in the base's spec (its cameras: "
                         f"{', '.join(known) or 'none'})")
    return ObservationDescriptorHook(frames, cams)


def _build_hooks(args) -> list:
    from policy_server.merge.hooks import ValueSubspaceHook
    from policy_server.models.registry import backend_admission_hooks

    # first: the base's backend validates the expert (e.g. LeRobot architecture fields, processor
    # files) before anything heavy is loaded, and stores what it needs per skill
    hooks = backend_admission_hooks(args.base, args.expert)
    if args.frames:
        hooks.append(_frames_hook(args))
    if args.value_subspace:
        hooks.append(ValueSubspaceHook(args.value_subspace, k=args.value_subspace_k))
    if (args.instruction or args.description) and not args.no_embed:
        # Embed the instructions now, while admitting, so a server start loads them from the state
        # instead of re-embedding every skill (router/text.py checks model + texts fingerprints).
        from router.embedder import shared_embedder
        from router.text import TextEmbeddingHook

        hooks.append(TextEmbeddingHook(list(args.instruction or ()),
                                       shared_embedder(args.router_model),
                                       args.description or ""))
    return hooks


def _storage_line(storage: dict) -> str:
    frac = storage.get("fraction_of_bank")
    parts = []
    if frac is not None:
        parts.append(f"storage {100 * float(frac):.2f}% of the expert bank")
    for k in ("stored_params", "version_bytes"):
        if k in storage:
            parts.append(f"{k} {storage[k]:,}" if isinstance(storage[k], int) else f"{k} {storage[k]}")
    if storage.get("bytes_fraction_of_bank") is not None:
        parts.append(f"bytes: state / bank {storage['bytes_fraction_of_bank']:.3f}, "
                     f"(state + base) / bank {storage['bytes_fraction_of_bank_with_base']:.3f}")
    return "; ".join(parts) if parts else "storage: n/a"


def run_admit(args) -> int:
    from policy_server.state.admission import AdmitRequest, admit_request, state_method

    method = args.method or state_method(args.state_dir) or "carve"
    options = collect_method_options(args, method)
    report = admit_request(AdmitRequest(
        args.state_dir, args.base, args.expert, args.skill,
        instructions=args.instruction or (), description=args.description or "",
        method=method, options=options, replace=args.replace,
        allow_pickle=args.allow_pickle, allow_dtype_mismatch=args.allow_dtype_mismatch,
        allow_base_mismatch=args.allow_base_mismatch,
        dense_patterns=args.dense_pattern or (), store_dtype=args.store_dtype,
        core_dtype=args.core_dtype, keep=args.keep, hooks=_build_hooks(args),
        progress=not args.no_progress, seed=args.seed))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    s = report["tensors"]
    what = "re-admitted" if report["replaced"] else "admitted"
    print(f"{what} skill {report['skill']!r} as version {report['version']} "
          f"(method {report['method']}, t={report['t']}, {report['wall_s']:.1f}s)")
    print(f"  {_storage_line(report['storage'])}")
    line = f"  entries: {s['entries']} {s['kinds']}, unchanged tensors: {s['unchanged']}"
    if "rank_mean" in s:
        line += (f"; rank mean {s['rank_mean']:.1f} max {s['rank_max']}; rel_error mean "
                 f"{s['rel_error_mean']:.4f} max {s['rel_error_max']:.4f}")
    print(line)
    if report["gc"]["removed"] or report["gc"]["held"]:
        held = report["gc"]["held"]
        print(f"  retention: removed {', '.join(report['gc']['removed']) or 'nothing'}"
              + (f"; kept while open by a reader: {', '.join(held)}" if held else ""))
    if report["refit_skills"]:
        print(f"  re-fitted (drift compensation): {', '.join(report['refit_skills'])}")
    return 0


def add_common_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle checkpoints (pytorch_model.bin, *.pt), loaded with "
                        "torch.load(weights_only=True); refused by default")
    p.add_argument("--allow-dtype-mismatch", action="store_true",
                   help="accept an expert whose floating dtypes differ from the base's")
    p.add_argument("--dense-pattern", action="append", metavar="GLOB",
                   help="fnmatch glob of checkpoint keys kept dense, never low-rank (repeatable; "
                        "1-D tensors always are), e.g. 'action_head.*'")
    p.add_argument("--store-dtype", choices=STORE_DTYPE_NAMES, default=None,
                   help="dtype of the stored residual factors (set by the first admission; "
                        "default 'param': each tensor in its base parameter's dtype)")
    p.add_argument("--core-dtype", choices=STORE_DTYPE_NAMES, default=None,
                   help="dtype of the stored core (set by the first admission; default 'param': "
                        "each tensor in its base parameter's dtype, bf16 for a bf16 base; "
                        "'float32' keeps a float32 core at twice the bytes)")
    p.add_argument("--seed", type=int, default=0, help="seed of randomized steps (SVD sketches)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def register(sub) -> None:
    p = sub.add_parser("admit", help="admit one expert into a merge state (continual methods)",
                       description="Admit one fine-tuned expert (a checkpoint directory or a PEFT "
                                   "LoRA adapter) into the merge state STATE_DIR, creating it on "
                                   "first use. Streams tensor by tensor; commits atomically.")
    p.add_argument("state_dir", metavar="STATE_DIR")
    p.add_argument("--base", required=True, metavar="BASE_DIR", help="base checkpoint directory")
    p.add_argument("--expert", required=True, metavar="EXPERT_DIR",
                   help="expert checkpoint directory or PEFT adapter directory")
    p.add_argument("--skill", required=True, metavar="NAME", help="skill name ([A-Za-z0-9_.-])")
    p.add_argument("--instruction", action="append", metavar="TEXT",
                   help="an instruction the router maps to this skill (repeatable)")
    p.add_argument("--description", default="", metavar="TEXT", help="free-text skill description")
    p.add_argument("--method", default=None,
                   help="continual merge method, fixed by the first admission (default: the "
                        "state's method; carve for a new state)")
    p.add_argument("--replace", action="store_true",
                   help="re-admit an existing skill: its old residual is dropped and the expert is "
                        "admitted as the next step; the core keeps the old contribution")
    p.add_argument("--value-subspace", action="append", metavar="GLOB",
                   help="keep the top-k right singular vectors of the expert's matching weights "
                        "(e.g. '*.v_proj.weight') for the value-subspace router (repeatable)")
    p.add_argument("--value-subspace-k", type=int, default=8, metavar="K",
                   help="singular vectors kept per matched tensor (default 8)")
    p.add_argument("--frames", action="append", metavar="NPZ",
                   help="first frames of this skill's episodes for the hybrid router's first-"
                        "frame descriptors (repeatable): an .npz file, or a directory of them, "
                        "with one uint8 array per camera named by the base spec's camera key, "
                        "(H, W, 3) or (N, H, W, 3) RGB exactly as the client sends it (e.g. LIBERO "
                        "agentview rotated 180 degrees); serve with --router hybrid")
    p.add_argument("--router-model", default=None, metavar="PATH",
                   help="sentence-transformers model dir for the cached instruction embeddings "
                        "(default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--no-embed", action="store_true",
                   help="do not cache instruction embeddings (the server embeds at start)")
    p.add_argument("--keep", type=int, default=None, metavar="N",
                   help="versions retained after this admission (default 3; at least 2 so a "
                        "rollback to the parent works; 0 keeps every version): older ones are "
                        "garbage-collected unless a live reader has them open")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="admit even when BASE_DIR's fingerprint is not the one the state records "
                        "(logs a warning); refused by default")
    add_common_input_flags(p)
    add_method_option_flags(p)
    p.set_defaults(func=run_admit)


if __name__ == "__main__":  # pragma: no cover
    from policy_server.cli import main

    sys.exit(main(["admit", *sys.argv[1:]]))
