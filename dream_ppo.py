"""DiWA fine-tuning: PPO inside the Dream Diffusion MDP (paper §III.D-E, S.2.4, Algorithm 1, Tab. S.5).

The pre-trained diffusion policy is fine-tuned *entirely in imagination*: episodes start from world-model states of
recorded frames, the frozen world model rolls them forward with its prior (Eq. 3), the latent classifier (reward.py)
gives the reward, and DPPO's two-layer MDP (denoising steps inside environment steps) makes every denoising step a
PPO policy step. No simulator here (`counters['sim_steps']` stays 0); with one (`real_rollout`) it is the DPPO baseline.

Dream Diffusion MDP (Eq. 4), K denoising steps per decision t, k runs K..1; only the last K' are fine-tuned (S.2.4):

    t(t,k) = tK + (K-k)          s = (z_t, a_t^k)   a = a_t^{k-1}   R = C(z_{t+1}) if k == 1 else 0

    decision t:  x^K ~ N(0,I) --pi_pre--> ... --pi_pre--> x^{K'} --actor--> ... --actor--> x^0 = chunk
                 |<------ K-K' frozen steps ------>|<--- K' fine-tuned steps --->|
                 chunk (Ta=4 actions) --4 x wm.img_step--> z_{t+1} --reward_clf--> R_t, done_t

Glossary (paper symbol -> variable -> shape):
    N parallel imagined episodes       cfg.n_envs            T decisions per iteration  cfg.n_steps
    K / K'                             K / K_ft (cfg.K_ft)   Ta x Da action chunk       (4, 7)
    z_t (feature cat(h, z))            feat                  (T, N, F)
    a_t^k chain, fine-tuned part       chain                 (T, N, K_ft+1, Ta, Da), chain[:, :, i] = x^{K_ft-i}
    R_{t(t,1)}                         rewards               (T, N)
    episode end after decision t       dones                 (T, N) bool
    V_nu(z_t)                          values                (T+1, N)
    A at k=1 (Eq. 15)                  adv                   (T, N)
    gamma_WM, gamma_denoise, lambda    gamma, gamma_denoise, gae_lambda
    epsilon per fine-tuned step        clip_schedule(...)    (K_ft,)
    alpha_BC                           alpha_bc_for(task, cfg)
Flattened PPO samples (decision x fine-tuned step) carry the prefix b_, minibatches mb_.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import data
from data import preprocess_obs
from diffusion_policy import gaussian_logprob
from env import near_rest, sample_task_start, task_possible, task_success


# ----------------------------------------------------------------------------- config
@dataclass
class FinetuneConfig:
    n_envs: int = 50  # parallel imagined episodes N of Alg. 1 (not in the paper; DPPO's robomimic runs use 50)
    n_steps: int = 36  # decisions per episode slot and iteration, x4 world-model steps (not in the paper)
    max_episode_steps: int = 18  # decisions per episode: 72 control steps, as in the evaluation (not in the paper)
    iterations: int = 800  # not in the paper: 800 x 50 x 36 x 4 = 5.8M imagined steps, about §IV.A's 5M
    K_ft: int = 10  # Tab. S.5 K': fine-tuned (last) denoising steps; the first K-K' use the frozen policy
    min_std: float = 0.1  # lower clip of the sampling std of every denoising step (not in the paper; DPPO's 0.1)
    noise_clip: float = 3.0  # clip of the sampling noise in std units (not in the paper; DPPO's 3)
    min_logprob_std: float = 0.1  # lower clip of the std in the PPO/BC log-probs (not in the paper; DPPO's 0.1)
    actor_lr: float = 1e-5  # Tab. S.5: learning rate of the fine-tuned policy
    critic_lr: float = 1e-3  # Tab. S.5: learning rate of the value function V_nu
    critic_hidden: int = 256  # Tab. S.5: width of the critic MLP (on the world-model feature)
    critic_layers: int = 3  # Tab. S.5: hidden layers of the critic MLP
    gamma: float = 0.999  # Tab. S.5 gamma_WM: discount between decisions (Eq. 15)
    gamma_denoise: float = 0.99  # Tab. S.5 gamma_DP, Eq. 8: advantage of step k scaled by gamma_denoise**k
    gae_lambda: float = 0.95  # Tab. S.5, Eq. 15: GAE lambda
    clip_min: float = 0.001  # PPO clip epsilon of the noisiest fine-tuned step (not in the paper; DPPO's value)
    clip_max: float = 0.01  # PPO clip epsilon of the last denoising step k=1 (not in the paper; DPPO's value)
    clip_rate: float = 3.0  # curvature of the exponential clip schedule (not in the paper; DPPO's value)
    update_epochs: int = 10  # passes over the iteration's samples (not in the paper; DPPO's robomimic value)
    batch_size: int = 7500  # Tab. S.5: PPO minibatch size (samples = decision x fine-tuned step)
    alpha_bc: float = -1.0  # Eq. 16 alpha_BC; negative = the per-task value of S.2.4 (default 0.05, Tab. S.5)
    reward_scaling: bool = True  # divide rewards by a running std of the discounted return (not in the paper; DPPO's)
    norm_adv: bool = True  # normalise advantages per minibatch (not in the paper; DPPO's default)
    max_grad_norm: float = 1.0  # actor/critic grad-norm clip: not in the paper or DPPO's defaults; bounds each step
    target_kl: float = 0.0  # stop the epochs early when approx-KL exceeds this; 0 = never (not in the paper)
    critic_warmup: int = 0  # first iterations update only the critic (not in the paper; a DPPO option)
    start_states: str = 'rest'  # Alg. 1's x_0: play frames near the rest pose where the task is possible, or 'any'
    reward: str = 'classifier'  # 'classifier' C(z_{t+1}) (§III.C) or 'decoder': task test on decoded scene (Fig. 2)
    reward_over_chunk: str = 'max'  # not in the paper (FINDINGS.md, "Fine-tuning settings that depart from the paper")
    success_threshold: float = 0.5  # not in the paper (FINDINGS.md, "Fine-tuning settings that depart from the paper")
    objective: str = 'probability'  # §III.C's; or 'binary', 'mixed' (FINDINGS.md, "The imagined objective")
    latent_sample: bool = True  # z_{t+1} ~ prior (Alg. 1) or its mode (FINDINGS.md, "The imagination gap")
    sim_workers: int = 2  # DPPO baseline only: simulator processes
    bf16: bool = False  # not in the paper: bfloat16 autocast of the PPO update (FINDINGS.md, "Speed on 2 cores")


PRESETS = {
    'paper': {},
    # cpu (2 cores, 512-d cpu world model): 50 x 18 decisions, 4 epochs = 20 gradient steps per iteration (paper: ~24),
    # ~2.7 s each; larger actor lr for ~5x fewer iterations; success_threshold: FINDINGS.md, "Fine-tuning settings...";
    # bf16: FINDINGS.md, "Speed on 2 cores"; objective 'binary' (the reference code's): the best mean real gain of the
    # three, measured (FINDINGS.md, "The imagined objective")
    'cpu': dict(n_steps=18, iterations=150, update_epochs=4, batch_size=1800, actor_lr=1e-4,
                critic_hidden=128, sim_workers=2, success_threshold=0.8, bf16=True, objective='binary'),
    'test': dict(n_envs=6, n_steps=5, max_episode_steps=3, iterations=2, K_ft=2, update_epochs=2,
                 batch_size=16, critic_hidden=32, critic_layers=2, actor_lr=1e-3, sim_workers=2),
}

ALPHA_BC = {'open_drawer': 0.10, 'close_drawer': 0.025, 'turn_on_led': 0.025}  # S.2.4; others: 0.05


def alpha_bc_for(task: str, cfg: FinetuneConfig | None = None) -> float:
    """alpha_BC of Eq. 16: cfg.alpha_bc when >= 0, else the per-task value of S.2.4 (default 0.05)."""
    if cfg is not None and cfg.alpha_bc >= 0:
        return cfg.alpha_bc
    return ALPHA_BC.get(task, 0.05)


def check_config(cfg: FinetuneConfig):
    """Each setting in its range (train.check_args runs this before any work starts)."""
    assert cfg.K_ft >= 1, f'K_ft must be >= 1, got {cfg.K_ft}'
    assert cfg.start_states in ('rest', 'any'), f"start_states must be 'rest' or 'any', got {cfg.start_states!r}"
    assert cfg.reward in ('classifier', 'decoder'), f"reward must be 'classifier' or 'decoder', got {cfg.reward!r}"
    assert cfg.objective in OBJECTIVES, f'objective must be one of {OBJECTIVES}, got {cfg.objective!r}'
    assert cfg.reward_over_chunk in ('max', 'last'), f"reward_over_chunk must be 'max' or 'last', got {cfg.reward_over_chunk!r}"
    assert 0 < cfg.clip_min <= cfg.clip_max, f'need 0 < clip_min <= clip_max, got {cfg.clip_min}, {cfg.clip_max}'


# ----------------------------------------------------------------------------- pure math
OBJECTIVES = ('probability', 'binary', 'mixed')


def episode_end(p, ep_len, cfg: FinetuneConfig):
    """The Dream MDP's reward and episode ends after a decision whose chunk scored p (N,), the episode's ep_len-th.
    -> reward, success (p > threshold), done (the episode ends: restart), terminal (ends with no future value).
      'probability' (§III.C): R = p; the episode runs to max_episode_steps, the threshold only counts successes.
      'binary' (the reference code): R = 1[p > threshold]; a success ends the episode, terminal.
      'mixed': R = p, and a success ends the episode: it pays for hovering just below the threshold (a success at
               decision 5 returns ~1-2, p = 0.79 for 18 decisions ~14); kept for comparison, timeouts terminal too.
    A timeout of 'probability' and 'binary' is a truncation: GAE bootstraps it with V of the state it stopped in."""
    success, timeout = p > cfg.success_threshold, ep_len >= cfg.max_episode_steps
    reward = success.float() if cfg.objective == 'binary' else p
    ends_at_success = success if cfg.objective != 'probability' else torch.zeros_like(success)
    done = ends_at_success | timeout
    return reward, success, done, ends_at_success | (timeout if cfg.objective == 'mixed' else torch.zeros_like(timeout))


def denoise_index(t, k, K: int):
    """Eq. 4: position t(t,k) = tK + (K-k) of denoising step k of decision t in the flattened MDP."""
    return t * K + (K - k)


def denoising_rewards(rewards: torch.Tensor, K: int) -> torch.Tensor:
    """Eq. 4: rewards (T,N) of the decisions -> (T*K, N) rewards of the Dream Diffusion MDP (R only at k=1)."""
    T, N = rewards.shape
    out = rewards.new_zeros(T * K, N)
    out[denoise_index(torch.arange(T), 1, K)] = rewards
    return out


def denoising_discount(k: torch.Tensor, gamma_denoise: float) -> torch.Tensor:
    """Eq. 8: advantage of step k = gamma_denoise**k * advantage at k=1 (DPPO: gamma**(k-1); we follow the paper)."""
    return gamma_denoise ** k.to(torch.float32)


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float,
        last_value: torch.Tensor | None = None, end_values: torch.Tensor | None = None):
    """Eq. 15, GAE at k=1 over decisions. rewards (T,N); values (T+1,N), or (T,N) plus last_value (N,); dones (T,N):
    episode ended after t; end_values (T,N): the value to bootstrap an ended episode with (V of the state a truncated
    one stopped in, 0 for a terminal end; None: all ends terminal). -> adv (T,N), value targets adv + V (T,N)."""
    T, N = rewards.shape
    if last_value is not None:
        values = torch.cat([values, last_value[None]], 0)
    assert values.shape == (T + 1, N), f'values must be (T+1,N)=({T + 1},{N}), got {tuple(values.shape)}'
    assert dones.shape == (T, N), f'dones must be (T,N)=({T},{N}), got {tuple(dones.shape)}'
    notdone = 1.0 - dones.float()
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        next_value = values[t + 1] * notdone[t] + (0.0 if end_values is None else end_values[t] * dones[t].float())
        delta = rewards[t] + gamma * next_value - values[t]  # delta_{t(t,1)}
        last = delta + gamma * lam * notdone[t] * last  # sum_l (gamma lam)^l delta_{t(t+l,1)}
        adv[t] = last
    return adv, adv + values[:-1]


def clip_schedule(K_ft: int, eps_min: float, eps_max: float, rate: float = 3.0) -> torch.Tensor:
    """PPO clip eps per fine-tuned step i = 0..K_ft-1 (k = K_ft..1): exponential from eps_min to eps_max, as DPPO."""
    if K_ft == 1:
        return torch.tensor([eps_max])
    x = torch.arange(K_ft, dtype=torch.float64) / (K_ft - 1)
    return (eps_min + (eps_max - eps_min) * (torch.exp(rate * x) - 1) / (math.exp(rate) - 1)).float()


def ppo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip):
    """Eq. 7 loss: -mean(min(rho A, clip(rho, 1-eps, 1+eps) A)), rho = pi_new/pi_old; clip float or (B,)."""
    logratio = logp_new - logp_old
    ratio = logratio.exp()
    loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()  # k3 estimator of KL(old || new)
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return loss, {'approx_kl': approx_kl.item(), 'clipfrac': clipfrac.item(), 'ratio': ratio.mean().item()}


def bc_loss(logp_actor_on_pre: torch.Tensor) -> torch.Tensor:
    """Eq. 9/16 BC regulariser, working form. As printed, Eq. 9 scores pi_old samples under the frozen pi_pre: no
    gradient w.r.t. theta. Like DPPO we instead maximise the fine-tuned policy's log-likelihood of pi_pre's chains
    (forward KL(pi_pre || pi_theta) up to a constant), for the fine-tuned steps k <= K'."""
    return -logp_actor_on_pre.mean()


