"""Meta-World layer on the real simulator: seeded envs, scripted demos, rollouts, suites."""

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="Meta-World is the optional sim extra")

from policy_server.errors import InputError  # noqa: E402
from policy_server.sim.metaworld_env import (Demos, collect_demos, make_env, rollout,  # noqa: E402
                                             scripted_policy_fn)
from policy_server.sim.suites import (BASE_TASKS, EXPERT_SUITES, INSTRUCTIONS, PRESETS,  # noqa: E402
                                      get_preset, instruction_for)


def test_seeded_placements_reproducible_and_varied():
    a, b = make_env("reach-v3", seed=3), make_env("reach-v3", seed=3)
    o0, o0b, o1 = a.reset(0), b.reset(0), a.reset(1)
    assert o0.shape == (39,) and o0.dtype == np.float32
    np.testing.assert_array_equal(o0, o0b)          # same (seed, episode) -> same scene
    assert not np.allclose(o0[36:], o1[36:])        # another episode -> another goal
    o_other = make_env("reach-v3", seed=4).reset(0)
    assert not np.allclose(o0[36:], o_other[36:])   # another seed -> another placement set


def test_collect_demos_push_real_env(tmp_path):
    d = collect_demos("push-v3", n_episodes=2, seed=0, max_steps=150)
    assert d.n_episodes == 2 and d.attempted_success.all()
    assert d.obs.shape[1] == 39 and d.obs.dtype == np.float32
    assert d.actions.shape == (len(d.obs), 4) and np.abs(d.actions).max() <= 1.0
    assert set(np.unique(d.episode)) == {0, 1}
    d.save(tmp_path / "d.npz")
    d2 = Demos.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(d.obs, d2.obs)
    assert d2.task == "push-v3"
    # deterministic: the same call collects the same trajectories
    np.testing.assert_array_equal(collect_demos("push-v3", 2, seed=0).actions, d.actions)


def test_rollout_scripted_succeeds_and_zero_policy_fails():
    res = rollout(scripted_policy_fn("button-press-topdown-v3"), "button-press-topdown-v3",
                  n_episodes=2, seed=7, max_steps=150)
    assert res.success == [True, True] and all(s < 150 for s in res.steps)
    idle = rollout(lambda o, i: np.zeros((4, 4), np.float32), "button-press-topdown-v3",
                   n_episodes=1, seed=7, max_steps=40, replan_every=4)
    assert idle.success == [False] and idle.steps == [40]


def test_rollout_executes_chunks_open_loop():
    calls = []

    def fn(obs, instr):
        calls.append(instr)
        return np.zeros((5, 4), np.float32)

    rollout(fn, "reach-v3", n_episodes=1, seed=0, max_steps=20, replan_every=5)
    assert len(calls) == 4 and calls[0] == INSTRUCTIONS["reach-v3"]


def test_errors():
    with pytest.raises(InputError, match="unknown Meta-World task"):
        make_env("not-a-task-v3")
    with pytest.raises(InputError, match="replan_every"):
        rollout(lambda o, i: np.zeros((1, 4)), "reach-v3", 1, replan_every=0)
    with pytest.raises(InputError, match=r"\(chunk, 4\)"):
        rollout(lambda o, i: np.zeros((1, 3)), "reach-v3", 1)
    with pytest.raises(InputError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(InputError, match="no instruction"):
        instruction_for("soccer-v3")  # a real task no suite uses (unreliable scripted policy)


def test_suites_disjoint_and_documented():
    seen = set(BASE_TASKS)
    assert len(EXPERT_SUITES) >= 4
    for suite, tasks in EXPERT_SUITES.items():
        assert 2 <= len(tasks) <= 3, suite
        assert not seen & set(tasks), suite
        seen |= set(tasks)
    # every instruction belongs to a task some preset trains on (the stream preset adds its own
    # tasks; tests/test_stream_preset.py checks that preset's suites)
    used = seen | {t for p in PRESETS.values() for s in p.suites.values() for t in s}
    assert used == set(INSTRUCTIONS)
    assert len(set(INSTRUCTIONS.values())) == len(INSTRUCTIONS)  # one distinct instruction per task
    assert 2 <= len(PRESETS["demo"].suites) <= 3 and len(PRESETS["bench"].suites) >= 4


def test_metaworld_client_cli_rejects_an_unknown_task(capsys):
    from clients import metaworld_client

    assert metaworld_client.main(["--server", "127.0.0.1:1", "--task", "not-a-task-v3"]) == 2
    assert "no instruction for task 'not-a-task-v3'" in capsys.readouterr().err
