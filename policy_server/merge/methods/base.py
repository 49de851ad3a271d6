"""The merge-method interface and registry (one class per method, as in mergekit).

Every method works per tensor, in float32, on task vectors ``tau = expert - base``. The streams
(``merge/stream.py``) read tensors one at a time and hand each method what it needs. A method's
protocol is what it declares here, and nothing else is looked at:

* ``continual = True``: it implements :meth:`MergeMethod.admit_tensor`, admitting one new expert
  into the carried per-tensor state without any earlier expert (CARVE, expert bank, online task
  arithmetic, MagMax, OPCM...); :func:`fold_step` is the one way an admission is folded in;
* ``one_shot`` (set automatically when a class overrides :meth:`MergeMethod.merge_tensor`): it
  merges all given experts at once (TIES, DARE, TALL masks, TSV...);
* ``per_skill``: it keeps per-skill parts, so a one-shot merge writes a state, not a checkpoint;
* ``needs_observe_pass``: ``observe_tensor`` must see every tensor before the merge pass;
* :attr:`MergeMethod.needs_residuals`: admissions re-fit earlier skills' residuals, so the stream
  must load them (they cost memory, so only then).

Options are a dataclass per method (``options_cls``); each field's ``metadata["help"]`` becomes a CLI
flag ``--<field-name-with-dashes>``, so a method's knobs are documented in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from policy_server.errors import InputError, StateError
from policy_server.tensors.entries import ResidualEntry


@dataclass
class TensorContext:
    """What a method knows about the tensor it is merging.

    name: checkpoint key; shape: full shape; dense: True when policy says keep this tensor dense
    (1-D tensors, ``--dense-pattern`` matches), so low-rank compression must not be applied;
    core_dtype: the dtype the core of this tensor will be stored in (None: it is not stored, or
    stored exactly). A method whose residual depends on the core (CARVE) rounds its new core to
    it first, so the residual is fitted against the core that will actually be served.
    """

    name: str
    shape: tuple[int, ...]
    dense: bool = False
    core_dtype: torch.dtype | None = None


@dataclass
class TensorState:
    """Per-tensor state a continual method carries from one admission to the next.

    core: dense float32 core delta (None before the first admission or for methods without core);
    aux: method-specific float32/int tensors (e.g. per-coordinate update counts);
    residuals: earlier skills' entries for this tensor, by skill name (read-only unless the method
    returns replacements in ``AdmitResult.updated``, e.g. drift compensation).
    """

    core: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    residuals: dict[str, ResidualEntry] = field(default_factory=dict)


@dataclass
class AdmitResult:
    """Outcome of admitting one expert's tensor.

    core/aux: the new carried state; entry: the new skill's residual (None = runs as base + core);
    updated: re-fitted entries of earlier skills; info: JSON-able facts for the manifest
    (``rank``, ``rel_error``, ``kind``...).
    """

    core: torch.Tensor | None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    entry: ResidualEntry | None = None
    updated: dict[str, ResidualEntry] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeResult:
    """Outcome of a one-shot merge of one tensor over N experts.

    core: shared delta (None = no shared part); entries: one per expert, in input order (None =
    that skill runs as base + core); info: JSON-able facts for the manifest.
    """

    core: torch.Tensor | None
    entries: list[ResidualEntry | None]
    info: dict[str, Any] = field(default_factory=dict)


class MergeMethod:
    """Base class. Subclasses set ``name``, ``options_cls``, ``continual`` and implement one of
    ``admit_tensor`` / ``merge_tensor``. ``aliases`` are extra CLI names (e.g. ``ta``)."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    options_cls: ClassVar[type] = None  # a dataclass
    #: True when the method implements ``admit_tensor`` (``carve admit`` accepts it).
    continual: ClassVar[bool] = False
    #: True when the class implements ``merge_tensor``; derived, never set by hand.
    one_shot: ClassVar[bool] = False
    #: True when the method keeps per-skill parts, so ``carve merge`` writes a state, not a checkpoint.
    per_skill: ClassVar[bool] = False
    #: True when merge_tensor needs statistics over all tensors first (e.g. TIES global trim);
    #: the stream then calls ``observe_tensor`` on every tensor before the merge pass. An
    #: instance may narrow it from its options.
    needs_observe_pass: ClassVar[bool] = False
    #: True when ``merge_tensor``'s core is elementwise across experts (each coordinate depends
    #: only on the N task vectors at that coordinate, no per-tensor statistic) and it returns no
    #: per-skill entries: a row block then merges on its own, bit-identically (TA, MagMax).
    elementwise: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # derived from the code itself, so the declaration can never disagree with it
        cls.one_shot = cls.merge_tensor is not MergeMethod.merge_tensor

    def __init__(self, options=None, seed: int = 0):
        self.options = options if options is not None else self.options_cls()
        self.seed = seed

    @property
    def needs_residuals(self) -> bool:
        """True when ``admit_tensor`` re-fits earlier skills' residuals (returned in
        ``AdmitResult.updated``), so they must be in ``TensorState.residuals``. Default False:
        the stream then hands an empty map and never loads earlier skills' files."""
        return False

    # continual methods -------------------------------------------------------------------------
    def admit_tensor(self, ctx: TensorContext, tau: torch.Tensor, state: TensorState, t: int,
                     skill: str) -> AdmitResult:
        """Admit expert number ``t`` (1-based) named ``skill``. tau: float32, shape ctx.shape."""
        raise NotImplementedError(f"method {self.name!r} is one-shot: use `carve merge`")

    def supports_blocks(self, ctx: TensorContext) -> bool:
        """True when :meth:`admit_blocked` can admit ``ctx``'s tensor from row blocks (so a huge
        tensor never exists whole in float32). Default False: the stream calls
        :meth:`admit_tensor` with the whole task vector."""
        return False

    def admit_blocked(self, ctx: TensorContext, tau_rows, core_prev: torch.Tensor | None,
                      t: int, skill: str) -> AdmitResult | None:
        """Admit a tensor seen as ``tau_rows(a, b)`` (float32 rows ``[a, b)``); only called
        when :meth:`supports_blocks`. None: the task vector is all zero (nothing to admit)."""
        raise NotImplementedError(f"method {self.name!r} has no row-block admission")

    # one-shot methods --------------------------------------------------------------------------
    def observe_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> None:
        """First pass over every tensor when ``needs_observe_pass``; default does nothing."""

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """Merge N task vectors (float32, shape ctx.shape) of one tensor."""
        raise NotImplementedError(f"method {self.name!r} is continual-only")

    def supports_merge_blocks(self, ctx: TensorContext) -> bool:
        """True when :meth:`merge_blocked` merges ``ctx``'s tensor from row blocks of all N
        experts (``merge/blocks.py``), bit-identically to :meth:`merge_tensor`, so a huge tensor
        is merged within a working set independent of N. A method with ``needs_observe_pass``
        that says True implements :meth:`observe_blocked` too. Default: :attr:`elementwise`."""
        return self.elementwise

    def merge_blocked(self, ctx: TensorContext, blocks) -> MergeResult:
        """Merge the tensor seen as ``blocks`` (a ``merge.blocks.RowBlocks``: iterate it for
        ``(a, b, taus)``, as many passes as needed); only called when
        :meth:`supports_merge_blocks`. The core is float32 ``ctx.shape``. Default, for an
        :attr:`elementwise` method: :meth:`merge_tensor` on each block, its info the last
        block's."""
        if not self.elementwise:
            raise NotImplementedError(f"method {self.name!r} has no row-block merge")
        core = torch.empty(ctx.shape, dtype=torch.float32)
        info: dict[str, Any] = {}
        for a, b, taus in blocks:
            res = self.merge_tensor(dataclasses.replace(ctx, shape=tuple(taus[0].shape)), taus)
            if any(e is not None for e in res.entries):
                raise StateError(f"method {self.name!r} is declared elementwise but returned "
                                 f"per-skill entries at {ctx.name!r}")
            core[a:b] = res.core
            info = res.info
        return MergeResult(core=core, entries=[None] * blocks.n, info=info)

    def observe_blocked(self, ctx: TensorContext, blocks) -> None:
        """The observe pass of one tensor read as ``blocks`` (see :meth:`merge_blocked`)."""
        raise NotImplementedError(f"method {self.name!r} has no row-block observe pass")

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


