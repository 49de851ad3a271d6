"""The wire codec of ``carve.policy.v1``, used by both the server and the clients.

Nothing is ever unpickled: tensors are raw little-endian bytes + dtype + shape, images raw uint8 HWC
or JPEG/PNG (OpenCV, the optional ``images`` extra). Every decoding error is a ``WireError`` that
names the offending field and carries the gRPC status code a servicer should answer with.
"""

from __future__ import annotations

import math
import struct
import time

import grpc
import numpy as np

from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.routing import RouteDecision
from carve_client.spec import ImageSpec, PolicySpec

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "uint8": np.uint8,
          "int32": np.int32, "int64": np.int64}
MAX_IMAGE_PIXELS = 4096 * 4096
# per wire dtype name: (little-endian dtype as on the wire, the native dtype decoded to), and per
# native dtype its wire name; built once, since numpy's dtype construction and ``dtype.name`` cost
# microseconds on every step otherwise
_WIRE = {k: (np.dtype(v).newbyteorder("<"), np.dtype(v)) for k, v in DTYPES.items()}
_NAME = {np.dtype(v): k for k, v in DTYPES.items()}
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


def fill_tensor(t: pb.Tensor, arr: np.ndarray) -> None:
    """Write ``arr`` into the (empty) Tensor message ``t`` in place, as :func:`encode_tensor`
    would encode it. Filling the field of the enclosing message directly saves the copies that
    assigning a built sub-message makes (each one copies the tensor's bytes)."""
    arr = np.asarray(arr)
    name = _NAME.get(arr.dtype)
    if name is None:  # another dtype, or a non-native byte order of an allowed one
        name = arr.dtype.name
        if name not in DTYPES:
            raise ValueError(f"dtype {name} cannot travel; use one of {sorted(DTYPES)}")
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    elif _WIRE[name][0] != arr.dtype:  # a big-endian machine
        arr = arr.astype(_WIRE[name][0])
    t.data = arr.tobytes()  # C order, whatever the array's layout
    t.dtype = name
    t.shape.extend(arr.shape)


MAX_TENSOR_DIMS = 8
_ECHO = 48  # characters of a client-supplied value echoed back in an error message


