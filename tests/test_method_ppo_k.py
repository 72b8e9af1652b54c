"""Method tests of the PPO update in the Dream Diffusion MDP (dream_ppo.update and its helpers).

These tests fail on plausible *wrong versions* of the method, not only on crashes: the denoising step index k
of every flattened sample (reversed / shifted by one), the pairing of (x^k, x^{k-1}) for PPO and for the BC
targets drawn from the frozen policy, the order of the per-step clip epsilons (DPPO's schedule: 0.001 at
the noisiest fine-tuned step, 0.01 at k=1), the gamma_denoise^k factor (Eq. 8: power k, not k-1), the
clipped surrogate with negative advantages, and the direction of the BC regulariser (Eq. 16) on the diffusion
policy. The expectations are written independently of the code's formulas: chains whose entries *name* their
own k, hand-computed numbers, and negative controls.
"""
import math
from dataclasses import replace

import pytest
import torch

import dream_ppo as dp
from diffusion_policy import PRESETS as BC_PRESETS, BCConfig, DiffusionPolicy

TEST = dp.FinetuneConfig(**dp.PRESETS['test'])
F_DIM = 4          # feature size of the hand-made buffers
K_FT = 3           # fine-tuned steps (the policy's test preset has K = 5)


pytestmark = pytest.mark.usefixtures('one_thread')


def make_policies(seed=0, perturb=0.0):
    torch.manual_seed(seed)
    pre = DiffusionPolicy(F_DIM, BCConfig(**BC_PRESETS['test']))
    actor = dp.make_actor(pre)
    if perturb:
        with torch.no_grad():
            for p in actor.parameters():
                p.add_(perturb * torch.randn_like(p))
    critic = dp.make_critic(F_DIM, TEST)
    return pre, actor, critic


# ----------------------------------------------------------------------------- chains that name their own k
# An entry of a labelled chain carries, in its first action row: [0, 0] = k of that x^k (x^0 -> 0),
# [0, 1] = id of its decision / 100, [0, 2] = source (0 = the rollout's chain, 1 = the frozen policy's BC chain).

def labelled_chain(T, N, K_ft):
    """(T, N, K_ft+1, 4, 7) rollout chain, chain[t, n, i] = x^{K_ft - i} of decision d = t*N + n."""
    g = torch.Generator().manual_seed(1)
    c = 0.1 * torch.randn(T, N, K_ft + 1, 4, 7, generator=g)
    for t in range(T):
        for n in range(N):
            for i in range(K_ft + 1):
                c[t, n, i, 0, 0] = K_ft - i          # written from the definition x^{K_ft}, ..., x^0
                c[t, n, i, 0, 1] = (t * N + n) / 100
                c[t, n, i, 0, 2] = 0.0
    return c


def labelled_feat(T, N):
    f = 0.1 * torch.randn(T, N, F_DIM, generator=torch.Generator().manual_seed(2))
    for t in range(T):
        for n in range(N):
            f[t, n, 0] = (t * N + n) / 100
    return f


class LabelledFrozen(torch.nn.Module):
    """Stand-in for the frozen pi_pre whose sample() returns a full chain (B, K+1, Tp, Da), chain[:, j] = x^{K-j},
    labelled as above (source 1) with the decision id read from the feature."""

    def __init__(self, K):
        super().__init__()
        self.K = K

    def sample(self, cond, **kw):
        B = cond.shape[0]
        c = 0.1 * torch.randn(B, self.K + 1, 4, 7, generator=torch.Generator().manual_seed(3))
        for j in range(self.K + 1):
            c[:, j, 0, 0] = self.K - j
            c[:, j, 0, 1] = cond[:, 0]
            c[:, j, 0, 2] = 1.0
        return c


def label(x):
    """(B, 4, 7) labelled entries -> (k, decision, source) long tensors."""
    return x[:, 0, 0].round().long(), (x[:, 0, 1] * 100).round().long(), x[:, 0, 2].round().long()