def value_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """Eq. 17: (R_target - V_nu(z_t))^2 on GAE lambda-returns (Eq. 17's Monte-Carlo sum is lambda=1), as DPPO/PPO."""
    return ((returns - values) ** 2).mean()


class RunningRewardScaler:
    """Divide rewards by the running std of the discounted return (not in the paper; DPPO's reward_scale_running).
    Each call's return starts at 0 (a fresh rollout); the statistics persist (exact parallel-variance merge)."""

    def __init__(self, gamma: float, eps: float = 1e-8):
        self.gamma, self.eps = gamma, eps
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def __call__(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        T, N = rewards.shape
        ret = torch.zeros(N, dtype=torch.float64)
        rets = []
        for t in range(T):
            ret = ret * self.gamma + rewards[t].double().cpu()  # discounted return so far
            rets.append(ret)
            ret = ret * (1.0 - dones[t].double().cpu())
        x = torch.stack(rets).flatten()
        m, v, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        tot = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / tot) / tot
        self.mean, self.count = self.mean + delta * n / tot, tot
        return rewards / math.sqrt(self.var + self.eps)

    def state_dict(self):
        return {'mean': self.mean, 'var': self.var, 'count': self.count}

    def load_state_dict(self, d):
        self.mean, self.var, self.count = d['mean'], d['var'], d['count']


