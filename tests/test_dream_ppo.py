"""Tests of dream_ppo.py: the PPO math against naive loops / hand computation, the Dream Diffusion MDP
rollout with small stand-ins (toy world model, toy reward) and with the real modules' test presets."""
import math
import subprocess
import sys
from dataclasses import replace
from conftest import ROOT

import numpy as np
import pytest
import torch
import torch.nn as nn


import dream_ppo as dp  # noqa: E402
from diffusion_policy import PRESETS as BC_PRESETS, BCConfig, DiffusionPolicy, GaussianPolicy  # noqa: E402

torch.set_num_threads(1)
TEST = dp.FinetuneConfig(**dp.PRESETS['test'])


# ----------------------------------------------------------------------------- stand-ins
class ToyWM(nn.Module):
    """Stand-in world model with the contract's imagination interface (initial / img_step / feature)."""

    def __init__(self, deter=6, stoch=2, classes=3):
        super().__init__()
        self.deter, self.Z, self.S, self.C = deter, stoch * classes, stoch, classes
        self.gru = nn.GRUCell(self.Z + 7, deter)
        self.prior = nn.Linear(deter, self.Z)
        self.feat_dim = deter + self.Z

    def initial(self, B):
        return {'h': torch.zeros(B, self.deter), 'z': torch.zeros(B, self.Z)}

    def img_step(self, state, action, sample=True):
        h = self.gru(torch.cat([state['z'], action], -1), state['h'])
        logits = self.prior(h).view(-1, self.S, self.C)
        idx = torch.distributions.Categorical(logits=logits).sample() if sample else logits.argmax(-1)
        return {'h': h, 'z': nn.functional.one_hot(idx, self.C).float().flatten(1), 'logits': logits}

    def feature(self, state):
        return torch.cat([state['h'], state['z']], -1)


class ToyReward(nn.Module):
    """Stand-in success classifier: p = sigmoid(w . feat + b); `const` fixes the probability."""

    def __init__(self, feat_dim, const=None):
        super().__init__()
        self.lin, self.const = nn.Linear(feat_dim, 1), const

    def success_prob(self, feat):
        if self.const is not None:
            return torch.full(feat.shape[:1], self.const)
        return torch.sigmoid(self.lin(feat).squeeze(-1))


def toy_pool(wm, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = nn.functional.one_hot(torch.randint(wm.C, (P, wm.S), generator=g), wm.C).float().flatten(1)
    return {'h': torch.randn(P, wm.deter, generator=g), 'z': z}


def make_setup(policy_kind='diffusion', const=None, seed=0):
    torch.manual_seed(seed)
    wm = ToyWM()
    bc_cfg = BCConfig(**{**BC_PRESETS['test'], 'policy': policy_kind})
    pre = (DiffusionPolicy if policy_kind == 'diffusion' else GaussianPolicy)(wm.feat_dim, bc_cfg)
    actor = dp.make_actor(pre)
    critic = dp.make_critic(wm.feat_dim, TEST)
    clf = ToyReward(wm.feat_dim, const)
    wm.requires_grad_(False), clf.requires_grad_(False)
    return wm, pre, actor, critic, clf


# ----------------------------------------------------------------------------- pure math
def naive_gae(r, v, d, gamma, lam):
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):  # direct sum over l of (gamma lam)^l delta_{t+l}, stopping at the episode end
            acc, w = 0.0, 1.0
            for s in range(t, T):
                nd = 0.0 if d[s, n] else 1.0
                acc += w * (r[s, n] + gamma * v[s + 1, n] * nd - v[s, n])
                if d[s, n]:
                    break
                w *= gamma * lam
            adv[t, n] = acc
    return adv


def test_gae_matches_naive_loop_with_dones():
    g = torch.Generator().manual_seed(0)
    T, N = 9, 4
    r, v = torch.rand(T, N, generator=g), torch.randn(T + 1, N, generator=g)
    d = torch.rand(T, N, generator=g) < 0.3
    adv, ret = dp.gae(r, v, d, 0.9, 0.8)
    ref = naive_gae(r.numpy(), v.numpy(), d.numpy(), 0.9, 0.8)
    assert d.any() and not d.all()
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret.numpy(), ref + v[:-1].numpy(), rtol=1e-5, atol=1e-6)
    adv2, _ = dp.gae(r, v[:-1], d, 0.9, 0.8, last_value=v[-1])  # (T,N) + last form
    torch.testing.assert_close(adv2, adv)
    with pytest.raises(AssertionError, match='values must be'):
        dp.gae(r, v[:-1], d, 0.9, 0.8)