def hand_buffer(T=3, N=2, K_ft=K_FT, rewards=None):
    rewards = torch.arange(1, T * N + 1, dtype=torch.float32).view(T, N) / 10 if rewards is None else rewards
    return {'feat': labelled_feat(T, N), 'chain': labelled_chain(T, N, K_ft), 'rewards': rewards,
            'dones': torch.ones(T, N, dtype=torch.bool),          # every decision ends its episode:
            'values': torch.zeros(T + 1, N)}                        # GAE advantage = reward exactly


def spy_update(monkeypatch, buffer, cfg, alpha_bc=0.1, pre=None):
    """Run dp.update once, recording every step_logprob call and every ppo_loss call."""
    pre_real, actor, critic = make_policies()
    calls, ppo_calls = [], []
    real_step_logprob, real_ppo_loss = dp.step_logprob, dp.ppo_loss

    def step_logprob(policy, x_k, x_prev, k, cond, min_std, rows=None):
        out = real_step_logprob(policy, x_k, x_prev, k, cond, min_std, rows)
        calls.append({'x_k': x_k.detach().clone(), 'x_prev': x_prev.detach().clone(), 'k': k.clone(),
                      'cond': (cond if rows is None else cond[rows]).detach().clone(),     # each sample's latent
                      'grad': torch.is_grad_enabled(), 'out': out.detach().clone()})
        return out

    def ppo_loss(logp_new, logp_old, adv, clip):
        n = len(logp_new)               # the actor pass just before scored the PPO samples, then their BC twins
        ppo_calls.append({'adv': adv.detach().clone(), 'clip': torch.as_tensor(clip).clone(),
                          'logp_new': logp_new.detach().clone(), 'call': calls[-1],
                          'last': {k: v[:n] if torch.is_tensor(v) and v.dim() else v for k, v in calls[-1].items()}})
        return real_ppo_loss(logp_new, logp_old, adv, clip)

    def bc_loss(logp):
        ppo_calls[-1]['bc'] = logp.detach().clone()                 # the same minibatch's BC term
        return real_bc_loss(logp)

    real_bc_loss = dp.bc_loss
    monkeypatch.setattr(dp, 'step_logprob', step_logprob)
    monkeypatch.setattr(dp, 'ppo_loss', ppo_loss)
    monkeypatch.setattr(dp, 'bc_loss', bc_loss)
    dp.update(actor, critic, pre if pre is not None else LabelledFrozen(pre_real.K), buffer,
              dp.make_optimizers(actor, critic, cfg), cfg, alpha_bc=alpha_bc)
    return calls, ppo_calls


# ----------------------------------------------------------------------------- item 1: which k, which pair
def test_chain_transitions_labels_every_sample_with_the_k_of_its_x_k():
    """chain[:, i] = x^{K_ft - i}: each flat sample must be (x^k, x^{k-1}, k) of its own decision, every
    (decision, k in 1..K_ft) exactly once, and i = K_ft - k is the position of x^k (the clip index)."""
    T, N = 2, 3
    chain = labelled_chain(T, N, K_FT).flatten(0, 1)                # (6, K_ft+1, 4, 7)
    x_k, x_prev, k, i, row = dp.chain_transitions(chain)
    kx, dx, _ = label(x_k)
    kp, dp_, _ = label(x_prev)
    assert torch.equal(kx, k), 'x^k of a sample is not labelled with its k'
    assert torch.equal(kp, k - 1), 'x^{k-1} is not the next entry of the chain'
    assert torch.equal(dx, row) and torch.equal(dp_, row)
    assert torch.equal(i, K_FT - k)
    triples = sorted(zip(row.tolist(), k.tolist()))
    assert triples == [(d, kk) for d in range(T * N) for kk in range(1, K_FT + 1)]