# ----------------------------------------------------------------------------- networks
class Critic(nn.Module):
    """V_nu(z_t): MLP on the feature cat(h, z) of decision t, the policy's input (Tab. S.5: 3 x 256)."""

    def __init__(self, feat_dim: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        dims = [feat_dim] + [hidden] * layers
        mods = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.Mish()]
        self.net = nn.Sequential(*mods, nn.Linear(dims[-1], 1))

    def forward(self, feat):  # (B,F) -> (B,)
        return self.net(feat).squeeze(-1)


def policy_K(policy) -> int:
    """Number of denoising steps K of a DiffusionPolicy (K=1 for GaussianPolicy)."""
    for obj in (policy, getattr(policy, 'cfg', None)):
        if obj is not None and isinstance(getattr(obj, 'K', None), int):
            return obj.K
    raise AttributeError(f'{type(policy).__name__} has neither .K nor .cfg.K: cannot tell its denoising steps')


def make_actor(policy_pre: nn.Module) -> nn.Module:
    """Freeze the pre-trained policy (pi_pre) and return the trainable copy pi_theta (Alg. 1 line 3)."""
    actor = copy.deepcopy(policy_pre).train()
    policy_pre.eval().requires_grad_(False)
    return actor.requires_grad_(True)


def make_critic(feat_dim: int, cfg: FinetuneConfig) -> Critic:
    return Critic(feat_dim, cfg.critic_hidden, cfg.critic_layers)


