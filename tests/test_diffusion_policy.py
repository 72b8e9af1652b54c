"""Tests for diffusion_policy.py: the DDPM closed forms against Bayes' rule, the sampling chain, BC, EMA."""
import math

import pytest
import torch

import diffusion_policy as dp  # noqa: E402

torch.set_num_threads(1)


def make_cfg(**kw):
    return dp.BCConfig(**{**dp.PRESETS['test'], **kw})


def test_presets_are_config_fields():
    fields = set(dp.BCConfig.__dataclass_fields__)
    for name, over in dp.PRESETS.items():
        assert set(over) <= fields, f'preset {name} has unknown fields {set(over) - fields}'
    paper = dp.BCConfig()
    assert (paper.K, paper.Tp, paper.Ta, paper.mlp_dim, paper.mlp_layers, paper.batch) == (20, 4, 4, 512, 3, 256)


# ---------------------------------------------------------------- schedule closed forms

def test_cosine_schedule_matches_definition_and_cumprod():
    K, s = 20, 0.008
    betas = dp.cosine_beta_schedule(K)
    f = lambda t: math.cos((t / K + s) / (1 + s) * math.pi / 2) ** 2
    sch = dp.ddpm_schedule(betas)
    prod = 1.0
    for k in range(1, K + 1):
        prod *= 1 - betas[k - 1].item()                      # naive running product
        assert abs(sch['alpha_bar'][k - 1].item() - prod) < 1e-12
        if k < K:                                            # beta_K is clipped at 0.999
            assert abs(prod - f(k) / f(0)) < 1e-9
    assert 0 < betas.min() and betas.max() <= 0.999
    assert torch.all(betas[1:] >= betas[:-1]), 'cosine betas must increase with k'


def test_posterior_matches_bayes_rule_scalar():
    """q(x_{k-1}|x_k,x0) ∝ q(x_k|x_{k-1}) q(x_{k-1}|x0): product of two Gaussians in x_{k-1}."""
    sch = dp.ddpm_schedule(dp.cosine_beta_schedule(20))
    x0, xk = 0.3, -0.7
    for k in range(2, 21):
        i = k - 1
        a, b, ab_prev = sch['alphas'][i].item(), sch['betas'][i].item(), sch['alpha_bar_prev'][i].item()
        # likelihood in x_{k-1}: N(xk; sqrt(a) x, b)  -> precision a/b, natural mean sqrt(a) xk / b
        # prior: N(x; sqrt(ab_prev) x0, 1 - ab_prev)
        prec = a / b + 1 / (1 - ab_prev)
        mean = (math.sqrt(a) * xk / b + math.sqrt(ab_prev) * x0 / (1 - ab_prev)) / prec
        got_mean = sch['post_c0'][i].item() * x0 + sch['post_ck'][i].item() * xk
        assert abs(got_mean - mean) < 1e-9 and abs(sch['post_var'][i].item() - 1 / prec) < 1e-12


def test_posterior_matches_numerical_integration():
    sch = dp.ddpm_schedule(dp.cosine_beta_schedule(20))
    x0, xk, k = -0.4, 0.9, 7
    i = k - 1
    a, b, ab_prev = sch['alphas'][i], sch['betas'][i], sch['alpha_bar_prev'][i]
    x = torch.linspace(-6, 6, 200001, dtype=torch.float64)
    logp = (-(xk - a.sqrt() * x) ** 2 / (2 * b)) + (-(x - ab_prev.sqrt() * x0) ** 2 / (2 * (1 - ab_prev)))
    w = torch.exp(logp - logp.max())
    w = w / w.sum()
    mean = (w * x).sum()
    var = (w * (x - mean) ** 2).sum()
    assert abs(mean - (sch['post_c0'][i] * x0 + sch['post_ck'][i] * xk)) < 1e-6
    assert abs(var - sch['post_var'][i]) < 1e-6
    assert sch['post_var'][0] == 0, 'the last step (k=1) is deterministic: tilde-beta_1 = 0'


# ---------------------------------------------------------------- step mean/std and log-probs