def test_update_scores_x_k_to_x_km1_at_step_k_and_bc_pairs_of_the_frozen_chain(monkeypatch):
    """Every log-prob the update takes (old / new PPO log-probs and the BC term) is of a transition x^k -> x^{k-1}
    evaluated at step k, with the latent of the same decision; BC pairs come from the frozen policy's chain at the
    fine-tuned steps k = 1..K_ft only (not shifted towards the noisy end)."""
    T, N = 3, 2
    cfg = replace(TEST, K_ft=K_FT, update_epochs=2, batch_size=7, norm_adv=False)
    calls, _ = spy_update(monkeypatch, hand_buffer(T, N), cfg)
    assert calls
    seen = {0: set(), 1: set()}
    for c in calls:
        kx, dx, sx = label(c['x_k'])
        kp, dpv, sp = label(c['x_prev'])
        assert torch.equal(kx, c['k']), 'the step index passed with x^k is not its k'
        assert torch.equal(kp, c['k'] - 1), 'x_prev is not x^{k-1}'
        assert torch.equal(sx, sp) and torch.equal(dx, dpv)
        assert torch.equal(dx, (c['cond'][:, 0] * 100).round().long()), 'latent of another decision'
        assert int(c['k'].min()) >= 1 and int(c['k'].max()) <= K_FT, 'a step outside the fine-tuned K_ft'
        for s in (0, 1):
            seen[s] |= set(zip(dx[sx == s].tolist(), kx[sx == s].tolist()))
    everything = {(d, k) for d in range(T * N) for k in range(1, K_FT + 1)}
    assert seen[0] == everything and seen[1] == everything      # all rollout and all BC transitions scored
    # the no-grad pass (old log-probs) covers each rollout transition exactly once
    old = [c for c in calls if not c['grad']]
    pairs = [p for c in old for p in zip(label(c['x_k'])[1].tolist(), c['k'].tolist())]
    assert sorted(pairs) == sorted(everything) and all(label(c['x_k'])[2].eq(0).all() for c in old)


def test_ppo_term_scores_the_rollout_chain_and_the_bc_term_the_frozen_chain(monkeypatch):
    """One actor pass scores a minibatch's PPO samples and their BC twins: the ratio must take the rollout chain's
    log-probs and the BC term the frozen policy's, each sample with its own k and decision (a swapped split would
    regularise towards the rollout and clip the BC pairs)."""
    cfg = replace(TEST, K_ft=K_FT, update_epochs=2, batch_size=5, norm_adv=False)
    _, ppo_calls = spy_update(monkeypatch, hand_buffer(), cfg)
    assert len(ppo_calls) == 2 * math.ceil(3 * 2 * K_FT / 5)
    for c in ppo_calls:
        k, d, src = label(c['call']['x_k'])
        out = c['call']['out']
        torch.testing.assert_close(c['logp_new'], out[src == 0])
        torch.testing.assert_close(c['bc'], out[src == 1])
        assert torch.equal(k[src == 0], k[src == 1]) and torch.equal(d[src == 0], d[src == 1])   # twins


def test_update_old_logprobs_equal_the_policys_own_chain_logprob(monkeypatch):
    """With a real sampled chain: the update's old log-prob of each sample equals the actor's (pi_old's)
    chain_logprob (which indexes the *full* chain at positions K-k, K-k+1) at that k, per action entry."""
    pre, actor, critic = make_policies(perturb=0.2)
    T, N = 2, 3
    feat = torch.randn(T * N, F_DIM, generator=torch.Generator().manual_seed(5))
    full = pre.sample(feat, ft_policy=actor, K_ft=K_FT, generator=torch.Generator().manual_seed(6))  # (TN, K+1, ..)
    buf = {'feat': feat.view(T, N, F_DIM), 'chain': full[:, pre.K - K_FT:].reshape(T, N, K_FT + 1, 4, 7),
           'rewards': torch.zeros(T, N), 'dones': torch.zeros(T, N, dtype=torch.bool), 'values': torch.zeros(T + 1, N)}
    ks = torch.arange(1, K_FT + 1).repeat(T * N, 1)                  # (TN, K_ft): every fine-tuned k
    with torch.no_grad():                                          # pi_old = the actor before the update
        table = actor.chain_logprob(feat, full, ks, min_std=TEST.min_logprob_std) / (4 * 7)   # [row, k-1]
    recorded = []
    real = dp.step_logprob
    monkeypatch.setattr(dp, 'step_logprob', lambda *a: recorded.append((a, real(*a))) or recorded[-1][1])
    cfg = replace(TEST, K_ft=K_FT, update_epochs=1, batch_size=1000)
    dp.update(actor, critic, pre, buf, dp.make_optimizers(actor, critic, cfg), cfg, alpha_bc=0.0)
    (args, old), = [(a, o) for a, o in recorded if not o.requires_grad]
    _, x_k, _, k, cond, _, rows = args
    cond = cond if rows is None else cond[rows]                     # each sample's latent
    # identify each sample's decision by its latent, then recompute with the policy's own indexing
    rows = torch.cdist(cond, feat).argmin(1)
    ref = table[rows, k - 1]
    torch.testing.assert_close(old, ref, rtol=1e-5, atol=1e-5)
    assert sorted(zip(rows.tolist(), k.tolist())) == [(r, kk) for r in range(T * N) for kk in range(1, K_FT + 1)]


