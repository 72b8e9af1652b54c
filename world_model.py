"""DiWA world model: a DreamerV2-style recurrent state-space model (RSSM) of the desk.

Paper: §III.A (Eq. 2-3), S.2.1 (Eq. 10-11, Tab. S.2), Fig. 2 (vision vs hybrid), Fig. S.7 (open loop). Trained
once on play data, then frozen: the policy and reward classifier read its features, fine-tuning imagines with it.

    x_t = (static image, gripper image, proprio [, scene])     frame t of a recorded sequence
    e_t = embed(x_t)                                            two CNNs -> linear fusion, proprio appended
    h_t = f(h_{t-1}, z_{t-1}, a_{t-1})                          GRU, deterministic path
    z_t ~ q(z_t | h_t, x_t)                                     Eq. 2, posterior (filtering)
    z^_t ~ p(z^_t | h_t)                                        Eq. 3, prior (imagination)
    feature s^_t = cat(h_t, z_t)                                what every later stage consumes

Glossary (paper symbol -> variable -> shape, B batch, T time, S = stoch, C = classes):
    h_t                -> h              (B, deter)          deterministic GRU state
    z_t                -> z              (B, S*C)            flattened one-hot sample of S categoricals
    q / p logits       -> logits         (B, S, C)           posterior / prior categorical logits
    s^_t = (h_t, z_t)  -> feat           (B, deter + S*C)    2048 at the paper preset
    a_{t-1}            -> prev_action    (B, 7)              actions[:, t-1]; zeros at a segment start
    (not in the paper) -> target         (B, 3)              with target_input: the controller's stored TCP target
    beta, delta, zeta  -> kl_scale, kl_balance, reset_prob   Tab. S.2

A batch (data.to_torch): 'rgb_static', 'rgb_gripper' (B,T,3,64,64) in [-1,1], 'proprio' (B,T,18), 'scene' (B,T,24)
raw scene_obs, 'actions' (B,T,7), 'is_first' (B,T), and 'target' (B,T,3) where recorded with absolute actions.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data


@dataclass
class WMConfig:
    image_size: int = 64        # side of the square camera images (S.4: 64x64)
    cnn_depth: int = 48         # channels of the first conv layer, doubled per layer (not in the paper; DreamerV2's 48)
    deter: int = 1024           # Tab. S.2: size of the deterministic GRU state h
    stoch: int = 32             # Tab. S.2: number of categorical latent variables in z
    classes: int = 32           # Tab. S.2: classes per categorical variable
    hidden: int = 1024          # width of the RSSM's MLP layers (not in the paper; DreamerV2's 1024)
    mlp_hidden: int = 400       # width of the proprio/scene MLPs (not in the paper; DreamerV2's 400)
    mlp_layers: int = 2         # hidden layers of the proprio/scene decoder MLPs (not in the paper)
    hybrid: bool = False        # Fig. 2 hybrid WM: also encode and decode the scene state (scene_obs)
    proprio_dim: int = 18       # proprioception size: TCP xyz, 6-D rotation (S.4), width, joints, gripper action
    proprio_scaled: bool = False  # not in the paper: a sharper proprio decoder (FINDINGS.md, "The imagination gap")
    proprio_pos_std: float = 0.01  # not in the paper: with proprio_scaled, the decoder's std of the gripper xyz (m)
    scene_dim: int = 24         # CALVIN scene_obs size
    action_dim: int = 7         # relative action size (S.3.1)
    target_input: bool = False  # not in the paper (FINDINGS.md, "The LED: does imagination know a press switched it?")
    kl_scale: float = 0.3       # Tab. S.2 beta: weight of the KL term of the ELBO (0.3 sim, 1.0 real)
    kl_balance: float = 0.8     # Tab. S.2 delta, Eq. 11: share of the KL gradient that trains the prior
    unimix: float = 0.0         # not in the paper: uniform share mixed into the categoricals (DreamerV3); 0 = off
    event_frac: float = 0.0  # not in the paper (FINDINGS.md, "The LED: does imagination know a press switched it?")
    reset_prob: float = 0.01    # Tab. S.2 zeta: per-step probability of resetting the RSSM state in training
    lr: float = 3e-4            # Tab. S.2: AdamW learning rate
    eps: float = 1e-5           # Tab. S.2: Adam epsilon
    weight_decay: float = 0.05  # Tab. S.2: decoupled weight decay
    grad_clip: float = 100.0    # Tab. S.2: gradient-norm clipping
    batch: int = 50             # Tab. S.2: sequences per batch
    seq_len: int = 50           # Tab. S.2: steps per sequence
    steps: int = 100_000        # gradient steps (not in the paper)
    bf16: bool = False          # not in the paper: bfloat16 autocast of the training step (FINDINGS.md, "Speed on 2 cores")


PRESETS = {
    'paper': {},
    # Same architecture for a CPU (feature 256 + 16*16 = 512; ~80 min / 10k steps, 2 cores); proprio_scaled: see below.
    'cpu': dict(cnn_depth=16, deter=256, stoch=16, classes=16, hidden=256, mlp_hidden=128,
                batch=8, seq_len=32, steps=10000, proprio_scaled=True),
    'test': dict(cnn_depth=4, deter=32, stoch=4, classes=4, hidden=32, mlp_hidden=32,
                 batch=4, seq_len=8, steps=5),
}

# scene_obs -> ~[-1, 1]: joints by CALVIN's ranges, lights 0/1 -> -1/+1, block xyz (m) around the table, Euler by pi.
_JOINT_RANGE = [0.28, 0.22, 0.02, 0.088]                  # door, drawer, button, switch
_SCENE_OFFSET = [r / 2 for r in _JOINT_RANGE] + [0.5, 0.5] + [0.0, 0.0, 0.5, 0.0, 0.0, 0.0] * 3
_SCENE_SCALE = [r / 2 for r in _JOINT_RANGE] + [0.5, 0.5] + [0.3, 0.3, 0.3, math.pi, math.pi, math.pi] * 3

# proprio = [tcp xyz (m), rot6d, width (m), 7 joints (rad), grip +-1]. proprio_scaled: the encoder gets p scaled to
# ~[-1, 1], the decoder's std is _PROPRIO_STD, not 1: at unit variance a 2 cm gripper error costs 0.0004 nats vs ~150
# for the images, so nothing asks the latent for the centimetre a knob needs (FINDINGS.md, "The imagination gap").
_PROPRIO_OFFSET = [0.0, -0.13, 0.53] + [0.0, 1.0, 0.0, 1.0, 0.0, 0.0] + [0.04] + \
                  [0.03, -0.65, 1.02, 1.82, -1.98, -0.93, 1.77] + [0.0]
_PROPRIO_RANGE = [0.3, 0.2, 0.15] + [0.2] * 6 + [0.04] + [1.0] * 7 + [1.0]
_PROPRIO_STD = [0.01] * 3 + [0.02] * 6 + [0.005] + [0.1] * 7 + [0.2]   # [:3] is WMConfig.proprio_pos_std's default

# CALVIN's relative controller (env.DeskEnv.step; same numbers, tested; no simulator import): its target resets to the
# measured TCP. target_input feeds the GRU (target - _TARGET_OFFSET) / _TARGET_SCALE: 5 cm per unit keeps millimetres.
POS_SCALE = 0.02
WORKSPACE = ((-0.55, -0.65, 0.26), (0.55, 0.25, 0.80))
_TARGET_OFFSET, _TARGET_SCALE = _PROPRIO_OFFSET[:3], 0.05


def target_step(target, action):
    """Stored TCP target after one relative action: clip(target + POS_SCALE * a[:3]). (B,3) m, (B,7) -> (B,3)."""
    lo, hi = (torch.tensor(w, dtype=target.dtype, device=target.device) for w in WORKSPACE)
    return torch.minimum(torch.maximum(target + POS_SCALE * action[..., :3], lo), hi)


# ---- Categorical latents: straight-through samples and the balanced KL (pure functions) ------------

def mix_uniform(logits, unimix):
    """Logits of (1 - unimix) * softmax(logits) + unimix / C (keeps every class's probability > 0)."""
    if unimix <= 0:
        return logits
    probs = (1 - unimix) * logits.softmax(-1) + unimix / logits.shape[-1]
    return probs.log()


def shard_rand(shape, device, dtype=torch.float32, shard=(0, 1)):
    """U(0, 1) noise for this process's rows (dim 0) of a batch split over shard = (rank, world size) processes: each
    draws the whole batch's noise from the same random state and keeps its rows, so that data-parallel training
    (torchrun) draws what one process would draw for the whole batch."""
    rank, world = shard
    u = torch.rand((shape[0] * world, *shape[1:]), device=device, dtype=dtype)
    return u[rank * shape[0]:(rank + 1) * shape[0]]


def straight_through_sample(logits, sample=True, shard=(0, 1)):
    """One-hot sample (Gumbel-max, or argmax if not sample) of each categorical in logits (B, ..., S, C); backward:
    d onehot / d logits := d softmax / d logits (straight-through, Bengio et al. 2013; DreamerV2 §2)."""
    probs = logits.softmax(-1)
    if sample:  # Gumbel-max: argmax(logits + Gumbel noise) ~ Categorical(softmax(logits))
        u = shard_rand(logits.shape, logits.device, logits.dtype, shard).clamp_(1e-20, 1.0)
        index = (logits - torch.log(-torch.log(u))).argmax(-1)
    else:
        index = logits.argmax(-1)
    onehot = F.one_hot(index, logits.shape[-1]).to(logits.dtype)
    return onehot + (probs - probs.detach())  # exactly onehot in value


def kl_categorical(q_logits, p_logits):
    """KL(q || p) of S independent categoricals, logits (..., S, C) -> (...) summed over S."""
    log_q, log_p = q_logits.log_softmax(-1), p_logits.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum((-2, -1))


def kl_balance(post_logits, prior_logits, delta):
    """Eq. 11 as printed: delta * KL(q || sg(p)) + (1 - delta) * KL(sg(q) || p), shape (...).
    The value is always KL(q || p); delta only splits the gradient (1: only q learns, 0: only p). DreamerV2 and the
    DiWA/LUMOS code put Tab. S.2's 0.8 on the *prior* term, as the paper's prose says ("accelerates the prior's
    convergence toward the richer posterior"); printed Eq. 11 puts it on q, so loss_wm passes 1 - cfg.kl_balance."""
    post_term = kl_categorical(post_logits, prior_logits.detach())   # posterior regulariser
    prior_term = kl_categorical(post_logits.detach(), prior_logits)  # prior regulariser
    return delta * post_term + (1 - delta) * prior_term


# ---- Networks --------------------------------------------------------------------------------------

class CameraEncoder(nn.Module):
    """64x64 RGB -> 32*depth features: 4 convs (kernel 4, stride 2, ELU), 64 -> 31 -> 14 -> 6 -> 2."""

    def __init__(self, depth):
        super().__init__()
        chans = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2), nn.ELU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = 8 * depth * 2 * 2

    def forward(self, x):  # (N, 3, 64, 64) -> (N, 32*depth)
        return self.net(x).flatten(1)