def test_step_mean_equals_posterior_mean_with_true_noise():
    torch.manual_seed(0)
    pol = dp.DiffusionPolicy(5, make_cfg(K=10))
    B = 12
    x0 = torch.rand(B, 4, 7) * 1.8 - 0.9                     # inside [-1, 1]: the x0 clip is inactive
    eps = torch.randn(B, 4, 7)
    k = torch.randint(1, 11, (B,))
    xk = pol.q_sample(x0, k, eps)

    class Oracle(torch.nn.Module):                            # an eps-net that predicts the true noise
        def forward(self, x, kk, c, rows=None):
            return eps
    pol.eps_net = Oracle()
    mean, std = pol.step_mean_std(xk, k, torch.zeros(B, 5), min_std=0.)
    ref_mean, ref_std = pol.q_posterior(x0, xk, k)
    assert torch.allclose(mean, ref_mean, atol=1e-5)
    assert torch.allclose(std, ref_std)
    _, std_c = pol.step_mean_std(xk, k, torch.zeros(B, 5), min_std=0.1)
    assert torch.all(std_c >= 0.1) and torch.allclose(std_c, ref_std.clamp(min=0.1))


def test_denoised_estimate_is_clipped_to_action_range():
    pol = dp.DiffusionPolicy(5, make_cfg(K=10))

    class Wild(torch.nn.Module):                              # noise estimate that implies |x0_hat| >> 1
        def forward(self, x, kk, c, rows=None):
            return torch.full_like(x, -10.0)
    pol.eps_net = Wild()
    xk, k = torch.zeros(4, 4, 7), torch.tensor([1, 4, 7, 10])
    mean, _ = pol.step_mean_std(xk, k, torch.zeros(4, 5))
    ref, _ = pol.q_posterior(torch.ones_like(xk), xk, k)     # x0_hat clipped to +1
    assert torch.allclose(mean, ref, atol=1e-6)


def test_gaussian_logprob_matches_torch_normal():
    torch.manual_seed(1)
    x, mean, std = torch.randn(6, 4, 7), torch.randn(6, 4, 7), torch.rand(6, 4, 7) + 0.05
    ref = torch.distributions.Normal(mean, std).log_prob(x).sum((1, 2))
    assert torch.allclose(dp.gaussian_logprob(x, mean, std), ref, atol=1e-4)


def test_chain_logprob_matches_per_step_loop():
    torch.manual_seed(2)
    pol = dp.DiffusionPolicy(5, make_cfg())
    cond = torch.randn(3, 5)
    chain = pol.sample(cond)
    K = pol.K
    ks = torch.tensor([[1, K], [2, 3], [K, 1]])
    lp = pol.chain_logprob(cond, chain, ks)
    assert lp.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            k = ks[i, j].item()
            m, s = pol.step_mean_std(chain[i:i + 1, K - k], torch.tensor([k]), cond[i:i + 1], min_std=0.1)
            ref = torch.distributions.Normal(m, s).log_prob(chain[i:i + 1, K - k + 1]).sum()
            assert abs(lp[i, j].item() - ref.item()) < 1e-3
    assert torch.allclose(pol.chain_logprob(cond, chain, ks[:, 0]), lp[:, 0])


# ---------------------------------------------------------------- sampling

