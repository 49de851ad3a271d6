"""The LeRobot backend on real LeRobot code: tiny SmolVLA / ACT / diffusion policies and experts
built offline in the test (tests/lerobot_utils.py), admitted with ``carve admit --method bank``
(lossless), served by the composition root behind a real gRPC server on loopback, compared with
LeRobot's own pipeline (preprocessor -> select_action -> postprocessor) on each expert checkpoint.

Skipped as a whole where LeRobot is not installed (the project venv without requirements-lerobot).
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot.policies.factory", reason="lerobot not installed "
                    "(pip install -r requirements-lerobot.txt; --no-deps lerobot==0.4.4)")

from carve_client import PolicyClient, PolicyError  # noqa: E402

from lerobot_utils import CAMERA, IMG, SD, build_family  # noqa: E402
from policy_server.cli import main as carve  # noqa: E402
from policy_server.errors import InputError  # noqa: E402
from policy_server.models.base import ObservationBatch  # noqa: E402
from policy_server.models.lerobot.backend import LeRobotBackend, episode_seed  # noqa: E402
from policy_server.models.registry import detect_backend, load_backend  # noqa: E402
from policy_server.service.server import PolicyServer, ServerConfig  # noqa: E402
from policy_server.serving import EngineConfig, build_engine  # noqa: E402
from policy_server.state.store import StateStore  # noqa: E402

torch.set_num_threads(1)
KINDS = ("smolvla", "act", "diffusion")
TASK = "pick up the red cube"
TOL = dict(rtol=1e-5, atol=1e-5)


def _admit(state, base, expert, skill, *extra) -> int:
    return carve(["admit", str(state), "--base", str(base), "--expert", str(expert), "--skill",
                  skill, "--method", "bank", "--no-progress", *extra])


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    """A base, two experts with different statistics, a bank state with both, a served engine."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    fam = build_family(root, kind)
    fam["kind"], fam["state"] = kind, root / "state"
    for skill, d in fam["experts"].items():
        assert _admit(fam["state"], fam["base"], d, skill) == 0
    server = PolicyServer(lambda: build_engine(EngineConfig(
        base_dir=str(fam["base"]), state_dir=str(fam["state"]), router="exact")),
        ServerConfig(port=0))
    port = server.start()
    fam["server"] = server
    fam["client"] = PolicyClient(f"127.0.0.1:{port}", retries=0)
    fam["client"].wait_ready(60)
    yield fam
    fam["client"].close()
    server.stop(1.0)


def _observations(seed: int, n: int) -> list[tuple[np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(SD).astype(np.float32),
             {"front": rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)}) for _ in range(n)]


