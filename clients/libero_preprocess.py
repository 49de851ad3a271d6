"""LIBERO observation/action conventions of the two reference evaluation stacks, as pure functions.

Two conventions are implemented so that a policy trained under either one is fed exactly what it saw
in training (getting one of these wrong silently drops LIBERO success to ~0 %):

**OpenVLA** (``openvla/experiments/robot/libero``):
  * ``agentview_image`` rotated 180 degrees (LIBERO renders upside down and mirrored: ``img[::-1, ::-1]``),
  * optional JPEG round trip (quality 95; the RLDS training data were JPEG-compressed),
  * resized to 224x224 with *antialiased* Lanczos-3 (``tf.image.resize(method="lanczos3",
    antialias=True)`` in OpenVLA; here a separable numpy resampler with the same kernel and support
    scaling as TF/PIL; ``cv2.INTER_LANCZOS4`` is a fixed 8x8 kernel without antialiasing and is only
    offered as ``backend="cv2"``),
  * optional center crop keeping 0.9 of the *area* (side ``sqrt(0.9)``) then resized back to 224
    (OpenVLA does this with bilinear ``tf.image.crop_and_resize`` when the model was trained with
    random-crop augmentation),
  * no proprioceptive state, action = 7-D (delta eef pos 3, delta axis-angle 3, gripper): the
    policy's gripper in [0, 1] (1 = open) is mapped to [-1, 1], binarised with ``sign`` and inverted
    (robosuite: -1 = open, +1 = close); ``unnorm_key`` = the suite name (e.g. ``libero_spatial``).

**openpi** (``openpi/examples/libero/main.py``):
  * ``observation/image`` = agentview, ``observation/wrist_image`` = ``robot0_eye_in_hand_image``, both
    rotated 180 degrees, then *resize with pad* to 224x224 (aspect kept, PIL bilinear, black bars
    centred),
  * ``observation/state`` 8-D float32 = ``robot0_eef_pos`` (3) + axis-angle of ``robot0_eef_quat``
    (3, quaternion in robosuite's ``(x, y, z, w)`` order) + ``robot0_gripper_qpos`` (2),
  * ``prompt`` = task language; the 7-D action is sent to the env unchanged; replan every 5 steps.

Both stacks wait 10 steps with the dummy action ``[0]*6 + [-1]`` at episode start so objects settle,
and render at 256x256. All images here are HWC ``uint8`` RGB numpy arrays.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: LIBERO step budgets used by OpenVLA / openpi (longest demo of each suite + margin).
MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
#: Dummy action during the settle phase: no motion, gripper open (robosuite -1 = open).
DUMMY_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], dtype=np.float32)
NUM_STEPS_WAIT = 10
ENV_RESOLUTION = 256
MODEL_IMAGE_SIZE = 224
OPENVLA_CROP_AREA = 0.9
OPENPI_REPLAN_STEPS = 5


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def _check_image(img: np.ndarray, name: str = "image") -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an HWC image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8, got {img.dtype}")
    return img


def rotate_180(img: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W, C), rotated by 180 degrees (flip both axes), C-contiguous copy.

    LIBERO's offscreen renderer returns frames upside down; both OpenVLA and openpi train on the
    rotated frames (``img[::-1, ::-1]``)."""
    img = np.asarray(img)
    if img.ndim < 2:
        raise ValueError(f"rotate_180: expected an image, got shape {img.shape}")
    return np.ascontiguousarray(img[::-1, ::-1])


def _lanczos3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    out = np.sinc(x) * np.sinc(x / 3.0)
    return np.where(x < 3.0, out, 0.0)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


_KERNELS = {"lanczos3": (_lanczos3, 3.0), "bilinear": (_triangle, 1.0)}


