"""``LeRobotBackend``: serve a LeRobot pretrained policy (SmolVLA, ACT, diffusion) with LeRobot's
own classes, each episode through its skill's own pre/post-processors.

Nothing of LeRobot is imported at module import time (the registry imports this module in every
process, with or without LeRobot installed); ``load`` imports it and turns its absence into an
``InputError`` naming the fix.

Per call (``predict``), row by row: wire observation (uint8 HWC per camera, float32 state, the
episode's instruction) -> LeRobot observation (float32 CHW in [0, 1], resized to the feature
shape when the camera sends another size, as LeRobot's async policy server does) -> the row's
skill's preprocessor (core-only rows: the base's) -> one batched model forward for all rows ->
the row's skill's postprocessor -> actions in that skill's dataset units.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from policy_server.errors import InputError
from policy_server.models.base import ImageSpec, ObservationBatch, PolicyBackend, PolicySpec
from policy_server.models.lerobot.config import check_policy_dir, resolve_vlm_dir
from policy_server.models.lerobot.episodes import EpisodeState, EpisodeStates
from policy_server.models.lerobot.processors import (
    ProcessorArtifactsHook, has_processor_artifacts, load_processors,
    load_processors_from_artifacts)

log = logging.getLogger(__name__)

OBS_STATE, OBS_IMAGES, ACTION = "observation.state", "observation.images", "action"
_IMAGE_PREFIX = OBS_IMAGES + "."
_LANG_KEYS = ("observation.language.tokens", "observation.language.attention_mask")


def import_lerobot():
    """(PreTrainedConfig, get_policy_class); InputError naming the fix when LeRobot is absent."""
    try:
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class
    except ImportError as e:
        raise InputError(f"serving a LeRobot policy needs the lerobot package ({e}); install "
                         "the pinned set: pip install -r requirements-lerobot.txt && pip install "
                         "--no-deps lerobot==0.4.4") from None
    return PreTrainedConfig, get_policy_class


@contextlib.contextmanager
def _quiet_stdout():
    """LeRobot prints progress ("Loading weights from local directory", "Reducing the number of
    VLM layers ...") to stdout, where ``carve serve`` reports its own status (scripts read its
    "listening on" line); move those lines to the debug log."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                log.debug("lerobot: %s", line)