def test_clip_epsilon_per_k_follows_the_paper_schedule(monkeypatch):
    """DPPO's schedule: eps = 0.001 at the noisiest fine-tuned step (k = K_ft), 0.01 at the last (k = 1),
    exponential (rate 3) in between: a reversed schedule gives k = 1 the smallest clip."""
    cfg = replace(TEST, K_ft=K_FT, update_epochs=1, batch_size=5, clip_min=0.001, clip_max=0.01, clip_rate=3.0)
    _, ppo_calls = spy_update(monkeypatch, hand_buffer(), cfg)
    by_k = {}
    for c in ppo_calls:
        for kk, eps in zip(c['last']['k'].tolist(), c['clip'].tolist()):
            by_k.setdefault(kk, set()).add(round(eps, 9))
    assert set(by_k) == {1, 2, 3} and all(len(v) == 1 for v in by_k.values())
    x = 0.5                                         # k = 2 sits half-way from the noisiest step (k=3, x=0) to k=1
    mid = 0.001 + 0.009 * (math.exp(3 * x) - 1) / (math.exp(3) - 1)   # = 0.001 + 0.009 * 3.4817 / 19.0855
    assert by_k[1].pop() == pytest.approx(0.01, rel=1e-6)
    assert by_k[3].pop() == pytest.approx(0.001, rel=1e-6)
    assert by_k[2].pop() == pytest.approx(mid, rel=1e-5) == pytest.approx(0.0026418, rel=1e-4)


def test_denoising_discount_power_k_applied_per_sample(monkeypatch):
    """Eq. 8: the advantage handed to the PPO loss for step k of decision d is gamma_denoise**k * A_d (A_d the
    GAE advantage at k = 1; with every decision terminal and V = 0 it is the reward). gamma_denoise = 0.5 makes
    k vs k-1 vs K_ft-k visible."""
    T, N = 3, 2
    buf = hand_buffer(T, N)
    cfg = replace(TEST, K_ft=K_FT, update_epochs=1, batch_size=4, norm_adv=False, gamma_denoise=0.5)
    _, ppo_calls = spy_update(monkeypatch, buf, cfg)
    n = 0
    for c in ppo_calls:
        kk = c['last']['k']
        d = (c['last']['cond'][:, 0] * 100).round().long()
        r = buf['rewards'].flatten()[d]
        expect = torch.tensor([float(ri) * 0.5 ** int(ki) for ri, ki in zip(r, kk)])
        torch.testing.assert_close(c['adv'], expect, rtol=1e-6, atol=1e-7)
        n += len(kk)
    assert n == T * N * K_FT
    # the pure helper: power k exactly (0.5, 0.25, 0.125 for k = 1, 2, 3)
    assert dp.denoising_discount(torch.tensor([1, 2, 3]), 0.5).tolist() == [0.5, 0.25, 0.125]


