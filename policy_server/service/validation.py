"""Observation messages -> model inputs, refusing what cannot be a valid observation before it
reaches the model.

A finite but absurd state (1e30 in every element) used to reach the model, produce NaN actions and
fail the whole micro-batch, i.e. other robots' steps. The state is therefore checked here, where
the wire is decoded: its dtype, shape, the float32 cast (a float64 1e300 overflows to inf) and a
magnitude bound. The bound is derived from the model's normalisation statistics where the spec
has them (``state_mean``/``state_std``: at most ``state_sigma`` standard deviations from the mean;
``state_min``/``state_max``: at most ``state_sigma`` ranges outside them) and is ``state_abs``
elsewhere. Every refusal is a ``WireError`` naming the field.

A camera image must have the spec's size, unless the engine resizes (``PolicyEngine.
resizes_images``, e.g. the LeRobot backend, whose own async server resizes any camera to the
policy's feature shape): then an image of another size (still within the pixel limit, checked
from the header before decoding) is resized here, before batching, because the rows of a
micro-batch must share one shape. ``resize_bilinear`` is torch's ``interpolate(mode="bilinear",
align_corners=False)`` (no antialias) in numpy, so the decoder stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
from carve_client.codec import MAX_IMAGE_PIXELS, WireError, decode_image, decode_tensor, echo
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb

from policy_server.models.base import ObservationBatch, PolicySpec


@dataclass
class InputLimits:
    """What the server accepts. state_sigma / state_abs: the state bounds described in the module
    docstring (None: no such bound; non-finite values are always refused)."""

    max_image_pixels: int = MAX_IMAGE_PIXELS
    state_sigma: float | None = 1000.0
    state_abs: float | None = 1e6


def _bad(field: str, why: str) -> WireError:
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {why}")


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 per output index along one axis, as torch's
    bilinear with align_corners=False: half-pixel centres, negative coordinates clamped to 0."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, bilinear as torch's ``F.interpolate(...,
    mode="bilinear", align_corners=False)`` on the float image (rows, then columns, in float32;
    equal to torch's result up to float32 rounding), rounded to the nearest integer. LeRobot's
    async server interpolates the uint8 tensor itself (torch's fixed-point uint8 kernel), which
    differs from this by at most 1 grey level."""
    r0, r1, wr = _bilinear_axis(img.shape[0], height)
    c0, c1, wc = _bilinear_axis(img.shape[1], width)
    x = img.astype(np.float32)
    wr, wc = wr[:, None, None], wc[None, :, None]
    rows = x[r0] * (1 - wr) + x[r1] * wr
    out = rows[:, c0] * (1 - wc) + rows[:, c1] * wc
    # C-contiguous like a decoded image: the column gather leaves another memory layout, and a
    # backend's conv picks its kernel (and so its float rounding) by the layout
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def state_bounds(spec: PolicySpec, limits: InputLimits) -> tuple[np.ndarray, np.ndarray, str]:
    """(low, high, where from) per state element, float64; +-inf where nothing bounds it."""
    n = spec.state_dim
    norm = spec.normalization or {}
    inf = np.full(n, np.inf)
    absb = inf if limits.state_abs is None else np.full(n, float(limits.state_abs))
    why = "no bound" if limits.state_abs is None else f"|state| <= {limits.state_abs:g}"
    low, high = -absb, absb.copy()
    sig = limits.state_sigma
    if sig is None or n == 0:  # a state-less policy (e.g. plain OpenVLA) has nothing to bound
        return low, high, why
    if len(norm.get("state_mean", ())) == n and len(norm.get("state_std", ())) == n:
        center = np.asarray(norm["state_mean"], np.float64)
        half = sig * np.asarray(norm["state_std"], np.float64)
    elif len(norm.get("state_min", ())) == n and len(norm.get("state_max", ())) == n:
        lo = np.asarray(norm["state_min"], np.float64)
        hi = np.asarray(norm["state_max"], np.float64)
        center, half = (lo + hi) / 2, (hi - lo) / 2 + sig * (hi - lo)
    else:
        return low, high, why
    ok = np.isfinite(center) & np.isfinite(half) & (half > 0)  # a constant dim keeps |state|
    low, high = np.where(ok, center - half, low), np.where(ok, center + half, high)
    return low, high, f"{sig:g} x the model's state statistics around their centre"


