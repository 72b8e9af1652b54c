"""Method tests of the evaluation (eval.run_episodes, task_starts, wilson_interval, policy_agent_factory).

Negative controls (a zero-action policy scores 0%, also from a start where the part is already where the task
would take it), a positive control (the scripted skills through the same loop), identical start states for
every policy, the first-success stopping rule checked against what the agent saw, the executed actions
(clipped, gripper thresholded at 0), and the Wilson interval against numbers computed by hand.
All on the built-in desk in this process (workers=0), no world model; a few seconds in all.
"""
import math

import numpy as np
import pytest
import torch

import env
import eval as E

CHEAP = E.EvalConfig(episodes=4, envs=4, workers=0)


class Recorder:
    """make_agent: each batch's agent returns policy(t, obs) and records every observation list it is shown."""

    def __init__(self, policy):
        self.policy, self.seen = policy, []

    def __call__(self, B):
        batch = []
        self.seen.append(batch)

        def act(t, obs, feat):
            batch.append([None if o is None else {'robot_obs': o['robot_obs'].copy(), 'scene_obs': o['scene_obs'].copy()}
                          for o in obs])
            return self.policy(t, obs, B)
        return act


def zero_policy(t, obs, B):
    return np.zeros((B, 7))


def test_zero_action_policy_scores_zero_and_every_policy_sees_the_same_starts():
    starts = E.task_starts('open_drawer', 4, seed=0)
    rec0 = Recorder(zero_policy)
    out = E.run_episodes(rec0, 'open_drawer', starts, CHEAP)
    assert not out['success'].any(), 'a policy that does nothing opened the drawer'
    assert out['steps'].tolist() == [72] * 4 and out['sim_steps'] == 4 * 72      # 18 decisions x 4 steps each
    # another policy (pushes towards +z, gripper closed) starts from the very same states
    rec1 = Recorder(lambda t, obs, B: np.tile([0.0, 0.0, 0.5, 0, 0, 0, -1.0], (B, 1)))
    E.run_episodes(rec1, 'open_drawer', starts, E.EvalConfig(episodes=4, envs=4, workers=0, max_decisions=1))
    first0, first1 = rec0.seen[0][0], rec1.seen[0][0]
    for i, (robot, scene) in enumerate(starts):
        for a, b in ((first0[i], first1[i]),):
            np.testing.assert_array_equal(a['scene_obs'], b['scene_obs'])
            np.testing.assert_array_equal(a['robot_obs'], b['robot_obs'])
        np.testing.assert_allclose(first0[i]['scene_obs'][:6], scene[:6], atol=2e-3)   # the task_starts state
        np.testing.assert_allclose(first0[i]['robot_obs'][:3], robot[:3], atol=5e-3)


def test_zero_policy_from_a_drawer_already_open_is_no_success():
    """The success test is relative to the episode's start: a drawer already 0.2 open at the start (beyond the
    0.12 of an absolute reading) is not an opened drawer."""
    robot, scene = E.task_starts('open_drawer', 1, seed=3)[0]
    scene = scene.copy()
    scene[1] = 0.2
    out = E.run_episodes(lambda B: (lambda t, obs, feat: np.zeros((B, 7))), 'open_drawer', [(robot, scene)] * 2,
                         E.EvalConfig(episodes=2, envs=2, workers=0, max_decisions=2))
    assert not out['success'].any()


def scripted_agent(task, seed=0):
    """The scripted skills (env.ScriptedSkill) as an agent: the positive control of the loop."""
    def make(B):
        rng = np.random.default_rng(seed)
        skills = [env.ScriptedSkill(task, rng) for _ in range(B)]
        return lambda t, obs, feat: np.stack([s.act(o) if o is not None else np.zeros(7) for s, o in zip(skills, obs)])
    return make


