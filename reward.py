"""Latent reward: a success classifier on world-model latents (DiWA §III.C, S.2.3, Eq. 13-14, Tab. S.4).

The play-trained world model has no reward head: per skill a classifier C_psi(z) learns from expert demo latents,
success frames positive, distant / unsuccessful ones negative. An imagined step's reward is the success *probability*
R_psi(z_t, a_t) := C_psi(z_{t+1}) in [0, 1] (§III.C); DiWA's code binarises it, here only `precision_recall` does.

    z (F) ─> f_psi: Linear 512, ReLU, Linear 512 ─> embedding e (512) ─> NT-Xent (Eq. 13)
                                                    └─> g_psi: Linear 512, ReLU, Linear 2 ─> logits ─> CE
    loss = NT-Xent + CE (Eq. 14)                reward = softmax(logits)[:, 1]

Not in the paper: with RewardConfig.imagined every training frame is added again as the world model imagines it open
loop from its sequence's first frame (imagined_samples times, latents sampled), with the recorded label: the policy is
only ever rewarded on such latents (FINDINGS.md, "The reward classifier"). With start_conditioned the classifier reads
C_psi(z_t, z_t - z_0), z_0 the episode's first latent: the success tests are relative to the start.

Neither class: the neg_margin demo frames (one action chunk) just before a window's first success, which look like
success to a latent classifier, and with drop_relapses the post-success frames where the test no longer holds
(episodes end at their first success, so such states are never judged). Play snippets add negatives (play_frac).

Glossary (paper symbol -> variable -> shape)
    z_t (WM latent)        feat      (B, F)
    f_psi(z)               emb       (B, E)    E = cfg.embed_dim
    g_psi(f_psi(z))        logits    (B, 2)    class 1 = success
    success label          labels    (B,) long in {0, 1}
    tau                    tau       float (0.5, Tab. S.4)
    C_psi(z) = R_psi       prob      (B,)
    z_0 (first latent)     start     (B, F)    read only with start_conditioned
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import env
import world_model as W


@dataclass
class RewardConfig:
    embed_dim: int = 512        # width of the embedding MLP f_psi, two layers (Tab. S.4: [512, 512])
    hidden: int = 512           # hidden width of the classification MLP g_psi, two layers (Tab. S.4)
    tau: float = 0.5            # NT-Xent temperature (Tab. S.4, Eq. 13)
    lr: float = 1e-6            # Adam learning rate (Tab. S.4)
    batch: int = 32             # batch size (Tab. S.4), half success / half not (not in the paper)
    epochs: int = 100           # training epochs (Tab. S.4)
    imagined: bool = False      # not in the paper: add imagined latents (FINDINGS.md, "The reward classifier")
    imagined_samples: int = 1   # not in the paper: imagined copies per frame (FINDINGS.md, "The reward classifier")
    neg_margin: int = 4         # frames just before the first success: neither class (Tab. S.4's "distant" negatives)
    play_frac: float = 0.125    # not in the paper: play negatives (FINDINGS.md, "The reward classifier")
    drop_relapses: bool = False  # post-success frames failing the test: neither class (a reading of Tab. S.4)
    start_conditioned: bool = False  # not in the paper: C_psi(z_t, z_t - z_0) (FINDINGS.md, "The reward classifier")


PRESETS = {
    # drop_relapses in every preset (its default False reproduces classifiers trained without it)
    'paper': {'drop_relapses': True},
    # cpu: lr 1e-6 barely moves a fresh MLP in the few thousand steps a small data set gives; 3e-4 trains it
    # in a minute or two on one core, batch 64 halves the steps; imagined: FINDINGS.md, "The reward classifier".
    'cpu': {'lr': 3e-4, 'batch': 64, 'epochs': 30, 'imagined': True, 'drop_relapses': True},
    'test': {'embed_dim': 32, 'hidden': 32, 'lr': 1e-3, 'batch': 16, 'epochs': 2, 'imagined': True,
             'drop_relapses': True},
}


def nt_xent(emb, labels, tau=0.5):
    """Eq. 13, supervised-contrastive reading. emb (B,E), labels (B,) -> scalar. For an anchor i and a positive j,
        l(i, j) = -log exp(sim_ij / tau) / sum_{k != i} exp(sim_ik / tau),   sim = cosine similarity,
    averaged over all ordered positive pairs. SimCLR's positives are two augmented views of one image; with no
    augmentations and Tab. S.4 naming success frames the positives, every same-label pair is positive (SupCon, Khosla
    et al. 2020, L_out); balanced batches make pair and anchor averages coincide. Eq. 13's indicator: k != i."""
    assert emb.dim() == 2 and labels.shape == (emb.shape[0],) and emb.shape[0] >= 2, \
        f'nt_xent needs emb (B>=2, E) and labels (B,), got {tuple(emb.shape)} and {tuple(labels.shape)}'
    z = F.normalize(emb, dim=1)
    sim = z @ z.t() / tau                                                   # (B, B) cosine / tau
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - sim.masked_fill(self_mask, float('-inf')).logsumexp(dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask                 # (B, B) positive pairs
    if not pos.any():
        return emb.sum() * 0.0                                              # all labels distinct: no pairs
    return -log_prob[pos].mean()


class RewardClassifier(nn.Module):
    def __init__(self, feat_dim, cfg):
        super().__init__()
        self.feat_dim, self.cfg = feat_dim, cfg
        # start_conditioned: dream_ppo passes the episode's first latent (as to DecodedStateReward)
        self.relative = bool(getattr(cfg, 'start_conditioned', False))
        in_dim = 2 * feat_dim if self.relative else feat_dim
        self.f_psi = nn.Sequential(nn.Linear(in_dim, cfg.embed_dim), nn.ReLU(),
                                   nn.Linear(cfg.embed_dim, cfg.embed_dim))
        self.g_psi = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 2))

    def embed(self, feat, start=None):
        """f_psi: (B, F) [and the episode's first latents (B, F) if start_conditioned] -> (B, E)."""
        assert feat.dim() == 2 and feat.shape[1] == self.feat_dim, \
            f'reward classifier expects (B, {self.feat_dim}) world-model latents, got {tuple(feat.shape)}'
        if self.relative:
            assert start is not None and start.shape == feat.shape, \
                f'a start-conditioned classifier needs the first latents z_0 {tuple(feat.shape)}, got ' \
                f'{None if start is None else tuple(start.shape)}'
            feat = torch.cat([feat, feat - start], 1)                       # (B, 2F): z_t and its change
        return self.f_psi(feat)

    def forward(self, feat, start=None):
        """(B, F) [, (B, F)] -> logits (B, 2); class 1 = success."""
        return self.g_psi(self.embed(feat, start))

    @torch.no_grad()
    def success_prob(self, feat, start=None):
        """The reward of §III.C / S.2.3: C_psi(z) = softmax(g_psi(f_psi(z)))[:, 1]. (B, F) [, start (B, F)] -> (B,)"""
        return self(feat, start).softmax(dim=1)[:, 1]


