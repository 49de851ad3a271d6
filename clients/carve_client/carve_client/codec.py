"""The wire codec of ``carve.policy.v1``, used by both the server and the clients.

Nothing is ever unpickled: tensors are raw little-endian bytes + dtype + shape, images raw uint8 HWC
or JPEG/PNG (OpenCV, the optional ``images`` extra). Every decoding error is a ``WireError`` that
names the offending field and carries the gRPC status code a servicer should answer with.
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.routing import RouteDecision
from carve_client.spec import ImageSpec, PolicySpec

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "uint8": np.uint8,
          "int32": np.int32, "int64": np.int64}
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_ENCODINGS = ("raw", "jpeg", "png")


class WireError(Exception):
    """A malformed or invalid message: ``code`` is the gRPC status, ``str(e)`` names the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _bad(field: str, why: str) -> WireError:
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {why}")


def _cv2():
    # OpenCV is only needed for JPEG/PNG; raw images and tensors must work without it.
    try:
        import cv2
    except ImportError as e:
        raise ImportError("JPEG/PNG images need OpenCV: pip install 'carve-client[images]' "
                          f"(or send encode='raw'); import failed: {e}") from None
    return cv2


def encode_tensor(arr: np.ndarray) -> pb.Tensor:
    """numpy array of any shape, dtype in ``DTYPES`` -> Tensor message (C order, little endian)."""
    arr = np.asarray(arr)
    name = arr.dtype.name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} cannot travel; use one of {sorted(DTYPES)}")
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    return pb.Tensor(data=arr.tobytes(), dtype=name, shape=list(arr.shape))


def decode_tensor(t: pb.Tensor, field: str) -> np.ndarray:
    """Tensor message -> numpy array of its shape and dtype (native byte order);
    WireError(INVALID_ARGUMENT) naming ``field`` if malformed."""
    if t.dtype not in DTYPES:
        raise _bad(field, f"unsupported dtype {t.dtype!r} (use one of {sorted(DTYPES)})")
    if any(s < 0 for s in t.shape):
        raise _bad(field, f"negative dimension in shape {list(t.shape)}")
    dt = np.dtype(DTYPES[t.dtype]).newbyteorder("<")
    n = int(np.prod(t.shape)) if len(t.shape) else 1
    if len(t.data) != n * dt.itemsize:
        raise _bad(field, f"{len(t.data)} bytes do not match shape {list(t.shape)} of {t.dtype} "
                          f"({n * dt.itemsize} bytes expected)")
    return np.frombuffer(t.data, dtype=dt).reshape(tuple(t.shape)).astype(dt.newbyteorder("="))


def encode_image(img: np.ndarray, encode: str = "raw", quality: int = 90) -> pb.Image:
    """uint8 (H, W, C) RGB image -> Image message (raw, or JPEG/PNG encoded with OpenCV)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"images must be uint8 HWC, got {img.dtype} {img.shape}")
    if encode == "raw":
        return pb.Image(raw=encode_tensor(img), format="raw")
    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}.get(encode)
    if ext is None:
        raise ValueError(f"unknown image encoding {encode!r}: raw, jpeg or png")
    cv2 = _cv2()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, img[..., ::-1] if img.shape[2] == 3 else img, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode the image as {encode}")
    return pb.Image(encoded=buf.tobytes(), format="jpeg" if ext == ".jpg" else "png")


def decode_image(msg: pb.Image, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image message -> uint8 (H, W, 3) RGB array. Oversized images are RESOURCE_EXHAUSTED."""
    kind = msg.WhichOneof("payload")
    if kind == "raw":
        arr = decode_tensor(msg.raw, f"{field}.raw")
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise _bad(field, f"raw image must be uint8 HWC, got {arr.dtype} {list(arr.shape)}")
    elif kind == "encoded":
        if len(msg.encoded) > max_pixels * 3:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{field}: encoded image of {len(msg.encoded)} bytes is too large")
        cv2 = _cv2()
        arr = cv2.imdecode(np.frombuffer(msg.encoded, dtype=np.uint8), cv2.IMREAD_COLOR)
        if arr is None:
            raise _bad(field, f"could not decode the {msg.format or 'encoded'} image bytes")
        arr = arr[..., ::-1].copy()  # OpenCV decodes BGR; the models take RGB
    else:
        raise _bad(field, "image has neither raw nor encoded payload")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{field}: {arr.shape[1]}x{arr.shape[0]} image exceeds the server's "
                        f"limit of {max_pixels} pixels")
    return arr


def observation_proto(state: np.ndarray, images: dict[str, np.ndarray] | None, step: int,
                      encode: str = "raw") -> pb.Observation:
    """Observation message. state: (state_dim,) float (sent as float32); images: camera key ->
    uint8 (H, W, C) RGB; encode: "raw", "jpeg" or "png"."""
    return pb.Observation(
        step=step, client_time=time.time(),
        state=encode_tensor(np.asarray(state, dtype=np.float32)),
        images={k: encode_image(v, encode) for k, v in (images or {}).items()})


def spec_to_proto(spec: PolicySpec) -> pb.ActionSpec:
    """PolicySpec -> ActionSpec message."""
    return pb.ActionSpec(
        action_dim=spec.action_dim, chunk_length=spec.chunk_length,
        action_low=list(spec.action_low), action_high=list(spec.action_high),
        state_dim=spec.state_dim,
        images={k: pb.ImageSpec(height=v.height, width=v.width, channels=v.channels)
                for k, v in spec.images.items()},
        normalization={k: pb.FloatList(values=list(map(float, v)))
                       for k, v in spec.normalization.items()},
        model=spec.name)


def spec_from_proto(s: pb.ActionSpec) -> PolicySpec:
    """ActionSpec message -> PolicySpec (the inverse of :func:`spec_to_proto`)."""
    return PolicySpec(state_dim=s.state_dim, action_dim=s.action_dim, chunk_length=s.chunk_length,
                      action_low=list(s.action_low), action_high=list(s.action_high),
                      images={k: ImageSpec(v.height, v.width, v.channels)
                              for k, v in s.images.items()},
                      normalization={k: list(v.values) for k, v in s.normalization.items()},
                      name=s.model)


def decision_to_proto(d: RouteDecision) -> pb.RouteDecision:
    """RouteDecision -> RouteDecision message (an abstention travels as skill "")."""
    return pb.RouteDecision(
        skill=d.skill or "", confidence=float(d.confidence), margin=float(d.margin),
        abstained=bool(d.abstained), reason=d.reason, router=d.router,
        candidates=[pb.Candidate(skill=s, score=float(v)) for s, v in d.candidates])


def decision_from_proto(d: pb.RouteDecision) -> RouteDecision:
    """RouteDecision message -> RouteDecision (the inverse of :func:`decision_to_proto`)."""
    return RouteDecision(skill=d.skill or None, confidence=d.confidence,
                         candidates=[(c.skill, c.score) for c in d.candidates], margin=d.margin,
                         abstained=d.abstained, reason=d.reason, router=d.router)