class CameraDecoder(nn.Module):
    """feature -> 64x64 RGB mean: linear to (32*depth, 1, 1), 4 transposed convs 1 -> 5 -> 13 -> 30 -> 64."""

    def __init__(self, feat_dim, depth):
        super().__init__()
        self.fc = nn.Linear(feat_dim, 32 * depth)
        chans, kernels = [32 * depth, 4 * depth, 2 * depth, depth, 3], [5, 5, 6, 6]
        layers = []
        for i, k in enumerate(kernels):
            layers.append(nn.ConvTranspose2d(chans[i], chans[i + 1], k, stride=2))
            if i < len(kernels) - 1:
                layers.append(nn.ELU())
        self.net = nn.Sequential(*layers)

    def forward(self, feat):  # (N, F) -> (N, 3, 64, 64)
        return self.net(self.fc(feat)[:, :, None, None])


def mlp(in_dim, hidden, out_dim, layers):
    mods, d = [], in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ELU()]
        d = hidden
    return nn.Sequential(*mods, nn.Linear(d, out_dim))


class WorldModel(nn.Module):
    def __init__(self, cfg: WMConfig):
        super().__init__()
        if cfg.image_size != 64:
            raise ValueError(f'world_model: image_size={cfg.image_size}, the DreamerV2 conv stack needs 64 '
                             '(resize images to 64x64 first, paper S.4)')
        self.cfg, self.shard = cfg, (0, 1)      # shard: (rank, world size) when trained by several processes
        S, C, D, H = cfg.stoch, cfg.classes, cfg.deter, cfg.hidden
        self.feat_dim = D + S * C
        # Encoders: one CNN per camera, concatenated and fused by a linear layer (S.2.1); proprio appended.
        self.enc_static, self.enc_gripper = CameraEncoder(cfg.cnn_depth), CameraEncoder(cfg.cnn_depth)
        cnn_dim = self.enc_static.out_dim
        self.fuse = nn.Linear(2 * cnn_dim, cnn_dim)
        self.embed_dim = cnn_dim + cfg.proprio_dim
        if cfg.hybrid:  # Fig. 2 hybrid: the scaled scene state is encoded by an MLP and appended too
            self.enc_scene = mlp(cfg.scene_dim, cfg.mlp_hidden, cfg.mlp_hidden, 1)
            self.embed_dim += cfg.mlp_hidden
        # RSSM. Linears on concatenated inputs are split per input: action/observation parts run before the time loop.
        self.img_z = nn.Linear(S * C, H)                         # (z_{t-1}, a_{t-1}) -> GRU input
        self.img_a = nn.Linear(cfg.action_dim + (3 if cfg.target_input else 0), H, bias=False)
        self.img_norm = nn.LayerNorm(H)
        self.gru = nn.GRUCell(H, D)                              # h_t = f(h_{t-1}, z_{t-1}, a_{t-1})
        self.prior_net = nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H), nn.ELU(), nn.Linear(H, S * C))  # Eq. 3
        self.post_h = nn.Linear(D, H)                            # Eq. 2: q(z_t | h_t, e_t)
        self.post_e = nn.Linear(self.embed_dim, H, bias=False)
        self.post_out = nn.Sequential(nn.LayerNorm(H), nn.ELU(), nn.Linear(H, S * C))
        # Decoders p(x_t | s^_t): transposed CNN per camera, MLP for proprio (and scene when hybrid).
        self.dec_static = CameraDecoder(self.feat_dim, cfg.cnn_depth)
        self.dec_gripper = CameraDecoder(self.feat_dim, cfg.cnn_depth)
        self.dec_proprio = mlp(self.feat_dim, cfg.mlp_hidden, cfg.proprio_dim, cfg.mlp_layers)
        if cfg.hybrid:
            self.dec_scene = mlp(self.feat_dim, cfg.mlp_hidden, cfg.scene_dim, cfg.mlp_layers)
        self.register_buffer('scene_offset', torch.tensor(_SCENE_OFFSET), persistent=False)
        self.register_buffer('scene_scale', torch.tensor(_SCENE_SCALE), persistent=False)
        assert len(_SCENE_SCALE) == cfg.scene_dim, 'scene scaling is written for CALVIN scene_obs (24)'
        assert not cfg.proprio_scaled or cfg.proprio_dim == len(_PROPRIO_OFFSET), \
            'proprio scaling is written for data.robot_obs_to_proprio (18)'
        on, P = cfg.proprio_scaled, cfg.proprio_dim
        self.register_buffer('proprio_offset', torch.tensor(_PROPRIO_OFFSET) if on else torch.zeros(P), persistent=False)
        self.register_buffer('proprio_range', torch.tensor(_PROPRIO_RANGE) if on else torch.ones(P), persistent=False)
        std = torch.tensor(_PROPRIO_STD)
        std[:3] = cfg.proprio_pos_std                       # the gripper position's std (m)
        self.register_buffer('proprio_std', std if on else torch.ones(P), persistent=False)
        # Conv weights channels-last, oneDNN's own layout on a CPU: ~1.2x faster training (FINDINGS.md, "Speed on 2 cores")
        self.to(memory_format=torch.channels_last)

    # ---- small helpers ---------------------------------------------------------------------------
    def initial(self, B, device=None):
        """Zero state for B sequences (also the state after a reset)."""
        device = device or self.img_z.weight.device
        return {'h': torch.zeros(B, self.cfg.deter, device=device),
                'z': torch.zeros(B, self.cfg.stoch * self.cfg.classes, device=device)}

    @property
    def state_keys(self):
        """Entries of a recurrent state that carry over from step to step (the logits do not)."""
        return ('h', 'z', 'target') if self.cfg.target_input else ('h', 'z')

    def last_state(self, post):
        """observe's (B,T,...) output -> the state after its last step (B,...), to imagine on from."""
        return {k: post[k][:, -1].contiguous() for k in self.state_keys}

    def _action_input(self, action, target):
        """GRU action input: a_{t-1}, and with target_input the stored target once a_{t-1} is applied."""
        if not self.cfg.target_input:
            return action
        return torch.cat([action, (target - target.new_tensor(_TARGET_OFFSET)) / _TARGET_SCALE], -1)

    def feature(self, state):
        """s^_t = cat(h_t, z_t): (..., deter + S*C)."""
        return torch.cat([state['h'], state['z']], -1)

    def _logits(self, x):  # (..., S*C) -> (..., S, C), with the optional uniform mix
        return mix_uniform(x.unflatten(-1, (self.cfg.stoch, self.cfg.classes)), self.cfg.unimix)

    def scale_scene(self, scene):    # raw scene_obs -> roughly [-1, 1]
        return (scene - self.scene_offset) / self.scene_scale

    def unscale_scene(self, scaled):
        return scaled * self.scene_scale + self.scene_offset

    def embed(self, obs):
        """Observation dict with leading dims L (e.g. (B,T) or (B,)) -> embedding e (*L, embed_dim)."""
        for key in ['rgb_static', 'rgb_gripper', 'proprio'] + (['scene'] if self.cfg.hybrid else []):
            if key not in obs:
                raise KeyError(f"world_model: observation has no '{key}' (keys: {sorted(obs)})")
        img_s, img_g = obs['rgb_static'], obs['rgb_gripper']
        S = self.cfg.image_size
        if img_s.shape[-3:] != (3, S, S) or img_g.shape[-3:] != (3, S, S):
            raise ValueError(f'world_model: images must be (...,3,{S},{S}) float in [-1,1], got '
                             f'{tuple(img_s.shape)} and {tuple(img_g.shape)}')
        lead = img_s.shape[:-3]
        feats = torch.cat([self.enc_static(img_s.reshape(-1, 3, S, S)),
                           self.enc_gripper(img_g.reshape(-1, 3, S, S))], -1)
        parts = [self.fuse(feats).reshape(*lead, -1), (obs['proprio'] - self.proprio_offset) / self.proprio_range]
        if self.cfg.hybrid:
            parts.append(self.enc_scene(self.scale_scene(obs['scene'])))
        return torch.cat(parts, -1)

    def _gru_step(self, h, z, a_proj):
        """h_t = f(h_{t-1}, z_{t-1}, a_{t-1}); a_proj = img_a(a_{t-1}) (precomputed for whole sequences)."""
        return self.gru(F.elu(self.img_norm(self.img_z(z) + a_proj)), h)

    # ---- the RSSM -----------------------------------------------------------------------------------
    def img_step(self, state, action, sample=True, target=None):
        """Eq. 3, one imagination step: (h_{t-1}, z_{t-1}), a_{t-1} (B,7) -> prior state {'h','z','logits'}
        (+ 'target': with target_input, the stored target integrated by target_step unless given)."""
        out = {}
        if self.cfg.target_input:
            if target is None:
                if 'target' not in state:
                    raise KeyError("world_model: target_input needs state['target'] (the controller's stored TCP "
                                   "target): imagine from a filtered state (observe / obs_step)")
                target = target_step(state['target'], action)
            out['target'] = target
        h = self._gru_step(state['h'], state['z'], self.img_a(self._action_input(action, target)))
        logits = self._logits(self.prior_net(h))
        return {'h': h, 'z': straight_through_sample(logits, sample, self.shard).flatten(-2), 'logits': logits, **out}

    def obs_step(self, state, prev_action, obs_t, sample=True):
        """One online filtering step (eval, DPPO) -> (post, prior); obs_t dict of (B,...), 'is_first' (B,) resets first.
        With target_input a reset (or a state without 'target') takes the measured TCP as target, as the controller."""
        B = prev_action.shape[0]
        reset = obs_t['is_first'].bool() if 'is_first' in obs_t else \
            torch.zeros(B, dtype=torch.bool, device=prev_action.device)
        keep = (~reset).float()[:, None]
        state = {**state, 'h': state['h'] * keep, 'z': state['z'] * keep}
        prev_action = prev_action * keep
        target = None
        if self.cfg.target_input:
            tcp = obs_t['proprio'][:, :3]
            target = tcp if 'target' not in state else \
                torch.where(reset[:, None], tcp, target_step(state['target'], prev_action))
        prior = self.img_step(state, prev_action, sample, target=target)
        logits = self._logits(self.post_out(self.post_h(prior['h']) + self.post_e(self.embed(obs_t))))
        post = {**prior, 'z': straight_through_sample(logits, sample, self.shard).flatten(-2), 'logits': logits}
        return post, prior

    def observe(self, batch, state=None, sample=True):
        """Filter a batch of sequences (Eq. 2 at every step). Returns (post, prior), dicts of (B,T,...):
        'h' (B,T,deter), 'z' (B,T,S*C), 'logits' (B,T,S,C); prior['h'] is post['h'] (same GRU path)."""
        actions, is_first = batch['actions'], batch['is_first'].bool()
        B, T = actions.shape[:2]
        if state is None:
            state = self.initial(B, actions.device)
        # Everything that does not depend on the recurrence is computed for all (B,T) at once.
        E = self.post_e(self.embed(batch))                                    # (B,T,H)
        keep = (~is_first).float()[..., None]                                 # (B,T,1) 0 where reset
        prev_actions = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1) * keep
        if self.cfg.target_input and 'target' not in batch:
            raise KeyError("world_model: target_input needs batch['target'] (B,T,3), the stored TCP target at "
                           "each frame (data.to_torch)")
        A = self.img_a(self._action_input(prev_actions, batch.get('target')))  # (B,T,H)
        h, z = state['h'], state['z']
        hs, zs, logits_all = [], [], []
        for t in range(T):
            h, z = h * keep[:, t], z * keep[:, t]                             # reset at segment starts
            h = self._gru_step(h, z, A[:, t])
            logits = self._logits(self.post_out(self.post_h(h) + E[:, t]))   # Eq. 2
            z = straight_through_sample(logits, sample, self.shard).flatten(-2)
            hs.append(h), zs.append(z), logits_all.append(logits)
        h_seq = torch.stack(hs, 1)
        post = {'h': h_seq, 'z': torch.stack(zs, 1), 'logits': torch.stack(logits_all, 1)}
        prior_logits = self._logits(self.prior_net(h_seq))                    # Eq. 3, batched over (B,T)
        prior = {'h': h_seq, 'z': straight_through_sample(prior_logits, sample, self.shard).flatten(-2),
                 'logits': prior_logits}
        if self.cfg.target_input:
            post['target'] = prior['target'] = batch['target']
        return post, prior

    @torch.no_grad()
    def featurize(self, batch, sample=False):
        """Posterior features s^_t (B,T,feat_dim) of recorded sequences, no gradient (policy/reward input)."""
        post, _ = self.observe(batch, sample=sample)
        return self.feature(post)

    def decode(self, feat):
        """Means of p(x_t | s^_t): (..., F) -> 'rgb_*' (...,3,64,64), 'proprio' (...,18) [, raw 'scene' (...,24)]."""
        lead, flat = feat.shape[:-1], feat.reshape(-1, self.feat_dim)
        out = {'rgb_static': self.dec_static(flat), 'rgb_gripper': self.dec_gripper(flat),
               'proprio': self.dec_proprio(flat) * self.proprio_range + self.proprio_offset}
        if self.cfg.hybrid:
            out['scene'] = self.unscale_scene(self.dec_scene(flat))
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in out.items()}

    def decode_scene(self, feat):
        """Hybrid WM only: scene_obs (..., 24) decoded from features (latent-decoder reward, Fig. 2)."""
        if not self.cfg.hybrid:
            raise ValueError('world_model: decode_scene needs a hybrid world model (train with --hybrid)')
        return self.unscale_scene(self.dec_scene(feat))

    def forward(self, batch):           # what DistributedDataParallel wraps (update_wm)
        return loss_wm(self, batch)


