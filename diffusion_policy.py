"""Diffusion policy over action chunks, conditioned on world-model latents (DiWA §III.B, S.2.2).

A DDPM (Ho et al. 2020) by hand: PPO in the Dream Diffusion MDP (§III.D, Eq. 4-9) needs every step's log-likelihood:

    x^K ~ N(0, I)                                        pure noise, an action chunk (Tp, Da)
    x^{k-1} ~ pi(x^{k-1} | z, x^k) = N(mu(z, x^k, k), sigma_k^2 I)    k = K..1   (Eq. 1, Eq. 5)
    a = x^0                                              the executed chunk, in [-1, 1]

mu is the mean of the posterior q(x^{k-1} | x^k, x0_hat), x0_hat the denoised estimate (clipped to [-1, 1]) that an
epsilon-predicting MLP's noise estimate gives. sigma_k is the cosine schedule's posterior std, clipped below by
`min_std` (DPPO's trick: a DDPM's last steps are nearly deterministic, so their PPO likelihood ratios explode). Chunking
(Tab. S.3): observation horizon 1, the policy predicts Tp = 4 actions and all Ta = 4 are executed.

    latent z_t ──┐
    noisy chunk ─┼─> eps-net MLP (3 x 512, Mish, residual) ─> eps_hat (Tp*Da)
    k ─ sin emb ─┘

Also here: S.5.3's unimodal `GaussianPolicy`, same interface (a "chain" of K = 1 step), so dream_ppo.py drives both.

Glossary (paper symbol -> variable -> shape)
    z_t (WM latent, Eq. 2-3)      cond          (B, F)        F = deter + stoch*classes (2048 at paper preset)
    a_t^k (noisy chunk)           x_k           (B, Tp, Da)   Tp = 4 actions, Da = 7
    k (denoising step, K..1)      k             (B,) long     arrays are indexed k-1
    beta_k, alpha_k, bar-alpha_k  betas, alphas, alpha_bar   (K,)
    eps, eps_theta                eps, eps_hat  (B, Tp, Da)
    mu_theta, sigma_k (Eq. 5)     mean, std     (B, Tp, Da)
    denoising chain (Eq. 1)       chain         (B, K+1, Tp, Da)  chain[:, i] = x^{K-i}; chain[:, -1] = x^0
    K' (fine-tuned steps, Tab. S.5)  K_ft       int
"""
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import env
import world_model as W


@dataclass
class BCConfig:
    policy: str = 'diffusion'   # policy class: 'diffusion' (§III.B) or 'gaussian' (unimodal baseline, S.5.3)
    K: int = 20                 # number of diffusion denoising steps K (Tab. S.3)
    Tp: int = 4                 # planning horizon: actions predicted per chunk T_p (Tab. S.3)
    Ta: int = 4                 # action horizon: actions of the chunk executed T_a (Tab. S.3)
    action_dim: int = 7         # action dimension D_a (7-DoF relative actions, S.3.1)
    mlp_dim: int = 512          # width of the eps-net / mean MLP (Tab. S.3: [512, 512, 512])
    mlp_layers: int = 3         # number of hidden layers of that MLP (Tab. S.3)
    time_dim: int = 16          # size of the denoising-step embedding (not in the paper; DPPO's 16)
    lr: float = 1e-4            # initial Adam learning rate (Tab. S.3)
    lr_final: float = 1e-5      # final learning rate of the cosine decay (Tab. S.3)
    weight_decay: float = 1e-6  # weight decay (Tab. S.3)
    batch: int = 256            # batch size (Tab. S.3)
    epochs: int = 5000          # training epochs over the expert chunks (Tab. S.3)
    ema_decay: float = 0.995    # EMA decay of the policy weights (Tab. S.3)
    ema_start_epoch: int = 20   # epoch from which the EMA starts averaging; before it copies (Tab. S.3)
    ema_every: int = 10         # EMA update every this many optimisation steps (Tab. S.3)


PRESETS = {
    'paper': {},
    # Same network, ~2.4k steps (~2 min on one core; the paper's 5000 epochs are ~60k): a higher lr to converge
    # in that budget, and an EMA updated every step (a ~200-step window) that does not lag behind the training.
    'cpu': {'epochs': 200, 'lr': 3e-4, 'lr_final': 3e-5, 'ema_start_epoch': 5, 'ema_every': 1},
    'test': {'K': 5, 'mlp_dim': 32, 'mlp_layers': 2, 'time_dim': 8, 'batch': 16, 'epochs': 2,
             'ema_start_epoch': 0, 'ema_every': 1},
}


