"""Per-row skill residual side path: layers that add each batch row's own skill residual.

The BGMV idea of Punica / S-LoRA: one forward serves a batch whose rows belong to different
skills. Each wrapped layer computes its base output once (weights = ``base + core``) and adds, per
row ``b`` with skill slot ``k_b``, the residual gathered from stacked factors:

    ResidualLinear:    y = x W^T + b + (x Q_k^T) P_k^T  [+ x D_k^T] [+ dB_k]
    ResidualLayerNorm: y = norm(x) * (w + dW_k) + (b + dB_k)
    ResidualEmbedding: y = E[ids] + P_k[ids] Q_k  [+ D_k[ids]]

with ``torch.bmm`` over factors gathered per row (``index_select`` on the stacks of
``skill_bank.ResidualStack``; slot 0 is zero for rows without a residual on this layer). When rows
share skills (at most B/2 distinct low-rank skills on a layer, the usual case of many robots and a
few skills), Linear layers use the segmented form instead (SGMV): one GEMM pair per skill on its
rows, which reads each skill's factors once instead of copying them per row. Dense and
``Masked`` residuals on Linear weights gather a dense (m, n) matrix per row: exact, but they cost
what the dense weight costs.

Wrappers *share* the base layer's Parameter objects rather than holding it as a child module (a
peft ``LoraLayer`` holds ``base_layer``): the state-dict keys then stay the checkpoint keys the rest
of carve-serve addresses, and ``isinstance(layer, nn.Linear)`` still holds for backend code.
Supported: exact ``nn.Linear`` (weight, bias), ``nn.LayerNorm`` (weight, bias), ``nn.Embedding``
(weight, without ``max_norm``) whose parameter has one owner module. Anything else (convolutions,
``nn.MultiheadAttention.in_proj_weight``, tied weights, plain ``nn.Parameter``s used functionally)
is reported by ``install_side_path`` as a fallback key; the runtime serves skills touching such a
key by grouping rows per skill and running fused per group.

Assumption the layers check: a wrapped layer's input has the batch as its leading dimension
(``x.shape[0] == B``); a layer that sees flattened or reordered rows raises ``SidePathError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from policy_server.runtime.skill_bank import ResidualStack


class SidePathError(RuntimeError):
    """A wrapped layer saw an input whose leading dimension is not the bound batch."""


def _share(base: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance (a subclass of ``type(base)``) with ``base``'s config attributes,
    Parameters and buffers: the same tensor objects, nothing copied."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for name, value in vars(base).items():
        if not name.startswith("_"):  # in_features, eps, padding_idx, training, ...
            object.__setattr__(layer, name, value)
    for name, p in base._parameters.items():
        layer._parameters[name] = p
    for name, b in base._buffers.items():
        layer._buffers[name] = b
    layer._non_persistent_buffers_set = set(base._non_persistent_buffers_set)
    return layer


def _rows(layer_name: str, stacks, x: torch.Tensor, min_dim: int = 2) -> int:
    """Bound batch size B, after checking the input is batch-major."""
    b = next(st.batch_size for st in stacks if st is not None)
    if x.dim() < min_dim or x.shape[0] != b:
        raise SidePathError(
            f"side path: layer {layer_name!r} received input of shape {tuple(x.shape)} but the "
            f"batch has {b} rows; per-row residuals need the batch as leading dimension "
            "(use mode='fused')")
    return b


def _active(st: ResidualStack | None) -> bool:
    return st is not None and (st.lr_rows is not None or st.dense_rows is not None)


def _row_view(t: torch.Tensor, ndim: int, trailing: int) -> torch.Tensor:
    """(B, *feat) -> (B, 1, ..., 1, *feat) broadcastable against an ``ndim``-D activation."""
    return t.view(t.shape[0], *([1] * (ndim - 1 - trailing)), *t.shape[1:])


def _add_segmented_lowrank(y3: torch.Tensor, x3: torch.Tensor, st: ResidualStack) -> None:
    """SGMV form of the low-rank term for rows that share skills, accumulated into ``y3``
    (B, L, m) in place: per skill, its rows through ``(x Q^T) P^T`` at the skill's own rank.
    x3: (B, L, n)."""
    b, m = x3.shape[0], y3.shape[-1]
    if len(st.lr_segments) == 1 and st.lr_segments[0][2].numel() == b:  # whole batch, one skill
        s, r, _ = st.lr_segments[0]
        h = x3.reshape(-1, x3.shape[-1]) @ st.Q[s, :r].T  # (B*L, r)
        y3.view(-1, m).addmm_(h, st.P[s, :, :r].T)
        return
    for s, r, idx in st.lr_segments:
        y3.index_add_(0, idx, (x3.index_select(0, idx) @ st.Q[s, :r].T) @ st.P[s, :, :r].T)


class _WeightBiasResiduals:
    """``wrap`` shared by the layers with per-row residuals on both weight and bias."""

    @classmethod
    def wrap(cls, base: nn.Module, name: str, weight_res: ResidualStack | None,
             bias_res: ResidualStack | None):
        """A ``cls`` layer sharing ``base``'s parameters, with the residual stacks attached."""
        layer = _share(base, cls)
        layer.layer_name, layer.weight_res, layer.bias_res = name, weight_res, bias_res
        return layer