# ---- Loss (Eq. 10), optimiser and one training step ------------------------------------------------

def loss_wm(wm, batch, sample=True):
    """Negative ELBO (Eq. 10): Gaussian NLL of every decoded modality (summed over its dims, up to a constant)
    + beta * balanced KL (Eq. 11), averaged over (B,T). -> (loss, dict of scalar tensors)."""
    cfg = wm.cfg
    post, prior = wm.observe(batch, sample=sample)
    dec = wm.decode(wm.feature(post))
    m = {'recon_static': 0.5 * (dec['rgb_static'] - batch['rgb_static']).square().sum((-3, -2, -1)).mean(),
         'recon_gripper': 0.5 * (dec['rgb_gripper'] - batch['rgb_gripper']).square().sum((-3, -2, -1)).mean(),
         'proprio': 0.5 * ((dec['proprio'] - batch['proprio']) / wm.proprio_std).square().sum(-1).mean()}
    if cfg.hybrid:  # compared in the scaled space, where all dims are O(1)
        err = wm.scale_scene(dec['scene']) - wm.scale_scene(batch['scene'])
        m['scene'] = 0.5 * err.square().sum(-1).mean()
    m['kl'] = kl_balance(post['logits'], prior['logits'], 1 - cfg.kl_balance).mean()
    loss = sum(v for k, v in m.items() if k != 'kl') + cfg.kl_scale * m['kl']  # Eq. 10
    m['loss'] = loss
    return loss, m