def test_gae_lambda_one_is_discounted_return_minus_value():
    r = torch.tensor([[0.0], [0.0], [1.0]])
    v = torch.tensor([[0.5], [0.2], [0.1], [9.0]])
    adv, ret = dp.gae(r, v, torch.tensor([[False], [False], [True]]), 0.9, 1.0)
    torch.testing.assert_close(ret.flatten(), torch.tensor([0.81, 0.9, 1.0]))  # Eq. 17 targets, V(s_T) unused


def test_denoise_index_and_rewards_only_at_k1():
    T, K = 3, 4
    order = [dp.denoise_index(t, k, K) for t in range(T) for k in range(K, 0, -1)]  # k decreasing inside t
    assert order == list(range(T * K))
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    rd = dp.denoising_rewards(r, K)
    assert rd.shape == (T * K, 2)
    nz = rd.abs().sum(1).nonzero().flatten().tolist()
    assert nz == [dp.denoise_index(t, 1, K) for t in range(T)] == [3, 7, 11]
    torch.testing.assert_close(rd[nz], r)
    torch.testing.assert_close(dp.denoising_discount(torch.tensor([1, 2, 10]), 0.99),
                               torch.tensor([0.99, 0.99 ** 2, 0.99 ** 10]))


def test_ppo_loss_hand_computed():
    new, old = torch.tensor([0.1, -0.2, 0.0]), torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, info = dp.ppo_loss(new, old, adv, 0.05)
    # ratio e^0.1 = 1.105 clipped to 1.05 (A>0); e^-0.2 = 0.819 clipped to 0.95 (A<0, pessimistic); ratio 1
    assert loss.item() == pytest.approx(-(1.05 - 0.95 + 2.0) / 3, abs=1e-6)
    assert info['clipfrac'] == pytest.approx(2 / 3)
    kl = ((math.exp(0.1) - 1 - 0.1) + (math.exp(-0.2) - 1 + 0.2)) / 3
    assert info['approx_kl'] == pytest.approx(kl, rel=1e-5)
    # per-sample clip: a wide clip on the first sample keeps its unclipped ratio
    loss2, _ = dp.ppo_loss(new, old, adv, torch.tensor([0.5, 0.05, 0.05]))
    assert loss2.item() == pytest.approx(-(math.exp(0.1) - 0.95 + 2.0) / 3, abs=1e-6)


def test_clip_schedule_endpoints():
    c = dp.clip_schedule(10, 0.001, 0.01)
    assert c.shape == (10,)
    assert c[0].item() == pytest.approx(0.001) and c[-1].item() == pytest.approx(0.01)
    assert bool((c[1:] > c[:-1]).all())
    assert c[5].item() < 0.001 + 0.009 * 5 / 9  # exponential: below the linear interpolation
    assert dp.clip_schedule(1, 0.001, 0.01).tolist() == [pytest.approx(0.01)]


def test_running_reward_scaler_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    gamma = 0.9
    scaler, rets = dp.RunningRewardScaler(gamma), []
    for _ in range(3):
        r, d = torch.rand(6, 4, generator=g), torch.rand(6, 4, generator=g) < 0.3
        out = scaler(r, d)
        for n in range(4):  # naive discounted returns, restarting after each done
            acc = 0.0
            for t in range(6):
                acc = acc * gamma + r[t, n].item()
                rets.append(acc)
                acc = 0.0 if d[t, n] else acc
        torch.testing.assert_close(out, r / np.std(rets), rtol=1e-5, atol=1e-7)
    s2 = dp.RunningRewardScaler(gamma)
    s2.load_state_dict(scaler.state_dict())
    assert s2.var == pytest.approx(np.var(rets)) and s2.count == len(rets)