# ---- The noise schedule: pure functions of K, tested against Bayes' rule in tests/test_diffusion_policy.py ---

def cosine_beta_schedule(K, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal (2021) Eq. 17: bar-alpha(k) = f(k)/f(0), f(k) = cos^2((k/K + s)/(1 + s) * pi/2). -> betas
    (K,) float64, beta_k = 1 - bar-alpha_k / bar-alpha_{k-1} clipped at max_beta (beta_K would be 1). Cosine keeps
    fewer steps near pure noise than the linear schedule, which matters with only K = 20 steps."""
    t = torch.arange(K + 1, dtype=torch.float64) / K
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def ddpm_schedule(betas):
    """All closed-form quantities of the forward process, indexed k-1 for k = 1..K. Returns a dict of (K,).
    q(x^k | x^0) = N(sqrt(bar-alpha_k) x^0, (1 - bar-alpha_k) I)                        (Ho et al. Eq. 4)
    q(x^{k-1} | x^k, x^0) = N(c0_k x^0 + ck_k x^k, tilde-beta_k I)                    (Ho et al. Eq. 6-7)"""
    alphas = 1 - betas
    alpha_bar = torch.cumprod(alphas, 0)                                   # bar-alpha_k = prod_{j<=k} alpha_j
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=betas.dtype), alpha_bar[:-1]])   # bar-alpha_0 = 1
    return {
        'betas': betas, 'alphas': alphas, 'alpha_bar': alpha_bar, 'alpha_bar_prev': alpha_bar_prev,
        'post_c0': betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),         # coefficient of x^0
        'post_ck': (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),  # coefficient of x^k
        'post_var': betas * (1 - alpha_bar_prev) / (1 - alpha_bar),         # tilde-beta_k (0 at k = 1)
    }


def gaussian_logprob(x, mean, std):
    """log N(x; mean, diag(std^2)) summed over all but the batch dim: (B, ...) x3 -> (B,). (Eq. 5)"""
    var = std ** 2
    lp = -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var))
    return lp.flatten(1).sum(1)


# ---- Networks --------------------------------------------------------------------------------------

def sinusoidal_embedding(k, dim):
    """Transformer-style embedding of the (integer) denoising step: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=k.device) / max(half - 1, 1))
    angles = k.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualMLP(nn.Module):
    """in -> Mish(Linear) -> (layers-1) x [h + Mish(Linear(h))] -> out. Widths Tab. S.3; Mish, residuals: DPPO's."""

    def __init__(self, in_dim, out_dim, width, layers):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 1))
        self.out = nn.Linear(width, out_dim)

    def forward(self, x=None, pre=None):    # pre: the first layer's output before Mish, if computed outside
        h = F.mish(self.inp(x) if pre is None else pre)
        for block in self.blocks:
            h = h + F.mish(block(h))
        return self.out(h)


class EpsNet(nn.Module):
    """eps_theta(x^k, k, z): predicts the noise that was added to the chunk. (B,Tp,Da),(B,),(B,F) -> (B,Tp,Da)"""

    def __init__(self, cond_dim, cfg):
        super().__init__()
        self.time_dim = cfg.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, 2 * cfg.time_dim), nn.Mish(),
                                      nn.Linear(2 * cfg.time_dim, cfg.time_dim))
        chunk = cfg.Tp * cfg.action_dim
        self.mlp = ResidualMLP(chunk + cfg.time_dim + cond_dim, chunk, cfg.mlp_dim, cfg.mlp_layers)

    def forward(self, x_k, k, cond, rows=None):
        """rows (B,): cond is (D,F), one latent per decision, sample i's is cond[rows[i]]; the latent's part of the
        first layer, most of its work, then runs once per decision, not per sample (the PPO update; same numbers)."""
        temb = self.time_mlp(sinusoidal_embedding(k, self.time_dim))           # (B, time_dim)
        xt = torch.cat([x_k.flatten(1), temb], dim=1)                          # (B, Tp*Da + time_dim)
        if rows is None:
            return self.mlp(torch.cat([xt, cond], dim=1)).view_as(x_k)
        W, n = self.mlp.inp.weight, xt.shape[1]                                # first layer on cat(xt, cond)
        pre = F.linear(xt, W[:, :n], self.mlp.inp.bias) + F.linear(cond, W[:, n:])[rows]
        return self.mlp(pre=pre).view_as(x_k)