class ResidualLinear(_WeightBiasResiduals, nn.Linear):
    """``nn.Linear`` plus per-row skill residuals on its weight (low-rank and/or dense) and bias.

    x: (B, ..., in_features) -> (B, ..., out_features), model dtype.
    """

    weight_res: ResidualStack | None
    bias_res: ResidualStack | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        w, bres = self.weight_res, self.bias_res
        if not (_active(w) or _active(bres)):
            return y
        b = _rows(self.layer_name, (w, bres), x)
        x3 = x.reshape(b, -1, self.in_features)  # (B, L, n)
        # y is F.linear's fresh contiguous output: accumulate the residual terms into it in place
        # (no temporary (B, L, m) delta, no extra pass over the output)
        y3 = y.view(b, -1, self.out_features)
        if w is not None and w.lr_segments is not None:
            _add_segmented_lowrank(y3, x3, w)
        elif w is not None and w.lr_rows is not None:
            q = w.Q.index_select(0, w.lr_rows)  # (B, r, n)
            p = w.P.index_select(0, w.lr_rows)  # (B, m, r)
            y3.baddbmm_(torch.bmm(x3, q.transpose(1, 2)), p.transpose(1, 2))
        if w is not None and w.dense_rows is not None:
            dw = w.D.index_select(0, w.dense_rows)  # (B, m, n)
            y3.baddbmm_(x3, dw.transpose(1, 2))
        if bres is not None and bres.dense_rows is not None:
            y3.add_(bres.D.index_select(0, bres.dense_rows).unsqueeze(1))  # (B, 1, m)
        return y


class ResidualLayerNorm(_WeightBiasResiduals, nn.LayerNorm):
    """``nn.LayerNorm`` with per-row dense residuals on its affine weight and bias.

    Computes ``norm(x) * (w + dW_k) + (b + dB_k)`` with the per-row effective affine parameters,
    i.e. the same expression the fused weights evaluate. x: (B, ..., *normalized_shape).
    """

    weight_res: ResidualStack | None
    bias_res: ResidualStack | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bres = self.weight_res, self.bias_res
        if not (_active(w) or _active(bres)):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        _rows(self.layer_name, (w, bres), x)
        k = len(self.normalized_shape)
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        scale = self.weight
        if _active(w):
            scale = _row_view(self.weight + w.D.index_select(0, w.dense_rows), x.dim(), k)
        if scale is not None:
            y = y * scale
        shift = self.bias
        if _active(bres):
            shift = _row_view(self.bias + bres.D.index_select(0, bres.dense_rows), x.dim(), k)
        return y if shift is None else y + shift