def make_optimizer(wm, cfg):
    """Tab. S.2: AdamW, lr 3e-4, eps 1e-5, decoupled weight decay 0.05."""
    return torch.optim.AdamW(wm.parameters(), lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=True)  # one fused kernel for all parameters: ~3x faster step on CPU


def data_parallel(wm, device):
    """Under torchrun (data.init_distributed): sets wm.shard = (rank, world size) and returns wm wrapped in
    DistributedDataParallel, which averages the gradients over the processes; None in a single process."""
    wm.shard = data.init_distributed(device)
    return torch.nn.parallel.DistributedDataParallel(wm) if wm.shard[1] > 1 else None


def update_wm(wm, opt, batch, ddp=None):
    """One gradient step on a batch (data.to_torch) -> float metrics (loss_wm's and grad_norm). ddp: wm wrapped in
    DistributedDataParallel (torchrun): gradients and metrics are averaged over the processes' equal batches."""
    wm.train()
    cfg = wm.cfg
    is_first = batch['is_first'].bool()
    # Tab. S.2 zeta: reset the recurrent state at random steps so the model learns to start from a zero state
    reset = shard_rand(is_first.shape, is_first.device, shard=wm.shard) < cfg.reset_prob
    with torch.autocast(is_first.device.type, torch.bfloat16, enabled=cfg.bf16):   # the loop's one precision switch
        loss, m = (ddp or wm)({**batch, 'is_first': is_first | reset})            # forward = loss_wm
    opt.zero_grad(set_to_none=True)
    loss.backward()                                                               # (ddp: all-reduces the gradients)
    m['grad_norm'] = torch.nn.utils.clip_grad_norm_(wm.parameters(), cfg.grad_clip)
    opt.step()
    names, values = list(m), torch.stack([m[k].detach().float() for k in m])
    if ddp is not None:
        torch.distributed.all_reduce(values)
        values /= wm.shard[1]
    return dict(zip(names, values.tolist()))  # the only sync point of the step