def _check_inputs(policy, cond, x=None, rows=None):
    assert cond.dim() == 2 and cond.shape[1] == policy.cond_dim, \
        f'cond must be (B, {policy.cond_dim}) world-model latents, got {tuple(cond.shape)}'
    B = cond.shape[0] if rows is None else rows.shape[0]          # with rows: cond holds one latent per decision
    if x is not None:
        assert x.shape[1:] == (policy.Tp, policy.Da) and x.shape[0] == B, \
            f'action chunk must be (B={B}, Tp={policy.Tp}, Da={policy.Da}), got {tuple(x.shape)}'


# ---- The diffusion policy (Eq. 1, 5, 12) -----------------------------------------------------------

# Evaluation samplers (`--eval.sampler`): 'mean' = the noise-free chain of posterior means; 'ddpm' = DPPO's evaluation,
# the schedule's posterior noise (std >= 1e-3) on every step k > 1 and the mean at k = 1. Both differ only for k > 1.
SAMPLERS, DDPM_EVAL_MIN_STD = ('mean', 'ddpm'), 1e-3


class DiffusionPolicy(nn.Module):
    def __init__(self, cond_dim, cfg):
        super().__init__()
        assert cfg.Ta <= cfg.Tp, f'action horizon Ta={cfg.Ta} must be <= planning horizon Tp={cfg.Tp}'
        self.cond_dim, self.cfg = cond_dim, cfg
        self.K, self.Tp, self.Da = cfg.K, cfg.Tp, cfg.action_dim
        self.eps_net = EpsNet(cond_dim, cfg)
        for name, v in ddpm_schedule(cosine_beta_schedule(cfg.K)).items():   # computed in float64, kept in float32
            self.register_buffer(name, v.float(), persistent=False)          # a function of K: not checkpointed

    def _at(self, name, k):
        """Schedule value for each step in k (B,) long in 1..K, shaped (B, 1, 1) to broadcast over chunks."""
        return getattr(self, name)[k - 1].view(-1, 1, 1)

    def q_sample(self, x0, k, eps):
        """Forward process (Ho et al. Eq. 4): x^k = sqrt(bar-alpha_k) x^0 + sqrt(1 - bar-alpha_k) eps."""
        ab = self._at('alpha_bar', k)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def q_posterior(self, x0, x_k, k):
        """Mean and std of q(x^{k-1} | x^k, x^0) (Ho et al. Eq. 7); each (B, Tp, Da)."""
        mean = self._at('post_c0', k) * x0 + self._at('post_ck', k) * x_k
        return mean, self._at('post_var', k).sqrt().expand_as(mean)

    def step_mean_std(self, x_k, k, cond, min_std=0., rows=None):
        """Eq. 5: mean mu_theta(z, x^k, k), std sigma_k >= min_std of pi(x^{k-1} | z, x^k); x_k (B,Tp,Da), k (B,) in
        1..K, cond (B,F) (or (D,F) and rows: EpsNet) -> (B,Tp,Da) x2. sigma_1 = 0: log-probs need min_std > 0."""
        _check_inputs(self, cond, x_k, rows)
        assert k.shape == (x_k.shape[0],), f'k must be (B,) long in 1..{self.K}, got shape {tuple(k.shape)}'
        if k.device.type == 'cpu':       # the range check reads k: on a GPU that would sync every denoising step
            assert 1 <= int(k.min()) and int(k.max()) <= self.K, f'k must be (B,) long in 1..{self.K}'
        eps_hat = self.eps_net(x_k, k, cond, rows)
        ab = self._at('alpha_bar', k)
        x0_hat = ((x_k - (1 - ab).sqrt() * eps_hat) / ab.sqrt()).clamp(-1, 1)   # denoised estimate, in [-1,1]
        mean, std = self.q_posterior(x0_hat, x_k, k)
        return mean, std.clamp(min=min_std)

    @torch.no_grad()
    def sample(self, cond, sampler='explore', min_std=0.1, noise_clip=3.0, ft_policy=None, K_ft=0,
               generator=None):
        """Denoising chain of Eq. 1: cond (B,F) -> chain (B, K+1, Tp, Da), chain[:, i] = x^{K-i}. Steps k <= K_ft use
        ft_policy (DiWA fine-tunes only the last K'). sampler: 'explore' (fine-tuning, as DPPO: std >= min_std, noise
        clipped to +-noise_clip) or an evaluation sampler (SAMPLERS). The final chunk is clipped to [-1, 1] (S.3.1; not
        in the paper or DPPO), its log-prob taken there (small bias). generator: on cond's device."""
        assert sampler in ('explore', *SAMPLERS), f'sampler must be explore or one of {SAMPLERS}, got {sampler!r}'
        _check_inputs(self, cond)
        assert K_ft == 0 or ft_policy is not None, f'K_ft={K_ft} > 0 needs ft_policy'
        assert 0 <= K_ft <= self.K, f'K_ft={K_ft} must be in 0..K={self.K}'
        B = cond.shape[0]
        x = torch.randn(B, self.Tp, self.Da, device=cond.device, generator=generator)   # x^K
        chain = [x]
        for k in range(self.K, 0, -1):
            pi = ft_policy if k <= K_ft else self
            mean, std = pi.step_mean_std(x, torch.full((B,), k, device=cond.device), cond,
                                         min_std=DDPM_EVAL_MIN_STD if sampler == 'ddpm' else min_std)
            if sampler == 'mean' or (sampler == 'ddpm' and k == 1):
                x = mean
            else:
                noise = torch.randn(mean.shape, device=cond.device, generator=generator)
                x = mean + std * noise.clamp(-noise_clip, noise_clip)                    # Eq. 5
            chain.append(x.clamp(-1, 1) if k == 1 else x)
        return torch.stack(chain, dim=1)

    def transition_logprob(self, cond, x_k, x_km1, k, min_std=0.1):
        """log pi(x^{k-1} | z, x^k) of a flat batch of transitions (Eq. 5). (N,F),(N,Tp,Da)x2,(N,) -> (N,)"""
        mean, std = self.step_mean_std(x_k, k, cond, min_std=min_std)
        return gaussian_logprob(x_km1, mean, std)

    def chain_logprob(self, cond, chain, ks, min_std=0.1):
        """Log-probs of chosen transitions of sampled chains (PPO, Eq. 7, 9): cond (N,F), chain (N,K+1,Tp,Da), ks (N,)
        or (N,n) in 1..K -> [i(,j)] = log pi(x^{k-1} | z_i, x^k), k = ks[i(,j)], from chain[i] at K-k and K-k+1."""
        assert min_std > 0, 'log-probs need min_std > 0 (the k = 1 posterior std is 0)'
        assert chain.dim() == 4 and chain.shape[1] == self.K + 1, \
            f'chain must be (N, K+1={self.K + 1}, Tp, Da), got {tuple(chain.shape)}'
        ks = ks.to(chain.device).long()
        assert ks.shape[0] == chain.shape[0] and ks.dim() in (1, 2), 'ks must be (N,) or (N, n)'
        rows = torch.arange(chain.shape[0], device=chain.device)
        rows = rows[:, None].expand_as(ks).reshape(-1) if ks.dim() == 2 else rows    # flatten (N, n) -> N*n
        k = ks.reshape(-1)
        pos = self.K - k                                                              # index of x^k in chain
        lp = self.transition_logprob(cond[rows], chain[rows, pos], chain[rows, pos + 1], k, min_std)
        return lp.view(ks.shape)

    def bc_loss(self, x0, cond):
        """Behaviour cloning (Eq. 12): expert chunks' NLL, bounded by a sum over k of weighted ||eps - eps_theta||^2.
        As Ho et al. (DPPO, Diffusion Policy) we drop the weights, one k per sample. (B,Tp,Da), (B,F) -> scalar."""
        _check_inputs(self, cond, x0)
        k = torch.randint(1, self.K + 1, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(self.eps_net(self.q_sample(x0, k, eps), k, cond), eps)


# ---- The unimodal Gaussian policy (S.5.3): a "chain" with K = 1 ------------------------------------

class GaussianPolicy(nn.Module):
    """pi(a | z) = N(tanh(MLP(z)), diag(exp(log_std)^2)) over the chunk, learned state-independent log std. The
    diffusion interface with K = 1: chain (B, 2, Tp, Da), chain[:, 0] = zeros (dummy x^1), chain[:, 1] = chunk x^0."""
    LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0

    def __init__(self, cond_dim, cfg):
        super().__init__()
        self.cond_dim, self.cfg = cond_dim, cfg
        self.K, self.Tp, self.Da = 1, cfg.Tp, cfg.action_dim
        self.mean_net = ResidualMLP(cond_dim, cfg.Tp * cfg.action_dim, cfg.mlp_dim, cfg.mlp_layers)
        self.log_std = nn.Parameter(torch.zeros(cfg.Tp, cfg.action_dim))

    def step_mean_std(self, x_k, k, cond, min_std=0., rows=None):
        """Same signature as DiffusionPolicy.step_mean_std; x_k and k are ignored. -> (B,Tp,Da) x2."""
        _check_inputs(self, cond, x_k, rows)
        mean = torch.tanh(self.mean_net(cond))                                     # bounded to [-1, 1]
        mean = (mean if rows is None else mean[rows]).view_as(x_k)
        std = self.log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp().clamp(min=min_std)
        return mean, std.expand_as(mean)

    @torch.no_grad()
    def sample(self, cond, sampler='explore', min_std=0.1, noise_clip=3.0, ft_policy=None, K_ft=0,
               generator=None):
        """cond (B,F) -> chain (B, 2, Tp, Da). K_ft >= 1 samples with ft_policy (the single step). Both evaluation
        samplers return the mean: the one step is k = 1."""
        _check_inputs(self, cond)
        assert K_ft in (0, 1) and (K_ft == 0 or ft_policy is not None), 'GaussianPolicy: K_ft must be 0 or 1'
        pi = ft_policy if K_ft == 1 else self
        x1 = torch.zeros(cond.shape[0], self.Tp, self.Da, device=cond.device)
        mean, std = pi.step_mean_std(x1, torch.ones(cond.shape[0], dtype=torch.long, device=cond.device),
                                     cond, min_std=min_std)
        if sampler != 'explore':
            x0 = mean
        else:
            noise = torch.randn(mean.shape, device=cond.device, generator=generator)
            x0 = mean + std * noise.clamp(-noise_clip, noise_clip)
        return torch.stack([x1, x0.clamp(-1, 1)], dim=1)

    def transition_logprob(self, cond, x_k, x_km1, k, min_std=0.1):
        mean, std = self.step_mean_std(x_k, k, cond, min_std=min_std)
        return gaussian_logprob(x_km1, mean, std)

    def chain_logprob(self, cond, chain, ks, min_std=0.1):
        """As DiffusionPolicy.chain_logprob with K = 1 (ks must be all ones)."""
        assert chain.dim() == 4 and chain.shape[1] == 2, f'chain must be (N, 2, Tp, Da), got {tuple(chain.shape)}'
        assert bool((ks == 1).all()), 'GaussianPolicy has a single step: ks must be 1'
        lp = self.transition_logprob(cond, chain[:, 0], chain[:, 1], torch.ones_like(chain[:, 0, 0, 0]).long(),
                                     min_std)
        return lp[:, None].expand(ks.shape) if ks.dim() == 2 else lp

    def bc_loss(self, x0, cond):
        """Maximum likelihood: negative log-likelihood per action dimension. (B,Tp,Da),(B,F) -> scalar."""
        _check_inputs(self, cond, x0)
        mean, std = self.step_mean_std(torch.zeros_like(x0), None, cond)
        return -gaussian_logprob(x0, mean, std).mean() / (self.Tp * self.Da)


def make_policy(cond_dim, cfg):
    """BCConfig.policy -> DiffusionPolicy or GaussianPolicy (rebuild from a checkpoint the same way)."""
    classes = {'diffusion': DiffusionPolicy, 'gaussian': GaussianPolicy}
    assert cfg.policy in classes, f"BCConfig.policy must be one of {list(classes)}, got '{cfg.policy}'"
    return classes[cfg.policy](cond_dim, cfg)


# ---- Training helpers: EMA, optimiser, schedule, one BC step ---------------------------------------

class EMA:
    """EMA of the policy weights (Tab. S.3; evaluate and fine-tune `ema.model`): every `every` update() calls
    theta_ema <- decay * theta_ema + (1 - decay) * theta from start_epoch on; before, a copy (so it starts trained)."""

    def __init__(self, model, decay=0.995, start_epoch=20, every=10):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.start_epoch, self.every, self.calls = decay, start_epoch, every, 0

    @torch.no_grad()
    def update(self, model, epoch):
        self.calls += 1
        if self.calls % self.every:
            return
        d = self.decay if epoch >= self.start_epoch else 0.0
        for p_ema, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if p_ema.dtype.is_floating_point:
                p_ema.mul_(d).add_(p.detach(), alpha=1 - d)
            else:
                p_ema.copy_(p)

    def state_dict(self):
        return {'model': self.model.state_dict(), 'calls': self.calls}

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd['model'])
        self.calls = sd['calls']