@functools.lru_cache(maxsize=64)
def _resample_taps(n_in: int, n_out: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """Taps of a 1-D antialiased resampler (PIL / TF ``antialias=True``): ``idx`` (n_out, T) int
    input indices and ``w`` (n_out, T) float64 weights, each row summing to 1.

    Output pixel i has centre ``(i + 0.5) * scale`` in input coordinates (half-pixel centres); when
    downscaling the kernel is stretched by ``scale`` so every input pixel contributes (that is the
    antialiasing); taps outside the image get weight 0 and the row is renormalised (PIL's edge
    rule)."""
    fn, support = _KERNELS[kernel]
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centers = (np.arange(n_out) + 0.5) * scale
    radius = support * stretch
    lo = np.floor(centers - radius).astype(int)
    width = int(math.ceil(2 * radius)) + 2
    idx = lo[:, None] + np.arange(width)[None, :]
    w = fn((idx + 0.5 - centers[:, None]) / stretch)
    w = np.where((idx >= 0) & (idx < n_in), w, 0.0)
    w /= w.sum(axis=1, keepdims=True)
    idx = np.clip(idx, 0, n_in - 1)  # zero-weight taps may point anywhere valid
    idx.setflags(write=False)  # cached and shared between calls
    w.setflags(write=False)
    return idx, w


def resize(img: np.ndarray, height: int, width: int, method: str = "lanczos3",
           backend: str = "numpy", pil_compat: bool = False) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width, C) uint8.

    method: ``"lanczos3"`` or ``"bilinear"``. backend ``"numpy"``: separable antialiased resampling
    in float64 with one final round + clip, i.e. TF ``tf.image.resize(..., antialias=True)``
    semantics (OpenVLA). ``pil_compat=True`` rounds/clips to uint8 between the horizontal and the
    vertical pass like PIL ``Image.resize`` (openpi); measured against Pillow 13: <= 1 grey level
    apart (PIL's fixed-point weights) for both kernels; without it Lanczos differs from PIL only
    where its overshoot was clipped in between. ``"cv2"``: OpenCV ``INTER_LANCZOS4`` /
    ``INTER_LINEAR`` (faster, no antialiasing when downscaling, so not training-faithful)."""
    img = _check_image(img)
    if height <= 0 or width <= 0:
        raise ValueError(f"resize: target size must be positive, got {height}x{width}")
    if img.shape[:2] == (height, width):
        return img.copy()
    if method not in _KERNELS:
        raise ValueError(f"resize: unknown method {method!r} (lanczos3 | bilinear)")
    if backend == "cv2":
        import cv2

        interp = cv2.INTER_LANCZOS4 if method == "lanczos3" else cv2.INTER_LINEAR
        out = cv2.resize(img, (width, height), interpolation=interp)
        return out.reshape(height, width, img.shape[2])
    if backend != "numpy":
        raise ValueError(f"resize: unknown backend {backend!r} (numpy | cv2)")
    # Sparse separable passes (gather the T taps, weight, sum): no BLAS, so no thread
    # oversubscription on a loaded robot computer; ~8 ms for 256 -> 224 on one core.
    iy, wy = _resample_taps(img.shape[0], height, method)
    ix, wx = _resample_taps(img.shape[1], width, method)
    tmp = np.einsum("hptc,pt->hpc", img[:, ix, :].astype(np.float64), wx)  # (h, width, c)
    if pil_compat:
        tmp = np.clip(np.rint(tmp), 0, 255)
    out = np.einsum("otpc,ot->opc", tmp[iy], wy)  # (height, width, c)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def center_crop_box(height: int, width: int, area_fraction: float) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the centred crop keeping ``area_fraction`` of the area.

    Each side is scaled by ``sqrt(area_fraction)`` (OpenVLA's ``crop_scale=0.9`` is an *area*)."""
    if not 0.0 < area_fraction <= 1.0:
        raise ValueError(f"crop area fraction must be in (0, 1], got {area_fraction}")
    side = math.sqrt(area_fraction)
    ch = max(1, int(round(height * side)))
    cw = max(1, int(round(width * side)))
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def center_crop_resize(img: np.ndarray, area_fraction: float = OPENVLA_CROP_AREA,
                       method: str = "bilinear") -> np.ndarray:
    """(H, W, C) uint8 -> (H, W, C) uint8: centre crop of ``area_fraction`` of the area, resized
    back to the input size (OpenVLA's test-time counterpart of its random-crop augmentation)."""
    img = _check_image(img)
    h, w = img.shape[:2]
    top, left, ch, cw = center_crop_box(h, w, area_fraction)
    return resize(img[top:top + ch, left:left + cw], h, w, method=method)


def pad_geometry(height: int, width: int, target_h: int, target_w: int
                 ) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, pad_top, pad_left) of openpi's ``resize_with_pad``.

    The image is scaled by ``1 / max(W / target_w, H / target_h)`` (int-truncated sizes, as openpi)
    and pasted centred (int-truncated offsets) on a black canvas."""
    ratio = max(width / target_w, height / target_h)
    rh, rw = int(height / ratio), int(width / ratio)
    return rh, rw, max(0, int((target_h - rh) / 2)), max(0, int((target_w - rw) / 2))


def resize_with_pad(img: np.ndarray, height: int = MODEL_IMAGE_SIZE, width: int = MODEL_IMAGE_SIZE,
                    method: str = "bilinear") -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8 keeping the aspect ratio, zero padded, centred
    (openpi ``image_tools.resize_with_pad``, PIL bilinear)."""
    img = _check_image(img)
    if img.shape[:2] == (height, width):
        return img.copy()
    rh, rw, top, left = pad_geometry(img.shape[0], img.shape[1], height, width)
    out = np.zeros((height, width, img.shape[2]), dtype=np.uint8)
    out[top:top + rh, left:left + rw] = resize(img, rh, rw, method=method, pil_compat=True)
    return out