# ---- Read-outs used by the evaluation --------------------------------------------------------------

@torch.no_grad()
def open_loop_features(wm, batch, context=2, horizon=50, sample=False):
    """Filter the first `context` frames, then imagine `horizon` more along the recorded actions (frame t consumes
    actions[:, t-1]). -> (B, context + horizon, F): [:context] posterior, [context:] open-loop prior."""
    T = batch['actions'].shape[1]
    if not 1 <= context < T:
        raise ValueError(f'open_loop: need 1 <= context < T, got context={context}, T={T}')
    horizon = min(horizon, T - context)
    post, _ = wm.observe({k: v[:, :context] for k, v in batch.items()}, sample=sample)
    state = wm.last_state(post)
    feats = [wm.feature(post)]
    for t in range(context, context + horizon):
        state = wm.img_step(state, batch['actions'][:, t - 1], sample=sample)
        feats.append(wm.feature(state)[:, None])
    return torch.cat(feats, 1)


@torch.no_grad()
def open_loop(wm, batch, context=2, horizon=50, sample=False):
    """Fig. S.7: decoded open_loop_features ([:context] reconstructions, [context:] open-loop predictions)."""
    return wm.decode(open_loop_features(wm, batch, context, horizon, sample))


def warm_start(wm, state_dict) -> list:
    """Copy trained weights into `wm` for training with an added input: a weight whose input grew (img_a, target_input)
    gets zero columns, so `wm` starts out computing what the trained one did. -> grown names; other mismatches fail."""
    own, grown = wm.state_dict(), []
    missing = sorted(set(own) - set(state_dict))
    if missing or set(state_dict) - set(own):
        raise ValueError(f'world_model.warm_start: parameters differ: missing {missing}, '
                         f'unexpected {sorted(set(state_dict) - set(own))} (--wm.hybrid must match)')
    new = {}
    for k, v in state_dict.items():
        if v.shape == own[k].shape:
            new[k] = v
        elif v.dim() == 2 and v.shape[0] == own[k].shape[0] and v.shape[1] < own[k].shape[1]:
            new[k] = torch.cat([v, v.new_zeros(v.shape[0], own[k].shape[1] - v.shape[1])], 1)
            grown.append(k)
        else:
            raise ValueError(f'world_model.warm_start: {k} is {tuple(v.shape)} in the checkpoint, '
                             f'{tuple(own[k].shape)} here (sizes must match the preset)')
    wm.load_state_dict(new)
    return grown