def test_alpha_bc_for():
    assert dp.alpha_bc_for('open_drawer') == 0.10
    assert dp.alpha_bc_for('close_drawer') == dp.alpha_bc_for('turn_on_led') == 0.025
    assert dp.alpha_bc_for('move_slider_left') == 0.05
    assert dp.alpha_bc_for('open_drawer', replace(TEST, alpha_bc=0.3)) == 0.3


def test_presets_are_fields():
    for name, over in dp.PRESETS.items():
        dp.FinetuneConfig(**over)
    p = dp.FinetuneConfig()
    assert (p.n_envs, p.n_steps, p.K_ft, p.batch_size, p.update_epochs) == (50, 36, 10, 7500, 10)


# ----------------------------------------------------------------------------- rollout
def test_first_steps_come_from_frozen_policy():
    wm, pre, actor, critic, clf = make_setup()
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.5 * torch.randn_like(p))
    cfg = replace(TEST, n_steps=1)
    pool = toy_pool(wm)
    K, K_ft = pre.K, cfg.K_ft
    feat = wm.feature(dp._sample_starts(pool, cfg.n_envs, torch.Generator().manual_seed(3)))
    b = dp.imagine_rollout(wm, pre, actor, critic, clf, pool, cfg, torch.Generator().manual_seed(3))
    # imagine_rollout draws the starts, then the chain with the same generator stream
    g = torch.Generator().manual_seed(3)
    dp._sample_starts(pool, cfg.n_envs, g)
    ft = pre.sample(feat, ft_policy=actor, K_ft=K_ft, generator=g)
    torch.testing.assert_close(b['chain'][0], ft[:, K - K_ft:])
    assert b['chain'].shape == (1, cfg.n_envs, K_ft + 1, 4, 7)
    g2 = torch.Generator().manual_seed(3)
    dp._sample_starts(pool, cfg.n_envs, g2)
    frozen = pre.sample(feat, generator=g2)
    torch.testing.assert_close(ft[:, :K - K_ft + 1], frozen[:, :K - K_ft + 1])  # x^K..x^{K'} from pi_pre
    assert not torch.allclose(ft[:, -1], frozen[:, -1])  # the fine-tuned steps moved the chunk


def test_rollout_episode_ends_and_restarts():
    wm, pre, actor, critic, _ = make_setup()
    pool = {k: v[:1] for k, v in toy_pool(wm).items()}  # a single start state
    cfg = replace(TEST, n_steps=7, max_episode_steps=3)
    b = dp.imagine_rollout(wm, pre, actor, critic, ToyReward(wm.feat_dim, 0.2), pool, cfg)
    expect = torch.tensor([False, False, True] * 2 + [False])[:, None].expand(7, cfg.n_envs)
    assert torch.equal(b['dones'], expect) and not b['successes'].any()  # timeouts only
    torch.testing.assert_close(b['feat'][3], wm.feature(pool).expand(cfg.n_envs, -1))  # restarted from the pool
    assert torch.allclose(b['rewards'], torch.full_like(b['rewards'], 0.2))
    b = dp.imagine_rollout(wm, pre, actor, critic, ToyReward(wm.feat_dim, 0.9), pool, replace(cfg, objective='binary'))
    assert b['dones'].all() and b['successes'].all() and b['sim_steps'] == 0      # a success ends the episode
    assert b['values'].shape == (8, cfg.n_envs) and b['imagined_steps'] == 7 * cfg.n_envs * 4
    b = dp.imagine_rollout(wm, pre, actor, critic, ToyReward(wm.feat_dim, 0.9), pool, cfg)   # 'probability'
    assert torch.equal(b['dones'], expect) and torch.equal(b['successes'], expect)   # no end at a success