def make_optimizers(actor, critic, cfg: FinetuneConfig) -> dict:
    return {'actor': torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr),
            'critic': torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)}


def step_logprob(policy, x_k, x_prev, k, cond, min_std: float, rows=None) -> torch.Tensor:
    """log pi(x^{k-1} | x^k, z, k) of one denoising step (Eq. 5), (B,), *averaged* over the Ta x Da
    action entries as in DPPO: DPPO's clip range 0.001-0.01 (clip_min, clip_max) is tuned for that scale.
    rows (B,): cond is one latent per decision (D,F), sample i's is cond[rows[i]] (EpsNet.forward)."""
    mean, std = policy.step_mean_std(x_k, k, cond, min_std=min_std, rows=rows)
    return gaussian_logprob(x_prev, mean, std) / x_prev[0].numel()


def _actor_logprob(actor, cfg: FinetuneConfig, x_k, x_prev, k, feat, rows) -> torch.Tensor:
    """step_logprob in the update's precision (cfg.bf16): old and new log-probs alike, so that ratios start at 1."""
    with torch.autocast(feat.device.type, torch.bfloat16, enabled=cfg.bf16):
        return step_logprob(actor, x_k, x_prev, k, feat, cfg.min_logprob_std, rows).float()


def chain_transitions(chain: torch.Tensor):
    """Fine-tuned chain (B, K_ft+1, Ta, Da) -> flat transitions x^k (B*K_ft,..), x^{k-1}, k, step index i, row."""
    B, L = chain.shape[:2]
    K_ft = L - 1
    row = torch.arange(B, device=chain.device).repeat_interleave(K_ft)  # decision of each sample
    i = torch.arange(K_ft, device=chain.device).repeat(B)  # position in the fine-tuned chain
    return chain[row, i], chain[row, i + 1], K_ft - i, i, row


# ----------------------------------------------------------------------------- imagined rollout (Alg. 1 l. 8-26)
def encode_start_pool(wm, batch: dict) -> dict:
    """Imagined starts: last posterior states {'h': (B,deter), 'z': (B,Z)[, 'target' (B,3)]} of (B,T) sequences."""
    with torch.no_grad():
        post, _ = wm.observe(batch, sample=False)
    return wm.last_state(post)


