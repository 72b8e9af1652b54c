"""Method tests of the Dream MDP's termination and reward (dream_ppo.imagine_chunk / imagine_rollout).

A scripted world model counts the imagination steps since its episode started (h = that count), and a scripted
classifier returns, for env slot n, a hand-written probability table[n][h] of the latent *after* each step. So
the expected dones / successes / rewards / restarts of every decision can be written down by hand:

    Ta = 4 world-model steps per decision: decision j of an episode scores the latents of steps 4j+1 .. 4j+4.
    success   = p > cfg.success_threshold   (strict; the threshold comes from the config: 0.37 here, so a
                                             hard-coded 0.5 or 0.8 fails)
    p         = max over the chunk's 4 latents ('max') or the 4th one ('last')
    reward    = p (paper) or 1[p > threshold] (reward_binary)
    done      = success or max_episode_steps decisions; a done episode, and only it, restarts from the pool (h = 0).
"""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import dream_ppo as dp
from diffusion_policy import PRESETS as BC_PRESETS, BCConfig, DiffusionPolicy

THR = 0.37
CFG = replace(dp.FinetuneConfig(**dp.PRESETS['test']), n_envs=5, n_steps=4, max_episode_steps=3, K_ft=2,
              success_threshold=THR, reward_binary=False, reward_over_chunk='max')


pytestmark = pytest.mark.usefixtures('one_thread')


class StepCountWM(nn.Module):
    """h = steps since the episode started (actions ignored), z = 0: feature (N, 2)."""

    def img_step(self, state, action, sample=True):
        return {'h': state['h'] + 1, 'z': state['z'], 'logits': torch.zeros(len(action), 1, 1)}

    def feature(self, state):
        return torch.cat([state['h'], state['z']], -1)


class ScriptedClassifier(nn.Module):
    """p of env slot n at a latent with step count h: table[n, h]."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.seen = []

    def success_prob(self, feat):
        h = feat[:, 0].round().long()
        self.seen.append(h.clone())
        return self.table[torch.arange(len(feat)), h]


def script():
    """Per env slot, p at step counts 0..12 (the start latent, h = 0, must never be scored)."""
    t = torch.full((5, 13), 0.2)
    t[0, :] = 0.1
    t[0, 2] = t[0, 6] = t[0, 10] = 0.40       # env 0: 0.40 mid-chunk (> 0.37 < 0.5); chunk ends at 0.1
    t[1, :] = THR                             # env 1: exactly the threshold: never a success (strict >)
    t[2, :] = 0.1
    t[2, 0] = 0.0
    t[2, 4] = 0.6                             # env 2: 0.6 at the chunk's last latent (h = 4) only
    t[3, 5:9] = 0.45                          # env 3: 0.45 during the *second* decision (h = 5..8)
    t[4, 2] = 0.6                             # env 4: 0.6 mid-chunk of the first decision, else 0.2
    return t


def run(cfg=CFG):
    torch.manual_seed(0)
    pre = DiffusionPolicy(2, BCConfig(**BC_PRESETS['test']))
    actor, critic = dp.make_actor(pre), dp.make_critic(2, cfg)
    clf = ScriptedClassifier(script())
    pool = {'h': torch.zeros(1, 1), 'z': torch.zeros(1, 1)}
    b = dp.imagine_rollout(StepCountWM(), pre, actor, critic, clf, pool, cfg, torch.Generator().manual_seed(0))
    return b, clf


F, T_ = False, True


def test_max_over_chunk_strict_threshold_from_config_and_probability_reward():
    b, clf = run()
    # rows: decisions 0..3; columns: env slots 0..4 (hand-derived from script())
    succ = torch.tensor([[T_, F, T_, F, T_],
                         [T_, F, T_, T_, T_],
                         [T_, F, T_, F, T_],
                         [T_, F, T_, T_, T_]])
    done = torch.tensor([[T_, F, T_, F, T_],
                         [T_, F, T_, T_, T_],
                         [T_, T_, T_, F, T_],      # env 1 times out after its 3rd decision
                         [T_, F, T_, T_, T_]])
    reward = torch.tensor([[0.40, THR, 0.6, 0.2, 0.6],
                           [0.40, THR, 0.6, 0.45, 0.6],
                           [0.40, THR, 0.6, 0.2, 0.6],
                           [0.40, THR, 0.6, 0.45, 0.6]])
    assert torch.equal(b['successes'], succ)
    assert torch.equal(b['dones'], done)
    torch.testing.assert_close(b['rewards'], reward)
    # the classifier scored the latents after each of the chunk's steps (h = 1..4 from a start), never h = 0
    assert all(int(h.min()) >= 1 for h in clf.seen) and len(clf.seen) == 4 * 4


def test_only_ended_episodes_restart():
    b, _ = run()
    # h at the start of each decision (the feature the policy saw) = steps since that episode started
    h = b['feat'][..., 0]
    expect = torch.tensor([[0., 0., 0., 0., 0.],
                           [0., 4., 0., 4., 0.],
                           [0., 8., 0., 0., 0.],
                           [0., 0., 0., 4., 0.]])
    torch.testing.assert_close(h, expect)
    assert b['values'].shape == (5, 5)


def test_last_latent_of_the_chunk():
    b, _ = run(replace(CFG, reward_over_chunk='last'))
    succ = torch.tensor([[F, F, T_, F, F],
                         [F, F, T_, T_, F],
                         [F, F, T_, F, F],
                         [F, F, T_, T_, F]])
    done = torch.tensor([[F, F, T_, F, F],
                         [F, F, T_, T_, F],
                         [T_, T_, T_, F, T_],      # envs 0, 1, 4 time out
                         [F, F, T_, T_, F]])
    reward = torch.tensor([[0.1, THR, 0.6, 0.2, 0.2],
                           [0.1, THR, 0.6, 0.45, 0.2],
                           [0.1, THR, 0.6, 0.2, 0.2],
                           [0.1, THR, 0.6, 0.45, 0.2]])
    assert torch.equal(b['successes'], succ) and torch.equal(b['dones'], done)
    torch.testing.assert_close(b['rewards'], reward)


def test_binary_reward_mode():
    b, _ = run(replace(CFG, reward_binary=True))
    torch.testing.assert_close(b['rewards'], b['successes'].float())
    assert b['rewards'][:, 0].tolist() == [1.0] * 4 and b['rewards'][:, 1].tolist() == [0.0] * 4


def test_other_thresholds_move_the_decision():
    """0.45 exactly at env 3's threshold: no longer a success; 0.3: env 1 (0.37) succeeds at once."""
    b, _ = run(replace(CFG, success_threshold=0.45))
    assert not b['successes'][:, 3].any() and b['successes'][:, 4].all() and not b['successes'][:, 0].any()
    b, _ = run(replace(CFG, success_threshold=0.3))
    assert b['successes'][:, 1].all() and b['successes'][:, 0].all()