def echo(value, limit: int = _ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages may quote what a client sent,
    but a status message must stay far below the peer's metadata limit (8 KiB by default)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def decode_tensor(t: pb.Tensor, field: str) -> np.ndarray:
    """Tensor message -> numpy array of its shape and dtype (native byte order);
    WireError(INVALID_ARGUMENT) naming ``field`` if malformed.

    The element count is computed with Python integers (never an overflowing int64 product) and
    checked against the byte length before any array is made, so a shape with no data behind it
    costs nothing."""
    dts = _WIRE.get(t.dtype)
    if dts is None:
        raise _bad(field, f"unsupported dtype {echo(t.dtype)} (use one of {sorted(DTYPES)})")
    dt, native = dts
    shape = list(t.shape)
    if len(shape) > MAX_TENSOR_DIMS:
        raise _bad(field, f"{len(shape)} dimensions (at most {MAX_TENSOR_DIMS})")
    if any(s < 0 for s in shape):
        raise _bad(field, f"negative dimension in shape {echo(shape)}")
    n = math.prod(shape)
    data = t.data  # each read of a bytes field copies it out of the message: read it once
    if len(data) != n * dt.itemsize:
        raise _bad(field, f"{len(data)} bytes do not match shape {echo(shape)} of {t.dtype} "
                          f"({n * dt.itemsize} bytes expected)")
    # a writable array the caller owns (frombuffer alone would be a read-only view of ``data``)
    return np.frombuffer(data, dtype=dt).reshape(tuple(shape)).astype(native)


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


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (the ones carrying the frame size): C0-CF minus DHT, JPG and DAC
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def _jpeg_size(data: bytes, field: str) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment; each step moves forward by at
    least two bytes, so the walk ends within ``len(data)`` steps."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise _bad(field, f"corrupt JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan before any frame header
        seg = int.from_bytes(data[i + 2:i + 4], "big")
        if seg < 2:
            raise _bad(field, f"corrupt JPEG: segment length {seg} at byte {i}")
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            return (int.from_bytes(data[i + 7:i + 9], "big"),
                    int.from_bytes(data[i + 5:i + 7], "big"))
        i += 2 + seg
    raise _bad(field, "corrupt JPEG: no frame header (SOF) before the image data")


def image_header_size(data: bytes, field: str) -> tuple[str, int, int]:
    """(format, width, height) read from the header of JPEG or PNG ``data`` without decoding it,
    so a size can be refused before any pixel is allocated. Other formats (which OpenCV would
    also decode: TIFF, WebP, ...) are refused: the protocol carries JPEG and PNG only."""
    if not data:
        raise _bad(field, "empty encoded image bytes")
    if data.startswith(_PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise _bad(field, "corrupt PNG: no IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data.startswith(b"\xff\xd8"):
        return ("jpeg", *_jpeg_size(data, field))
    raise _bad(field, f"encoded image is neither JPEG nor PNG (starts with {echo(data[:8])})")


def _check_pixels(field: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise _bad(field, f"image declares {width}x{height} pixels")
    if width * height > max_pixels:
        raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{field}: {width}x{height} image exceeds the server's limit of "
                        f"{max_pixels} pixels")


def _decode_encoded(data: bytes, field: str, max_pixels: int,
                    expect_hw: tuple[int, int] | None) -> np.ndarray:
    fmt, width, height = image_header_size(data, field)
    _check_pixels(field, width, height, max_pixels)
    if expect_hw is not None and (height, width) != tuple(expect_hw):
        raise _bad(field, f"{fmt} image is {width}x{height} (expected {expect_hw[1]}x"
                          f"{expect_hw[0]})")
    cv2 = _cv2()
    try:
        # ignore EXIF orientation: the decoded size must be the header's size
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8),
                           cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        raise _bad(field, f"could not decode the {fmt} image: "
                          f"{echo(str(e).strip().splitlines()[-1:] or '')}") from None
    if arr is None:
        raise _bad(field, f"could not decode the {fmt} image bytes")
    if arr.shape[:2] != (height, width):
        raise _bad(field, f"{fmt} image decoded to {arr.shape[1]}x{arr.shape[0]}, its header "
                          f"says {width}x{height}")
    return arr[..., ::-1].copy()  # OpenCV decodes BGR; the models take RGB


def decode_image(msg: pb.Image, field: str, max_pixels: int = MAX_IMAGE_PIXELS,
                 expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Image message -> uint8 (H, W, 3) RGB array; WireError naming ``field`` otherwise.

    The size is checked before any pixel is decoded (raw: from the tensor shape; JPEG/PNG: from
    the header): over ``max_pixels`` is RESOURCE_EXHAUSTED; empty, corrupt, non-JPEG/PNG bytes or
    a size other than ``expect_hw`` (height, width), when given, are INVALID_ARGUMENT. Peak memory
    is thus one decoded image of at most ``max_pixels`` (and of ``expect_hw`` when given)."""
    kind = msg.WhichOneof("payload")
    if kind == "raw":
        shape = list(msg.raw.shape)
        if len(shape) != 3 or msg.raw.dtype != "uint8":
            raise _bad(field, f"raw image must be uint8 HWC, got {echo(msg.raw.dtype)} "
                              f"{echo(shape)}")
        _check_pixels(field, shape[1], shape[0], max_pixels)
        return decode_tensor(msg.raw, f"{field}.raw")
    if kind == "encoded":
        if len(msg.encoded) > max_pixels * 3:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{field}: encoded image of {len(msg.encoded)} bytes is too large")
        return _decode_encoded(msg.encoded, field, max_pixels, expect_hw)
    raise _bad(field, "image has neither raw nor encoded payload")


def observation_proto(state: np.ndarray, images: dict[str, np.ndarray] | None, step: int,
                      encode: str = "raw") -> pb.Observation:
    """Observation message. state: (state_dim,) float (sent as float32); images: camera key ->
    uint8 (H, W, C) RGB; encode: "raw", "jpeg" or "png"."""
    msg = pb.Observation()
    fill_observation(msg, state, images, step, encode)
    return msg


def fill_observation(msg: pb.Observation, state: np.ndarray,
                     images: dict[str, np.ndarray] | None, step: int,
                     encode: str = "raw") -> None:
    """Write an observation into the (empty) Observation message ``msg`` in place (arguments as
    :func:`observation_proto`); the clients fill the field of their request message so that an
    image's bytes are copied once (``tobytes``), not once more per enclosing message."""
    msg.step = step
    msg.client_time = time.time()
    fill_tensor(msg.state, np.asarray(state, dtype=np.float32))
    for key, img in (images or {}).items():
        img = np.asarray(img)
        if encode != "raw":
            msg.images[key].CopyFrom(encode_image(img, encode))
            continue
        if img.dtype != np.uint8 or img.ndim != 3:
            raise ValueError(f"images must be uint8 HWC, got {img.dtype} {img.shape}")
        slot = msg.images[key]
        slot.format = "raw"
        fill_tensor(slot.raw, img)


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