def test_rollout_gives_a_relative_reward_its_episode_start():
    """A relative reward (the decoded-state reward, a start-conditioned classifier) is called with the latent its
    episode started from, also after an episode ended and restarted from a fresh draw."""
    wm, pre, actor, critic, _ = make_setup()

    class Relative(ToyReward):
        relative = True

        def success_prob(self, feat, start):
            starts.append(start.clone())
            return (torch.rand(len(feat), generator=g) < 0.1).float()   # episodes end at random decisions
    starts, g = [], torch.Generator().manual_seed(0)
    cfg = replace(TEST, n_steps=12, max_episode_steps=5)
    b = dp.imagine_rollout(wm, pre, actor, critic, Relative(wm.feat_dim), toy_pool(wm), cfg)
    Ta = len(starts) // cfg.n_steps
    first = torch.zeros(cfg.n_envs, dtype=torch.long)                  # the decision each episode started at
    for t in range(cfg.n_steps):
        for n in range(cfg.n_envs):
            for c in range(Ta):
                assert torch.equal(starts[t * Ta + c][n], b['feat'][first[n], n]), (t, n, c)
            if b['dones'][t, n]:
                first[n] = t + 1
    assert b['dones'][:-1].any()                                        # some episodes did restart


@pytest.mark.parametrize('latent_sample', [True, False])
def test_rollout_samples_latents_or_takes_the_prior_mode(latent_sample, monkeypatch):
    """latent_sample=False imagines with the prior's mode: every world-model step is called with sample=False."""
    wm, pre, actor, critic, _ = make_setup()
    seen, img_step = [], wm.img_step
    monkeypatch.setattr(wm, 'img_step', lambda s, a, sample=True: seen.append(sample) or img_step(s, a, sample))
    dp.imagine_rollout(wm, pre, actor, critic, ToyReward(wm.feat_dim, 0.2), toy_pool(wm),
                       replace(TEST, n_steps=2, latent_sample=latent_sample))
    assert len(seen) == 2 * 4 and set(seen) == {latent_sample}


def test_execute_chunk_thresholds_gripper():
    a = dp.execute_chunk(torch.tensor([[[0.3, 0, 0, 0, 0, 0, -0.01], [0, 0, 0, 0, 0, 0.2, 0.0]]]))
    assert a[0, :, -1].tolist() == [-1.0, 1.0] and a[0, 0, 0].item() == pytest.approx(0.3)


# ----------------------------------------------------------------------------- update
@pytest.mark.parametrize('kind', ['diffusion', 'gaussian'])
def test_gradients_reach_only_the_finetuned_copy(kind):
    wm, pre, actor, critic, clf = make_setup(kind)
    pre_sd = {k: v.clone() for k, v in pre.state_dict().items()}
    wm_sd = {k: v.clone() for k, v in wm.state_dict().items()}
    act_sd = {k: v.clone() for k, v in actor.state_dict().items()}
    opts = dp.make_optimizers(actor, critic, TEST)
    b = dp.imagine_rollout(wm, pre, actor, critic, clf, toy_pool(wm), TEST)
    m = dp.update(actor, critic, pre, b, opts, TEST, alpha_bc=0.05)
    assert all(p.grad is None for p in list(pre.parameters()) + list(wm.parameters()) + list(clf.parameters()))
    assert all(torch.equal(v, pre.state_dict()[k]) for k, v in pre_sd.items())
    assert all(torch.equal(v, wm.state_dict()[k]) for k, v in wm_sd.items())
    assert any(not torch.equal(v, actor.state_dict()[k]) for k, v in act_sd.items())
    assert all(p.grad is not None for p in actor.parameters() if p.requires_grad)
    assert all(math.isfinite(v) for v in m.values())
    assert m['charts/samples'] == TEST.update_epochs * TEST.n_steps * TEST.n_envs * (TEST.K_ft if kind == 'diffusion' else 1)


def test_bc_term_pulls_actor_to_pretrained_policy():
    """With alpha_bc large and zero advantages, the update is pure BC towards pi_pre: the KL-ish
    gap (mean log-prob of pi_pre's samples under the actor) must shrink."""
    wm, pre, actor, critic, clf = make_setup('gaussian')
    with torch.no_grad():
        actor.log_std.fill_(-1.5)
        for p in actor.mean_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    cfg = replace(TEST, update_epochs=20, actor_lr=3e-3, norm_adv=False, reward_scaling=False)
    b = dp.imagine_rollout(wm, pre, actor, critic, clf, toy_pool(wm), cfg)
    b['rewards'] = torch.zeros_like(b['rewards'])
    b['values'] = torch.zeros_like(b['values'])
    feat = b['feat'].flatten(0, 1)
    x = pre.sample(feat, generator=torch.Generator().manual_seed(0))
    lp0 = actor.chain_logprob(feat, x, torch.ones(len(feat), dtype=torch.long)).mean()
    dp.update(actor, critic, pre, b, dp.make_optimizers(actor, critic, cfg), cfg, alpha_bc=1.0)
    lp1 = actor.chain_logprob(feat, x, torch.ones(len(feat), dtype=torch.long)).mean()
    assert lp1 > lp0 + 0.5