def reward_loss(clf, feat, labels, start=None):
    """Eq. 14: L_reward = L_NT-Xent + L_CE. -> (loss, dict of parts)."""
    emb = clf.embed(feat, start)
    logits = clf.g_psi(emb)
    l_con, l_ce = nt_xent(emb, labels, clf.cfg.tau), F.cross_entropy(logits, labels)
    acc = (logits.argmax(1) == labels).float().mean()
    return l_con + l_ce, {'nt_xent': l_con.item(), 'ce': l_ce.item(), 'acc': acc.item()}


def balanced_indices(labels, batch, generator=None):
    """Class-balanced minibatch (Tab. S.4): batch//2 success rows, the rest others, with replacement. -> (batch,)"""
    pos, neg = torch.nonzero(labels == 1)[:, 0], torch.nonzero(labels == 0)[:, 0]
    assert len(pos) and len(neg), f'need both classes, got {len(pos)} success and {len(neg)} other frames'
    half = batch // 2
    return torch.cat([pos[torch.randint(0, len(pos), (half,), generator=generator)],
                      neg[torch.randint(0, len(neg), (batch - half,), generator=generator)]])


def make_optimizer(clf, cfg):
    return torch.optim.Adam(clf.parameters(), lr=cfg.lr)


def update_reward(clf, opt, feat, labels, start=None):
    """One optimisation step on a (class-balanced) batch. feat (B,F), labels (B,) long [, start (B,F)] -> metrics."""
    assert labels.dtype == torch.long and bool(((labels == 0) | (labels == 1)).all()), \
        'labels must be a long tensor of 0 (not success) / 1 (success)'
    clf.train()
    loss, parts = reward_loss(clf, feat, labels, start)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {'reward_loss': loss.item(), **parts}


@torch.no_grad()
def precision_recall(clf, feat, labels, threshold=0.5, chunk=4096, start=None):
    """Evaluation only: success predicted where C_psi(z) >= threshold. -> precision, recall, accuracy, f1."""
    clf.eval()
    prob = torch.cat([clf.success_prob(feat[i:i + chunk]) if start is None else
                      clf.success_prob(feat[i:i + chunk], start[i:i + chunk]) for i in range(0, len(feat), chunk)])
    pred, true = prob >= threshold, labels.bool()
    tp, fp, fn = (pred & true).sum().item(), (pred & ~true).sum().item(), (~pred & true).sum().item()
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {'precision': precision, 'recall': recall, 'accuracy': (pred == true).float().mean().item(),
            'f1': 2 * precision * recall / max(precision + recall, 1e-12)}


