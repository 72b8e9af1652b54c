"""Tests of world_model.py: the KL/straight-through math against closed forms, RSSM shapes and resets,
online filtering vs batch filtering, checkpoint round trip, and a tiny learning run."""
import io
import math
from dataclasses import asdict

import pytest
import torch

from world_model import (PRESETS, WMConfig, WorldModel, fit_linear_probe, kl_balance, kl_categorical,  # noqa: E402
                         loss_wm, make_optimizer, open_loop, straight_through_sample, update_wm)


pytestmark = pytest.mark.usefixtures('one_thread')


def make_wm(**over):
    torch.manual_seed(0)
    return WorldModel(WMConfig(**{**PRESETS['test'], **over}))


def random_batch(B=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'rgb_static': torch.rand(B, T, 3, 64, 64, generator=g) * 2 - 1,
            'rgb_gripper': torch.rand(B, T, 3, 64, 64, generator=g) * 2 - 1,
            'proprio': torch.randn(B, T, 18, generator=g),
            'scene': torch.rand(B, T, 24, generator=g) * 0.2,
            'actions': torch.rand(B, T, 7, generator=g) * 2 - 1,
            'is_first': torch.zeros(B, T, dtype=torch.bool)}


def square_batch(B, T, g):
    """Moving square: its position integrates the actions (dx, dy), so the dynamics are learnable."""
    pos = torch.randint(8, 48, (B, 2), generator=g).float()
    actions = torch.rand(B, T, 7, generator=g) * 2 - 1
    imgs = torch.full((B, T, 3, 64, 64), -1.0)
    for t in range(T):
        for b in range(B):
            x, y = int(pos[b, 0]), int(pos[b, 1])
            imgs[b, t, :, y:y + 8, x:x + 8] = 1.0
        pos = (pos + 4 * actions[:, t, :2]).clamp(0, 56)
    return {'rgb_static': imgs, 'rgb_gripper': imgs.flip(-1), 'proprio': torch.zeros(B, T, 18),
            'scene': torch.zeros(B, T, 24), 'actions': actions, 'is_first': torch.zeros(B, T, dtype=torch.bool)}


# ---- pure math ---------------------------------------------------------------------------------------

def test_kl_balance_value_matches_closed_form():
    q = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    p = torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.25, 0.25]])
    naive = sum(q[s, c].item() * math.log(q[s, c].item() / p[s, c].item()) for s in range(2) for c in range(3))
    for delta in (0.0, 0.2, 0.8, 1.0):  # the value does not depend on delta
        assert kl_balance(q.log(), p.log(), delta).item() == pytest.approx(naive, rel=1e-5)
    assert kl_categorical(q.log(), q.log()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_balance_gradient_split():
    torch.manual_seed(0)
    post, prior = torch.randn(5, 4, 3), torch.randn(5, 4, 3)

    def grads(delta):
        q, p = post.clone().requires_grad_(), prior.clone().requires_grad_()
        kl_balance(q, p, delta).sum().backward()
        return q.grad, p.grad

    gq1, gp1 = grads(1.0)
    gq0, gp0 = grads(0.0)
    assert torch.all(gp1 == 0) and gq1.abs().sum() > 1e-3    # delta=1: only the posterior is trained
    assert torch.all(gq0 == 0) and gp0.abs().sum() > 1e-3    # delta=0: only the prior is trained
    gq, gp = grads(0.8)
    assert torch.allclose(gq, 0.8 * gq1) and torch.allclose(gp, 0.2 * gp0)


def test_straight_through_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 5, requires_grad=True)
    w = torch.randn(6, 4, 5)
    z = straight_through_sample(logits)
    assert torch.allclose(z.detach().sum(-1), torch.ones(6, 4))               # exact one-hot forward
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    (z * w).sum().backward()
    ref = logits.detach().clone().requires_grad_()
    (ref.softmax(-1) * w).sum().backward()                                   # straight-through = softmax grad
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6) and logits.grad.abs().sum() > 0
    mode = straight_through_sample(logits, sample=False).detach()
    assert torch.equal(mode.argmax(-1), logits.argmax(-1))


def test_gumbel_samples_follow_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).expand(40000, 1, 4)
    freq = straight_through_sample(logits).detach().mean((0, 1))
    assert torch.allclose(freq, logits[0, 0].softmax(-1), atol=0.01)


def test_fit_linear_probe_recovers_linear_map():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 10, generator=g)
    W, b = torch.randn(10, 3, generator=g), torch.randn(3, generator=g)
    W_hat, b_hat = fit_linear_probe(X, X @ W + b, ridge=1e-9)
    assert torch.allclose(W_hat, W, atol=1e-4) and torch.allclose(b_hat, b, atol=1e-4)
    with pytest.raises(ValueError, match='fit_linear_probe'):
        fit_linear_probe(X, b)