def test_update_increases_prob_of_advantaged_actions():
    """PPO direction: a positive advantage on every sample raises the actor's log-prob of the stored chains."""
    wm, pre, actor, critic, clf = make_setup()
    cfg = replace(TEST, norm_adv=False, clip_min=0.2, clip_max=0.2, update_epochs=3, actor_lr=1e-3)
    b = dp.imagine_rollout(wm, pre, actor, critic, clf, toy_pool(wm), cfg)
    b['rewards'], b['values'] = torch.ones_like(b['rewards']), torch.zeros_like(b['values'])
    xk, xp, k, _, row = dp.chain_transitions(b['chain'].flatten(0, 1))
    feat = b['feat'].flatten(0, 1)[row]
    with torch.no_grad():
        lp0 = dp.step_logprob(actor, xk, xp, k, feat, 0.1).mean()
    dp.update(actor, critic, pre, b, dp.make_optimizers(actor, critic, cfg), cfg, alpha_bc=0.0)
    with torch.no_grad():
        lp1 = dp.step_logprob(actor, xk, xp, k, feat, 0.1).mean()
    assert lp1 > lp0


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize('kind', ['diffusion', 'gaussian'])
def test_iterations_end_to_end_with_stand_ins(kind):
    wm, pre, actor, critic, clf = make_setup(kind)
    opts, scaler, counters = dp.make_optimizers(actor, critic, TEST), dp.RunningRewardScaler(TEST.gamma), dp.new_counters()
    pool, g = toy_pool(wm), torch.Generator().manual_seed(0)
    for _ in range(TEST.iterations):
        m = dp.iteration(wm, pre, actor, critic, clf, opts, scaler, pool, 'open_drawer', TEST, counters, g)
        assert all(math.isfinite(v) for v in m.values()), m
    assert counters['sim_steps'] == 0 and m['charts/sim_steps'] == 0
    assert counters['imagined_steps'] == TEST.iterations * TEST.n_envs * TEST.n_steps * 4
    assert m['charts/alpha_bc'] == 0.10


def test_iterations_with_real_modules_test_presets():
    from world_model import PRESETS as WM_PRESETS, WMConfig, WorldModel
    torch.manual_seed(0)
    wm = WorldModel(WMConfig(**WM_PRESETS['test'])).requires_grad_(False)
    S, B, L = wm.cfg.image_size, 3, 4
    batch = {'rgb_static': torch.rand(B, L, 3, S, S) * 2 - 1, 'rgb_gripper': torch.rand(B, L, 3, S, S) * 2 - 1,
             'proprio': torch.randn(B, L, 18), 'scene': torch.randn(B, L, 24), 'actions': torch.rand(B, L, 7) * 2 - 1,
             'is_first': torch.zeros(B, L, dtype=torch.bool)}
    batch['is_first'][:, 0] = True
    pool = dp.encode_start_pool(wm, batch)
    assert pool['h'].shape == (B, wm.cfg.deter) and pool['z'].shape == (B, wm.feat_dim - wm.cfg.deter)
    pre = DiffusionPolicy(wm.feat_dim, BCConfig(**BC_PRESETS['test']))
    actor, critic = dp.make_actor(pre), dp.make_critic(wm.feat_dim, TEST)
    from reward import PRESETS as R_PRESETS, RewardClassifier, RewardConfig
    clf = RewardClassifier(wm.feat_dim, RewardConfig(**R_PRESETS['test'])).requires_grad_(False)
    opts, counters = dp.make_optimizers(actor, critic, TEST), dp.new_counters()
    for _ in range(2):
        m = dp.iteration(wm, pre, actor, critic, clf, opts, dp.RunningRewardScaler(TEST.gamma), pool,
                         'close_drawer', TEST, counters)
    assert counters['sim_steps'] == 0 and counters['imagined_steps'] == 2 * TEST.n_envs * TEST.n_steps * 4
    assert all(math.isfinite(v) for v in m.values())
    assert all(p.grad is None for p in list(wm.parameters()) + list(clf.parameters()))