STATE_KEYS = ('h', 'z', 'target')   # what a world-model state may carry from step to step (wm.state_keys)


def _sample_starts(pool: dict, n: int, generator) -> dict:
    assert isinstance(pool, dict) and {'h', 'z'} <= set(pool) and len(pool['h']) == len(pool['z']) > 0, \
        "start_pool must be a non-empty dict {'h': (P,deter), 'z': (P,Z)} (see encode_start_pool)"
    idx = torch.randint(pool['h'].shape[0], (n,), generator=generator, device=pool['h'].device)
    return {key: pool[key][idx] for key in STATE_KEYS if key in pool}


def _where_state(mask: torch.Tensor, a: dict, b: dict) -> dict:
    return {key: torch.where(mask[:, None], a[key], b[key]) for key in STATE_KEYS if key in a}


def execute_chunk(chunk: torch.Tensor) -> torch.Tensor:
    """Chunk x^0 (B,Ta,Da) in [-1,1] -> executed actions: gripper thresholded at 0 to +-1 (S.3.1)."""
    grip = torch.where(chunk[..., -1:] >= 0, 1.0, -1.0)
    return torch.cat([chunk[..., :-1], grip], -1)


def action_horizon(policy) -> int:
    """Ta: actions of the predicted chunk that are executed (Tab. S.3: Ta = Tp = 4)."""
    return getattr(getattr(policy, 'cfg', None), 'Ta', None) or policy.Tp


def _sample_chain(policy_pre, actor, feat, cfg, generator):
    K = policy_K(policy_pre)
    K_ft = min(cfg.K_ft, K)
    chain = policy_pre.sample(feat, min_std=cfg.min_std, noise_clip=cfg.noise_clip, ft_policy=actor,
                              K_ft=K_ft, generator=generator)  # (N, K+1, Ta, Da)
    assert chain.shape[1] == K + 1, f'policy.sample returned {chain.shape[1]} chain entries, expected K+1={K + 1}'
    return chain[:, K - K_ft:]  # fine-tuned part: x^{K_ft} .. x^0


def imagine_chunk(wm, state: dict, actions: torch.Tensor, reward_clf, cfg: FinetuneConfig, start_feat=None):
    """Run a chunk (N, Ta, Da) through Ta prior steps (Eq. 3; mode z unless cfg.latent_sample), scoring each new
    latent (§III.C; vs start_feat: Fig. 2). -> (state after it, p (N,): success prob., max over the chunk or last)."""
    probs = []
    for j in range(actions.shape[1]):
        state = wm.img_step(state, actions[:, j], sample=cfg.latent_sample)
        f_next = wm.feature(state)
        probs.append(reward_clf.success_prob(f_next) if start_feat is None else reward_clf.success_prob(f_next, start_feat))
    probs = torch.stack(probs, 1)  # (N, Ta)
    return state, (probs.max(1).values if cfg.reward_over_chunk == 'max' else probs[:, -1])


@torch.no_grad()
def imagine_rollout(wm, policy_pre, actor, critic, reward_clf, start_pool: dict, cfg: FinetuneConfig,
                    generator: torch.Generator | None = None) -> dict:
    """N imagined episodes, T decisions (Alg. 1 l. 8-26), from start_pool; an ended one restarts from a fresh draw."""
    check_config(cfg)
    N, T = cfg.n_envs, cfg.n_steps
    state = _sample_starts(start_pool, N, generator)
    relative = getattr(reward_clf, 'relative', False)  # reward vs z_0 (Fig. 2 decoder reward, start_conditioned)
    start_feat = wm.feature(state) if relative else None
    ep_len = torch.zeros(N, dtype=torch.long, device=state['h'].device)
    ep_succ = torch.zeros(N, dtype=torch.bool, device=ep_len.device)       # a success so far in the episode
    feats, chains, rewards, dones, succs, values, ends = [], [], [], [], [], [], []
    for t in range(T):
        feat = wm.feature(state)  # z_t: (N, F)
        chain = _sample_chain(policy_pre, actor, feat, cfg, generator)  # (N, K_ft+1, Ta, Da)
        actions = execute_chunk(chain[:, -1, :action_horizon(policy_pre)])  # (N, Ta, Da)
        state, p = imagine_chunk(wm, state, actions, reward_clf, cfg, start_feat)
        ep_len += 1
        reward, success, done, terminal = episode_end(p, ep_len, cfg)      # R = C(z_{t+1}) (paper: probability)
        ep_succ |= success
        feats.append(feat), chains.append(chain), rewards.append(reward), dones.append(done)
        succs.append(ep_succ & done), values.append(critic(feat))          # an ended episode's success
        ends.append(torch.where(done & ~terminal, critic(wm.feature(state)), 0.0))   # truncated: V(z_{t+1})
        ep_succ = ep_succ & ~done
        fresh = _sample_starts(start_pool, N, generator)
        state = _where_state(done, fresh, state)  # restart ended episodes
        if relative:
            start_feat = torch.where(done[:, None], wm.feature(fresh), start_feat)
        ep_len = ep_len * (~done)
    values.append(critic(wm.feature(state)))  # bootstrap V(z_T)
    return {'feat': torch.stack(feats), 'chain': torch.stack(chains), 'rewards': torch.stack(rewards),
            'dones': torch.stack(dones), 'successes': torch.stack(succs), 'values': torch.stack(values),
            'end_values': torch.stack(ends), 'imagined_steps': T * N * actions.shape[1], 'sim_steps': 0}