def jpeg_roundtrip(img: np.ndarray, quality: int = 95) -> np.ndarray:
    """Encode + decode as JPEG (RGB in, RGB out), like OpenVLA's ``tf.image.encode_jpeg`` step."""
    import cv2

    img = _check_image(img)
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("jpeg_roundtrip: OpenCV failed to encode the image")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


# --------------------------------------------------------------------------------------------
# State / action
# --------------------------------------------------------------------------------------------

def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(4,) quaternion ``(x, y, z, w)`` (robosuite order) -> (3,) float32 axis * angle (radians).

    Same as robosuite's ``quat2axisangle`` used by openpi: w is clipped to [-1, 1], a (near) identity
    rotation returns zeros. Not sign-canonicalised (q and -q give angles theta and 2*pi - theta
    about opposite axes), which is what the policies were trained on."""
    q = np.asarray(quat, dtype=np.float64).reshape(-1)
    if q.shape != (4,):
        raise ValueError(f"quat2axisangle: expected 4 values (x, y, z, w), got shape {q.shape}")
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0, abs_tol=1e-9):
        return np.zeros(3, dtype=np.float32)
    return (q[:3] * 2.0 * math.acos(w) / den).astype(np.float32)


def libero_state(obs: dict) -> np.ndarray:
    """(8,) float32 openpi state: eef pos (3) + eef axis-angle (3) + gripper qpos (2)."""
    try:
        parts = (np.asarray(obs["robot0_eef_pos"], np.float64).reshape(3),
                 quat2axisangle(obs["robot0_eef_quat"]),
                 np.asarray(obs["robot0_gripper_qpos"], np.float64).reshape(2))
    except KeyError as e:
        raise KeyError(f"LIBERO observation lacks {e.args[0]!r}; keys: {sorted(obs)}") from None
    return np.concatenate(parts).astype(np.float32)


def openvla_gripper_to_env(action: np.ndarray) -> np.ndarray:
    """(..., 7) policy action with gripper in [0, 1] (1 = open) -> (..., 7) float32 env action with
    gripper in {-1, 0, +1} (robosuite: -1 = open, +1 = close).

    [0, 1] -> [-1, 1] (``2 g - 1``), binarised with ``sign`` (exactly 0.5 stays 0: no command),
    then inverted. Does not modify its input."""
    a = np.array(action, dtype=np.float32, copy=True)
    if a.shape[-1] < 1:
        raise ValueError("openvla_gripper_to_env: empty action")
    a[..., -1] = -np.sign(2.0 * a[..., -1] - 1.0)
    return a


# --------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------

@dataclass
class PreparedObservation:
    """What the client sends: ``images`` convention key -> (S, S, 3) uint8, ``state`` (D,) float32,
    ``prompt`` the instruction."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompt: str


