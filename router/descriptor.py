"""Model-free first-frame descriptor for the hybrid router (when the served base has no pretrained
vision to take features from, or none can be loaded on the robot box).

What it must do: tell apart scenes that differ in *where* things are (LIBERO-spatial: the same
black bowls, plate, ramekin and cookie box arranged differently per task) and *which* objects are
present (LIBERO-object: a different grocery set per task), while staying stable across the fixed
init states of one task (objects jittered by a few centimetres, the arm in the same home pose).
It must also cost little on the robot CPU at episode start (3-11 ms for a 128x128 frame measured on
the shared 2-core dev host, most of it the HSV conversion) and be exactly reproducible, since
admission stores it and the server recomputes it per episode.

Per camera image (uint8 (H, W, 3), RGB) two blocks, each a unit vector:

* **Colour layout** (``GRID`` x ``GRID`` x 3 = 432 values): the image area-averaged to a 12x12
  thumbnail in an opponent colour space (intensity (R+G+B)/3, red-green (R-G)/2, yellow-blue
  (R+G-2B)/4), each channel minus its mean over the thumbnail, then L2-normalised. The cosine of
  two such vectors is the zero-mean normalised cross-correlation of the thumbnails, the classic
  template-matching score: invariant to a global brightness/contrast change, and a 12x12 grid on a
  128x128 frame (cells of ~11 px, a bowl is ~10 px wide) is coarse enough that a few-centimetre
  jitter moves mass between neighbouring cells only, but fine enough that "bowl on the cookie box"
  and "bowl next to the cookie box" light up different cells.
* **Colour histogram** (``HUE_BINS`` x ``SAT_BINS`` x ``VAL_BINS`` = 8 x 4 x 4 = 128 values): a
  joint HSV histogram (fractions of pixels), square-rooted, so the cosine of two blocks is their
  Bhattacharyya coefficient. It ignores positions entirely: which objects (their colours) are in
  view, robust to any jitter; it is what separates LIBERO-object's grocery sets.

The blocks are concatenated with weights sqrt(w) (``LAYOUT_WEIGHT`` for the layout, 1 - that for
the histogram) and the cameras are concatenated and divided by sqrt(#cameras), so the descriptor
is a unit vector and the cosine of two descriptors is the weighted average of the blocks' and
cameras' cosines. Shapes: one camera -> float32 (560,); C cameras -> (560 * C,).

The parameters and camera names are stored with the descriptors (``descriptor_spec``, as JSON): a
server whose descriptor differs from the one used at admission ignores the stored descriptors
instead of comparing incompatible vectors.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from policy_server.errors import InputError
from policy_server.merge.hooks import ArtifactOnlyHook

DESCRIPTOR_VERSION = 1
GRID = 12
HUE_BINS, SAT_BINS, VAL_BINS = 8, 4, 4
LAYOUT_WEIGHT = 0.5
# DescriptorScorer softmax temperature, chosen by bench/routing/bench_libero_frames.py --tune on
# registration frames only (register LIBERO init states 0-3, query 4, paraphrases 0-1; grid
# 0.005-0.1 x text weight 0.3-0.7): every setting but one routed the dev set 100%, and 0.005 with
# the default text weight 0.5 had the highest mean log confidence of the true skill.
DEFAULT_TEMPERATURE = 0.005
BLOCK = GRID * GRID * 3 + HUE_BINS * SAT_BINS * VAL_BINS  # 560 values per camera

KEY_OBS_DESCRIPTORS = "router::obs::descriptors"        # float32 (n, D): unit descriptors
KEY_OBS_DESCRIPTOR_SPEC = "router::obs::descriptor_spec"  # uint8 (n,): UTF-8 JSON of the spec

# Opponent colour transform (rows: intensity, red-green, yellow-blue) applied to RGB in [0, 1].
_OPPONENT = np.array([[1 / 3, 1 / 3, 1 / 3],
                      [1 / 2, -1 / 2, 0.0],
                      [1 / 4, 1 / 4, -1 / 2]], dtype=np.float32)


def descriptor_spec(cameras: list[str] | None = None) -> dict:
    """The parameters that define the descriptor (and the camera order), JSON-serialisable."""
    return {"version": DESCRIPTOR_VERSION, "grid": GRID,
            "hist_bins": [HUE_BINS, SAT_BINS, VAL_BINS], "layout_weight": LAYOUT_WEIGHT,
            "cameras": sorted(cameras) if cameras is not None else None}


def encode_spec(cameras: list[str]) -> torch.Tensor:
    """descriptor_spec(cameras) as uint8 (n,) UTF-8 JSON (safetensors stores tensors only)."""
    raw = json.dumps(descriptor_spec(cameras), sort_keys=True).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def decode_spec(t: torch.Tensor) -> dict:
    """Inverse of ``encode_spec``; an unreadable spec decodes to {} (never equal to a real one)."""
    try:
        return json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _as_image(img, what: str = "image") -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[-1] != 3 or a.shape[0] < GRID or a.shape[1] < GRID:
        raise InputError(f"{what}: expected an RGB image (H, W, 3) or (1, H, W, 3) with H, W >= "
                         f"{GRID}, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise InputError(f"{what}: expected uint8 pixels, got {a.dtype}")
    return a


def colour_layout(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (GRID * GRID * 3,) unit vector: zero-mean opponent-colour
    thumbnail (see the module docstring). A flat image (no structure) gives the zero vector."""
    x = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32).permute(2, 0, 1)[None] / 255.0
    # adaptive average pooling = area averaging for any H, W (no aliasing of small objects)
    t = torch.nn.functional.adaptive_avg_pool2d(x, GRID)[0].permute(1, 2, 0).numpy()  # (G, G, 3)
    o = t.reshape(-1, 3) @ _OPPONENT.T                                                # (G*G, 3)
    o -= o.mean(0, keepdims=True)
    v = o.reshape(-1)
    n = float(np.linalg.norm(v))
    return (v / n if n > 1e-8 else np.zeros_like(v)).astype(np.float32)