class DecodedStateReward(nn.Module):
    """Fig. 2's third variant: no classifier; the task's success test (env.task_success_batch) between the scene states
    that the hybrid world model decodes from the episode's first and current latents (dream_ppo passes the first)."""
    relative = True

    def __init__(self, wm, task: str):
        super().__init__()
        if not getattr(wm.cfg, 'hybrid', False):
            raise ValueError('reward=decoder needs a hybrid world model (--wm.hybrid true): a vision model '
                             'has no scene decoder')
        self.wm, self.task = wm, task

    @torch.no_grad()
    def success_prob(self, feat, start_feat):  # (B, F), (B, F) -> (B,) in {0, 1}
        return env.task_success_batch(self.task, self.wm.decode_scene(start_feat), self.wm.decode_scene(feat)).float()


# ---- The classifier's data (Tab. S.4): labelled demo frames, play frames as 'distant/unsuccessful' negatives ---

def play_negatives(wm, split: dict, task: str, device, n_seq: int, seed: int, imagined: int = 0,
                   relative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of play frames where the task is still possible (not its success state) from 32-frame snippets, first
    8 frames context only; imagined=n adds them n times more, imagined from the snippet's first frame; relative=True
    instead takes every frame failing the test relative to it. -> (feat (N, F), start (N, F): the snippet's z_0)."""
    rng = np.random.default_rng(seed)
    starts = data.sample_sequences(split, n_seq, 32, rng)['rows'][:, 0]
    rows = starts[:, None] + np.arange(32)                                # (n_seq, 32)
    scene = split['scene_obs']
    if relative:
        keep = ~np.array([[env.task_success(task, {'scene_obs': scene[r[0]]}, {'scene_obs': scene[t]}) for t in r[8:]]
                          for r in rows], bool)
    else:
        keep = np.vectorize(lambda r: env.task_possible(task, scene[r]))(rows[:, 8:])
    keep = torch.as_tensor(keep)
    feats, firsts = [], []
    for i in range(1 + int(imagined)):                                    # recorded, then n imagined copies
        f = W.featurize_rows(wm, split, rows, device, imagined=i > 0)     # (n_seq, 32, F)
        feats.append(f[:, 8:][keep])
        firsts.append(f[:, :1].expand(-1, 24, -1)[keep])
    return torch.cat(feats), torch.cat(firsts)


def reward_dataset(wm, demos: dict, split: dict, task: str, device, post: int, seed: int, imagined: int = 0,
                   margin: int = 0, play_frac: float = 0.125, drop_relapses: bool = False,
                   relative: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feat (N, F), start (N, F), label (N,)): the frames of `demos` (diffusion_policy.demo_latents of `split`)
    labelled by the success test relative to the window start, with its window's z_0, plus play_negatives. imagined
    (copies per frame), margin, drop_relapses: see the module docstring; play_frac: play snippets per demo success."""
    success = demos['success']
    first = success.float().argmax(1, keepdim=True)                   # (W, 1) first success frame (window end)
    offset = torch.arange(success.shape[1])[None] - first             # (W, T) frames relative to it
    done = success.any(1, keepdim=True)                               # (W, 1) windows that reach success
    valid = demos['valid'] & ~((offset < 0) & (offset >= -margin) & done)
    if drop_relapses:
        valid &= ~((offset > 0) & ~success & done)

    def z0_of(f):                                                     # (W, T, F) -> each frame's z_0, (N, F)
        return f[:, :1].expand_as(f)[valid]

    feat, start, label = [demos['feat'][valid]], [z0_of(demos['feat'])], [demos['success'][valid].long()]
    if imagined:
        rows, _ = data.window_rows(split['episodes'], demos['windows'].numpy(), post)
        for _ in range(int(imagined)):
            f = W.featurize_rows(wm, split, rows, device, imagined=True)
            feat.append(f[valid]), start.append(z0_of(f)), label.append(label[0])
    n_seq = max(8, int(label[0].sum().item() * play_frac))
    neg, neg_start = play_negatives(wm, split, task, device, n_seq, seed, imagined=imagined, relative=relative)
    return (torch.cat(feat + [neg]), torch.cat(start + [neg_start]),
            torch.cat(label + [torch.zeros(len(neg), dtype=torch.long)]))


def load(path, task: str, feat_dim: int, device='cpu'):
    """The task's latent success classifier C_psi, checked against the world model's latent size."""
    ckpt = data.load_checkpoint(path, 'reward', task)
    if ckpt['extra'].get('feat_dim') != feat_dim:
        raise data.DataError(f"{path}: classifier of {ckpt['extra'].get('feat_dim')}-d latents, world model gives "
                             f'{feat_dim}-d')
    clf = RewardClassifier(feat_dim, data.config_from(RewardConfig, ckpt['config'], path, 'reward')).to(device)
    clf.load_state_dict(ckpt['model'])
    return clf.eval().requires_grad_(False), ckpt