# ----------------------------------------------------------------------------- PPO update (Alg. 1 l. 27-35)
def update(actor, critic, policy_pre, buffer: dict, opts: dict, cfg: FinetuneConfig, alpha_bc: float,
           train_actor: bool = True, generator: torch.Generator | None = None) -> dict:
    """GAE at k=1, then update_epochs passes of minibatches of (decision x fine-tuned step) samples: BC-regularised
    clipped PPO loss (Eq. 7-9, 16) and value loss (Eq. 17). buffer['rewards'] are already scaled. -> float metrics."""
    T, N = buffer['rewards'].shape
    F = buffer['feat'].shape[-1]
    adv, returns = gae(buffer['rewards'], buffer['values'], buffer['dones'], cfg.gamma, cfg.gae_lambda,
                       end_values=buffer.get('end_values'))
    feat = buffer['feat'].reshape(T * N, F)
    chain = buffer['chain'].reshape(T * N, *buffer['chain'].shape[2:])
    K_ft = chain.shape[1] - 1
    K = policy_K(actor)
    b_x_k, b_x_prev, b_k, b_i, b_row = chain_transitions(chain)  # M = T*N*K_ft samples
    M, Bm = b_row.numel(), cfg.batch_size
    b_adv, b_ret = adv.reshape(-1)[b_row], returns.reshape(-1)[b_row]
    b_clip = clip_schedule(K_ft, cfg.clip_min, cfg.clip_max, cfg.clip_rate).to(feat.device)[b_i]
    # Gaussian policy (S.5.3, K=1): a single step, no denoising discount
    b_disc = denoising_discount(b_k, cfg.gamma_denoise) if K > 1 else torch.ones_like(b_adv)
    with torch.no_grad():
        b_logp_old = torch.cat([_actor_logprob(actor, cfg, b_x_k[s:s + Bm], b_x_prev[s:s + Bm], b_k[s:s + Bm],
                                               feat, b_row[s:s + Bm]) for s in range(0, M, Bm)])
        # BC targets, in the update's precision: one pi_pre chain per decision and iteration (DPPO: per minibatch)
        with torch.autocast(feat.device.type, torch.bfloat16, enabled=cfg.bf16):
            pre = torch.cat([policy_pre.sample(feat[s:s + Bm], min_std=cfg.min_std, noise_clip=cfg.noise_clip,
                                               generator=generator)[:, K - K_ft:] for s in range(0, T * N, Bm)])
        b_bc_x_k, b_bc_x_prev = pre[b_row, b_i], pre[b_row, b_i + 1]
    stats = {k: [] for k in ('policy', 'bc', 'value', 'approx_kl', 'clipfrac', 'ratio')}
    stopped = 0
    cpu_gen = generator if generator is not None and generator.device.type == 'cpu' else None
    for epoch in range(cfg.update_epochs):
        perm = torch.randperm(M, generator=cpu_gen).to(feat.device)
        for s in range(0, M, Bm):
            mb = perm[s:s + Bm]
            mb_row, mb_k = b_row[mb], b_k[mb]
            v_loss = value_loss(critic(feat)[mb_row], b_ret[mb])  # Eq. 17; V once per decision
            opts['critic'].zero_grad(set_to_none=True)
            v_loss.backward()
            nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
            opts['critic'].step()
            stats['value'].append(v_loss.item())
            if not train_actor:
                continue
            mb_adv = b_adv[mb]
            if cfg.norm_adv:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std(unbiased=False) + 1e-8)
            mb_adv = mb_adv * b_disc[mb]  # Eq. 8: A_{t(t,k)} = gamma_denoise^k A_{t(t,1)}
            # One actor pass scores the PPO samples and their BC twins (same decisions, same k): twice the batch
            logp = _actor_logprob(actor, cfg, torch.cat([b_x_k[mb], b_bc_x_k[mb]]),
                                  torch.cat([b_x_prev[mb], b_bc_x_prev[mb]]), mb_k.repeat(2), feat, mb_row.repeat(2))
            logp_new, logp_bc = logp.chunk(2)
            pg_loss, info = ppo_loss(logp_new, b_logp_old[mb], mb_adv, b_clip[mb])  # Eq. 7
            bc = bc_loss(logp_bc)
            loss = pg_loss + alpha_bc * bc  # Eq. 16
            opts['actor'].zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
            opts['actor'].step()
            stats['policy'].append(pg_loss.item()), stats['bc'].append(bc.item())
            for key in ('approx_kl', 'clipfrac', 'ratio'):
                stats[key].append(info[key])
        if train_actor and cfg.target_kl > 0 and np.mean(stats['approx_kl'][-math.ceil(M / Bm):]) > cfg.target_kl:
            stopped = 1
            break
    with torch.no_grad():
        v = buffer['values'][:-1].flatten()
        explained_var = 1 - (returns.flatten() - v).var() / (returns.flatten().var() + 1e-8)
    out = {f'losses/{k}': float(np.mean(v)) if v else 0.0 for k, v in stats.items()}
    out.update({'losses/explained_variance': explained_var.item(), 'losses/early_stop': stopped,
                'charts/samples': M * (epoch + 1), 'charts/alpha_bc': alpha_bc})
    return out