def _hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) RGB -> hue in [0, 1), saturation, value in [0, 1] (float32 (H, W) each)."""
    rgb = img.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0,
                 np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    h = np.where(d > 0, h, 0.0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    return h.astype(np.float32) % 1.0, s.astype(np.float32), mx.astype(np.float32)


def colour_histogram(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (HUE_BINS * SAT_BINS * VAL_BINS,) unit vector: the square root of
    the joint HSV histogram (pixel fractions), so a dot product is the Bhattacharyya coefficient."""
    h, s, v = _hsv(img)
    hi = np.minimum((h * HUE_BINS).astype(np.int64), HUE_BINS - 1)
    si = np.minimum((s * SAT_BINS).astype(np.int64), SAT_BINS - 1)
    vi = np.minimum((v * VAL_BINS).astype(np.int64), VAL_BINS - 1)
    idx = (hi * SAT_BINS + si) * VAL_BINS + vi
    hist = np.bincount(idx.reshape(-1), minlength=HUE_BINS * SAT_BINS * VAL_BINS)
    return np.sqrt(hist / hist.sum()).astype(np.float32)


def image_descriptor(img) -> np.ndarray:
    """uint8 (H, W, 3) or (1, H, W, 3) RGB -> float32 (BLOCK,) unit descriptor of one camera."""
    a = _as_image(img)
    return np.concatenate([np.sqrt(LAYOUT_WEIGHT) * colour_layout(a),
                           np.sqrt(1.0 - LAYOUT_WEIGHT) * colour_histogram(a)]).astype(np.float32)


def _images_of(observation) -> dict:
    if isinstance(observation, dict):
        return dict(observation.get("images") or {})
    return dict(getattr(observation, "images", None) or {})


def observation_descriptor(observation, cameras: list[str] | None = None) -> torch.Tensor:
    """First observation (``ObservationBatch`` of size 1, or a dict with "images": {name: uint8
    (H, W, 3) or (1, H, W, 3)}) -> float32 (BLOCK * C,) unit tensor over the cameras ``cameras``
    (default: every camera of the observation), in sorted name order. The state vector is not
    used: a robot's home pose says nothing about the task."""
    images = _images_of(observation)
    names = sorted(images) if cameras is None else sorted(cameras)
    missing = [n for n in names if n not in images]
    if missing or not names:
        raise InputError(f"observation descriptor: cameras {missing or names} not in the "
                         f"observation (it has {sorted(images)})")
    parts = [image_descriptor(_as_image(images[n], f"camera {n!r}")) for n in names]
    return torch.from_numpy(np.concatenate(parts) / np.sqrt(len(parts))).to(torch.float32)


def observation_descriptor_artifacts(frames: list, cameras: list[str] | None = None
                                     ) -> dict[str, torch.Tensor]:
    """Descriptors of a skill's first frames, for storage with the skill at admission:
    {KEY_OBS_DESCRIPTORS: float32 (n, D), KEY_OBS_DESCRIPTOR_SPEC: uint8 (m,) JSON}. ``cameras``
    default: the cameras of the first frame (every frame must have them)."""
    if not frames:
        raise InputError("observation descriptors need at least one frame")
    if cameras is None:
        cameras = sorted(_images_of(frames[0]))
    return {KEY_OBS_DESCRIPTORS: torch.stack([observation_descriptor(f, cameras) for f in frames]),
            KEY_OBS_DESCRIPTOR_SPEC: encode_spec(cameras)}