def fit_linear_probe(feats, targets, ridge=1e-3):
    """Ridge least squares targets ~ feats @ W + b, (N,F), (N,D) -> W (F,D), b (D,): reads drawer, door, lights out
    of vision latents. Penalty ridge * N * |W|^2 (scale-free in N); data are centred, so b is not penalised."""
    if feats.ndim != 2 or targets.ndim != 2 or len(feats) != len(targets):
        raise ValueError(f'fit_linear_probe: want feats (N,F) and targets (N,D), got '
                         f'{tuple(feats.shape)} and {tuple(targets.shape)}')
    X, Y = feats.double(), targets.double()
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    A = Xc.T @ Xc + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    W = torch.linalg.solve(A, Xc.T @ Yc)
    b = y_mean - x_mean @ W
    return W.to(feats.dtype), b.to(feats.dtype)


def load(path, device='cpu'):
    """The frozen world model of a finished wm.pt -> (wm, ckpt)."""
    ckpt = data.load_checkpoint(path, 'wm')
    if not ckpt.get('done'):
        raise data.DataError(f"{path}: world model training is unfinished (step {ckpt['step']}); run --stage wm "
                             'to complete it')
    wm = WorldModel(data.config_from(WMConfig, ckpt['config'], path, 'wm')).to(device)
    wm.load_state_dict(ckpt['model'])
    return wm.eval().requires_grad_(False), ckpt


@torch.no_grad()
def featurize_rows(wm, split: dict, rows, device, chunk: int = 16, imagined: bool = False) -> torch.Tensor:
    """Features (W, T, F) of the frame sequences rows (W, T) of a split, each from a fresh state: posterior, or with
    imagined=True the prior (rows[w, 0] filtered, the rest imagined with sampled latents, as in the Dream MDP)."""
    feats = []
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        batch = {k: split[k][r] for k in data.SEQ_KEYS}
        batch['is_first'] = np.zeros(r.shape, bool)
        batch['is_first'][:, 0] = True
        batch = data.to_torch(batch, device)
        f = open_loop_features(wm, batch, 1, r.shape[1] - 1, sample=True) if imagined else wm.featurize(batch)
        feats.append(f.float().cpu())
    return torch.cat(feats)