def test_sample_shapes_order_clip_and_determinism():
    torch.manual_seed(3)
    pol = dp.DiffusionPolicy(5, make_cfg())
    cond = torch.randn(8, 5)
    chain = pol.sample(cond, generator=torch.Generator().manual_seed(0))
    assert chain.shape == (8, pol.K + 1, 4, 7)
    assert chain[:, -1].abs().max() <= 1.0
    # chain[:, 0] is x^K: the first draw of the generator
    assert torch.equal(chain[:, 0], torch.randn(8, 4, 7, generator=torch.Generator().manual_seed(0)))
    # deterministic: chain[:, i+1] is the mean of step k = K - i applied to chain[:, i]; reproducible
    d1 = pol.sample(cond, sampler='mean', generator=torch.Generator().manual_seed(5))
    d2 = pol.sample(cond, sampler='mean', generator=torch.Generator().manual_seed(5))
    assert torch.equal(d1, d2)
    for i in range(pol.K):
        k = pol.K - i
        m, _ = pol.step_mean_std(d1[:, i], torch.full((8,), k), cond)
        assert torch.allclose(d1[:, i + 1], m.clamp(-1, 1) if k == 1 else m, atol=1e-6)
    # stochastic samples differ from the deterministic ones but are reproducible with the same generator
    s1 = pol.sample(cond, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(s1, d1)
    assert torch.equal(s1, pol.sample(cond, generator=torch.Generator().manual_seed(5)))


def test_ddpm_sampler_adds_the_schedule_noise_on_steps_above_one_only():
    """--eval.sampler ddpm (DPPO's evaluation): x^{k-1} = mean + max(sigma_k, 1e-3) * clip(noise) for k > 1, from the
    same generator draws as a naive loop; the mean at k = 1 (as the 'mean' sampler, tested above, at every k)."""
    torch.manual_seed(3)
    pol = dp.DiffusionPolicy(5, make_cfg())
    cond = torch.randn(6, 5)
    chain = pol.sample(cond, sampler='ddpm', noise_clip=3.0, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 7, generator=g)
    assert torch.equal(chain[:, 0], x)
    for i in range(pol.K):
        k = pol.K - i
        m, _ = pol.step_mean_std(chain[:, i], torch.full((6,), k), cond)
        if k == 1:
            assert torch.allclose(chain[:, i + 1], m.clamp(-1, 1), atol=1e-6), 'no noise on the last step'
        else:
            sigma = float(pol.post_var[k - 1].sqrt().clamp(min=1e-3))
            noise = torch.randn(6, 4, 7, generator=g).clamp(-3, 3)
            assert torch.allclose(chain[:, i + 1], m + sigma * noise, atol=1e-5), f'step k={k}'
    with pytest.raises(AssertionError, match='sampler'):
        pol.sample(cond, sampler='noisy')


def test_sample_noise_is_clipped():
    torch.manual_seed(4)
    pol = dp.DiffusionPolicy(5, make_cfg())
    cond = torch.randn(200, 5)
    chain = pol.sample(cond, min_std=0.5, noise_clip=0.2, generator=torch.Generator().manual_seed(1))
    k = torch.full((200,), pol.K)
    m, s = pol.step_mean_std(chain[:, 0], k, cond, min_std=0.5)
    z = (chain[:, 1] - m) / s
    assert z.abs().max() <= 0.2 + 1e-5 and z.abs().max() > 0.19


@pytest.mark.parametrize('K_ft', [0, 3, 5])
def test_ft_policy_used_exactly_for_last_K_ft_steps(K_ft):
    torch.manual_seed(5)
    cfg = make_cfg()
    base, ft = dp.DiffusionPolicy(5, cfg), dp.DiffusionPolicy(5, cfg)
    seen = {'base': [], 'ft': []}
    base.eps_net.register_forward_hook(lambda m, inp, out: seen['base'].append(int(inp[1][0])))
    ft.eps_net.register_forward_hook(lambda m, inp, out: seen['ft'].append(int(inp[1][0])))
    base.sample(torch.randn(2, 5), ft_policy=ft, K_ft=K_ft)
    assert seen['base'] == list(range(cfg.K, K_ft, -1))
    assert seen['ft'] == list(range(K_ft, 0, -1))


def test_bad_inputs_fail_with_message():
    pol = dp.DiffusionPolicy(5, make_cfg())
    with pytest.raises(AssertionError, match='cond must be'):
        pol.sample(torch.randn(2, 6))
    with pytest.raises(AssertionError, match='K_ft'):
        pol.sample(torch.randn(2, 5), K_ft=2)
    with pytest.raises(AssertionError, match='action chunk'):
        pol.bc_loss(torch.randn(2, 3, 7), torch.randn(2, 5))


# ---------------------------------------------------------------- behaviour cloning and EMA

def toy_data(n, cond_dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, cond_dim, generator=g)
    W = torch.randn(cond_dim, 28, generator=torch.Generator().manual_seed(123)) / 2
    return cond, torch.tanh(cond @ W).view(n, 4, 7) * 0.9     # action = f(cond), in [-0.9, 0.9]


def test_bc_learns_toy_conditional_mapping():
    torch.manual_seed(6)
    cfg = make_cfg(K=10, mlp_dim=128, mlp_layers=3, time_dim=16, lr=2e-3, lr_final=1e-4)
    pol = dp.DiffusionPolicy(4, cfg)
    opt = dp.make_optimizer(pol, cfg)
    steps = 600
    sched = dp.make_scheduler(opt, cfg, steps)
    ema = dp.make_ema(pol, cfg)
    cond, act = toy_data(512)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, 512, (128,))
        m = dp.update_bc(pol, opt, ema, {'actions': act[idx], 'cond': cond[idx]}, epoch=step // 4, sched=sched)
        losses.append(m['bc_loss'])
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    assert abs(opt.param_groups[0]['lr'] - cfg.lr_final) < 1e-6
    tc, ta = toy_data(256, seed=1)
    pred = pol.sample(tc, sampler='mean')[:, -1]
    err = (pred - ta).abs().mean().item()
    baseline = (ta - act.mean(0)).abs().mean().item()         # best constant action
    assert err < 0.4 * baseline, (err, baseline)


def test_ema_against_hand_computation():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = dp.EMA(lin, decay=0.9, start_epoch=2, every=2)
    values, epochs = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [0, 0, 1, 1, 2, 3]
    for v, e in zip(values, epochs):
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.update(lin, e)
    # calls 2 (epoch 0) and 4 (epoch 1 < start) copy: 3.0 then 5.0; call 6 (epoch 3) averages: 0.9*5 + 0.1*7
    assert abs(ema.model.weight.item() - (0.9 * 5.0 + 0.1 * 7.0)) < 1e-6
    assert not ema.model.weight.requires_grad


# ---------------------------------------------------------------- the Gaussian policy of S.5.3

def test_gaussian_policy_interface_and_logprob():
    torch.manual_seed(7)
    cfg = make_cfg(policy='gaussian')
    pol = dp.make_policy(5, cfg)
    assert isinstance(pol, dp.GaussianPolicy) and pol.K == 1
    with torch.no_grad():
        pol.log_std.fill_(math.log(0.3))
    cond = torch.randn(6, 5)
    chain = pol.sample(cond, min_std=0.1)
    assert chain.shape == (6, 2, 4, 7) and chain[:, 1].abs().max() <= 1
    mean = torch.tanh(pol.mean_net(cond)).view(6, 4, 7)
    ref = torch.distributions.Normal(mean, torch.full_like(mean, 0.3)).log_prob(chain[:, 1]).sum((1, 2))
    assert torch.allclose(pol.chain_logprob(cond, chain, torch.ones(6, dtype=torch.long)), ref, atol=1e-4)
    assert torch.allclose(pol.sample(cond, sampler='mean')[:, 1], mean, atol=1e-6)
    with torch.no_grad():
        pol.log_std.fill_(math.log(0.01))                    # min_std clips the std from below
    lp = pol.chain_logprob(cond, chain, torch.ones(6, dtype=torch.long), min_std=0.1)
    ref = torch.distributions.Normal(mean, torch.full_like(mean, 0.1)).log_prob(chain[:, 1]).sum((1, 2))
    assert torch.allclose(lp, ref, atol=1e-3)


def test_gaussian_policy_bc_max_likelihood():
    torch.manual_seed(8)
    cfg = make_cfg(policy='gaussian', mlp_dim=64, lr=3e-3)
    pol = dp.make_policy(4, cfg)
    opt = dp.make_optimizer(pol, cfg)
    cond, act = toy_data(256)
    first = dp.update_bc(pol, opt, None, {'actions': act, 'cond': cond})['bc_loss']
    for _ in range(300):
        last = dp.update_bc(pol, opt, None, {'actions': act, 'cond': cond})['bc_loss']
    assert last < first - 1.0
    assert pol.log_std.exp().mean() < 0.5, 'ML should shrink the std towards the residual error'


@pytest.mark.parametrize('kind', ['diffusion', 'gaussian'])
def test_per_decision_latents_with_rows_equal_per_sample_latents(kind):
    """step_mean_std(..., cond (D,F), rows): the latent's part of the first layer once per decision (the PPO update)
    must give what cond[rows] (one latent per sample) gives."""
    torch.manual_seed(0)
    cfg = dp.BCConfig(**{**dp.PRESETS['test'], 'policy': kind})
    pol = dp.make_policy(5, cfg)
    cond, rows = torch.randn(4, 5), torch.tensor([0, 3, 3, 1, 0, 2, 2])
    x, k = torch.randn(7, cfg.Tp, cfg.action_dim), torch.randint(1, pol.K + 1, (7,))
    m_ref, s_ref = pol.step_mean_std(x, k, cond[rows], min_std=0.1)
    m, s = pol.step_mean_std(x, k, cond, min_std=0.1, rows=rows)
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, s_ref)
    with pytest.raises(AssertionError, match='action chunk must be'):
        pol.step_mean_std(x, k, cond, rows=rows[:3])