def test_rewards_enter_the_advantage_only_at_their_own_decision(monkeypatch):
    """Negative control of the discount test: one decision rewarded, all others not; only its K_ft samples get a
    non-zero advantage."""
    T, N = 3, 2
    r = torch.zeros(T, N)
    r[1, 0] = 1.0                                   # decision d = 2
    cfg = replace(TEST, K_ft=K_FT, update_epochs=1, batch_size=50, norm_adv=False, gamma_denoise=0.5)
    _, ppo_calls = spy_update(monkeypatch, hand_buffer(T, N, rewards=r), cfg)
    (c,) = ppo_calls
    d = (c['last']['cond'][:, 0] * 100).round().long()
    assert set(d[c['adv'] != 0].tolist()) == {2} and int((c['adv'] != 0).sum()) == K_FT


# ----------------------------------------------------------------------------- item 5: negative advantages
def test_ppo_loss_negative_advantage_hand_computed():
    """adv = -2, eps = 0.1. Per sample, loss = max(-A r, -A clip(r, 0.9, 1.1)) = 2 max(r, clip(r)):
    r = e^-0.3 = 0.7408 -> 2 * 0.9 (the pessimistic bound keeps 1-eps: no credit for lowering further),
    r = e^-0.05 -> 2 r, r = 1 -> 2, r = e^0.05 -> 2 r, r = e^0.3 = 1.3499 -> 2 r (not clipped above)."""
    lr = torch.tensor([-0.3, -0.05, 0.0, 0.05, 0.3], requires_grad=True)
    adv = torch.full((5,), -2.0)
    loss, info = dp.ppo_loss(lr, torch.zeros(5), adv, 0.1)
    per = [2 * 0.9, 2 * math.exp(-0.05), 2.0, 2 * math.exp(0.05), 2 * math.exp(0.3)]
    assert loss.item() == pytest.approx(sum(per) / 5, abs=1e-6)
    assert info['clipfrac'] == pytest.approx(2 / 5)
    loss.backward()
    # gradient: zero where the clipped bound is active (r < 1 - eps with A < 0); d(2 r)/d logr = 2 r elsewhere
    expect = [0.0, 2 * math.exp(-0.05) / 5, 2 / 5, 2 * math.exp(0.05) / 5, 2 * math.exp(0.3) / 5]
    torch.testing.assert_close(lr.grad, torch.tensor(expect), rtol=1e-5, atol=1e-7)
    # mixed signs in one batch, per-sample clip: A>0 at r=e^0.3 clips at 1+eps (1.05), A<0 at r=e^-0.3 at 1-eps
    loss2, _ = dp.ppo_loss(torch.tensor([0.3, -0.3]), torch.zeros(2), torch.tensor([1.0, -1.0]),
                           torch.tensor([0.05, 0.2]))
    assert loss2.item() == pytest.approx((-1.05 + 0.8) / 2, abs=1e-6)


def test_update_with_negative_advantage_lowers_the_logprob_of_those_actions():
    pre, actor, critic = make_policies(seed=1)
    T, N = 3, 4
    feat = torch.randn(T * N, F_DIM, generator=torch.Generator().manual_seed(7))
    full = pre.sample(feat, ft_policy=actor, K_ft=K_FT, generator=torch.Generator().manual_seed(8))
    chain = full[:, pre.K - K_FT:]
    buf = {'feat': feat.view(T, N, F_DIM), 'chain': chain.reshape(T, N, K_FT + 1, 4, 7),
           'rewards': -torch.ones(T, N), 'dones': torch.ones(T, N, dtype=torch.bool), 'values': torch.zeros(T + 1, N)}
    cfg = replace(TEST, K_ft=K_FT, norm_adv=False, clip_min=0.2, clip_max=0.2, update_epochs=3, actor_lr=1e-3)
    xk, xp, k, _, row = dp.chain_transitions(chain)

    def mean_lp():
        with torch.no_grad():
            return dp.step_logprob(actor, xk, xp, k, feat[row], 0.1).mean().item()
    lp0 = mean_lp()
    dp.update(actor, critic, pre, buf, dp.make_optimizers(actor, critic, cfg), cfg, alpha_bc=0.0)
    assert mean_lp() < lp0 - 1e-4