def load_frames(paths) -> list[dict]:
    """First frames from npz files for ``ObservationDescriptorHook`` (``carve admit --frames``).

    paths: npz files and/or directories (every ``*.npz`` directly in one, in name order). Each
    file holds one array per camera, named by the server spec's camera key, uint8 (H, W, 3) (one
    frame) or (N, H, W, 3) (N frames), RGB as the client sends it (e.g. LIBERO's agentview already
    rotated by 180 degrees); every camera of a file has the same N, every file the same cameras.
    -> N_total observations {"images": {camera: uint8 (H, W, 3)}}; InputError naming the file for
    a missing path, an unreadable file, a non-uint8 or mis-shaped array."""
    from pathlib import Path

    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.npz"))
            if not found:
                raise InputError(f"--frames {p}: no .npz files in the directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"--frames {p}: no such file or directory")
    frames, cams = [], None
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - zip, pickle or format errors: one clear line
            raise InputError(f"--frames {f}: not a readable npz ({type(e).__name__}: {e})") from e
        if not arrays:
            raise InputError(f"--frames {f}: holds no arrays (one per camera expected)")
        if cams is not None and sorted(arrays) != cams:
            raise InputError(f"--frames {f}: cameras {sorted(arrays)} differ from the first "
                             f"file's {cams}")
        cams = sorted(arrays)
        n = None
        for k, a in arrays.items():
            if a.dtype != np.uint8:
                raise InputError(f"--frames {f}: camera {k!r} is {a.dtype}, expected uint8 pixels")
            if a.ndim == 3:
                a = a[None]
            if a.ndim != 4 or a.shape[-1] != 3 or a.shape[1] < GRID or a.shape[2] < GRID:
                raise InputError(f"--frames {f}: camera {k!r} has shape {arrays[k].shape}, "
                                 f"expected (H, W, 3) or (N, H, W, 3) RGB with H, W >= {GRID}")
            if n is not None and a.shape[0] != n:
                raise InputError(f"--frames {f}: cameras hold different frame counts")
            n = a.shape[0]
            arrays[k] = a
        frames += [{"images": {k: arrays[k][i] for k in cams}} for i in range(n)]
    if not frames:
        raise InputError("--frames: no frames given")
    return frames


class ObservationDescriptorHook(ArtifactOnlyHook):
    """Admission hook (``policy_server.merge.hooks.AdmissionHook`` protocol, like
    ``TextEmbeddingHook``): stores the descriptors of the skill's first frames (e.g. the first
    observation of its demonstrations, or of its task's init states) with the skill. It reads no
    tensor (``wants`` is always False). frames: observations as ``observation_descriptor`` takes."""

    name = "obs_descriptors"

    def __init__(self, frames: list, cameras: list[str] | None = None):
        if not frames:
            raise InputError("ObservationDescriptorHook needs at least one frame")
        self.frames = list(frames)
        self.cameras = cameras

    def artifacts(self) -> dict[str, torch.Tensor]:
        return observation_descriptor_artifacts(self.frames, self.cameras)


class DescriptorScorer:
    """Scores skills by their nearest stored first-frame descriptor.

    descriptors: skill -> float32 (n_k, D) (from ``observation_descriptor_artifacts``); cameras:
    the camera names they were made from (queries use the same).

    Scenes of one robot cell share most of their pixels (table, walls, arm in its home pose), so
    raw cosines of two LIBERO frames are all ~0.95-1.0 and the task-specific part is a small
    difference on top. The scorer therefore centres every descriptor on the mean of *all* stored
    descriptors (what every skill's scene has in common) and compares the residuals:

        c      = mean over all skills and frames of D_k[i]                      (D,)
        r(x)   = normalize(x - c)
        score_k = max_i  r(query) . r(D_k[i])                                   in [-1, 1]
        p_G    = softmax_G(max_{k in G} score_k / temperature)   over scene groups G
        p_k    = p_G / |G|                                       for k in G

    Centring (not per-dimension z-scoring) keeps the descriptor's own weighting of its dimensions;
    z-scoring would blow up dimensions that only vary with init-state jitter. With one skill there
    is nothing to tell apart and the probabilities are [1.0].

    Skills that show the same scene (their stored frames are as close to each other's as to their
    own) share one softmax logit (``group_scenes``, see ``_scene_groups``): the observation then
    says "one of these" and leaves the choice among them to the text. ``groups`` lists them.
    """

    name = "obs-descriptor"

    def __init__(self, descriptors: dict[str, torch.Tensor], cameras: list[str] | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, group_scenes: bool = True):
        if not descriptors:
            raise InputError("observation descriptors: no skill has any")
        if temperature <= 0:
            raise InputError(f"descriptor temperature must be > 0, got {temperature}")
        dims = {int(d.shape[-1]) for d in descriptors.values()}
        if len(dims) != 1:
            raise InputError(f"observation descriptors have different sizes {sorted(dims)} "
                             f"(skills admitted with different cameras?)")
        dim = next(iter(dims))
        self.skills = list(descriptors)
        self.cameras = None if cameras is None else sorted(cameras)
        mats = [d.to(torch.float32).reshape(-1, dim) for d in descriptors.values()]
        self._centre = torch.cat(mats).mean(0)                                  # (D,)
        self._D = [self._residual(m) for m in mats]                             # (n_k, D) each
        self.temperature = float(temperature)
        self.groups = self._scene_groups() if group_scenes else [[k] for k in range(len(mats))]

    def _scene_groups(self) -> list[list[int]]:
        """Skills whose stored frames are as close to another skill's as to their own other
        frames show the same scene (LIBERO-goal's ten tasks; two libero_10 tasks in one living
        room; libero_spatial's "on the stove" / "on the wooden cabinet", whose scenes hold both
        bowls): the frame cannot tell them apart, and a sharp softmax over init-state jitter would
        pick one at random and could outvote the text. They are merged into one group (union-find
        over "cross >= own"), which gets one softmax logit shared equally by its members.

        own_k = mean_i max_{i' != i} D_k[i] . D_k[i']   (leave-one-out nearest own frame; a skill
                                                          with one frame cannot be judged: alone)
        cross_jk = mean_i max_i' D_j[i] . D_k[i']"""
        n = len(self._D)
        own = []
        for d in self._D:
            if d.shape[0] < 2:
                own.append(float("inf"))
                continue
            s = d @ d.T
            s.fill_diagonal_(-2.0)
            own.append(float(s.max(1).values.mean()))
        parent = list(range(n))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for j in range(n):
            for k in range(j + 1, n):
                cross = 0.5 * (float((self._D[j] @ self._D[k].T).max(1).values.mean())
                               + float((self._D[k] @ self._D[j].T).max(1).values.mean()))
                if cross >= min(own[j], own[k]):
                    parent[find(j)] = find(k)
        groups: dict[int, list[int]] = {}
        for k in range(n):
            groups.setdefault(find(k), []).append(k)
        return sorted(groups.values())

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x - self._centre, dim=-1)

    @classmethod
    def from_snapshot(cls, snapshot, **options) -> "DescriptorScorer":
        """The skills whose stored descriptors were made with this descriptor (same spec: version,
        parameters) and the same cameras as the first such skill; other skills are skipped with a
        warning (they get a uniform observation probability in the hybrid router)."""
        descs, stale, ref = {}, [], None
        for name in snapshot.skill_names():
            arts = snapshot.skill_artifacts(name) or {}
            d, spec = arts.get(KEY_OBS_DESCRIPTORS), arts.get(KEY_OBS_DESCRIPTOR_SPEC)
            if d is None or spec is None:
                continue
            spec = decode_spec(spec)
            if spec != descriptor_spec(spec.get("cameras")) or (ref is not None and spec != ref):
                stale.append(name)
                continue
            ref = spec
            descs[name] = d
        if stale:
            warnings.warn(f"observation descriptors of skills {stale} were made with another "
                          f"descriptor (version, parameters or cameras) than {ref}; they are "
                          f"ignored until re-admitted", RuntimeWarning, stacklevel=2)
        return cls(descs, cameras=ref["cameras"] if ref else None, **options)

    def scores(self, observation) -> dict[str, float]:
        """-> {skill: nearest centred cosine} (see the class docstring)."""
        f = observation_descriptor(observation, self.cameras)
        if f.shape[-1] != self._centre.shape[0]:
            raise InputError(f"observation descriptor has size {f.shape[-1]}, stored ones "
                             f"{self._centre.shape[0]} (different cameras)")
        r = self._residual(f)
        return {s: float((d @ r).max()) for s, d in zip(self.skills, self._D)}

    def probabilities(self, observation) -> dict[str, float]:
        """-> {skill: probability} (sum 1): softmax over scene groups of the group's best score,
        each group's mass split equally among its skills (see ``_scene_groups``)."""
        sc = self.scores(observation)
        g = torch.tensor([max(sc[self.skills[k]] for k in grp) for grp in self.groups],
                         dtype=torch.float64)
        pg = torch.softmax(g / self.temperature, 0)
        out = {}
        for grp, p in zip(self.groups, pg):
            for k in grp:
                out[self.skills[k]] = float(p) / len(grp)
        return out