def test_imagination_path_imports_no_simulator():
    """Fine-tuning in imagination loads no simulator: env's success tests are numpy, pybullet comes with a desk."""
    code = ('import sys, dream_ppo, train; assert "pybullet" not in sys.modules, '
            'sorted(m for m in sys.modules if "bullet" in m)')
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


def test_dppo_baseline_counts_simulator_steps():
    """The same update driven by the built-in desk (2 simulator processes): reward = the simulator's success
    test, episodes restart on success or timeout, a timeout bootstraps with V (a truncation, as DPPO's), every
    control step is counted."""
    from world_model import PRESETS as WM_PRESETS, WMConfig, WorldModel
    torch.manual_seed(0)
    wm = WorldModel(WMConfig(**WM_PRESETS['test'])).requires_grad_(False)
    pre = DiffusionPolicy(wm.feat_dim, BCConfig(**BC_PRESETS['test']))
    actor, critic = dp.make_actor(pre), dp.make_critic(wm.feat_dim, TEST)
    cfg = replace(TEST, n_envs=2, n_steps=3, max_episode_steps=2, sim_workers=2)
    import env
    sims = env.make_vec_env('desk', cfg.n_envs, workers=cfg.sim_workers, seed=0, image_size=wm.cfg.image_size)
    try:
        b = dp.real_rollout(sims, wm, pre, actor, critic, 'open_drawer', cfg, np.random.default_rng(1))
        assert torch.equal(b['end_values'] != 0, b['dones'] & ~b['successes']) and b['dones'][1].all()
        counters = dp.new_counters()
        m = dp.dppo_iteration(sims, wm, pre, actor, critic, dp.make_optimizers(actor, critic, cfg),
                              dp.RunningRewardScaler(cfg.gamma), 'open_drawer', cfg, counters, np.random.default_rng(0))
    finally:
        sims.close()
    assert counters['sim_steps'] == cfg.n_steps * cfg.n_envs * 4 and counters['imagined_steps'] == 0
    assert m['charts/episodes'] >= cfg.n_envs  # every episode ends by decision max_episode_steps
    assert all(math.isfinite(v) for v in m.values())


def test_bf16_update_logprobs_agree_with_fp32_and_do_not_depend_on_the_batch():
    """--ft.bf16: the actor runs under a bfloat16 autocast in the PPO update, old and new log-probs alike. A sample's
    log-prob must not depend on which other samples share its batch (else ratios would not start at 1), and it stays
    within 0.01 of fp32's (mean 0.001): the clip range (0.001-0.01) bounds the ratio, not these log-probs' error."""
    torch.manual_seed(0)
    pol = DiffusionPolicy(64, BCConfig(**{**BC_PRESETS['cpu'], 'mlp_dim': 256}))
    feat, n = torch.randn(50, 64), 400
    x_k = torch.randn(n, 4, 7)
    x_prev, k, rows = 0.9 * x_k + 0.1 * torch.randn(n, 4, 7), torch.randint(1, 11, (n,)), torch.randint(0, 50, (n,))
    bf16, fp32 = replace(TEST, bf16=True), replace(TEST, bf16=False)
    with torch.no_grad():
        whole = dp._actor_logprob(pol, bf16, x_k, x_prev, k, feat, rows)
        part = dp._actor_logprob(pol, bf16, x_k[::3], x_prev[::3], k[::3], feat, rows[::3])
        ref = dp._actor_logprob(pol, fp32, x_k, x_prev, k, feat, rows)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(part, whole[::3], rtol=0, atol=1e-6)
    assert (whole - ref).abs().max() < 0.01 and (whole - ref).abs().mean() < 0.001