def test_imagine_chunk_reduction_by_hand():
    """imagine_chunk alone: p per env = max (or last) of the scripted probabilities at h = 1..Ta."""
    table = script()
    clf = ScriptedClassifier(table)
    state = {'h': torch.zeros(5, 1), 'z': torch.zeros(5, 1)}
    acts = torch.zeros(5, 4, 7)
    s, p = dp.imagine_chunk(StepCountWM(), state, acts, clf, CFG)
    torch.testing.assert_close(p, torch.tensor([0.40, THR, 0.6, 0.2, 0.6]))
    assert s['h'].flatten().tolist() == [4.0] * 5
    _, p = dp.imagine_chunk(StepCountWM(), state, acts, clf, replace(CFG, reward_over_chunk='last'))
    torch.testing.assert_close(p, torch.tensor([0.1, THR, 0.6, 0.2, 0.2]))


def test_rollout_metrics_success_rate_among_ended_episodes():
    b, _ = run()
    b['rewards_raw'] = b['rewards']
    m = dp.rollout_metrics(b)
    # ended: 4 + 1 + 4 + 2 + 4 = 15 episodes, of which 14 successes (env 1's timeout is the failure)
    assert m['charts/episodes'] == 15
    assert m['charts/success_rate'] == pytest.approx(14 / 15)


def test_the_executed_chunk_is_x0_of_the_stored_chain():
    """Each decision executes x^0 (the chain's last entry), gripper thresholded at 0, one action per
    world-model step, in order: not x^1, not a reversed chunk."""
    sent = []

    class RecordingWM(StepCountWM):
        def img_step(self, state, action, sample=True):
            sent.append(action.clone())
            return super().img_step(state, action, sample)
    torch.manual_seed(0)
    pre = DiffusionPolicy(2, BCConfig(**BC_PRESETS['test']))
    actor, critic = dp.make_actor(pre), dp.make_critic(2, CFG)
    pool = {'h': torch.zeros(1, 1), 'z': torch.zeros(1, 1)}
    b = dp.imagine_rollout(RecordingWM(), pre, actor, critic, ScriptedClassifier(script()), pool,
                           replace(CFG, n_steps=2), torch.Generator().manual_seed(0))
    assert len(sent) == 2 * 4
    for t in range(2):
        x0 = b['chain'][t][:, -1]                                   # (N, 4, 7) = x^0
        for j in range(4):
            a = sent[4 * t + j]
            torch.testing.assert_close(a[:, :6], x0[:, j, :6])
            assert torch.equal(a[:, 6], torch.where(x0[:, j, 6] >= 0, 1.0, -1.0))
