"""Skill residuals resident on the device, and the weight edits that apply them.

Two jobs, both about *weights* (the forward-time side path lives in ``residual_layers.py``):

* ``ParamIndex`` resolves merge-state tensor names (checkpoint keys) to the module's live tensors,
  with tied-weight aliases collapsed onto one canonical key so a delta is never applied twice.
* ``SkillBank`` holds every skill's residual per target parameter as a ``ResidualStack`` (stacked,
  rank-padded factors that a batch can gather per row), folds ``base + core`` once, and merges /
  unmerges one skill into the weights exactly (the fused mode).

Skill indices are global across the runtime: ``0`` is core-only, ``1..K`` are ``skill_names[i-1]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from policy_server.errors import StateError
from policy_server.tensors.entries import Dense, LowRank, Masked, ResidualEntry

CORE = 0  #: global skill index of "no skill" (core-only rows)


class ParamIndex:
    """Checkpoint key -> live tensor of ``module`` (parameter or floating buffer).

    ``module.state_dict(keep_vars=True)`` lists tied tensors once per owner key; all keys that share
    one tensor are aliases of the first (canonical) key, so callers write each tensor once.
    """

    def __init__(self, module: nn.Module):
        self.tensors: dict[str, torch.Tensor] = {}
        self.canonical: dict[str, str] = {}
        first_key_of: dict[int, str] = {}
        for key, t in module.state_dict(keep_vars=True).items():
            canon = first_key_of.setdefault(id(t), key)
            self.canonical[key] = canon
            if canon == key:
                self.tensors[key] = t

    def resolve(self, key: str, what: str) -> str:
        """Canonical key of ``key``; ``StateError`` naming ``what`` (e.g. "skill 'pick'") when the
        model has no such floating-point tensor."""
        canon = self.canonical.get(key)
        if canon is None:
            raise StateError(f"{what}: tensor {key!r} is not a parameter or buffer of the model")
        if not self.tensors[canon].is_floating_point():
            raise StateError(f"{what}: tensor {key!r} is not floating point "
                             f"({self.tensors[canon].dtype}); it cannot carry a delta")
        return canon

    def collapse(self, deltas: Mapping[str, object], what: str, same) -> dict[str, object]:
        """Re-key ``deltas`` by canonical key. Two aliases of one tensor must carry the same value
        (``same(a, b) -> bool``), otherwise the state is ambiguous and ``StateError`` is raised."""
        out: dict[str, object] = {}
        for key, value in deltas.items():
            canon = self.resolve(key, what)
            if canon in out:
                if not same(out[canon], value):
                    raise StateError(f"{what}: tied tensors {canon!r} and {key!r} carry different "
                                     "deltas")
                continue
            out[canon] = value
        return out


def _shape_check(key: str, got, want, what: str) -> None:
    if tuple(got) != tuple(want):
        raise StateError(f"{what}: tensor {key!r} residual has shape {tuple(got)}, the model "
                         f"parameter is {tuple(want)}")


def _same_entry(a: ResidualEntry, b: ResidualEntry) -> bool:
    """Whether two entries (for tied aliases of one tensor) describe the same residual."""
    if isinstance(a, Masked) or isinstance(b, Masked):
        return isinstance(a, Masked) and isinstance(b, Masked) and torch.equal(a.mask, b.mask)
    return torch.allclose(a.materialize(), b.materialize())


class ResidualStack:
    """Every skill's residual for one parameter, laid out for per-row gathering.

    Low-rank entries: ``P`` (S+1, m, r_max), ``Q`` (S+1, r_max, n); dense entries (``Dense`` and
    ``Masked``, the latter stored as ``D = mask * core - core``): ``D`` (S_d+1, *shape). All in the
    parameter's dtype and device. Slot 0 of each stack is all zeros (rows with no residual gather
    it); ranks below ``r_max`` are zero-padded, which is exact (padded columns contribute 0).
    ``lr_slot[g]`` / ``dense_slot[g]``: slot of global skill ``g`` (0 = none), length K+1.

    While a batch is bound (``bind``), ``lr_rows`` / ``dense_rows`` are (B,) int64 slot indices on
    the device, or None when no row of the batch has such a residual here (the layer then skips it).
    ``lr_segments`` is set instead of nothing when rows share skills (at most half as many distinct
    low-rank skills as rows): ``[(slot, rank, row_index (n_s,) int64)]``, one GEMM pair per skill
    on its own rows (the SGMV variant: no per-row copy of the factors, unpadded rank).
    """

    def __init__(self, key: str, param: torch.Tensor, num_skills: int,
                 lowrank: dict[int, LowRank], dense: dict[int, torch.Tensor]):
        self.key = key
        self.shape = tuple(param.shape)
        dt, dev = param.dtype, param.device
        self.lr_slot = [0] * (num_skills + 1)
        self.dense_slot = [0] * (num_skills + 1)
        self.rank: dict[int, int] = {}
        self.P = self.Q = self.D = None
        if lowrank:
            m, n = self.shape
            r_max = max(e.rank for e in lowrank.values())
            self.P = torch.zeros((len(lowrank) + 1, m, r_max), dtype=dt, device=dev)
            self.Q = torch.zeros((len(lowrank) + 1, r_max, n), dtype=dt, device=dev)
            for slot, (g, e) in enumerate(sorted(lowrank.items()), start=1):
                self.P[slot, :, :e.rank] = e.P.to(dev, dt)
                self.Q[slot, :e.rank, :] = e.Q.to(dev, dt)
                self.lr_slot[g] = slot
                self.rank[g] = e.rank
        if dense:
            self.D = torch.zeros((len(dense) + 1, *self.shape), dtype=dt, device=dev)
            for slot, (g, d) in enumerate(sorted(dense.items()), start=1):
                self.D[slot] = d.to(dev, dt)
                self.dense_slot[g] = slot
        self._lr_map = torch.tensor(self.lr_slot, dtype=torch.long, device=dev)
        self._dense_map = torch.tensor(self.dense_slot, dtype=torch.long, device=dev)
        self.lr_rows: torch.Tensor | None = None
        self.dense_rows: torch.Tensor | None = None
        self.lr_segments: list[tuple[int, int, torch.Tensor]] | None = None
        self.batch_size = 0

    def has(self, skill: int) -> bool:
        return bool(self.lr_slot[skill] or self.dense_slot[skill])

    def add_into(self, w32: torch.Tensor, skill: int) -> None:
        """``w32 += residual(skill)`` in place, ``w32`` float32 of this parameter's shape: one
        ``addmm_`` at the skill's own rank (no dense temporary), or one ``add_``."""
        if self.lr_slot[skill]:
            s, r = self.lr_slot[skill], self.rank[skill]
            w32.addmm_(self.P[s, :, :r].float(), self.Q[s, :r, :].float())
        elif self.dense_slot[skill]:
            w32.add_(self.D[self.dense_slot[skill]].float())

    def bind(self, rows_py: list[int], rows_dev: torch.Tensor,
             rows_of: dict[int, torch.Tensor] | None = None) -> None:
        """Bind a batch: ``rows_py`` global skill index per row, ``rows_dev`` the same as a (B,)
        int64 tensor on the device, ``rows_of[g]`` the row indices of skill ``g`` on the device
        (all built once per batch and shared by every stack)."""
        self.batch_size = len(rows_py)
        # decide activity on the host: no device sync, and layers skip inactive stacks for free
        lr_skills = sorted({g for g in rows_py if self.lr_slot[g]})
        self.lr_rows = self._lr_map[rows_dev] if lr_skills else None
        self.lr_segments = None
        if lr_skills and rows_of is not None and 2 * len(lr_skills) <= len(rows_py):
            self.lr_segments = [(self.lr_slot[g], self.rank[g], rows_of[g]) for g in lr_skills]
        self.dense_rows = (self._dense_map[rows_dev]
                           if any(self.dense_slot[g] for g in rows_py) else None)

    def unbind(self) -> None:
        self.lr_rows = self.dense_rows = self.lr_segments = None
        self.batch_size = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.P, self.Q, self.D) if t is not None)