def fold_step(method: MergeMethod, ctx: TensorContext, tau: torch.Tensor, state: TensorState,
              t: int, skill: str) -> tuple[AdmitResult, TensorState]:
    """Admit ``tau`` (float32, ``ctx.shape``) as expert ``t`` named ``skill`` into ``state``.

    The one fold of an admission, shared by every admission loop. Returns the method's result and
    the state the next admission of this tensor starts from: the new core and aux, and the
    residual map with the re-fits applied and ``skill``'s new entry in place of any old one
    (dropped when the new entry is None). A re-fit of a skill that is not in ``state.residuals``
    is a method bug: StateError naming the method, skill and tensor.
    """
    res = method.admit_tensor(ctx, tau, state, t, skill)
    residuals = dict(state.residuals)
    for name, entry in res.updated.items():
        if name not in residuals:
            raise StateError(f"method {method.name!r} re-fitted unknown skill {name!r} at "
                             f"{ctx.name!r}")
        residuals[name] = entry
    residuals.pop(skill, None)
    if res.entry is not None:
        residuals[skill] = res.entry
    return res, TensorState(core=res.core, aux=res.aux, residuals=residuals)


METHODS: dict[str, type[MergeMethod]] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding ``cls`` to the registry under its name and aliases."""
    if not cls.name or cls.options_cls is None:
        raise TypeError(f"{cls.__name__} must set name and options_cls")
    for key in (cls.name, *cls.aliases):
        if key in _ALIASES and _ALIASES[key] != cls.name:
            raise TypeError(f"merge method name {key!r} registered twice")
        _ALIASES[key] = cls.name
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    """Look a method up by name or alias; InputError listing the known names otherwise."""
    from policy_server.merge import methods as _  # noqa: F401  (imports every method module)

    key = _ALIASES.get(name.lower().replace("_", "-"), _ALIASES.get(name))
    if key is None:
        raise InputError(f"unknown merge method {name!r}; known: {', '.join(sorted(_ALIASES))}")
    return METHODS[key]


def build_options(method_cls: type[MergeMethod], values: dict[str, Any]):
    """Build the options dataclass from a {field: value} dict, rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(method_cls.options_cls)}
    unknown = set(values) - names
    if unknown:
        raise InputError(f"method {method_cls.name!r} has no option(s) {sorted(unknown)}; "
                         f"it takes {sorted(names)}")
    return method_cls.options_cls(**values)