# ---- model -------------------------------------------------------------------------------------------

def test_shapes_and_paper_feature_size():
    cfg = WMConfig(**PRESETS['test'])
    wm, batch = make_wm(), random_batch(B=3, T=6)
    S, C = cfg.stoch, cfg.classes
    post, prior = wm.observe(batch)
    for d in (post, prior):
        assert d['h'].shape == (3, 6, cfg.deter) and d['z'].shape == (3, 6, S * C)
        assert d['logits'].shape == (3, 6, S, C)
    assert torch.allclose(post['z'].detach().sum(-1), torch.full((3, 6), float(S)))  # S one-hots
    feat = wm.featurize(batch)
    assert feat.shape == (3, 6, wm.feat_dim) and wm.feat_dim == cfg.deter + S * C and not feat.requires_grad
    dec = wm.decode(feat)
    assert dec['rgb_static'].shape == dec['rgb_gripper'].shape == (3, 6, 3, 64, 64)
    assert dec['proprio'].shape == (3, 6, 18)
    state = wm.img_step(wm.initial(3), batch['actions'][:, 0])
    assert state['h'].shape == (3, cfg.deter) and wm.feature(state).shape == (3, wm.feat_dim)
    assert WorldModel(WMConfig()).feat_dim == 2048                                   # Tab. S.2


@torch.no_grad()
def filter_online(wm, batch):
    """obs_step over a batch's frames one at a time from a fresh state, as the evaluation does -> the states."""
    B, T = batch['actions'].shape[:2]
    state, prev_a, states = wm.initial(B), torch.zeros(B, 7), []
    for t in range(T):
        state, _ = wm.obs_step(state, prev_a, {k: batch[k][:, t] for k in ('rgb_static', 'rgb_gripper', 'proprio')},
                               sample=False)
        prev_a = batch['actions'][:, t]
        states.append(state)
    return states


def test_obs_step_matches_observe():
    wm, batch = make_wm(), random_batch(B=2, T=5)
    feat = wm.featurize(batch)
    for t, state in enumerate(filter_online(wm, batch)):
        assert torch.allclose(wm.feature(state), feat[:, t], atol=1e-5)


def test_is_first_resets_state():
    wm, batch = make_wm(), random_batch(B=2, T=6)
    k = 3
    reset = {**batch, 'is_first': batch['is_first'].clone()}
    reset['is_first'][:, k] = True
    full, fresh = wm.featurize(reset), wm.featurize({key: v[:, k:] for key, v in batch.items()})
    assert torch.allclose(full[:, k:], fresh, atol=1e-5)             # history before k is forgotten
    assert not torch.allclose(wm.featurize(batch)[:, k:], fresh, atol=1e-3)  # ... and it mattered


