"""PolicyRuntime: serve a backend with ``base + core`` folded and every skill residual resident.

Execution plans per ``infer`` call (``mode``):

* ``"fused"``: the batch's skill is merged into the weights (``SkillBank.switch``: exact, a no-op
  when it is already active). A batch mixing skills runs one forward per skill group, the currently
  merged skill's group first.
* ``"side"``: weights stay ``base + core``; wrapped layers add each row's residual (BGMV, see
  ``residual_layers.py``) so one forward serves all rows. Skills with a residual the side path
  cannot apply per row (``SidePath.fallback_keys``) run as fused groups.
* ``"auto"`` (default): a batch with one distinct skill runs fused (zero per-step overhead; a switch
  happens only when that skill changes); a mixed batch unmerges (back to ``base + core``) and runs
  the side path. If a layer turns out not to be batch-major (``SidePathError``), auto stops using
  the side path for good and serves mixed batches as fused groups.

Actions come back as float32 numpy (B, chunk, A) through the one ``ActionGuard`` (clipped to the
spec's bounds; non-finite outputs raise ``NonFiniteActions`` naming the rows and skills, never
returned to a robot). ``capture`` records routing features (module inputs) under the same lock as
inference, so a hook never sees another request's rows.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch

from policy_server.action_guard import ActionGuard
from policy_server.errors import InputError, StateError
from policy_server.models.base import ObservationBatch, PolicyBackend, PolicySpec
from policy_server.runtime.capture import InputCapture
from policy_server.runtime.residual_layers import SidePath, SidePathError, install_side_path
from policy_server.runtime.skill_bank import CORE, ParamIndex, SkillBank, fold_core

log = logging.getLogger(__name__)

MODES = ("auto", "fused", "side")
_FOLDED_ATTR = "_carve_core_folded"  # set on the module so a second runtime cannot fold twice


def take_rows(batch: ObservationBatch, rows: list[int]) -> ObservationBatch:
    """Sub-batch of ``batch`` with the given row indices (in that order), per-row skills and
    episode ids included (a LeRobot backend reads them)."""
    return batch.take(rows)


class PolicyRuntime:
    """Weights owner and executor for one backend and one merge-state snapshot.

    backend: a loaded ``PolicyBackend`` (its module is modified in place: placed on ``device``
    with ``backend.to``, core folded, cast to ``dtype`` when given, layers wrapped for the side
    path). The runtime is the only owner of placement: pass the device here, not to the loader.
    snapshot: a ``StateSnapshot``-like object (``core()``, ``skill_names()``, ``residuals(name)``,
    ``version``, ``manifest``) or None for the plain base model.
    dtype: model dtype after folding (None keeps the module's); residuals are kept in the dtype of
    the parameter they target.
    prefolded: None (fold here), or the canonical keys of the tensors ``snapshot``'s core touches
    when ``backend.module`` already holds ``base + core`` on ``device`` in the serving dtype (a
    module rebuilt by ``runtime.refold`` beside a served runtime: nothing is placed, folded or cast
    again, and only the core tensors a ``Masked`` residual needs are read).

    ``core_keys``: canonical keys of the tensors the folded core touches (what a later refold must
    rebuild besides the residual targets).
    """

    def __init__(self, backend: PolicyBackend, snapshot=None, mode: str = "auto",
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 prefolded: set[str] | None = None):
        if mode not in MODES:
            raise InputError(f"runtime mode must be one of {MODES}, got {mode!r}")
        module = backend.module
        if prefolded is None and getattr(module, _FOLDED_ATTR, False):
            raise StateError("this backend's module already has a merge-state core folded in; "
                             "load the backend again for a new runtime")
        self.backend, self.mode = backend, mode
        self.device = torch.device(device)
        self.version = getattr(snapshot, "version", None)
        if prefolded is not None:
            # the module's tensors are shared with a served runtime or freshly built for this
            # version: placing or casting them here would touch tensors another runtime serves
            index = ParamIndex(module)
            self.core_keys = set(prefolded)
            core = snapshot.core(lazy=True) if snapshot is not None else {}
        else:
            backend.to(self.device)
            module.eval()
            index = ParamIndex(module)
            core = snapshot.core() if snapshot is not None else {}
            # fold in float32 while the module still has its load dtype, then cast once
            self.core_keys = fold_core(index, core)
            setattr(module, _FOLDED_ATTR, True)
            if dtype is not None:
                backend.to(dtype=dtype)
                index = ParamIndex(module)  # .to() may have replaced tensors
        names = list(snapshot.skill_names()) if snapshot is not None else []
        residuals = {n: snapshot.residuals(n) for n in names}
        self.bank = SkillBank.build(index, names, residuals, core)
        del core, residuals
        self._index_of = {n: i for i, n in enumerate(names, start=1)}
        self._side: SidePath | None = None
        self._side_ok = mode != "fused"
        if mode != "fused":
            self._side = install_side_path(module, self.bank.stacks)
        self._fallback_skills = {
            g for g in range(1, len(names) + 1)
            if self._side is None or any(k in self._side.fallback_keys
                                         for k in self.bank.touched(g))}
        self._lock = threading.Lock()  # weights, row bindings and capture hooks are shared state
        self._guard = ActionGuard(backend.spec)

    # ---- introspection ----------------------------------------------------------------------
    @property
    def spec(self) -> PolicySpec:
        return self.backend.spec

    @property
    def skill_names(self) -> list[str]:
        return list(self.bank.skill_names)

    @property
    def active_skill(self) -> str | None:
        """Skill currently merged into the weights (None: ``base + core``)."""
        a = self.bank.active
        return None if a == CORE else self.bank.skill_names[a - 1]

    def skill_index(self, skill: str | None) -> int:
        """Global index of ``skill`` (0 for None); ``StateError`` naming an unknown skill."""
        if skill is None:
            return CORE
        try:
            return self._index_of[skill]
        except (KeyError, TypeError):
            raise StateError(f"unknown skill {skill!r}; known skills: {self.skill_names}") from None

    def residual_bytes(self) -> int:
        """Device bytes of all resident residuals."""
        return self.bank.nbytes()

    def side_fallback_keys(self) -> set[str]:
        """Residual keys the side path serves via fused groups (empty in fused mode)."""
        return set(self._side.fallback_keys) if self._side else set()

    # ---- inference --------------------------------------------------------------------------
    def infer(self, batch: ObservationBatch, skills: list[str | None]) -> np.ndarray:
        """Actions (B, chunk, A) float32 for ``batch``, row ``i`` under ``skills[i]`` (None =
        core-only), clipped to ``spec.action_low/high``; ``NonFiniteActions`` (nothing
        returned) when any row is NaN/inf."""
        return self._guard(self._forward(batch, skills), skills)

    def infer_rows(self, batch: ObservationBatch, skills: list[str | None]
                   ) -> list[np.ndarray | Exception]:
        """Like :meth:`infer`, per row: row ``i`` is its (chunk, A) float32 actions, or a
        ``NonFiniteActions`` when that row (only) came out NaN/inf. What the micro-batcher uses,
        so one robot's bad output never costs another robot its step."""
        y, bad = self._guard.rows(self._forward(batch, skills), skills)
        bad_set = set(bad)
        return [self._guard.error([i], skills) if i in bad_set else y[i]
                for i in range(len(skills))]

    def _forward(self, batch: ObservationBatch, skills: list[str | None]) -> np.ndarray:
        if len(skills) != len(batch):
            raise InputError(f"infer: {len(skills)} skills for a batch of {len(batch)} rows")
        if len(batch) == 0:
            raise InputError("infer: empty batch")
        rows = [self.skill_index(s) for s in skills]
        batch = batch.with_skills(skills)  # backends with per-skill processors read row skills
        with self._lock, torch.inference_mode():
            out = self._run(batch, rows)
        return out.detach().to("cpu", torch.float32).numpy()

    def capture(self, batch: ObservationBatch, module_keys: Sequence[str],
                skill: str | None = None) -> dict[str, torch.Tensor]:
        """Routing features: {key: float32 (N, in) CPU}, the input of the module owning each key
        (a weight key such as ``...v_proj.weight`` or a module path) while ``batch`` runs with
        ``skill``'s residuals (None = ``base + core``); N = rows x tokens of ``batch`` only.

        Hooks are registered, the forward runs and the hooks are removed under the inference
        lock, so no other request's forward can pass through them. The actions are discarded.
        ``StateError`` for an unknown skill or a module the forward never called."""
        if len(batch) == 0:
            raise InputError("capture: empty batch")
        rows = [self.skill_index(skill)] * len(batch)
        batch = batch.with_skills([skill] * len(batch))
        cap = InputCapture(self.backend.module, module_keys)
        with self._lock, torch.inference_mode(), cap:
            self._run(batch, rows)
        return cap.result()

    def _run(self, batch: ObservationBatch, rows: list[int]) -> torch.Tensor:
        distinct = set(rows)
        if self.mode == "fused" or (self.mode == "auto" and len(distinct) == 1):
            return self._grouped(batch, rows)
        if not self._side_ok:
            return self._grouped(batch, rows)
        self.bank.switch(CORE)  # the side path adds residuals on top of base + core
        side_rows = [i for i, g in enumerate(rows) if g not in self._fallback_skills]
        try:
            if len(side_rows) == len(rows):
                return self._side_forward(batch, rows)
            parts = []
            if side_rows:
                parts.append((side_rows, self._side_forward(take_rows(batch, side_rows),
                                                            [rows[i] for i in side_rows])))
            rest = [i for i, g in enumerate(rows) if g in self._fallback_skills]
            parts.append((rest, self._grouped(take_rows(batch, rest), [rows[i] for i in rest])))
            return self._assemble(len(rows), parts)
        except SidePathError:
            if self.mode == "side":
                raise
            log.warning("side path unusable for this backend; auto mode serves mixed batches as "
                        "fused skill groups from now on", exc_info=True)
            self._side_ok = False
            return self._grouped(batch, rows)

    def _side_forward(self, batch: ObservationBatch, rows: list[int]) -> torch.Tensor:
        self.bank.bind(rows, self.device)
        try:
            return self._predict(batch)
        finally:
            self.bank.unbind()

    def _grouped(self, batch: ObservationBatch, rows: list[int]) -> torch.Tensor:
        """One fused forward per distinct skill; the merged skill's group first (no switch)."""
        order = sorted(set(rows), key=lambda g: (g != self.bank.active, g))
        if len(order) == 1:
            self.bank.switch(order[0])
            return self._predict(batch)
        parts = []
        for g in order:
            idx = [i for i, r in enumerate(rows) if r == g]
            self.bank.switch(g)
            parts.append((idx, self._predict(take_rows(batch, idx))))
        return self._assemble(len(rows), parts)

    @staticmethod
    def _assemble(n: int, parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
        first = parts[0][1]
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for idx, t in parts:
            out[torch.tensor(idx, device=first.device)] = t
        return out

    def _predict(self, batch: ObservationBatch) -> torch.Tensor:
        return self.backend.predict(batch)

    def copy_module(self, replace: dict[int, torch.Tensor]) -> torch.nn.Module:
        """A new module of the served module's architecture *without* side-path wrappers whose
        tensors are ``replace[id(t)]`` for each tensor ``t`` listed there and the very same
        objects (shared, not copied) for every other parameter and buffer. Only the Python
        structure is copied (modules, config attributes), so this costs no tensor memory; it
        runs under the inference lock, where no capture hook is registered and no wrapper is
        being bound. Tensors shared this way must never be written in place by either runtime:
        ``refold`` replaces every tensor a core or a residual touches."""
        module = self.backend.module
        with self._lock:
            memo: dict[int, object] = {}
            for _name, t in [*module.named_parameters(remove_duplicate=False),
                             *module.named_buffers(remove_duplicate=False)]:
                memo[id(t)] = replace.get(id(t), t)
            if self._side is not None:
                # each wrapper is copied as the plain layer it replaced (they share Parameters)
                for path, original in self._side.replaced.items():
                    wrapper = module.get_submodule(path)
                    memo[id(wrapper)] = copy.deepcopy(original, memo)
            return copy.deepcopy(module, memo)

    def close(self) -> None:
        """Unmerge any fused skill and remove the side-path wrappers (weights: ``base + core``)."""
        with self._lock:
            self.bank.unmerge()
            if self._side is not None:
                self._side.uninstall()
                self._side = None
            self._side_ok = False