class ResidualEmbedding(nn.Embedding):
    """``nn.Embedding`` with per-row residual rows: ids (B, ...) int64 -> (B, ..., dim).

    Low-rank: the looked-up rows of ``P_k`` times ``Q_k``; dense: the looked-up rows of ``D_k``.
    """

    weight_res: ResidualStack | None

    @classmethod
    def wrap(cls, base: nn.Embedding, name: str, weight_res: ResidualStack | None
             ) -> "ResidualEmbedding":
        layer = _share(base, cls)
        layer.layer_name, layer.weight_res = name, weight_res
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.weight, self.padding_idx, None, self.norm_type,
                        self.scale_grad_by_freq, self.sparse)
        w = self.weight_res
        if not _active(w):
            return y
        b = _rows(self.layer_name, (w,), ids, min_dim=1)  # ids may be (B,): one token per row
        ids2 = ids.reshape(b, -1)  # (B, L)
        y3 = y.view(b, -1, self.embedding_dim)  # fresh output: accumulate in place
        if w.lr_rows is not None:
            p_rows = w.P[w.lr_rows.unsqueeze(1), ids2]  # (B, L, r): row ids of each row's P_k
            y3.baddbmm_(p_rows, w.Q.index_select(0, w.lr_rows))  # + (B, L, r) @ (B, r, dim)
        if w.dense_rows is not None:
            y3.add_(w.D[w.dense_rows.unsqueeze(1), ids2])
        return y


@dataclass
class SidePath:
    """Handle of installed wrappers. ``fallback_keys``: residual keys the side path cannot apply
    per row (the runtime applies them fused, per skill group)."""

    module: nn.Module
    replaced: dict[str, nn.Module] = field(default_factory=dict)  # module path -> original layer
    fallback_keys: set[str] = field(default_factory=set)

    def uninstall(self) -> None:
        """Put the original layers back (their Parameters were shared, so weights are current)."""
        for path, original in self.replaced.items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.module.get_submodule(parent), leaf, original)
        self.replaced.clear()


def _supported(mod: nn.Module, attr: str) -> bool:
    t = type(mod)
    if t is nn.Linear or t is nn.LayerNorm:
        return attr in ("weight", "bias")
    if t is nn.Embedding:
        return attr == "weight" and mod.max_norm is None  # max_norm renormalises rows in place
    return False


def install_side_path(module: nn.Module, stacks: dict[str, ResidualStack]) -> SidePath:
    """Replace every layer owning a residual key with its ``Residual*`` wrapper.

    ``stacks``: canonical checkpoint key -> ResidualStack (``SkillBank.stacks``). A key is served
    per row when its tensor is a parameter of exactly one supported layer; otherwise it goes to
    ``SidePath.fallback_keys``.
    """
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((path, attr, mod))
    per_layer: dict[str, dict[str, ResidualStack]] = {}
    layer_obj: dict[str, nn.Module] = {}
    side = SidePath(module)
    params = dict(module.named_parameters(remove_duplicate=False))
    for key, st in stacks.items():
        p = params.get(key)
        own = owners.get(id(p), []) if p is not None else []
        if len(own) != 1 or not own[0][0] or not _supported(own[0][2], own[0][1]):
            side.fallback_keys.add(key)
            continue
        path, attr, mod = own[0]
        per_layer.setdefault(path, {})[attr] = st
        layer_obj[path] = mod
    for path, res in per_layer.items():
        base = layer_obj[path]
        if type(base) is nn.Linear:
            new = ResidualLinear.wrap(base, path, res.get("weight"), res.get("bias"))
        elif type(base) is nn.LayerNorm:
            new = ResidualLayerNorm.wrap(base, path, res.get("weight"), res.get("bias"))
        else:
            new = ResidualEmbedding.wrap(base, path, res.get("weight"))
        parent, _, leaf = path.rpartition(".")
        setattr(module.get_submodule(parent), leaf, new)
        side.replaced[path] = base
    return side