# ----------------------------------------------------------------------------- item 2: BC direction (K > 1)
def _bc_setup():
    pre, actor, critic = make_policies(seed=2, perturb=0.15)
    T, N = 4, 4
    feat = torch.randn(T * N, F_DIM, generator=torch.Generator().manual_seed(9))
    chain = pre.sample(feat, ft_policy=actor, K_ft=K_FT, generator=torch.Generator().manual_seed(10))[:, pre.K - K_FT:]
    buf = {'feat': feat.view(T, N, F_DIM), 'chain': chain.reshape(T, N, K_FT + 1, 4, 7),
           'rewards': torch.zeros(T, N), 'dones': torch.ones(T, N, dtype=torch.bool), 'values': torch.zeros(T + 1, N)}
    # held-out frozen transitions (another draw): x^k -> x^{k-1} of pi_pre at the fine-tuned steps
    held = pre.sample(feat, generator=torch.Generator().manual_seed(11))              # (B, K+1, 4, 7)
    ks = torch.arange(1, K_FT + 1).repeat(len(feat), 1)                                 # (B, K_ft)

    def lp_of_frozen():
        with torch.no_grad():
            return (actor.chain_logprob(feat, held, ks, min_std=0.1) / 28).mean().item()
    return pre, actor, critic, buf, lp_of_frozen


def test_actor_and_frozen_policy_have_equal_stds():
    """Precondition of the BC-direction test: the diffusion step std is the schedule's, not learned."""
    pre, actor, _ = make_policies(seed=2, perturb=0.15)
    x = torch.randn(3, 4, 7)
    for k in range(1, pre.K + 1):
        kk = torch.full((3,), k)
        _, s_pre = pre.step_mean_std(x, kk, torch.zeros(3, F_DIM), min_std=0.1)
        _, s_act = actor.step_mean_std(x, kk, torch.zeros(3, F_DIM), min_std=0.1)
        torch.testing.assert_close(s_pre, s_act)


@pytest.mark.parametrize('alpha_bc, direction', [(1.0, +1), (-1.0, -1)])
def test_bc_term_raises_the_logprob_of_frozen_transitions_on_the_diffusion_policy(alpha_bc, direction):
    """Eq. 16 with zero advantages (pure BC): the update moves the fine-tuned diffusion policy's log-likelihood
    of the frozen policy's transitions UP. The negated weight (the parametrised negative control) moves it down,
    so a sign flip in bc_loss or in 'pg + alpha * bc' fails the first case."""
    pre, actor, critic, buf, lp = _bc_setup()
    cfg = replace(TEST, K_ft=K_FT, norm_adv=False, reward_scaling=False, update_epochs=8, batch_size=16,
                  actor_lr=2e-3)
    before = lp()
    dp.update(actor, critic, pre, buf, dp.make_optimizers(actor, critic, cfg), cfg, alpha_bc=alpha_bc)
    after = lp()
    assert direction * (after - before) > 0.05, (before, after)


def test_bc_loss_gradient_step_direction():
    """One plain gradient step on bc_loss alone, on the diffusion policy: log-prob of the frozen pairs goes up."""
    pre, actor, _, _, lp = _bc_setup()
    feat = torch.randn(16, F_DIM, generator=torch.Generator().manual_seed(9))
    held = pre.sample(feat, generator=torch.Generator().manual_seed(11))
    xk, xp, k, _, row = dp.chain_transitions(held[:, pre.K - K_FT:])
    before = lp()
    loss = dp.bc_loss(dp.step_logprob(actor, xk, xp, k, feat[row], 0.1))
    loss.backward()
    with torch.no_grad():
        for p in actor.parameters():
            p.sub_(1e-2 * p.grad)
    assert lp() > before