def test_scripted_skills_succeed_and_episodes_stop_at_the_first_success():
    """Positive control on 4 episodes over 2 desks (2 batches): the scripted skill opens the drawer; an episode's
    'steps' is the number of actions until its first success (the agent saw exactly that many observations, none
    of them a success relative to the start it saw first), and the inactive desks are not stepped."""
    task = 'open_drawer'
    starts = E.task_starts(task, 4, seed=0)
    rec = Recorder(None)
    inner = scripted_agent(task)

    def make(B):
        agent = inner(B)
        rec.policy = lambda t, obs, B_: agent(t, obs, None)
        return rec(B)
    out = E.run_episodes(make, task, starts, E.EvalConfig(episodes=4, envs=2, workers=0))
    assert out['success'].sum() >= 3, out
    assert out['sim_steps'] == int(out['steps'].sum())
    for e in range(4):
        batch, i = rec.seen[e // 2], e % 2
        views = [step[i] for step in batch if step[i] is not None]
        start = views[0]
        np.testing.assert_allclose(start['scene_obs'][:6], starts[e][1][:6], atol=2e-3)
        if out['success'][e]:
            assert len(views) == out['steps'][e] < 72
            assert not any(env.task_success(task, start, v) for v in views[1:]), 'ran past the first success'
        else:
            assert out['steps'][e] == 72


def test_executed_actions_are_clipped_and_the_gripper_thresholded_at_zero(monkeypatch):
    sent = []
    real = env.make_vec_env

    def spy(*a, **k):
        venv = real(*a, **k)
        step = venv.step
        venv.step = lambda actions, active=None: sent.append(np.array(actions)) or step(actions, active)
        return venv
    monkeypatch.setattr(env, 'make_vec_env', spy)
    raw = np.array([[1.5, -2.0, 0.3, 0.0, 0.0, 0.0, 0.0],         # gripper exactly 0 -> open (+1)
                    [0.1, 0.2, -0.3, 0.0, 0.0, 0.0, -1e-3]])     # just below 0 -> close (-1)
    E.run_episodes(lambda B: (lambda t, obs, feat: raw.copy()), 'open_drawer', E.task_starts('open_drawer', 2, 0),
                   E.EvalConfig(episodes=2, envs=2, workers=0, max_decisions=1))
    assert len(sent) == 4
    np.testing.assert_allclose(sent[0], [[1.0, -1.0, 0.3, 0, 0, 0, 1.0], [0.1, 0.2, -0.3, 0, 0, 0, -1.0]])


def test_task_starts_deterministic_possible_and_independent_of_global_rng():
    a = E.task_starts('close_drawer', 5, seed=7)
    np.random.seed(123), torch.manual_seed(123)
    np.random.rand(10)
    b = E.task_starts('close_drawer', 5, seed=7)
    for (r1, s1), (r2, s2) in zip(a, b):
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(s1, s2)
    assert all(env.task_possible('close_drawer', s) for _, s in a)
    c = E.task_starts('close_drawer', 5, seed=8)
    assert not np.allclose(np.stack([s for _, s in a]), np.stack([s for _, s in c]))
    d = E.task_starts('open_drawer', 5, seed=7)            # another task, other states (its own stream)
    assert all(env.task_possible('open_drawer', s) for _, s in d)


def test_wilson_interval_hand_computed():
    """z = 1.96, z^2 = 3.8416, n = 10: denominator 1 + z^2/n = 1.38416, z^2/(2n) = 0.19208, z^2/(4n^2) = 0.009604.
    k=0:  centre = 0.19208/1.38416 = 0.138770, half = 1.96*sqrt(0.009604)/1.38416 = 0.138770 -> (0, 0.277540)
    k=5:  centre = 0.69208/1.38416 = 0.5, half = 1.96*sqrt(0.025 + 0.009604)/1.38416 = 0.263411
          -> (0.236589, 0.763411)
    k=10: mirror of k=0 -> (0.722460, 1)."""
    lo, hi = E.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(0.277540, abs=1e-5)
    lo, hi = E.wilson_interval(5, 10)
    assert lo == pytest.approx(0.236589, abs=1e-5) and hi == pytest.approx(0.763411, abs=1e-5)
    lo, hi = E.wilson_interval(10, 10)
    assert lo == pytest.approx(0.722460, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-9)
    lo, hi = E.wilson_interval(3, 100)      # another n: 100 episodes, 3 successes
    centre = (0.03 + 3.8416 / 200) / 1.038416
    half = 1.96 * math.sqrt(0.03 * 0.97 / 100 + 3.8416 / 40000) / 1.038416
    assert (lo, hi) == (pytest.approx(centre - half, abs=1e-9), pytest.approx(centre + half, abs=1e-9))
    assert lo == pytest.approx(0.010254, abs=1e-5) and hi == pytest.approx(0.084521, abs=1e-5)
    for k, n in [(0, 4), (1, 4), (2, 7), (7, 7), (50, 100)]:
        lo, hi = E.wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1 and hi - lo > 0


def test_policy_agent_factory_deploys_the_pair_deterministically():
    """The evaluated DiWA policy: x^K from the seeded generator, the frozen policy for the first K-K' steps and
    the fine-tuned actor for the last K', deterministic denoising; chunk actions played one per step, a fresh
    decision every Ta = 4 steps."""
    from diffusion_policy import PRESETS as BC_PRESETS, BCConfig, DiffusionPolicy
    torch.manual_seed(0)
    pre = DiffusionPolicy(6, BCConfig(**BC_PRESETS['test'])).eval()
    actor = DiffusionPolicy(6, BCConfig(**BC_PRESETS['test'])).eval()       # other weights: visibly different
    feat = torch.randn(3, 6)
    agent = E.policy_agent_factory(pre, actor, K_ft=2, seed=5)(3)
    got = np.stack([agent(t, [None] * 3, feat) for t in range(8)], 1)    # (3, 8, 7)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        c1 = pre.sample(feat, sampler='mean', ft_policy=actor, K_ft=2, generator=g)[:, -1]
        c2 = pre.sample(feat, sampler='mean', ft_policy=actor, K_ft=2, generator=g)[:, -1]
    np.testing.assert_allclose(got, torch.cat([c1, c2], 1).numpy(), atol=1e-6)
    # the base policy alone (no actor): differs from the pair
    base_agent = E.policy_agent_factory(pre, None, K_ft=2, seed=5)(3)
    base = np.stack([base_agent(t, [None] * 3, feat) for t in range(4)], 1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ref = pre.sample(feat, sampler='mean', generator=g)[:, -1].numpy()
    np.testing.assert_allclose(base, ref, atol=1e-6)
    assert not np.allclose(base, got[:, :4], atol=1e-3)
