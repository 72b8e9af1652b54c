"""Method tests of the Dream MDP's termination and reward (dream_ppo.imagine_chunk / imagine_rollout).

A scripted world model counts the imagination steps since its episode started (h = that count), and a scripted
classifier returns, for env slot n, a hand-written probability table[n][h] of the latent *after* each step. So
the expected dones / successes / rewards / restarts of every decision can be written down by hand:

    Ta = 4 world-model steps per decision: decision j of an episode scores the latents of steps 4j+1 .. 4j+4.
    success   = p > cfg.success_threshold   (strict; the threshold comes from the config: 0.37 here, so a
                                             hard-coded 0.5 or 0.8 fails)
    p         = max over the chunk's 4 latents ('max') or the 4th one ('last')
    reward    = p (paper, 'mixed') or 1[p > threshold] ('binary')
    done      = success or max_episode_steps decisions ('mixed', 'binary'); a done episode, and only it, restarts
                from the pool (h = 0). 'probability' (the paper's objective) ends at max_episode_steps only.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import dream_ppo as dp
from diffusion_policy import PRESETS as BC_PRESETS, BCConfig, DiffusionPolicy

THR = 0.37
CFG = replace(dp.FinetuneConfig(**dp.PRESETS['test']), n_envs=5, n_steps=4, max_episode_steps=3, K_ft=2,
              success_threshold=THR, objective='mixed', reward_over_chunk='max')


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
    b, _ = run(replace(CFG, objective='binary'))
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


# ----------------------------------------------------------------------------- the objective (FINDINGS.md)
def episode_return(cfg, probs):
    """Discounted return from the start of one episode whose decisions score `probs` in turn (V = 0, lambda = 1)."""
    rewards, dones, ends = [], [], []
    for t, p in enumerate(probs):
        reward, _, done, terminal = dp.episode_end(torch.tensor([p]), torch.tensor([t + 1]), cfg)
        rewards.append(reward), dones.append(done), ends.append(torch.zeros(1))
        if done.item():
            break
    T = len(rewards)
    adv, _ = dp.gae(torch.stack(rewards), torch.zeros(T + 1, 1), torch.stack(dones), cfg.gamma, 1.0,
                    end_values=torch.stack(ends))
    return adv[0, 0].item()


@pytest.mark.parametrize('objective, finishing_wins', [('probability', True), ('binary', True), ('mixed', False)])
def test_the_objectives_rank_finishing_above_hovering(objective, finishing_wins):
    """A policy that hovers just below the threshold (p = 0.79 for all 18 decisions) against one that finishes at
    decision 5 (p = 0.3, then 0.95 and the task stays done): the paper's probability objective and the reference
    code's binary one pay more for finishing; the mixed one (probability reward, end at success) pays for hovering."""
    cfg = replace(dp.FinetuneConfig(**dp.PRESETS['cpu']), objective=objective, max_episode_steps=18, gamma=0.999)
    assert cfg.success_threshold == 0.8
    hover = episode_return(cfg, [0.79] * 18)
    finish = episode_return(cfg, [0.3] * 4 + [0.95] * 14)
    assert (finish > hover) == finishing_wins, (objective, hover, finish)


def test_gae_bootstraps_a_truncated_episode_with_its_end_value():
    """One decision that ends its episode: terminal -> A = r - V(s); truncated with end value v -> A = r + g v - V(s)."""
    r, v, d = torch.tensor([[1.0]]), torch.tensor([[0.5], [7.0]]), torch.tensor([[True]])
    adv, _ = dp.gae(r, v, d, 0.9, 0.95)
    assert adv.item() == pytest.approx(1.0 - 0.5)                               # the next row's 7.0 is never used
    adv, _ = dp.gae(r, v, d, 0.9, 0.95, end_values=torch.tensor([[2.0]]))
    assert adv.item() == pytest.approx(1.0 + 0.9 * 2.0 - 0.5)


class StepCritic(nn.Module):
    def forward(self, feat):                    # V = 10 x the steps since the episode started
        return 10 * feat[:, 0]


@pytest.mark.parametrize('objective', ['probability', 'binary', 'mixed'])
def test_rollout_bootstraps_timeouts_except_in_the_mixed_objective(objective):
    """An episode cut at max_episode_steps keeps its future: end_values = V of the state it stopped in (h = 4 x 3 = 12
    steps here), for the probability and binary objectives; a success ('binary', 'mixed') and every end of 'mixed'
    are terminal (0). 'probability' never ends at a success."""
    cfg = replace(CFG, objective=objective)
    pre = DiffusionPolicy(2, BCConfig(**BC_PRESETS['test']))
    b = dp.imagine_rollout(StepCountWM(), pre, dp.make_actor(pre), StepCritic(), ScriptedClassifier(script()),
                           {'h': torch.zeros(1, 1), 'z': torch.zeros(1, 1)}, cfg, torch.Generator().manual_seed(0))
    timeout = b['dones'] & ~(b['successes'] & (objective != 'probability'))
    expect = torch.where(timeout, 120.0, 0.0) if objective != 'mixed' else torch.zeros_like(b['end_values'])
    torch.testing.assert_close(b['end_values'], expect)
    if objective == 'probability':
        assert b['dones'].sum() == b['dones'].shape[1] and b['dones'][2].all()      # all end at decision 3 only