def rollout_metrics(buffer: dict) -> dict:
    """Success rate among the episodes that ended in the rollout, mean raw reward."""
    ended = buffer['dones'].sum().item()
    return {'charts/episodes': ended,
            'charts/success_rate': buffer['successes'].sum().item() / max(ended, 1),
            'charts/reward_mean': buffer['rewards_raw'].mean().item()}


def _finish_iteration(buffer, actor, critic, policy_pre, opts, scaler, task, cfg, counters, generator):
    buffer['rewards_raw'] = buffer['rewards']
    if scaler is not None and cfg.reward_scaling:
        buffer = dict(buffer, rewards=scaler(buffer['rewards'], buffer['dones']))
    train_actor = counters['iteration'] >= cfg.critic_warmup
    metrics = update(actor, critic, policy_pre, buffer, opts, cfg, alpha_bc_for(task, cfg), train_actor, generator)
    counters['iteration'] += 1
    counters['imagined_steps'] += buffer['imagined_steps']
    counters['sim_steps'] += buffer['sim_steps']
    metrics.update(rollout_metrics(buffer))
    metrics.update({f'charts/{k}': v for k, v in counters.items()})
    return metrics


def new_counters() -> dict:
    return {'iteration': 0, 'imagined_steps': 0, 'sim_steps': 0}


def iteration(wm, policy_pre, actor, critic, reward_clf, opts: dict, scaler: RunningRewardScaler | None,
              start_pool: dict, task: str, cfg: FinetuneConfig, counters: dict,
              generator: torch.Generator | None = None) -> dict:
    """One DiWA iteration (Alg. 1 l. 6-36): imagined rollout + PPO update; counts world-model steps in counters."""
    buffer = imagine_rollout(wm, policy_pre, actor, critic, reward_clf, start_pool, cfg, generator)
    return _finish_iteration(buffer, actor, critic, policy_pre, opts, scaler, task, cfg, counters, generator)


# ----------------------------------------------------------------------------- DPPO baseline: the simulator instead
def _info(obs: dict) -> dict:
    """The part of the simulator's info dict that the success tests read."""
    return {'robot_obs': obs['robot_obs'].copy(), 'scene_obs': obs['scene_obs'].copy()}


