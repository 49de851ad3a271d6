"""Benchmark method specs: how each compared method builds what is served after admission step t.

Two ways to build, matching ``policy_server.state.admission`` and ``policy_server.state.oneshot``:

* ``continual`` -- ``admit`` expert t into the method's own state directory (the state
  carries every earlier step; the expert is then discarded). CARVE, the expert bank and the
  continual baselines (task arithmetic, MagMax, OPCM) go this way, as in CARVE's protocol.
* ``oneshot`` -- ``merge`` re-merges experts 1..t from scratch into a fresh output (TIES,
  DARE, TSV, ResMerge write one checkpoint; TALL masks write a state with per-skill masks). This
  is an upper bound for those methods' continual use: they get to see every expert again.

What is served follows from the output: a state is served as ``base + state`` (oracle skill id or
text router); a checkpoint is served as the base with no state (one task-agnostic model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policy_server.errors import InputError


@dataclass(frozen=True)
class MethodSpec:
    """One benchmark row. ``method``/``options`` are passed to the merge engine unchanged."""

    name: str                      # label in tables and plots (unique)
    method: str                    # engine method name (policy_server.merge.methods registry)
    build: str                     # "continual" (admit step by step) | "oneshot" (re-merge 1..t)
    options: dict = field(default_factory=dict)
    description: str = ""
    storage: dict = field(default_factory=dict)  # admission fields, e.g. {"core_dtype": "bfloat16"}

    @property
    def rank(self) -> int | None:
        """Fixed CARVE residual rank, for the rank-vs-success plot (None: not a fixed-rank run)."""
        if self.method != "carve" or self.options.get("energy") is not None:
            return None
        return int(self.options.get("rank", 64))

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "build": self.build,
                "options": dict(self.options), "description": self.description,
                "rank": self.rank, "storage": dict(self.storage)}


def _carve(rank: int | None = None, **extra) -> MethodSpec:
    opts = dict(extra)
    if rank is not None:
        opts["rank"] = rank
    label = "carve" + (f"-r{rank}" if rank is not None else "")
    if opts.get("energy") is not None:
        label = f"carve-e{opts['energy']:g}"
    if opts.get("drift_compensation"):
        label += "-drift"
    return MethodSpec(label, "carve", "continual", opts,
                      "CARVE: shared core + rank-r SVD residual per skill"
                      + (", energy-chosen rank" if "energy" in opts else "")
                      + (", drift compensation" if opts.get("drift_compensation") else ""))


# Every method the runner knows, by label. Options not given use the method's defaults
# (docs/METHODS.md), which follow the reference implementations.
REGISTRY: dict[str, MethodSpec] = {s.name: s for s in [
    MethodSpec("bank", "bank", "continual", {}, "expert bank: every expert kept whole (ceiling)"),
    _carve(4), _carve(16), _carve(64),
    _carve(energy=0.9), _carve(energy=0.95),
    _carve(16, drift_compensation=True),
    # the core update-rate variants of docs/CARVE.md (default "1/t" is carve-r16 itself)
    MethodSpec("carve-r16-rate-t1", "carve", "continual", {"rank": 16, "rate": "1/(t+1)"},
               "CARVE rank 16, core rate 1/(t+1) (half of the first skill stays residual)"),
    MethodSpec("carve-r16-rate-count", "carve", "continual", {"rank": 16, "rate": "count"},
               "CARVE rank 16, per-coordinate core rate 1/(n_j+1)"),
    # the demo VLA is float32, so its default core is float32 too: this row stores the core in
    # bfloat16 to measure what a bf16 base's default storage does to closed-loop success
    MethodSpec("carve-r16-bf16core", "carve", "continual", {"rank": 16},
               "CARVE rank 16 with the core stored in bfloat16", {"core_dtype": "bfloat16"}),
    MethodSpec("ta", "task_arithmetic", "continual", {},
               "task arithmetic, admitted online (C_t = C_{t-1} + lam tau_t)"),
    MethodSpec("magmax", "magmax", "continual", {}, "MagMax, admitted online"),
    MethodSpec("opcm", "opcm", "continual", {}, "OPCM, admitted online"),
    MethodSpec("ties", "ties", "oneshot", {}, "TIES, re-merged over experts 1..t"),
    MethodSpec("dare", "dare", "oneshot", {}, "DARE (+TA), re-merged over experts 1..t"),
    MethodSpec("tsv", "tsv", "oneshot", {}, "TSV-Merge, re-merged over experts 1..t"),
    MethodSpec("resmerge", "resmerge", "oneshot", {}, "ResMerge, re-merged over experts 1..t"),
    MethodSpec("iso_c", "iso_c", "oneshot", {}, "Iso-C, re-merged over experts 1..t"),
    MethodSpec("iso_cts", "iso_cts", "oneshot", {}, "Iso-CTS, re-merged over experts 1..t"),
    MethodSpec("tall_mask", "tall_mask", "oneshot", {},
               "TALL / MergeVLA task masks (per-skill masks), re-merged over experts 1..t"),
    # MergeVLA's per-skill expert head: the demo VLA's last action-expert block
    # (``action_expert.head.*``, docs/DEMO_VLA.md) is kept whole per skill (Dense(tau_i - mean)),
    # the rest masked. The pattern names demo-VLA keys: the benchmark's factory is the demo VLA.
    MethodSpec("tall_mask-heads", "tall_mask", "oneshot",
               {"head_patterns": ["action_expert.head.*"]},
               "TALL / MergeVLA masks + per-skill expert heads (action_expert.head.*), "
               "re-merged over experts 1..t"),
]}

DEFAULT_METHODS = ["bank", "carve-r16", "carve-e0.9", "ta", "ties", "tall_mask", "magmax"]
QUICK_METHODS = ["carve-r16", "ta"]


def parse_label(label: str) -> MethodSpec:
    """Registry label, or an ad-hoc CARVE variant ``carve-r<N>`` / ``carve-e<F>`` [+ ``-drift``]."""
    if label in REGISTRY:
        return REGISTRY[label]
    if label.startswith("carve-"):
        body, drift = label[len("carve-"):], False
        if body.endswith("-drift"):
            body, drift = body[:-len("-drift")], True
        extra = {"drift_compensation": True} if drift else {}
        try:
            if body.startswith("r"):
                return _carve(int(body[1:]), **extra)
            if body.startswith("e"):
                return _carve(energy=float(body[1:]), **extra)
        except ValueError:
            pass
    raise InputError(f"unknown benchmark method {label!r}; choose from {sorted(REGISTRY)}, "
                     f"'all', or carve-r<rank> / carve-e<energy> (optionally with -drift)")


def resolve(labels) -> list[MethodSpec]:
    """Labels (list, or one comma-separated string) -> specs, in order, without duplicates.
    ``all`` expands to every registered method (``REGISTRY`` order)."""
    if isinstance(labels, str):
        labels = [x for x in labels.split(",")]
    out: list[MethodSpec] = []
    for lab in labels:
        lab = lab.strip()
        if not lab:
            continue
        specs = list(REGISTRY.values()) if lab == "all" else [parse_label(lab)]
        for spec in specs:
            if spec.name not in {s.name for s in out}:
                out.append(spec)
    if not out:
        raise InputError("no benchmark methods given")
    return out