def _inward_float32(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 bounds -> float32 bounds rounded inwards: the smallest float32 >= each low and
    the largest float32 <= each high. For a float32 x, ``x >= low32`` iff ``x >= low`` (and
    likewise for high), so a float32 state is checked exactly in float32."""
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, then the largest finite
        lo, hi = low.astype(np.float32), high.astype(np.float32)
        lo = np.where(lo < low, np.nextafter(lo, np.float32(np.inf)), lo).astype(np.float32)
        hi = np.where(hi > high, np.nextafter(hi, np.float32(-np.inf)), hi).astype(np.float32)
    return lo, hi


class ObservationDecoder:
    """Decodes and validates ``Observation`` messages for one spec (thread-safe, stateless).

    resize: accept camera images of another size and resize them to the spec's (for engines
    whose ``resizes_images`` is True); otherwise another size is INVALID_ARGUMENT."""

    def __init__(self, spec: PolicySpec, limits: InputLimits | None = None,
                 resize: bool = False):
        self.spec = spec
        self.limits = limits or InputLimits()
        self.resize = resize
        self.low, self.high, self._why = state_bounds(spec, self.limits)
        self._low32, self._high32 = _inward_float32(self.low, self.high)
        # with finite bounds on every element, one range test also refuses NaN and inf
        self._bounded = bool(np.isfinite(self.low).all() and np.isfinite(self.high).all())

    def state(self, msg: pb.Observation, field: str) -> np.ndarray:
        """The (state_dim,) float32 state of ``msg``; WireError naming ``field.state``."""
        f = f"{field}.state"
        if not msg.HasField("state"):
            raise _bad(f, "missing")
        state = decode_tensor(msg.state, f)
        if state.dtype not in (np.float32, np.float64):
            raise _bad(f, f"dtype {state.dtype} (float32 expected)")
        if state.shape != (self.spec.state_dim,):
            raise _bad(f, f"shape {echo(list(state.shape))} (expected [{self.spec.state_dim}])")
        if state.dtype == np.float32 and self._in_range(state):
            return state  # the common case in one test; the checks below name what is wrong
        if not np.all(np.isfinite(state)):
            raise _bad(f, "contains NaN or inf")
        with np.errstate(over="ignore"):
            cast = state.astype(np.float32)
        if not np.all(np.isfinite(cast)):
            i = int(np.flatnonzero(~np.isfinite(cast))[0])
            raise _bad(f, f"element {i} = {float(state[i]):.3g} overflows float32")
        out = (cast < self.low) | (cast > self.high)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise _bad(f, f"element {i} = {float(cast[i]):.3g} is outside the accepted range "
                          f"[{self.low[i]:.3g}, {self.high[i]:.3g}] ({self._why}); "
                          f"{int(out.sum())} element(s) out of range")
        return cast

    def _in_range(self, state: np.ndarray) -> bool:
        """Whether every element of the float32 ``state`` is finite and within [low, high]
        (NaN fails any comparison; +-inf passes an infinite bound, so then finiteness is tested
        apart). Compared with the float32 bounds rounded inwards, which for a float32 value
        decide exactly as the float64 bounds do, without mixed-dtype comparisons."""
        inside = bool(((state >= self._low32) & (state <= self._high32)).all())
        return inside and (self._bounded or bool(np.isfinite(state).all()))

    def images(self, msg: pb.Observation, field: str,
               notes: list[str] | None = None) -> dict[str, np.ndarray]:
        """camera key -> (1, H, W, 3) uint8 at the spec's size; WireError naming
        ``field.images['key']``. A resized camera appends a line saying so to ``notes``."""
        spec_images = self.spec.images
        for key in msg.images:
            if key not in spec_images:
                raise _bad(f"{field}.images[{echo(key)}]",
                           f"unknown camera (model takes {sorted(spec_images) or 'no images'})")
        images = {}
        for key, ispec in spec_images.items():
            f = f"{field}.images[{key!r}]"
            if key not in msg.images:
                raise _bad(f, "missing camera")
            images[key] = self._image(msg.images[key], f, key, ispec, notes)[None]
        return images

    def _image(self, img_msg: pb.Image, f: str, key: str, ispec, notes: list[str] | None
               ) -> np.ndarray:
        """One camera -> (H, W, C) uint8 at the spec's size (resized when allowed)."""
        hw = (ispec.height, ispec.width)
        # with resizing, any size passes the header check; max_image_pixels still bounds it, so
        # the decode allocates at most that many pixels (the bomb-safety of decode_image)
        img = decode_image(img_msg, f, self.limits.max_image_pixels,
                           expect_hw=None if self.resize else hw)
        want = (*hw, ispec.channels)
        if img.shape == want:
            return img
        if not self.resize or img.ndim != 3 or img.shape[2] != ispec.channels:
            raise _bad(f, f"shape {list(img.shape)} (expected {list(want)})")
        if notes is not None:
            notes.append(f"camera {key!r}: {img.shape[0]}x{img.shape[1]} resized to "
                         f"{hw[0]}x{hw[1]} (bilinear)")
        return resize_bilinear(img, *hw)

    def __call__(self, msg: pb.Observation, field: str, instruction: str,
                 notes: list[str] | None = None) -> ObservationBatch:
        """A batch of one from ``msg`` (validated against the spec), with ``instruction``;
        facts about the conversion (resized cameras) are appended to ``notes`` when given."""
        state = self.state(msg, field)
        return ObservationBatch(state=state[None], instructions=[instruction],
                                images=self.images(msg, field, notes))
