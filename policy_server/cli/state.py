"""``carve state show|verify|versions|rollback|gc|skills|export``: inspect and manage a merge state."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("state", help="inspect and manage a merge state",
                       description="Inspect, verify, roll back and garbage-collect a versioned "
                                   "merge state; edit skill instructions; export a skill.")
    ss = p.add_subparsers(dest="state_command", metavar="SUBCOMMAND", required=True)

    s = ss.add_parser("show", help="method, base, skills, ranks and storage of a version")
    s.add_argument("state_dir", metavar="STATE_DIR")
    s.add_argument("--version", help="version id (default: current)")
    s.add_argument("--json", action="store_true",
                   help="print the whole manifest as JSON, with the measured disk usage as 'disk'")
    s.set_defaults(func=run_show)

    s = ss.add_parser("verify", help="recheck every file's sha256")
    s.add_argument("state_dir", metavar="STATE_DIR")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--version", help="version id (default: current)")
    g.add_argument("--all", action="store_true", help="verify every version")
    s.add_argument("--base", help="also check this base against the version (default: the "
                                  "full content hash of every weight file, see --fast)")
    s.add_argument("--fast", action="store_true",
                   help="with --base: only the load-time fingerprint (tensor table, file sizes, "
                        "first and last MiB of each file), as `carve serve` checks it")
    s.add_argument("--base-sha256", metavar="HEX",
                   help="with --base: the base's known content sha256 to compare with (when the "
                        "state records none)")
    s.set_defaults(func=run_verify)

    s = ss.add_parser("versions", help="list committed versions")
    s.add_argument("state_dir", metavar="STATE_DIR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_versions)

    s = ss.add_parser("rollback", help="make an older version current (later ones are kept)")
    s.add_argument("state_dir", metavar="STATE_DIR")
    s.add_argument("version", metavar="VERSION")
    s.set_defaults(func=run_rollback)

    s = ss.add_parser("gc", help="delete old versions and abandoned staging directories")
    s.add_argument("state_dir", metavar="STATE_DIR")
    s.add_argument("--keep", type=int, default=3, help="newest versions to keep (default 3)")
    s.set_defaults(func=run_gc)

    s = ss.add_parser("skills", help="list skills; add/remove instructions (new version)")
    s.add_argument("state_dir", metavar="STATE_DIR")
    s.add_argument("--add-instruction", nargs=2, action="append", metavar=("SKILL", "TEXT"),
                   help="register another instruction for SKILL (repeatable)")
    s.add_argument("--remove-instruction", nargs=2, action="append", metavar=("SKILL", "TEXT"))
    s.add_argument("--set-description", nargs=2, action="append", metavar=("SKILL", "TEXT"))
    s.add_argument("--router-model", help="sentence-transformers model dir used to cache the "
                                          "new instructions' embeddings (default: packaged MiniLM)")
    s.add_argument("--no-embed", action="store_true",
                   help="do not re-embed (the server embeds at start instead)")
    s.set_defaults(func=run_skills)

    from policy_server.cli.export import add_export_parser

    add_export_parser(ss)


def _store(args):
    from policy_server.state.store import StateStore

    return StateStore(args.state_dir)


def _fmt_frac(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def run_show(args) -> int:
    from policy_server.dtypes import state_dtypes

    snap = _store(args).open(args.version)
    m = snap.manifest
    if args.json:
        print(json.dumps({**m, "disk": _store(args).disk_usage(snap.version)}, indent=1,
                         sort_keys=True))
        return 0
    st = m.get("storage", {})
    base = m.get("base", {})
    method = m.get("method", {})
    print(f"state {snap.path.parent.parent}  version {snap.version} (parent {m.get('parent')}, "
          f"{m.get('created')})")
    print(f"method {method.get('name')}  options {json.dumps(method.get('options', {}))}")
    store_dt, core_dt = state_dtypes(m)
    print(f"base fingerprint {str(base.get('fingerprint', ''))[:16]}  "
          f"params {base.get('num_params', 0):,}  dtype {base.get('dtype')}  "
          f"store dtype {store_dt}  core dtype {core_dt}")
    print(f"storage: {st.get('stored_params', 0):,} params; core "
          f"{st.get('core_params', 0):,}, residuals {st.get('residual_params', 0):,}; "
          f"{_fmt_frac(st.get('fraction_of_bank'))} of a {st.get('skills', 0)}-expert bank "
          f"({_fmt_frac(st.get('fraction_of_bank_with_base'))} counting the base)")
    for line in _bytes_lines(m, _store(args).disk_usage(snap.version)):
        print(line)
    print(f"skills ({len(snap.skill_names())}):")
    for name in snap.skill_names():
        rec = snap.skill(name)
        tensors = rec.get("tensors", {})
        ranks = [t.get("rank") or 0 for t in tensors.values() if t.get("kind") == "lowrank"]
        errs = [t.get("rel_error", 0.0) for t in tensors.values() if t.get("kind") == "lowrank"]
        kinds: dict[str, int] = {}
        for t in tensors.values():
            kinds[t.get("kind", "?")] = kinds.get(t.get("kind", "?"), 0) + 1
        rank_s = (f"rank mean {sum(ranks) / len(ranks):.1f} max {max(ranks)}, rel_error max "
                  f"{max(errs):.3f}" if ranks else "no low-rank entries")
        print(f"  {rec.get('order', '?'):>3}. {name}: {kinds}; {rank_s}; "
              f"{rec.get('stored_params', 0):,} params")
        for text in rec.get("instructions", []):
            print(f"       - {text}")
    return 0


def _bytes_lines(m: dict, du: dict) -> list[str]:
    """The byte accounting of ``carve state show``: the manifest's figures and the disk's."""
    from policy_server.state.format import bytes_accounting

    b = bytes_accounting(m)  # recomputed, so states from before the byte fields show them too
    return [
        f"bytes: version {b['version_bytes']:,} as stored ({du['version_bytes']:,} on disk with "
        f"the manifest); all {du['versions']} retained versions {du['retained_bytes']:,} "
        f"(hard links counted once, as du)",
        f"       bank of the same experts {b['bank_bytes']:,} (their dtypes); base "
        f"{b['base_bytes']:,}; state / bank {_fmt_ratio(b['bytes_fraction_of_bank'])}, "
        f"(state + base) / bank {_fmt_ratio(b['bytes_fraction_of_bank_with_base'])}"]


def _fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def run_verify(args) -> int:
    from policy_server.errors import IntegrityError, StateError

    store = _store(args)
    if not args.all:
        rep = store.verify(args.version, progress=True)
        print(f"{rep['version']}: ok ({rep['files']} files, {rep['bytes']:,} bytes)")
        _verify_base(args, store, rep["version"])
        return 0
    versions = [v["id"] for v in store.versions()]
    if not versions:
        raise StateError(f"{args.state_dir} has no committed versions")
    # --all reports every bad version instead of stopping at the first one
    bad = []
    for v in versions:
        try:
            rep = store.verify(v, progress=True)
        except StateError as e:  # IntegrityError, or a version directory without a manifest
            bad.append(v)
            print(f"{v}: FAILED: {e}")
            continue
        print(f"{rep['version']}: ok ({rep['files']} files, {rep['bytes']:,} bytes)")
    if bad:
        raise IntegrityError(f"{len(bad)} of {len(versions)} versions failed verification: "
                             f"{', '.join(bad)}")
    _verify_base(args, store, store.open().version)  # the base is checked against CURRENT
    return 0


def _verify_base(args, store, version: str) -> None:
    """``--base``: the base against ``version``'s manifest (full content unless ``--fast``)."""
    from policy_server.errors import InputError
    from policy_server.state.base_verify import verify_base

    if not args.base:
        if args.fast or args.base_sha256:
            raise InputError("--fast and --base-sha256 need --base")
        return
    rep = verify_base(store.open(version).manifest, args.base,
                      f"state {args.state_dir} version {version}", full=not args.fast,
                      expect_sha256=args.base_sha256)
    if rep["content_sha256"] is None:
        print(f"base {args.base}: fingerprint ok (fast check: bytes inside the files not read)")
    elif rep["compared_with"] is None:
        print(f"base {args.base}: fingerprint ok; content sha256 {rep['content_sha256']} (this "
              "state records no content hash, so only the fingerprint was compared; pass "
              "--base-sha256 to compare the content with a known hash)")
    else:
        print(f"base {args.base}: content sha256 {rep['content_sha256']} ok (matches the "
              f"{'given' if rep['compared_with'] == '--base-sha256' else 'recorded'} hash)")


