"""Method test of KL balancing inside the world-model loss (world_model.loss_wm, Eq. 10-11, Tab. S.2).

world_model.kl_balance's docstring: the printed Eq. 11 puts delta on the posterior term, but DreamerV2 and the
DiWA/LUMOS code put the Tab. S.2 value (0.8) on the *prior* term, so loss_wm calls kl_balance(q, p, 1 - delta).
What the code claims, then: in d loss / d logits, the prior logits get  kl_scale * delta       * dKL/dp
                                                    the posterior logits get kl_scale * (1 - delta) * dKL/dq.
The reference gradients are closed forms of KL(q || p) between categoricals, written independently of the code:
    dKL/d p_logits[c] = softmax(p)[c] - q[c]
    dKL/d q_logits[c] = q[c] * (log q[c] - log p[c] - KL_s)        (KL_s: that categorical's KL)
checked against autograd on the real (test-preset) world model, whose loss is averaged over (B, T).
"""
import pytest
import torch

from world_model import PRESETS, WMConfig, WorldModel, loss_wm


pytestmark = pytest.mark.usefixtures('one_thread')


def closed_form_grads(q_logits, p_logits):
    """Gradients of sum over all categoricals of KL(q || p) w.r.t. q's and p's logits, (..., S, C) each."""
    q, p = q_logits.softmax(-1), p_logits.softmax(-1)
    kl_s = (q * (q.log() - p.log())).sum(-1, keepdim=True)
    return q * (q.log() - p.log() - kl_s), p - q


def test_closed_form_matches_autograd_on_tiny_logits():
    """The reference itself, on two hand-written categoricals (no project code involved)."""
    q = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]).log().requires_grad_()
    p = torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.25, 0.25]]).log().requires_grad_()
    lq, lp = q.log_softmax(-1), p.log_softmax(-1)
    (lq.exp() * (lq - lp)).sum().backward()
    gq, gp = closed_form_grads(q.detach(), p.detach())
    torch.testing.assert_close(q.grad, gq)
    torch.testing.assert_close(p.grad, gp)
    # hand numbers for the second categorical's prior gradient: softmax(p) - q = (0.25, 0, -0.25)
    torch.testing.assert_close(p.grad[1], torch.tensor([0.25, 0.0, -0.25]))


def _batch(B=2, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {'rgb_static': torch.rand(B, T, 3, 64, 64, generator=g) * 2 - 1,
         'rgb_gripper': torch.rand(B, T, 3, 64, 64, generator=g) * 2 - 1,
         'proprio': torch.randn(B, T, 18, generator=g), 'scene': torch.rand(B, T, 24, generator=g) * 0.2,
         'actions': torch.rand(B, T, 7, generator=g) * 2 - 1, 'is_first': torch.zeros(B, T, dtype=torch.bool)}
    b['is_first'][:, 0] = True
    return b


def _logit_grads(wm, batch):
    """loss_wm once (deterministic: sample=False); -> (post logits, prior logits, their .grad)."""
    seen = {}
    observe = wm.observe

    def spy(*a, **k):
        post, prior = observe(*a, **k)
        post['logits'].retain_grad(), prior['logits'].retain_grad()
        seen['post'], seen['prior'] = post['logits'], prior['logits']
        return post, prior
    wm.observe = spy
    try:
        wm.zero_grad(set_to_none=True)
        loss, _ = loss_wm(wm, batch, sample=False)
        loss.backward()
    finally:
        del wm.observe
    return seen['post'].detach(), seen['prior'].detach(), seen['post'].grad, seen['prior'].grad


@pytest.mark.parametrize('delta, beta', [(0.8, 0.3), (0.7, 1.0)])
def test_loss_wm_puts_delta_of_the_kl_gradient_on_the_prior(delta, beta):
    torch.manual_seed(0)
    batch = _batch()
    B, T = batch['actions'].shape[:2]
    wm = WorldModel(WMConfig(**{**PRESETS['test'], 'kl_balance': delta, 'kl_scale': beta}))
    q, p, gq, gp = _logit_grads(wm, batch)
    ref_q, ref_p = closed_form_grads(q, p)
    # The prior logits reach the loss only through the KL term.
    torch.testing.assert_close(gp, beta * delta * ref_p / (B * T), rtol=1e-4, atol=1e-7)
    # The posterior logits also get reconstruction gradients (straight-through): remove them with kl_scale = 0.
    wm0 = WorldModel(WMConfig(**{**PRESETS['test'], 'kl_balance': delta, 'kl_scale': 0.0}))
    wm0.load_state_dict(wm.state_dict())
    q0, _, gq0, gp0 = _logit_grads(wm0, batch)
    torch.testing.assert_close(q0, q)
    assert gp0 is None or gp0.abs().max() == 0
    torch.testing.assert_close(gq - gq0, beta * (1 - delta) * ref_q / (B * T), rtol=1e-4, atol=1e-7)
    # and the split really is uneven: the prior's share is delta / (1 - delta) times the posterior's
    assert abs(delta - 0.5) > 0.1
