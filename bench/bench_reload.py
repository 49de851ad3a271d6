#!/usr/bin/env python
"""Reload benchmark: the transient peak memory of a live version switch (``carve serve --follow``
or the admin ``Reload`` RPC) on the built-in demo model.

A reload builds a whole second engine beside the served one, then swaps (see
``policy_server/service/reload.py``), so the expected transient is one more model with its
residuals. This serves the demo state's previous version, resets the process's peak RSS
(``/proc/self/clear_refs``), reloads to ``CURRENT`` and prints the peak RSS growth next to the
served model's weight bytes.

Usage: ``python bench/bench_reload.py [--state DIR --base DIR]`` (default: the cached demo).
"""

from __future__ import annotations

import argparse


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


def _weight_bytes(engine) -> int:
    module = getattr(engine.runtime.backend, "module", None)
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module else 0


def main() -> None:
    from policy_server.service.metrics import NO_METRICS
    from policy_server.service.reload import Reloader
    from policy_server.service.servicer import EngineHolder
    from policy_server.serving import EngineConfig, StateSource, build_engine
    from policy_server.state.store import StateStore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state")
    ap.add_argument("--base")
    args = ap.parse_args()
    if not args.state:
        from policy_server.demo import ensure_demo_state

        d = ensure_demo_state(progress=False, log=lambda *_: None)
        args.state, args.base = d["state_dir"], d["base_dir"]
    versions = [v["id"] for v in StateStore(args.state).versions()]
    if len(versions) < 2:
        raise SystemExit(f"{args.state}: needs two versions to switch between")
    cfg = EngineConfig(base_dir=str(args.base), state_dir=str(args.state),
                       state_version=versions[-2], router="exact")
    holder = EngineHolder()
    holder.swap(build_engine(cfg))
    weights = _weight_bytes(holder.engine)
    before = _kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    Reloader(holder, StateSource(cfg), NO_METRICS).reload(versions[-1])
    peak = _kb("VmHWM") - before
    print(f"reload {versions[-2]} -> {versions[-1]}: transient peak RSS +{peak / 1024:.1f} MiB "
          f"(served model weights {weights / 2**20:.1f} MiB; RSS before {before / 1024:.1f} MiB, "
          f"after {_kb('VmRSS') / 1024:.1f} MiB)")
    holder.close()


if __name__ == "__main__":
    main()