def lerobot_reference(policy_dir, observations, noise_seed: int = 0) -> list[np.ndarray]:
    """LeRobot's own pipeline on one checkpoint: for each observation the (n_action_steps, A)
    actions ``select_action`` + postprocessor execute from a chunk computed at that observation.
    Stateless policies (ACT, SmolVLA) are reset per observation (the server computes a chunk
    per observation); diffusion keeps its observation history across the episode and is read
    where it computes a chunk. Sampling noise is drawn as the backend draws it: one draw per
    observation from a generator seeded with ``noise_seed`` at episode start (diffusion: a seed
    per observation for the global RNG, which DDPM's denoising steps draw from)."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    cfg = PreTrainedConfig.from_pretrained(str(policy_dir))
    policy = get_policy_class(cfg.type).from_pretrained(str(policy_dir), strict=True)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(policy_dir))
    n, g, out, pending = cfg.n_action_steps, torch.Generator().manual_seed(noise_seed), [], []
    policy.reset()
    for state, imgs in observations:
        obs = {CAMERA: torch.from_numpy(imgs["front"]).permute(2, 0, 1).float() / 255,
               "observation.state": torch.from_numpy(state), "task": TASK}
        with torch.no_grad():
            if cfg.type == "smolvla":
                noise = torch.randn((1, cfg.chunk_size, cfg.max_action_dim), generator=g)
                policy.reset()
                acts = [post(policy.select_action(pre(dict(obs)), noise=noise)) for _ in range(n)]
            elif cfg.type == "act":
                policy.reset()
                acts = [post(policy.select_action(pre(dict(obs)))) for _ in range(n)]
            else:  # the backend seeds the global RNG per call (DDPM draws from it per step)
                torch.manual_seed(episode_seed(g))
                noise = torch.randn((1, cfg.horizon, cfg.action_feature.shape[0]))
                pending.append(post(policy.select_action(pre(dict(obs)), noise=noise)))
                acts = None
        out.append(None if acts is None else torch.cat(acts).numpy())
    if cfg.type == "diffusion":  # a chunk is computed at steps 0, n, 2n, ...
        out = [torch.cat(pending[i:i + n]).numpy() if i % n == 0 and i + n <= len(pending) else None
               for i in range(len(pending))]
    return out


def _serve_episode(client, skill, observations) -> list[np.ndarray]:
    with client.episode(TASK, skill=skill) as ep:
        return [ep.infer(state, imgs) for state, imgs in observations]


def _clip(a, spec):
    return np.clip(a, np.asarray(spec.action_low), np.asarray(spec.action_high))


# ---- registry, spec, offline handling ----------------------------------------------------------
def test_registry_detects_lerobot_dir_and_spec(family):
    assert detect_backend(family["base"]) is LeRobotBackend
    be = load_backend(family["base"])
    spec = be.spec
    assert (spec.state_dim, spec.action_dim, spec.chunk_length) == (SD, 6, 4)
    assert {k: (v.height, v.width) for k, v in spec.images.items()} == {"front": (IMG, IMG)}
    sd = be.module.state_dict()
    from safetensors import safe_open

    with safe_open(str(family["base"] / "model.safetensors"), "pt") as f:
        assert set(f.keys()) <= set(sd)  # the runtime addresses checkpoint keys in the state dict
    prefix = {"smolvla": "model.vlm_with_expert.", "act": "model.backbone.",
              "diffusion": "diffusion."}[family["kind"]]
    assert any(k.startswith(prefix) for k in sd)


def test_not_a_lerobot_dir_and_missing_processor_files(tmp_path, family):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(InputError, match="model_type"):
        load_backend(tmp_path / "x")
    broken = tmp_path / "broken"
    shutil.copytree(family["base"], broken)
    next(broken.glob("policy_postprocessor_step_*.safetensors")).unlink()
    with pytest.raises(InputError, match="state_file"):
        load_backend(broken)
    (broken / "policy_preprocessor.json").unlink()
    with pytest.raises(InputError, match="policy_preprocessor.json"):
        load_backend(broken)


def test_unsupported_policy_type_is_refused(tmp_path, family):
    d = tmp_path / "pi0"
    shutil.copytree(family["base"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["type"] = "pi0"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="'pi0' is not supported.*transformers"):
        load_backend(d)


def test_wrong_state_size_and_camera_key(family):
    be = load_backend(family["base"])
    img = np.zeros((1, IMG, IMG, 3), np.uint8)
    with pytest.raises(InputError, match="observation.state"):
        be.predict(ObservationBatch(np.zeros((1, SD + 1), np.float32), [TASK], {"front": img}))
    with pytest.raises(InputError, match="'front'"):
        be.predict(ObservationBatch(np.zeros((1, SD), np.float32), [TASK], {"wrist": img}))
    with pytest.raises(PolicyError, match="state") as e:  # the same over gRPC
        with family["client"].episode(TASK, skill="skill1") as ep:
            ep.infer(np.zeros(SD + 1, np.float32), {"front": img[0]})
    assert "INVALID_ARGUMENT" in str(e.value.code)


def test_camera_of_another_size_is_resized(family):
    """In process, a camera of another size is resized to the feature shape (bilinear, like
    LeRobot's async server); the wire announces the feature size."""
    be = load_backend(family["base"])
    big = np.random.default_rng(0).integers(0, 256, (1, 2 * IMG, 2 * IMG, 3), dtype=np.uint8)
    obs = be.lerobot_observation(ObservationBatch(np.zeros((1, SD), np.float32), [TASK],
                                                  {"front": big}), 0)
    assert tuple(obs[CAMERA].shape) == (3, IMG, IMG) and obs[CAMERA].dtype == torch.float32
    assert float(obs[CAMERA].max()) <= 1.0


# ---- admission --------------------------------------------------------------------------------
def test_admission_stores_each_skills_processors(family):
    snap = StateStore(family["state"]).open(verify=True)
    for skill, d in family["experts"].items():
        arts = snap.skill_artifacts(skill)
        names = {k.split("::", 1)[1] for k in arts if k.startswith("lerobot_processor::")}
        assert names == {p.name for p in d.glob("policy_*processor*")}
        js = bytes(arts["lerobot_processor::policy_postprocessor.json"].numpy())
        assert js == (d / "policy_postprocessor.json").read_bytes()


def test_admission_refuses_bad_experts_and_leaves_state_untouched(family, tmp_path):
    state = family["state"]
    before = (state / "CURRENT").read_text()
    other = tmp_path / "other-arch"
    shutil.copytree(family["experts"]["skill1"], other)
    cfg = json.loads((other / "config.json").read_text())
    field = {"smolvla": "num_steps", "act": "dim_model", "diffusion": "down_dims"}[family["kind"]]
    cfg[field] = [8, 16] if field == "down_dims" else 7
    (other / "config.json").write_text(json.dumps(cfg))
    assert _admit(state, family["base"], other, "bad") == 2
    noproc = tmp_path / "noproc"
    shutil.copytree(family["experts"]["skill1"], noproc)
    (noproc / "policy_preprocessor.json").unlink()
    assert _admit(state, family["base"], noproc, "bad") == 2
    assert (state / "CURRENT").read_text() == before


# ---- served == LeRobot -------------------------------------------------------------------------
def test_served_actions_equal_lerobot_pipeline_per_skill(family):
    """Bank merge = lossless: each skill's served chunks equal LeRobot's own pipeline on that
    expert (its weights AND its processors); the base's processors would give other units."""
    steps = 5 if family["kind"] == "diffusion" else 2
    obs = _observations(3, steps)
    with family["client"].episode(TASK, skill="skill1") as ep:
        spec = ep.spec  # the served bounds (union of the skills' action min/max)
    for skill, d in family["experts"].items():
        got = _serve_episode(family["client"], skill, obs)
        want = lerobot_reference(d, obs)
        checked = 0
        for g, w in zip(got, want):
            if w is None:
                continue
            np.testing.assert_allclose(g, _clip(w, spec), **TOL)
            checked += 1
        assert checked >= 1
        base_units = lerobot_reference(family["base"], obs)
        first = next(i for i, w in enumerate(want) if w is not None)
        assert np.abs(got[first] - base_units[first]).max() > 1e-2


def test_core_only_rows_use_the_base_processors(family):
    """Bank: core = 0, so a core-only row is the base policy with the base's processors."""
    engine = build_engine(EngineConfig(base_dir=str(family["base"]),
                                       state_dir=str(family["state"]), router="exact"))
    try:
        obs = _observations(4, 4)  # diffusion's reference needs n_action_steps observations
        (state, imgs) = obs[0]
        batch = ObservationBatch(state[None], [TASK], {"front": imgs["front"][None]},
                                 episode_ids=["core-ep"])
        got = engine.infer(batch, None)
        want = lerobot_reference(family["base"], obs)[0]
        np.testing.assert_allclose(got, _clip(want, engine.spec), **TOL)
    finally:
        engine.close()


def test_mixed_skill_concurrent_episodes_equal_sequential(family):
    client = family["client"]
    skills = ["skill1", "skill2", "skill1", "skill2"]
    inputs = [_observations(10 + i, 3) for i in range(len(skills))]
    seq = [_serve_episode(client, s, inputs[i]) for i, s in enumerate(skills)]
    conc: list = [None] * len(skills)
    barrier = threading.Barrier(len(skills))

    def run(i):
        barrier.wait()
        conc[i] = _serve_episode(client, skills[i], inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(skills))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for a, b in zip(seq, conc):
        np.testing.assert_allclose(np.stack(a), np.stack(b), **TOL)


def test_per_episode_state_is_isolated(family):
    """Interleaved episodes (diffusion: separate observation queues; all: separate RNG) give
    what each gives alone; a new episode starts fresh."""
    client = family["client"]
    a_obs, b_obs = _observations(20, 3), _observations(21, 3)
    alone_a = _serve_episode(client, "skill1", a_obs)
    alone_b = _serve_episode(client, "skill2", b_obs)
    with client.episode(TASK, skill="skill1") as ea, client.episode(TASK, skill="skill2") as eb:
        inter_a, inter_b = [], []
        for (sa, ia), (sb, ib) in zip(a_obs, b_obs):
            inter_a.append(ea.infer(sa, ia))
            inter_b.append(eb.infer(sb, ib))
    np.testing.assert_allclose(np.stack(inter_a), np.stack(alone_a), **TOL)
    np.testing.assert_allclose(np.stack(inter_b), np.stack(alone_b), **TOL)
    if family["kind"] == "diffusion":  # history matters: step 1 differs from a fresh episode
        fresh = _serve_episode(client, "skill1", a_obs[1:2])[0]
        assert np.abs(fresh - alone_a[1]).max() > 1e-4
    # the server tells the backend when each episode ended: no episode state outlives it
    states = family["server"].holder.engine.runtime.backend.episodes
    deadline = time.monotonic() + 5
    while len(states) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(states) == 0


# ---- offline VLM resolution (SmolVLA) ------------------------------------------------------------
@pytest.fixture(scope="module")
def smolvla(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("smolvla-offline"), "smolvla", n_experts=1)


def test_hub_id_vlm_model_name_is_refused_with_the_fix(smolvla, tmp_path, monkeypatch):
    from policy_server.models.lerobot.config import VLM_DIR_ENV

    moved = tmp_path / "moved"
    shutil.copytree(smolvla["base"], moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["vlm_model_name"] = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    (moved / "config.json").write_text(json.dumps(cfg))
    monkeypatch.delenv(VLM_DIR_ENV, raising=False)
    with pytest.raises(InputError, match=r"'vlm_model_name'.*hub id.*--vlm-dir"):
        load_backend(moved)
    ref = load_backend(smolvla["base"])
    obs = ObservationBatch(np.zeros((1, SD), np.float32), [TASK],
                           {"front": np.full((1, IMG, IMG, 3), 7, np.uint8)})
    want = ref.predict(obs)
    # the three ways to point it at a local VLM dir, all offline
    np.testing.assert_allclose(load_backend(moved, vlm_dir=str(smolvla["vlm"])).predict(obs),
                               want, **TOL)
    monkeypatch.setenv(VLM_DIR_ENV, str(smolvla["vlm"]))
    np.testing.assert_allclose(load_backend(moved).predict(obs), want, **TOL)
    monkeypatch.delenv(VLM_DIR_ENV)
    shutil.copytree(smolvla["vlm"], moved / "vlm")
    np.testing.assert_allclose(load_backend(moved).predict(obs), want, **TOL)


# ---- ACT temporal ensembling: per-episode ensemblers ------------------------------------------
def test_act_temporal_ensembling_is_per_episode(tmp_path):
    fam = build_family(tmp_path, "act", n_experts=0, temporal_ensemble_coeff=0.01,
                       n_action_steps=1)
    be = load_backend(fam["base"])
    assert be.spec.chunk_length == 1
    a_obs, b_obs = _observations(30, 4), _observations(31, 4)

    def step(ep, o):
        st, im = o
        return be.predict(ObservationBatch(st[None], [TASK], {"front": im["front"][None]},
                                           episode_ids=[ep])).numpy()[0]

    alone = [step("a0", o) for o in a_obs]
    inter = []
    for oa, ob in zip(a_obs, b_obs):
        inter.append(step("a1", oa))
        step("b1", ob)
    np.testing.assert_allclose(np.stack(inter), np.stack(alone), **TOL)
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    pol = get_policy_class("act").from_pretrained(str(fam["base"]), strict=True)
    pol.eval()
    pre, post = make_pre_post_processors(pol.config, pretrained_path=str(fam["base"]))
    pol.reset()
    with torch.no_grad():
        want = [post(pol.select_action(pre({
            CAMERA: torch.from_numpy(im["front"]).permute(2, 0, 1).float() / 255,
            "observation.state": torch.from_numpy(st), "task": TASK}))).numpy()
            for st, im in a_obs]
    np.testing.assert_allclose(np.concatenate(want), np.concatenate(alone), **TOL)


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_one_mixed_batch_equals_rows_alone(family, mode, caplog):
    """A batch mixing skills and core-only rows (side path in auto mode, fused groups in fused
    mode) equals each row run alone: per-row processors and per-row state follow the rows."""
    engine = build_engine(EngineConfig(base_dir=str(family["base"]),
                                       state_dir=str(family["state"]), router="exact", mode=mode))
    try:
        skills = ["skill1", "skill2", None, "skill2"]
        obs = _observations(40, len(skills))
        batch = ObservationBatch(np.stack([s for s, _ in obs]), [TASK] * len(skills),
                                 {"front": np.stack([i["front"] for _, i in obs])},
                                 episode_ids=[f"m{i}" for i in range(len(skills))])
        mixed = engine.runtime.infer(batch, skills)
        for i, s in enumerate(skills):
            row = ObservationBatch(batch.state[[i]], [TASK], {"front": batch.images["front"][[i]]},
                                   episode_ids=[f"alone{i}"])
            alone = engine.runtime.infer(row, [s])
            np.testing.assert_allclose(mixed[i], alone[0], **TOL)
    finally:
        engine.close()


def test_real_carve_serve_with_vlm_dir_and_threads(smolvla, tmp_path):
    """``carve serve`` as users run it, on a checkpoint whose vlm_model_name is a hub id: exit 2
    naming the field without ``--vlm-dir``; with it (and ``--threads 1``) the served actions
    equal LeRobot's pipeline on the expert."""
    import subprocess
    import sys

    from serving_utils import ServeProcess

    moved = tmp_path / "moved"
    shutil.copytree(smolvla["base"], moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["vlm_model_name"] = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    (moved / "config.json").write_text(json.dumps(cfg))
    state = tmp_path / "state"
    assert _admit(state, moved, smolvla["experts"]["skill1"], "skill1") == 0
    env = {k: v for k, v in __import__("os").environ.items() if k != "CARVE_LEROBOT_VLM_DIR"}
    bad = subprocess.run([sys.executable, "-m", "policy_server.cli", "serve", "--base", str(moved),
                          "--state", str(state), "--port", "0", "--router", "exact"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "vlm_model_name" in bad.stderr and "--vlm-dir" in bad.stderr
    srv = ServeProcess({"base": moved, "state": state}, "--threads", "1", "--vlm-dir",
                       str(smolvla["vlm"]), ready_timeout=300)
    try:
        client = PolicyClient(f"127.0.0.1:{srv.port}", retries=0, timeout=60)
        obs = _observations(50, 2)
        with client.episode(TASK, skill="skill1") as ep:
            got = [ep.infer(st, im) for st, im in obs]
            spec = ep.spec
        client.close()
    finally:
        srv.terminate()
    for g, w in zip(got, lerobot_reference(smolvla["experts"]["skill1"], obs)):
        np.testing.assert_allclose(g, _clip(w, spec), **TOL)


def test_missing_extra_package_is_a_cli_error(smolvla):
    """A policy type whose extra is not installed (SmolVLA's processor needs num2words): the
    server refuses to start with exit 2 naming the package (simulated by blocking the import)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['num2words'] = None; from policy_server.cli import main; "
            f"sys.exit(main(['serve', '--base', {str(smolvla['base'])!r}, '--port', '0']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "num2words" in out.stderr, out.stderr[-2000:]


def test_carve_at_full_rank_serves_the_expert(smolvla, tmp_path):
    """CARVE with a rank above every tensor's is lossless up to SVD rounding: the served skill
    equals LeRobot's pipeline on the expert checkpoint."""
    state = tmp_path / "carve-state"
    assert carve(["admit", str(state), "--base", str(smolvla["base"]), "--expert",
                  str(smolvla["experts"]["skill1"]), "--skill", "skill1", "--method", "carve",
                  "--rank", "4096", "--no-progress"]) == 0
    engine = build_engine(EngineConfig(base_dir=str(smolvla["base"]), state_dir=str(state),
                                       router="exact"))
    try:
        obs = _observations(60, 2)
        got = [engine.infer(ObservationBatch(s[None], [TASK], {"front": i["front"][None]},
                                             episode_ids=["full-rank"]), "skill1")
               for s, i in obs]
        for g, w in zip(got, lerobot_reference(smolvla["experts"]["skill1"], obs)):
            np.testing.assert_allclose(g, _clip(w, engine.spec), rtol=1e-4, atol=1e-4)
    finally:
        engine.close()