class Convention:
    """Base class: ``prepare(obs, instruction)`` and ``postprocess(action_chunk)``."""

    name = "base"
    #: env steps executed from each chunk before asking the server again (None = whole chunk)
    replan_steps: int | None = None
    image_keys: tuple[str, ...] = ()

    def prepare(self, obs: dict, instruction: str) -> PreparedObservation:
        raise NotImplementedError

    def postprocess(self, chunk: np.ndarray) -> np.ndarray:
        """(T, 7) server actions -> (T, 7) float32 env actions."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != 7:
            raise ValueError(f"{self.name}: LIBERO needs (T, 7) action chunks, got {chunk.shape}")
        return chunk


class OpenVLAConvention(Convention):
    """OpenVLA: one 224x224 agentview image, no state (the 8-D LIBERO state is still provided for
    servers whose spec asks for one), gripper [0,1] -> binarised, inverted robosuite command."""

    name = "openvla"
    image_keys = ("image",)

    def __init__(self, suite: str = "libero_spatial", size: int = MODEL_IMAGE_SIZE,
                 center_crop: bool = False, jpeg: bool = True, replan_steps: int | None = 1,
                 backend: str = "numpy"):
        self.unnorm_key = suite
        self.size = size
        self.center_crop = center_crop
        self.jpeg = jpeg
        # OpenVLA predicts one action per query; a chunked server can run more per call.
        self.replan_steps = replan_steps
        self.backend = backend

    def image(self, agentview: np.ndarray) -> np.ndarray:
        img = rotate_180(_check_image(agentview, "agentview_image"))
        if self.jpeg:
            img = jpeg_roundtrip(img)
        img = resize(img, self.size, self.size, method="lanczos3", backend=self.backend)
        if self.center_crop:
            img = center_crop_resize(img, OPENVLA_CROP_AREA)
        return img

    def prepare(self, obs: dict, instruction: str) -> PreparedObservation:
        return PreparedObservation({"image": self.image(obs["agentview_image"])},
                                   libero_state(obs), instruction)

    def postprocess(self, chunk: np.ndarray) -> np.ndarray:
        return openvla_gripper_to_env(super().postprocess(chunk))


class OpenPIConvention(Convention):
    """openpi: agentview + wrist 224x224 resize-with-pad, 8-D state, actions unchanged, replan 5."""

    name = "openpi"
    image_keys = ("observation/image", "observation/wrist_image")

    def __init__(self, size: int = MODEL_IMAGE_SIZE, replan_steps: int = OPENPI_REPLAN_STEPS):
        self.size = size
        self.replan_steps = replan_steps

    def prepare(self, obs: dict, instruction: str) -> PreparedObservation:
        img = resize_with_pad(rotate_180(_check_image(obs["agentview_image"], "agentview_image")),
                              self.size, self.size)
        wrist = resize_with_pad(rotate_180(_check_image(obs["robot0_eye_in_hand_image"],
                                                        "robot0_eye_in_hand_image")),
                                self.size, self.size)
        return PreparedObservation({"observation/image": img, "observation/wrist_image": wrist},
                                   libero_state(obs), instruction)


def make_convention(name: str, suite: str = "libero_spatial", **kwargs) -> Convention:
    """``"openvla"`` or ``"openpi"`` -> a Convention instance (kwargs go to its constructor)."""
    if name == "openvla":
        return OpenVLAConvention(suite=suite, **kwargs)
    if name == "openpi":
        return OpenPIConvention(**kwargs)
    raise ValueError(f"unknown LIBERO convention {name!r} (openvla | openpi)")


_PRIMARY_ALIASES = ("image", "agentview", "agentview_image", "primary", "front", "observation/image",
                    "observation.images.image", "observation.image", "main")
_WRIST_ALIASES = ("wrist_image", "wrist", "eye_in_hand", "robot0_eye_in_hand_image",
                  "observation/wrist_image", "observation.images.wrist_image", "hand")


def map_to_spec_images(prepared: dict[str, np.ndarray], spec_images: dict) -> dict[str, np.ndarray]:
    """Rename (and if needed resize) convention images to the server spec's camera keys.

    prepared: convention key -> (S, S, 3) uint8 (first = primary, second = wrist);
    spec_images: server key -> object with ``height``/``width`` (``ImageSpec``) or ``(h, w)``.
    A spec key equal to a convention key is used as is; otherwise keys containing "wrist"/"hand"
    get the wrist view and any other key the primary view. Images are resized (antialiased
    bilinear) when the server wants another size, because the service resizes nothing."""
    vals = list(prepared.values())
    if not vals:
        raise ValueError("no prepared images")
    primary = vals[0]
    wrist = vals[1] if len(vals) > 1 else None
    out = {}
    for key, spec in spec_images.items():
        if hasattr(spec, "height"):
            h, w = int(spec.height), int(spec.width)
        else:
            h, w = int(spec[0]), int(spec[1])
        if key in prepared:
            img = prepared[key]
        else:
            low = key.lower()
            is_wrist = key in _WRIST_ALIASES or "wrist" in low or "hand" in low
            if is_wrist and wrist is None:
                raise ValueError(f"server wants a wrist camera {key!r} but the convention provides "
                                 f"only {list(prepared)}")
            img = wrist if is_wrist else primary
        if img.shape[:2] != (h, w):
            img = resize(img, h, w, method="bilinear")
        out[key] = img
    return out