@torch.no_grad()
def real_rollout(sims, wm, policy_pre, actor, critic, task: str, cfg: FinetuneConfig,
                 rng: np.random.Generator, generator: torch.Generator | None = None, device='cpu',
                 starts: list | None = None) -> dict:
    """DPPO baseline: decisions run in the simulator (wm.obs_step filters, its success test rewards 1 and ends the
    episode, a timeout is a truncation as in DPPO, every step counts) -> imagine_rollout's buffer. starts: start states
    drawn with rng (default env.sample_task_start)."""
    check_config(cfg)
    N, T, S = cfg.n_envs, cfg.n_steps, wm.cfg.image_size
    Da = 7

    def start(ids):
        obs = sims.reset([sample_task_start(task, rng) if starts is None else starts[rng.integers(len(starts))]
                          for _ in ids], ids=ids)
        infos = [_info(o) for o in obs]
        post, _ = wm.obs_step(wm.initial(len(ids)), torch.zeros(len(ids), Da, device=device),
                              preprocess_obs(obs, S, device), sample=False)  # mode, as featurize for BC
        return {k: post[k] for k in wm.state_keys}, infos

    state, start_info = start(list(range(N)))
    ep_len = torch.zeros(N, dtype=torch.long, device=device)
    feats, chains, rewards, dones, values, ends = [], [], [], [], [], []
    for t in range(T):
        feat = wm.feature(state)
        chain = _sample_chain(policy_pre, actor, feat, cfg, generator)
        actions = execute_chunk(chain[:, -1, :action_horizon(policy_pre)])
        success = torch.zeros(N, dtype=torch.bool, device=device)
        for j in range(actions.shape[1]):
            obs = sims.step(actions[:, j].cpu().numpy())
            infos = [_info(o) for o in obs]
            post, _ = wm.obs_step(state, actions[:, j], preprocess_obs(obs, S, device), sample=False)
            state = {k: post[k] for k in wm.state_keys}
            success |= torch.tensor([task in o['completed'] if 'completed' in o else task_success(task, s, i)
                                     for o, s, i in zip(obs, start_info, infos)], device=device)   # calvin: its oracle
        ep_len += 1
        done = success | (ep_len >= cfg.max_episode_steps)
        feats.append(feat), chains.append(chain), rewards.append(success.float()), dones.append(done)
        values.append(critic(feat))
        ends.append(torch.where(done & ~success, critic(wm.feature(state)), 0.0))   # a timeout is a truncation
        ids = done.nonzero().flatten().tolist()
        if ids:
            new_state, new_info = start(ids)
            for key in wm.state_keys:
                state[key] = state[key].clone()
                state[key][ids] = new_state[key]  # restart ended episodes
            for g, info in zip(ids, new_info):
                start_info[g] = info
        ep_len = ep_len * (~done)
    values.append(critic(wm.feature(state)))
    rewards = torch.stack(rewards)
    return {'feat': torch.stack(feats), 'chain': torch.stack(chains), 'rewards': rewards,
            'dones': torch.stack(dones), 'successes': rewards.bool(), 'values': torch.stack(values),
            'end_values': torch.stack(ends), 'imagined_steps': 0, 'sim_steps': T * N * actions.shape[1]}


def dppo_iteration(sims, wm, policy_pre, actor, critic, opts: dict, scaler, task: str,
                   cfg: FinetuneConfig, counters: dict, rng: np.random.Generator,
                   generator: torch.Generator | None = None, device='cpu', starts: list | None = None) -> dict:
    """One DPPO-baseline iteration: simulator rollout + the same update; counts simulator steps."""
    buffer = real_rollout(sims, wm, policy_pre, actor, critic, task, cfg, rng, generator, device, starts)
    return _finish_iteration(buffer, actor, critic, policy_pre, opts, scaler, task, cfg, counters, generator)


# ---- Around the loop: where imagined episodes start, the fine-tuned actor of a checkpoint, the loop's state ---

@torch.no_grad()
def start_pool(wm, split: dict, task: str, device, seed: int, n: int = 1024, where: str = 'rest') -> dict:
    """Alg. 1 l. 10's x_0: play frames where the task is possible (e.g. drawer closed for open_drawer) and, if where is
    'rest', the robot near its rest pose, as in the evaluation; each encoded alone from a fresh state, as eval does."""
    ok = np.array([task_possible(task, s) for s in split['scene_obs']], bool)
    if where == 'rest':
        rest = ok & near_rest(split['robot_obs'])
        if rest.sum() >= 64:
            ok = rest
        else:
            print(f'[finetune/{task}] only {rest.sum()} recorded frames near the rest pose where the task is '
                  'possible: starting imagined episodes from any such frame')
    possible = np.flatnonzero(ok)
    if len(possible) == 0:
        raise data.DataError(f'finetune/{task}: no recorded frame where the task is possible')
    rows = np.random.default_rng(seed).choice(possible, min(n, len(possible)), replace=False)[:, None]  # (n, 1)
    pool = []
    for i in range(0, len(rows), 256):
        batch = {k: split[k][rows[i:i + 256]] for k in data.SEQ_KEYS}
        pool.append(encode_start_pool(wm, data.to_torch(batch, device)))
    return {k: torch.cat([p[k] for p in pool]) for k in pool[0]}


def load_actor(ckpt: dict, policy_pre):
    """The fine-tuned copy pi_theta stored in a finetune / dppo checkpoint (same architecture as pi_pre)."""
    actor = copy.deepcopy(policy_pre)
    actor.load_state_dict(ckpt['model'])
    return actor.eval().requires_grad_(False)


class StateBox:
    """The loop's counters and torch.Generator behind the state_dict interface that train.train_loop saves."""

    def __init__(self, counters: dict, generator: torch.Generator):
        self.counters, self.generator = counters, generator

    def state_dict(self):
        return {'counters': dict(self.counters), 'generator': self.generator.get_state()}

    def load_state_dict(self, d):
        self.counters.update(d['counters'])
        self.generator.set_state(d['generator'])
