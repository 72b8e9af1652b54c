"""Tests for reward.py: NT-Xent against a naive double loop, the classifier on a separable toy problem."""
import math

import pytest
import torch

import reward as R  # noqa: E402

torch.set_num_threads(1)


def naive_nt_xent(emb, labels, tau):
    """Eq. 13 written out: mean over ordered positive pairs (i, j), i != j, same label."""
    B = len(emb)
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()
    total, pairs = 0.0, 0
    for i in range(B):
        denom = sum(math.exp(cos(emb[i], emb[k]) / tau) for k in range(B) if k != i)
        for j in range(B):
            if j != i and labels[j] == labels[i]:
                total += -math.log(math.exp(cos(emb[i], emb[j]) / tau) / denom)
                pairs += 1
    return total / pairs


@pytest.mark.parametrize('tau', [0.5, 0.1])
def test_nt_xent_matches_naive_loop(tau):
    torch.manual_seed(0)
    emb = torch.randn(9, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])        # unbalanced on purpose
    assert abs(R.nt_xent(emb, labels, tau).item() - naive_nt_xent(emb, labels, tau)) < 1e-9


def test_nt_xent_prefers_clustered_embeddings():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    clustered = torch.tensor([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 3) + 0.01 * torch.randn(6, 2)
    mixed = torch.tensor([[1.0, 0.0], [-1.0, 0.0]] * 3) + 0.01 * torch.randn(6, 2)
    assert R.nt_xent(clustered, labels, 0.5) < R.nt_xent(mixed, labels, 0.5) - 1.0
    # scale invariance (cosine similarity)
    assert torch.allclose(R.nt_xent(3 * clustered, labels), R.nt_xent(clustered, labels))


def test_nt_xent_gradient_finite_and_no_pairs_case():
    emb = torch.randn(4, 3, requires_grad=True)
    R.nt_xent(emb, torch.tensor([0, 1, 0, 1])).backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert R.nt_xent(torch.randn(2, 3), torch.tensor([0, 1])).item() == 0.0


def test_classifier_shapes_and_prob_is_softmax():
    cfg = R.RewardConfig(**R.PRESETS['test'])
    clf = R.RewardClassifier(10, cfg)
    feat = torch.randn(7, 10)
    logits = clf(feat)
    assert logits.shape == (7, 2)
    p = clf.success_prob(feat)
    assert p.shape == (7,) and torch.allclose(p, torch.softmax(logits, 1)[:, 1])
    assert ((p >= 0) & (p <= 1)).all()
    with pytest.raises(AssertionError, match='expects'):
        clf(torch.randn(3, 11))


def toy_reward_data(n, feat_dim=16, seed=0):
    """Separable toy problem: success iff a fixed linear projection of the latent is > 0.5."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(n, feat_dim, generator=g)
    w = torch.randn(feat_dim, generator=torch.Generator().manual_seed(99))
    return feat, (feat @ w / w.norm() > 0.5).long()


def test_classifier_learns_separable_toy_problem():
    torch.manual_seed(1)
    cfg = R.RewardConfig(**{**R.PRESETS['test'], 'batch': 32})
    clf = R.RewardClassifier(16, cfg)
    opt = R.make_optimizer(clf, cfg)
    feat, labels = toy_reward_data(1000)
    g = torch.Generator().manual_seed(0)
    first = None
    for step in range(400):
        idx = R.balanced_indices(labels, cfg.batch, g)
        assert labels[idx].sum() == cfg.batch // 2
        m = R.update_reward(clf, opt, feat[idx], labels[idx])
        first = first or m
    assert m['reward_loss'] < first['reward_loss'] - 0.3
    tf, tl = toy_reward_data(1000, seed=1)
    pr = R.precision_recall(clf, tf, tl)
    assert pr['accuracy'] > 0.9 and pr['precision'] > 0.75 and pr['recall'] > 0.85, pr


def test_start_conditioned_classifier_learns_a_relative_test():
    """RewardConfig.start_conditioned: C(z_t, z_t - z_0). Success = moved more than 0.5 along a direction from
    wherever the episode started, which z_t alone cannot tell (starts spread over [-1, 1]); with z_0 it can."""
    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        start = torch.randn(n, 8, generator=g)
        start[:, 0] = 2 * torch.rand(n, generator=g) - 1
        moved = torch.rand(n, generator=g)
        feat = start + 0.05 * torch.randn(n, 8, generator=g)
        feat[:, 0] = start[:, 0] + moved
        return feat, start, (moved > 0.5).long()
    accuracy = {}
    for conditioned in (False, True):
        torch.manual_seed(0)
        cfg = R.RewardConfig(**{**R.PRESETS['test'], 'batch': 32, 'start_conditioned': conditioned})
        clf = R.RewardClassifier(8, cfg)
        assert clf.relative == conditioned and clf.f_psi[0].in_features == (16 if conditioned else 8)
        opt, (feat, start, labels), g = R.make_optimizer(clf, cfg), data(2000, 0), torch.Generator().manual_seed(0)
        for _ in range(600):
            idx = R.balanced_indices(labels, cfg.batch, g)
            R.update_reward(clf, opt, feat[idx], labels[idx], start[idx] if conditioned else None)
        tf, ts, tl = data(2000, 1)
        accuracy[conditioned] = R.precision_recall(clf, tf, tl, start=ts if conditioned else None)['accuracy']
    assert accuracy[True] > 0.9 and accuracy[True] > accuracy[False] + 0.1, accuracy
    with pytest.raises(AssertionError, match='first latents'):
        clf.success_prob(tf)                                             # a start-conditioned one needs z_0


def test_precision_recall_by_hand():
    clf = R.RewardClassifier(1, R.RewardConfig(**R.PRESETS['test']))
    clf.success_prob = lambda feat: feat[:, 0]                # probability = the feature itself
    feat = torch.tensor([[0.9], [0.8], [0.2], [0.6], [0.1]])
    labels = torch.tensor([1, 0, 1, 1, 0])
    pr = R.precision_recall(clf, feat, labels)                # predicted: 1 1 0 1 0 -> tp 2, fp 1, fn 1
    assert pr['precision'] == pytest.approx(2 / 3) and pr['recall'] == pytest.approx(2 / 3)
    assert pr['accuracy'] == pytest.approx(3 / 5)


def test_presets_are_config_fields():
    fields = set(R.RewardConfig.__dataclass_fields__)
    for name, over in R.PRESETS.items():
        assert set(over) <= fields, f'preset {name} has unknown fields {set(over) - fields}'
    paper = R.RewardConfig()
    assert (paper.lr, paper.batch, paper.epochs, paper.tau) == (1e-6, 32, 100, 0.5)


def test_decoded_state_reward_needs_hybrid_and_tests_against_the_start():
    """Fig. 2's decoded-state reward: the task's success test between the scene decoded from the episode's first
    latent and from the current one; a vision world model (no scene decoder) is refused."""
    import world_model as W
    with pytest.raises(ValueError, match='hybrid'):
        R.DecodedStateReward(W.WorldModel(W.WMConfig(**W.PRESETS['test'])), 'open_drawer')
    wm = W.WorldModel(W.WMConfig(**{**W.PRESETS['test'], 'hybrid': True})).eval()
    r = R.DecodedStateReward(wm, 'open_drawer')
    feat = torch.randn(5, wm.feat_dim)
    assert r.relative and torch.equal(r.success_prob(feat, feat), torch.zeros(5))     # no change, no success
    wm.decode_scene = lambda f: f[:, :24]            # a known decoder: the first 24 features are the scene
    start, now = torch.zeros(4, wm.feat_dim), torch.zeros(4, wm.feat_dim)
    now[:, 1] = torch.tensor([0.05, 0.13, 0.2, -0.2])                # drawer moved by ...
    assert torch.equal(r.success_prob(now, start), torch.tensor([0., 1., 1., 0.]))
    assert torch.equal(r.success_prob(start, now), torch.tensor([0., 0., 0., 1.]))    # relative to the start