def run_versions(args) -> int:
    vs = _store(args).versions()
    if args.json:
        print(json.dumps(vs, indent=1))
        return 0
    for v in vs:
        mark = "*" if v.get("is_current") else " "
        if "error" in v:
            print(f"{mark} {v['id']}  UNREADABLE: {v['error']}")
            continue
        print(f"{mark} {v['id']}  {v['created']}  {v['bytes']:>12,} B  {v['message']}  "
              f"skills: {', '.join(v['skills'])}")
    return 0


def run_rollback(args) -> int:
    store = _store(args)
    before = store.current_version()
    store.rollback(args.version)
    print(f"current version: {args.version} (was {before})")
    return 0


def run_gc(args) -> int:
    rep = _store(args).collect(keep=args.keep)
    print(f"removed {len(rep['removed'])}: {', '.join(rep['removed']) or 'nothing'}")
    if rep["held"]:
        print(f"kept (open by a live reader; retried by the next gc): {', '.join(rep['held'])}")
    return 0


def run_skills(args) -> int:
    from policy_server.errors import InputError

    store = _store(args)
    edits = (args.add_instruction or [], args.remove_instruction or [], args.set_description or [])
    if not any(edits):
        snap = store.open()
        for name in snap.skill_names():
            rec = snap.skill(name)
            print(f"{name}: {rec.get('description', '')}")
            for t in rec.get("instructions", []):
                print(f"  - {t}")
        return 0
    with store.transaction("edit skill instructions") as tx:
        records = {s["name"]: s for s in tx.manifest.get("skills", [])}
        touched = set()

        def rec(name):
            if name not in records:
                raise InputError(f"no skill {name!r} in {args.state_dir} "
                                 f"(skills: {', '.join(records) or 'none'})")
            touched.add(name)
            return records[name]

        for name, text in edits[0]:
            r = rec(name)
            if not text.strip():
                raise InputError(f"--add-instruction {name}: empty instruction")
            if text not in r.setdefault("instructions", []):
                r["instructions"].append(text)
        for name, text in edits[1]:
            r = rec(name)
            if text not in r.get("instructions", []):
                raise InputError(f"skill {name!r} has no instruction {text!r}")
            r["instructions"].remove(text)
        for name, text in edits[2]:
            rec(name)["description"] = text
        if not args.no_embed:
            from router.embedder import shared_embedder
            from router.text import skill_texts, text_router_artifacts

            emb = shared_embedder(args.router_model)
            parent = tx.parent
            for name in sorted(touched):
                r = records[name]
                arts = {k: v for k, v in parent.skill_artifacts(name).items()
                        if not k.startswith("router::text::")}
                texts = skill_texts(r)
                if texts:
                    arts.update(text_router_artifacts(texts, emb))
                tx.write_artifacts(name, arts)
        version = tx.commit()
    print(f"new version {version}: updated {', '.join(sorted(touched))}")
    return 0