def test_checkpoint_round_trip():
    wm, batch = make_wm(), random_batch()
    buf = io.BytesIO()
    torch.save({'config': asdict(wm.cfg), 'model': wm.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    wm2 = WorldModel(WMConfig(**ckpt['config']))
    wm2.load_state_dict(ckpt['model'])
    assert torch.equal(wm.featurize(batch, sample=False), wm2.featurize(batch, sample=False))


def test_open_loop_shapes_and_imagination():
    wm, batch = make_wm(), random_batch(B=2, T=6)
    pred = open_loop(wm, batch, context=2, horizon=50)                 # horizon clipped to T - context
    assert pred['rgb_static'].shape == (2, 6, 3, 64, 64) and pred['proprio'].shape == (2, 6, 18)
    with torch.no_grad():                                              # frame 3 = two prior steps after frame 1
        post, _ = wm.observe({k: v[:, :2] for k, v in batch.items()}, sample=False)
        s = {'h': post['h'][:, 1], 'z': post['z'][:, 1]}
        for t in (2, 3):
            s = wm.img_step(s, batch['actions'][:, t - 1], sample=False)
        assert torch.allclose(wm.decode(wm.feature(s))['proprio'], pred['proprio'][:, 3], atol=1e-5)
    with pytest.raises(ValueError, match='context'):
        open_loop(wm, batch, context=6)


def test_hybrid_scene_decoding_and_errors():
    wm, batch = make_wm(hybrid=True), random_batch()
    feat = wm.featurize(batch)
    assert wm.decode_scene(feat).shape == (3, 6, 24) and wm.decode(feat)['scene'].shape == (3, 6, 24)
    assert torch.allclose(wm.unscale_scene(wm.scale_scene(batch['scene'])), batch['scene'], atol=1e-6)
    m = update_wm(wm, make_optimizer(wm, wm.cfg), batch)
    assert {'loss', 'recon_static', 'recon_gripper', 'proprio', 'kl', 'scene'} <= set(m)
    assert all(math.isfinite(v) for v in m.values())
    with pytest.raises(ValueError, match='hybrid'):
        make_wm().decode_scene(feat)
    with pytest.raises(ValueError, match='64'):
        make_wm().featurize({**batch, 'rgb_static': batch['rgb_static'][..., :32, :32]})


def test_proprio_scaling_is_a_gaussian_of_the_stated_std():
    """proprio_scaled: the decoder returns raw units, the loss is the Gaussian NLL with std _PROPRIO_STD
    (proprio_pos_std on the gripper xyz; hand-computed from decode), and the encoder's input is
    (p - offset) / range; unscaled is unchanged."""
    import world_model as W
    batch = random_batch()
    for scaled, pos_std in ((False, 0.01), (True, 0.01), (True, 0.003)):
        wm = make_wm(proprio_scaled=scaled, proprio_pos_std=pos_std)
        std = torch.tensor(W._PROPRIO_STD) if scaled else torch.ones(18)
        if scaled:
            std[:3] = pos_std                   # proprio_pos_std replaces the gripper position's std
        off = torch.tensor(W._PROPRIO_OFFSET) if scaled else torch.zeros(18)
        rng = torch.tensor(W._PROPRIO_RANGE) if scaled else torch.ones(18)
        torch.manual_seed(1)
        _, m = loss_wm(wm, batch, sample=False)
        post, _ = wm.observe(batch, sample=False)
        dec = wm.decode(wm.feature(post))['proprio']
        expect = 0.5 * (((dec - batch['proprio']) / std) ** 2).sum(-1).mean()
        assert torch.allclose(m['proprio'], expect, rtol=1e-5)
        assert torch.allclose(dec, wm.dec_proprio(wm.feature(post)) * rng + off, atol=1e-6)
        emb = wm.embed(batch)[..., -18:]
        assert torch.allclose(emb, (batch['proprio'] - off) / rng, atol=1e-6)
    assert len(W._PROPRIO_STD) == len(W._PROPRIO_OFFSET) == len(W._PROPRIO_RANGE) == WMConfig().proprio_dim


def test_training_lowers_loss_on_moving_square():
    wm = make_wm(lr=1e-3)
    opt = make_optimizer(wm, wm.cfg)
    g = torch.Generator().manual_seed(0)
    held_out = square_batch(4, 8, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = loss_wm(wm, held_out, sample=False)[0].item()
    for _ in range(40):
        update_wm(wm, opt, square_batch(4, 8, g))
    with torch.no_grad():
        after = loss_wm(wm, held_out, sample=False)[0].item()
    assert after < 0.5 * before, (before, after)


# ---------------------------------------------------------------- target_input (FINDINGS.md: the LED tasks)

def consistent_targets(batch):
    """Stored targets as the controller keeps them: the measured TCP at the first frame (a reset), then
    world_model.target_step of each action."""
    from world_model import target_step
    tgt = [batch['proprio'][:, 0, :3] * 0.1 + torch.tensor([0.0, -0.1, 0.5])]
    for t in range(1, batch['actions'].shape[1]):
        tgt.append(target_step(tgt[-1], batch['actions'][:, t - 1]))
    return {**batch, 'target': torch.stack(tgt, 1),
            'proprio': torch.cat([tgt[0][:, None].expand(-1, batch['proprio'].shape[1], -1), batch['proprio'][..., 3:]], -1)}


def test_target_step_matches_the_desk_controller():
    """target_step is env.DeskEnv's integration of the stored target (same scale, same workspace clip, also when
    the clip bites); the world model's copies of the constants are env's."""
    import numpy as np
    import env as E
    from world_model import POS_SCALE, WORKSPACE, target_step
    assert POS_SCALE == E.POS_SCALE and np.allclose(WORKSPACE, E.WORKSPACE)
    desk = E.DeskEnv(cameras=False, seed=0)
    try:
        desk.reset()
        target = torch.tensor(desk.target_pos, dtype=torch.float64)[None]
        rng = np.random.default_rng(0)
        for t in range(40):
            a = rng.uniform(-1, 1, 7) if t < 20 else np.array([0, 0, -1.0, 0, 0, 0, 1])  # then down into the table
            desk.step(a)
            target = target_step(target, torch.tensor(a)[None])
            assert np.allclose(target[0].numpy(), desk.target_pos, atol=1e-9), t
        assert desk.target_pos[2] == E.WORKSPACE[0, 2]                     # the clip was hit
    finally:
        desk.close()


def test_target_input_filtering_online_batch_and_imagination_agree():
    """With target_input: obs_step from a fresh state (target = measured TCP, as on reset) matches observe on the
    recorded targets; img_step from observe's state at t integrates the target and reproduces observe's h at t+1
    (h does not depend on the frame it is about to see); without a target the world model says what is missing."""
    wm = make_wm(target_input=True)
    batch = consistent_targets(random_batch(B=2, T=5))
    post, _ = wm.observe(batch, sample=False)
    for t, state in enumerate(filter_online(wm, batch)):
        assert torch.allclose(wm.feature(state), wm.feature(post)[:, t], atol=1e-5)
        assert torch.allclose(state['target'], batch['target'][:, t], atol=1e-6)
    with torch.no_grad():
        k = 2
        head, _ = wm.observe({key: v[:, :k + 1] for key, v in batch.items()}, sample=False)
        nxt = wm.img_step(wm.last_state(head), batch['actions'][:, k], sample=False)
        assert torch.allclose(nxt['h'], post['h'][:, k + 1], atol=1e-5)
        assert torch.allclose(nxt['target'], batch['target'][:, k + 1], atol=1e-6)
        other = {**batch, 'target': batch['target'] + 0.05}
        assert not torch.allclose(wm.observe(other, sample=False)[0]['h'], post['h'], atol=1e-4)  # it is an input
    with pytest.raises(KeyError, match="batch\\['target'\\]"):
        wm.observe({k: v for k, v in batch.items() if k != 'target'})
    with pytest.raises(KeyError, match="state\\['target'\\]"):
        wm.img_step(wm.initial(2), batch['actions'][:, 0])


def test_warm_start_adds_the_target_input_without_changing_the_model():
    """warm_start: a target_input model started from a trained one computes the same features whatever the
    targets (the new input's weights start at zero); mismatched models are refused, naming the parameter."""
    from world_model import warm_start
    src, dst = make_wm(), make_wm(target_input=True)
    assert warm_start(dst, src.state_dict()) == ['img_a.weight']
    batch = consistent_targets(random_batch(B=2, T=5))
    assert torch.allclose(dst.featurize(batch), src.featurize(batch), atol=1e-6)
    assert torch.allclose(dst.featurize({**batch, 'target': batch['target'] * 3}), src.featurize(batch), atol=1e-6)
    with pytest.raises(ValueError, match='missing'):
        warm_start(make_wm(hybrid=True), src.state_dict())
    with pytest.raises(ValueError, match='sizes must match'):
        warm_start(make_wm(deter=16), src.state_dict())


# ---------------------------------------------------------------- precision (FINDINGS.md, "Speed on 2 cores")

def test_bf16_training_loss_agrees_with_fp32_on_one_batch():
    """--wm.bf16 runs the training step under a bfloat16 autocast. On one batch of the cpu preset's network, the loss
    and each of its terms agree with fp32 to 2% (bf16 keeps 8 bits of mantissa: ~0.4% per rounding), and the model
    it trains stays float32."""
    torch.manual_seed(0)
    wm = WorldModel(WMConfig(**{**PRESETS['cpu'], 'steps': 1}))
    batch = random_batch(B=2, T=6)
    batch['is_first'][:, 0] = True
    with torch.no_grad():
        _, fp32 = loss_wm(wm, batch, sample=False)
        with torch.autocast('cpu', torch.bfloat16):
            _, bf16 = loss_wm(wm, batch, sample=False)
    for key in fp32:
        assert abs(bf16[key].float() - fp32[key]) <= 0.02 * abs(fp32[key]) + 1e-3, (key, fp32[key], bf16[key])
    wm.cfg.bf16 = True
    update_wm(wm, make_optimizer(wm, wm.cfg), batch)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in wm.parameters())


def test_channels_last_weights_give_the_same_numbers():
    """The conv weights are kept channels-last (oneDNN's layout on a CPU): a memory layout, not a different model."""
    wm = make_wm()
    batch = random_batch()
    assert wm.enc_static.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = loss_wm(wm, batch, sample=False)[0]
        wm.to(memory_format=torch.contiguous_format)
        ref = loss_wm(wm, batch, sample=False)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_shards_of_the_noise_and_of_the_sequences_make_up_the_global_batch():
    """Data-parallel training (torchrun): the rows each process keeps, put together, are what one process draws for
    the global batch, for the latent noise (shard_rand) and for the sequences (data.sample_sequences)."""
    import numpy as np
    import data
    from world_model import shard_rand
    whole = (torch.manual_seed(3), shard_rand((6, 2, 5), 'cpu'))[1]
    parts = [(torch.manual_seed(3), shard_rand((2, 2, 5), 'cpu', shard=(r, 3)))[1] for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    split = {'episodes': np.array([[0, 39], [40, 99]]), 'light_switch_frames': np.array([], int),
             **{k: np.arange(100 * 2).reshape(100, 2) for k in data.SEQ_KEYS}}
    one = data.sample_sequences(split, 4, 5, np.random.default_rng(0))['rows']
    two = [data.sample_sequences(split, 2, 5, np.random.default_rng(0), shard=(r, 2))['rows'] for r in range(2)]
    assert np.array_equal(np.concatenate(two), one)