def episode_seed(generator: torch.Generator) -> int:
    """One 63-bit seed drawn from an episode's generator (one draw per call)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))


def wire_camera_key(feature_key: str) -> str:
    """LeRobot feature key -> wire camera key: ``observation.images.front`` -> ``front`` (the
    robot-side camera name, as LeRobot robots report them)."""
    if feature_key.startswith(_IMAGE_PREFIX):
        return feature_key[len(_IMAGE_PREFIX):]
    return feature_key


def _stats_of(pipeline, key: str) -> dict[str, torch.Tensor]:
    """Normalisation statistics ``{mean|std|min|max|...: tensor}`` of ``key`` in a processor
    pipeline (empty when no (un)normaliser step carries it)."""
    for step in getattr(pipeline, "steps", []):
        stats = getattr(step, "stats", None) or {}
        if key in stats:
            return {k: torch.as_tensor(v, dtype=torch.float32).flatten()
                    for k, v in stats[key].items()}
    return {}


class LeRobotBackend(PolicyBackend):
    """A LeRobot ``PreTrainedPolicy`` behind the ``PolicyBackend`` interface.

    ``module`` is the policy itself, so its ``state_dict()`` keys are exactly
    ``model.safetensors``'s (``model.vlm_with_expert...`` for SmolVLA, ``model.backbone...`` for
    ACT, ``diffusion...``), buffers included; the runtime folds and applies residuals there.
    pipelines: skill name (None = base / core-only) -> (preprocessor, postprocessor).
    """

    # LeRobot's async server resizes any camera to the feature shape; so does this server
    resizes_images = True

    def __init__(self, path: Path, policy, config: dict, vlm_dir: str | None,
                 noise_seed: int = 0, max_episodes: int = 1024):
        self.path, self.policy, self.module = path, policy, policy
        self.config = config  # the raw config.json (architecture checks, docs)
        self.cfg = policy.config  # LeRobot's PreTrainedConfig
        self.type = self.cfg.type
        self.vlm_dir, self.noise_seed = vlm_dir, int(noise_seed)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._cameras = {wire_camera_key(k): k for k in self.cfg.image_features}
        self.pipelines = {None: load_processors(self.cfg, path, vlm_dir)}
        self.episodes = EpisodeStates(self._new_episode, max_episodes)
        self.spec = self._make_spec()

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
             vlm_dir: str | None = None, noise_seed: int = 0) -> "LeRobotBackend":
        """Load a LeRobot policy directory with ``get_policy_class(type).from_pretrained(...,
        strict=True)`` (a missing or unexpected weight is an error, not silently random) and its
        processors with ``make_pre_post_processors(..., pretrained_path=path)``. Offline by
        construction: a SmolVLA's VLM config/tokenizer come from a local directory (see
        ``config.resolve_vlm_dir``) and ``load_vlm_weights`` is forced off (the weights are all in
        ``model.safetensors``; True would fetch the VLM's weights from the hub)."""
        path = Path(path)
        raw = check_policy_dir(path)
        local_vlm = resolve_vlm_dir(path, raw, vlm_dir)
        PreTrainedConfig, get_policy_class = import_lerobot()
        cfg = PreTrainedConfig.from_pretrained(str(path))
        cfg.device = "cpu"  # the runtime alone places the model (backend.to)
        if local_vlm is not None:
            cfg.vlm_model_name, cfg.load_vlm_weights = local_vlm, False
        try:
            with _quiet_stdout():
                policy = get_policy_class(cfg.type).from_pretrained(str(path), config=cfg,
                                                                    strict=True)
        except ImportError as e:
            raise InputError(f"{path}: policy type {cfg.type!r} needs a package that is not "
                             f"installed ({e}); see requirements-lerobot.txt") from None
        except (RuntimeError, OSError, ValueError) as e:
            raise InputError(f"{path}: LeRobot could not load the policy: "
                             f"{type(e).__name__}: {str(e)[:800]}") from None
        policy.eval()
        with _quiet_stdout():
            be = cls(path, policy, raw, local_vlm, noise_seed)
        return be.to(device, dtype) if (device != "cpu" or dtype != torch.float32) else be

    @classmethod
    def admission_hooks(cls, base_dir, expert_dir) -> list:
        """The hook storing the expert's processor files with its skill (and refusing an expert
        whose architecture fields differ from the base's)."""
        return [ProcessorArtifactsHook(base_dir, expert_dir)]

    def attach_state(self, snapshot) -> None:
        """Load every skill's own processors from its stored artifacts; widen the action bounds
        to the union of every skill's dataset range (the runtime clips with one spec)."""
        if snapshot is None:
            return
        for name in snapshot.skill_names():
            arts = snapshot.skill_artifacts(name)
            if not has_processor_artifacts(arts):
                log.warning("skill %r has no stored LeRobot processors (admitted without the "
                            "lerobot_processors hook); it is served with the base's statistics",
                            name)
                continue
            with _quiet_stdout():
                self.pipelines[name] = load_processors_from_artifacts(
                    self.cfg, arts, self.vlm_dir, f"skill {name!r}")
        self.spec = self._make_spec()

    # ---- spec ---------------------------------------------------------------------------------
    def _make_spec(self) -> PolicySpec:
        cfg = self.cfg
        adim = int(cfg.action_feature.shape[0])
        lows, highs = [], []
        for _, post in self.pipelines.values():
            st = _stats_of(post, ACTION)
            if "min" in st and "max" in st:
                lows.append(st["min"]), highs.append(st["max"])
        # bounds: the datasets' observed action extremes (min/max statistics): the policy was
        # never trained to command outside them; MEAN_STD outputs are otherwise unbounded
        low = torch.stack(lows).min(0).values.tolist() if lows else [-math.inf] * adim
        high = torch.stack(highs).max(0).values.tolist() if highs else [math.inf] * adim
        norm = {f"{k.split('.')[-1]}_{s}": v.tolist() for k in (OBS_STATE, ACTION)
                for s, v in _stats_of(self.pipelines[None][0 if k == OBS_STATE else 1], k).items()}
        images = {wire: ImageSpec(height=int(cfg.image_features[k].shape[1]),
                                  width=int(cfg.image_features[k].shape[2]),
                                  channels=int(cfg.image_features[k].shape[0]))
                  for wire, k in self._cameras.items()}
        return PolicySpec(state_dim=int(cfg.robot_state_feature.shape[0]), action_dim=adim,
                          chunk_length=self.chunk_length, action_low=low, action_high=high,
                          images=images, normalization=norm, name=f"lerobot-{self.type}")

    @property
    def chunk_length(self) -> int:
        """Actions per served chunk: ``n_action_steps`` (what LeRobot's ``select_action``
        executes per model call); 1 with ACT temporal ensembling (one ensembled action per
        observation)."""
        if getattr(self.cfg, "temporal_ensemble_coeff", None) is not None:
            return 1
        return int(self.cfg.n_action_steps)

    # ---- per-episode state ----------------------------------------------------------------------
    def _new_episode(self) -> EpisodeState:
        st = EpisodeState(generator=torch.Generator().manual_seed(self.noise_seed))
        if self.type == "diffusion":
            n = self.cfg.n_obs_steps
            st.queues = {OBS_STATE: deque(maxlen=n)}
            if self.cfg.image_features:
                st.queues[OBS_IMAGES] = deque(maxlen=n)
        if getattr(self.cfg, "temporal_ensemble_coeff", None) is not None:
            from lerobot.policies.act.modeling_act import ACTTemporalEnsembler

            st.ensembler = ACTTemporalEnsembler(self.cfg.temporal_ensemble_coeff,
                                                self.cfg.chunk_size)
        return st

    def end_episode(self, episode_id: str) -> None:
        """Drop one episode's state (queues, ensembler, RNG); other episodes are untouched."""
        self.episodes.end(episode_id)

    # ---- inputs -------------------------------------------------------------------------------
    def _check(self, batch: ObservationBatch) -> None:
        st = np.asarray(batch.state)
        sdim = self.spec.state_dim
        if st.ndim != 2 or st.shape[1] != sdim:
            raise InputError(f"observation.state: shape {list(st.shape[1:])} (the policy's "
                             f"observation.state feature is [{sdim}])")
        for wire in self._cameras:
            img = batch.images.get(wire)
            if img is None:
                raise InputError(f"images[{wire!r}]: missing camera (the policy takes "
                                 f"{sorted(self._cameras)})")
            if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3:
                raise InputError(f"images[{wire!r}]: {img.dtype}{list(img.shape)}, expected "
                                 "uint8 (B, H, W, 3)")
        extra = sorted(set(batch.images) - set(self._cameras))
        if extra:
            raise InputError(f"images[{extra[0]!r}]: unknown camera (the policy takes "
                             f"{sorted(self._cameras)})")

    def lerobot_observation(self, batch: ObservationBatch, i: int) -> dict:
        """Row ``i`` as the unbatched LeRobot observation the preprocessor takes:
        ``{observation.images.<cam>: float32 (3, H, W) in [0, 1], observation.state: float32
        (D,), task: str}``; images are resized (bilinear, as LeRobot's async server) to the
        feature's (H, W) when the camera sends another size."""
        obs = {OBS_STATE: torch.from_numpy(np.asarray(batch.state[i], dtype=np.float32).copy()),
               "task": batch.instructions[i]}
        for wire, key in self._cameras.items():
            img = torch.from_numpy(np.ascontiguousarray(batch.images[wire][i]))
            img = img.permute(2, 0, 1).to(torch.float32) / 255.0
            want = tuple(self.cfg.image_features[key].shape[1:])
            if tuple(img.shape[1:]) != want:
                img = F.interpolate(img[None], size=want, mode="bilinear", align_corners=False)[0]
            obs[key] = img.contiguous()
        return obs

    def _pipeline(self, skill: str | None):
        return self.pipelines.get(skill) or self.pipelines[None]

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Preprocessed rows (each batch-of-1 dicts) -> one batch on the model's device/dtype.
        Language tokens of different lengths are right-padded with attention mask False, as
        LeRobot's tokenizer step pads a batch (``padding_side="right"``)."""
        keys = [k for k, v in rows[0].items() if torch.is_tensor(v) and k != ACTION]
        out = {}
        for k in keys:
            ts = [r[k] for r in rows]
            if k in _LANG_KEYS and len({t.shape[-1] for t in ts}) > 1:
                n = max(t.shape[-1] for t in ts)
                ts = [F.pad(t, (0, n - t.shape[-1]), value=0) for t in ts]
            t = torch.cat(ts, dim=0).to(self.device)
            out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    # ---- forward ------------------------------------------------------------------------------
    def _noise(self, states: list[EpisodeState], shape: tuple[int, ...]) -> torch.Tensor:
        """(B, *shape) float32 sampling noise, row i from episode i's own generator."""
        return torch.cat([torch.randn((1, *shape), generator=s.generator) for s in states]
                         ).to(self.device, self.dtype)

    def _forward(self, batch: dict[str, torch.Tensor], states: list[EpisodeState]) -> torch.Tensor:
        """Normalised actions (B, chunk_length, A) from one batched LeRobot call."""
        cfg, pol = self.cfg, self.policy
        if self.type == "smolvla":
            noise = self._noise(states, (cfg.chunk_size, cfg.max_action_dim))
            return pol.predict_action_chunk(batch, noise=noise)[:, :cfg.n_action_steps]
        if self.type == "diffusion":
            return self._diffusion_forward(self._diffusion_history(batch, states), states)
        chunk = pol.predict_action_chunk(batch)
        if states[0].ensembler is None:
            return chunk[:, :cfg.n_action_steps]
        return torch.stack([s.ensembler.update(chunk[i:i + 1]) for i, s in enumerate(states)])

    def _diffusion_history(self, batch: dict[str, torch.Tensor], states: list[EpisodeState]
                           ) -> dict[str, torch.Tensor]:
        """Push each row's observation into its own episode's queues (LeRobot's
        ``populate_queues``: the first observation fills the history) and stack every row's
        history: {key: (B, n_obs_steps, ...)}, what ``DiffusionModel.generate_actions`` takes."""
        from lerobot.policies.utils import populate_queues

        if self.cfg.image_features:
            batch = dict(batch)
            batch[OBS_IMAGES] = torch.stack([batch[k] for k in self.cfg.image_features], dim=-4)
        for i, st in enumerate(states):
            populate_queues(st.queues, {k: batch[k][i:i + 1] for k in st.queues})
        return {k: torch.cat([torch.stack(list(s.queues[k]), dim=1) for s in states])
                for k in states[0].queues}

    def _diffusion_forward(self, history: dict[str, torch.Tensor], states: list[EpisodeState]
                           ) -> torch.Tensor:
        """(B, n_action_steps, A): one ``generate_actions`` per row. The DDPM scheduler draws
        fresh noise from torch's *global* RNG at every denoising step, so a batched call would
        make a row's actions depend on the other rows; each row instead runs under a forked
        global RNG seeded from its own episode's generator (deterministic, isolated, and the same
        as LeRobot's ``select_action`` after ``torch.manual_seed`` of that seed)."""
        cfg, out = self.cfg, []
        for i, st in enumerate(states):
            seed = episode_seed(st.generator)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                noise = torch.randn((1, cfg.horizon, cfg.action_feature.shape[0]))
                row = {k: v[i:i + 1] for k, v in history.items()}
                out.append(self.policy.diffusion.generate_actions(
                    row, noise=noise.to(self.device, self.dtype)))
        return torch.cat(out)

    def predict(self, batch: ObservationBatch) -> torch.Tensor:
        """(B, chunk_length, action_dim) float32 CPU actions, each row in its skill's dataset
        units (its own postprocessor), unclipped."""
        self._check(batch)
        n = len(batch)
        skills = list(batch.skills) if batch.skills is not None else [None] * n
        episodes = list(batch.episode_ids) if batch.episode_ids is not None else [None] * n
        rows = [self._pipeline(skills[i])[0](self.lerobot_observation(batch, i)) for i in range(n)]
        states = [self.episodes.get(e) for e in episodes]
        saved = [s.snapshot() for s in states]
        try:
            with torch.no_grad():
                normalised = self._forward(self._collate(rows), states).to("cpu", torch.float32)
        except BaseException:
            for st, snap in zip(states, saved):  # a retried batch must see the same state
                st.restore(snap)
            raise
        out = [self._pipeline(skills[i])[1](normalised[i:i + 1]) for i in range(n)]
        return torch.cat([torch.as_tensor(o, dtype=torch.float32) for o in out])


__all__ = ["LeRobotBackend", "import_lerobot", "wire_camera_key"]