def fold_core(index: ParamIndex, core: Mapping[str, torch.Tensor]) -> set[str]:
    """Add the dense core deltas into the live tensors once: ``W <- cast(float32(W) + C)``.
    Returns the canonical keys of the tensors changed. Float32 arithmetic whatever the model
    dtype, so a half-precision model rounds once, not per addition."""
    canon = index.collapse(core, "core", lambda a, b: torch.equal(a.float(), b.float()))
    with torch.no_grad():
        for key, c in canon.items():
            p = index.tensors[key]
            _shape_check(key, c.shape, p.shape, "core")
            p.copy_((p.float() + c.to(p.device, torch.float32)).to(p.dtype))
    return set(canon)


class SkillBank:
    """All skills' residuals, resident, plus exact fused merge/unmerge of one skill.

    Fused exactness: before a skill's delta is added to a parameter, the parameter's current value
    (``base + core``, model dtype) is copied aside; unmerging copies it back. Restoring a copy is
    bitwise exact whatever the dtype, while subtracting the delta again would not be (rounding in
    bf16/fp16 accumulates over switches). The cost is extra memory equal to the *active* skill's
    touched parameters only; copies are freed on unmerge.
    """

    def __init__(self, index: ParamIndex, skill_names: list[str], stacks: dict[str, ResidualStack]):
        self.index = index
        self.skill_names = list(skill_names)
        self.stacks = stacks
        self.active = CORE
        self._pristine: dict[str, torch.Tensor] = {}
        self._touches: list[list[str]] = [[]] + [
            [k for k, st in stacks.items() if st.has(g)] for g in range(1, len(skill_names) + 1)]

    @classmethod
    def build(cls, index: ParamIndex, skill_names: list[str],
              residuals: Mapping[str, Mapping[str, ResidualEntry]],
              core: Mapping[str, torch.Tensor]) -> "SkillBank":
        """``residuals[skill][key]``: entries as produced by the merge methods; ``core``: the dense
        core deltas by checkpoint key, a dict or a lazy mapping with ``keys()`` / ``get(key)``
        (``StateSnapshot.core(lazy=True)``). Only the core tensors a ``Masked`` entry needs are
        read (to turn it into the dense residual ``mask*core - core``), so a live reload never
        loads the whole core here. Aliases of one tied tensor are assumed consistent in ``core``
        (``fold_core`` / ``refold`` check that when they fold it)."""
        core_keys_of: dict[str, str] = {}  # canonical key -> the first core key naming it
        for k in sorted(core.keys()):
            core_keys_of.setdefault(index.resolve(k, "core"), k)
        lowrank: dict[str, dict[int, LowRank]] = {}
        dense: dict[str, dict[int, torch.Tensor]] = {}
        for g, name in enumerate(skill_names, start=1):
            what = f"skill {name!r}"
            entries = index.collapse(residuals[name], what, _same_entry)
            for key, e in entries.items():
                shape = index.tensors[key].shape
                if isinstance(e, LowRank):
                    if len(shape) != 2:
                        raise StateError(f"{what}: low-rank residual on {key!r} but the parameter "
                                         f"has shape {tuple(shape)} (need 2-D)")
                    _shape_check(key, (e.P.shape[0], e.Q.shape[1]), shape, what)
                    if e.P.shape[1] != e.Q.shape[0]:
                        raise StateError(f"{what}: tensor {key!r} factors disagree on rank "
                                         f"({tuple(e.P.shape)} @ {tuple(e.Q.shape)})")
                    if e.rank:
                        lowrank.setdefault(key, {})[g] = e
                elif isinstance(e, Dense):
                    _shape_check(key, e.D.shape, shape, what)
                    dense.setdefault(key, {})[g] = e.D.float()
                elif isinstance(e, Masked):
                    _shape_check(key, e.mask.shape, shape, what)
                    c = core.get(core_keys_of[key]) if key in core_keys_of else None
                    if c is not None:  # no core on this tensor: mask * 0 - 0 = no residual
                        c = c.float()
                        dense.setdefault(key, {})[g] = c * e.mask.to(c.device, torch.float32) - c
                else:
                    raise StateError(f"{what}: tensor {key!r} has unknown entry type "
                                     f"{type(e).__name__}")
        stacks = {key: ResidualStack(key, index.tensors[key], len(skill_names),
                                     lowrank.get(key, {}), dense.get(key, {}))
                  for key in sorted(set(lowrank) | set(dense))}
        return cls(index, skill_names, stacks)

    # ---- fused mode -------------------------------------------------------------------------
    def touched(self, skill: int) -> list[str]:
        """Canonical keys of the parameters ``skill`` has a residual on."""
        return self._touches[skill]

    def switch(self, skill: int) -> None:
        """Make the weights ``base + core + residual(skill)`` (``CORE``: ``base + core``). A no-op
        when ``skill`` is already active; otherwise unmerge exactly, then merge."""
        if skill == self.active:
            return
        self.unmerge()
        with torch.no_grad():
            for key in self._touches[skill]:
                p = self.index.tensors[key]
                self._pristine[key] = p.detach().clone()
                if p.dtype == torch.float32:  # add in place: no float32 temporary of the weight
                    self.stacks[key].add_into(p, skill)
                else:  # add in float32, round once to the model dtype
                    w32 = p.float()
                    self.stacks[key].add_into(w32, skill)
                    p.copy_(w32)
        self.active = skill

    def unmerge(self) -> None:
        """Restore every parameter touched by the active skill bitwise to ``base + core``."""
        with torch.no_grad():
            for key, saved in self._pristine.items():
                self.index.tensors[key].copy_(saved)
        self._pristine.clear()
        self.active = CORE

    # ---- side path binding ------------------------------------------------------------------
    def bind(self, rows: list[int], device: torch.device) -> None:
        """Bind per-row global skill indices (len B) to every stack for one forward pass."""
        rows_dev = torch.tensor(rows, dtype=torch.long, device=device)
        rows_of = {g: torch.tensor([i for i, r in enumerate(rows) if r == g], dtype=torch.long,
                                   device=device) for g in set(rows) if g != CORE}
        for st in self.stacks.values():
            st.bind(rows, rows_dev, rows_of)

    def unbind(self) -> None:
        for st in self.stacks.values():
            st.unbind()

    def nbytes(self) -> int:
        """Device bytes held by the residual stacks (zero slots and rank padding included)."""
        return sum(st.nbytes() for st in self.stacks.values())