def make_optimizer(policy, cfg):
    """Adam with decoupled weight decay (AdamW; at 1e-6 the same as Adam + L2 for all practical purposes)."""
    return torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg, total_steps):
    """Cosine decay from cfg.lr to cfg.lr_final over total_steps calls of sched.step() (Tab. S.3)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=cfg.lr_final)


def make_ema(policy, cfg):
    return EMA(policy, cfg.ema_decay, cfg.ema_start_epoch, cfg.ema_every)


def update_bc(policy, opt, ema, batch, epoch=0, sched=None):
    """One BC step (Eq. 12) on {'actions': (B,Tp,Da) in [-1,1], 'cond': (B,F)}, then ema / sched (each optional)."""
    policy.train()
    loss = policy.bc_loss(batch['actions'], batch['cond'])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), float('inf'))
    opt.step()
    lr = opt.param_groups[0]['lr']
    if sched is not None:
        sched.step()
    if ema is not None:
        ema.update(policy, epoch)
    return {'bc_loss': loss.item(), 'grad_norm': grad_norm.item(), 'lr': lr}


# ---- The demonstrations in latent space (Alg. 1 line 2): expert windows filtered from their first frame ---
#   window      s ............ e  (first frame where the task's success test holds)  + post frames
#   feat        z_s ........... z_e ......... z_{e+P}            (W, T, F)
#   chunk       a_t..a_{t+3}    for t in [s, e]  (padded with the window's last action)  (W, T, Ta, 7)
#   success     test(start=s, now=t) for t in [s, e+P]                                     (W, T)

def demo_latents(wm, split: dict, task: str, n: int, seed: int, post: int, device, Ta: int = 4) -> dict:
    """Latents, action chunks and success labels of n expert windows of `task` drawn with `seed` (diagram above)."""
    win = data.expert_windows(split, task, n=n, seed=seed)                       # (W, 2) row windows
    rows, mask = data.window_rows(split['episodes'], win, post)                  # (W, T)
    feat = W.featurize_rows(wm, split, rows, device)                             # (W, T, F)
    # action chunks a_t .. a_{t+Ta-1}, never reading past the window's end (edge-padded)
    idx = np.minimum(rows[:, :, None] + np.arange(Ta), win[:, 1:2, None])       # (W, T, Ta)
    chunks = torch.as_tensor(split['rel_actions'][idx], dtype=torch.float32)      # (W, T, Ta, 7)
    in_window = torch.as_tensor(rows <= win[:, 1:2]) & torch.as_tensor(mask)     # (W, T) frames s..e
    start_scene = split['scene_obs'][win[:, 0]]
    success = np.array([[env.task_success(task, {'scene_obs': start_scene[w]}, {'scene_obs': split['scene_obs'][r]})
                         for r in rows[w]] for w in range(len(win))]) & mask
    return {'task': task, 'feat': feat, 'chunks': chunks, 'in_window': in_window, 'valid': torch.as_tensor(mask),
            'success': torch.as_tensor(success), 'windows': torch.as_tensor(win), 'start_rows': torch.as_tensor(win[:, 0])}


def load(path, task: str, feat_dim: int, device='cpu'):
    """A checkpoint's policy (bc: EMA weights, else fine-tuned), checked against the WM's feat_dim. -> (policy, ckpt)"""
    ckpt = data.load_checkpoint(path, None, task)
    cond_dim = ckpt['extra'].get('cond_dim')
    if cond_dim != feat_dim:
        raise data.DataError(f'{path}: policy conditioned on {cond_dim}-d latents, but the world model gives '
                             f'{feat_dim}-d features (checkpoints from different runs?)')
    cfg = data.config_from(BCConfig, ckpt['extra'].get('bc_config', ckpt['config']), path, 'bc')
    policy = make_policy(cond_dim, cfg).to(device)
    policy.load_state_dict(ckpt['ema']['model'] if ckpt['stage'] == 'bc' else ckpt['model'])
    return policy.eval().requires_grad_(False), ckpt
