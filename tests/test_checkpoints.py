"""Checkpoints and the shared training loop, in process: a killed run resumes to exactly what an uninterrupted run
gives, and every checkpoint that does not fit (another stage, another task, another latent size, an unfinished
world model, settings of another version, a broken file) is a DataError that names it, never a traceback."""
import dataclasses

import numpy as np
import pytest
import torch

import data
import diffusion_policy as D
import reward as R
import train
import world_model as W

pytestmark = pytest.mark.usefixtures('one_thread')


def toy_run(path, n_steps, stop_at=None):
    """train_loop on a linear model whose every step draws from torch's global rng, a numpy Generator and a torch
    Generator (as the stages do); stop_at: raise KeyboardInterrupt at that step, as a kill would."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(2)

    def step_fn(step):
        if step == stop_at:
            raise KeyboardInterrupt
        x = torch.randn(8, 3) + float(rng.normal()) + torch.rand(1, generator=gen)
        loss = (lin(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        return {'loss': loss.item()}
    return train.train_loop(stage='demo', task=None, path=str(path), config={'steps': n_steps}, upstream=['u'],
                            objects={'model': lin, 'optim': opt}, step_fn=step_fn, n_steps=n_steps, ckpt_every=2,
                            rng=rng, generator=gen, quiet=True)


def test_a_killed_run_resumes_to_what_an_uninterrupted_run_gives(tmp_path):
    whole = toy_run(tmp_path / 'whole.pt', 7)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path / 'killed.pt', 7, stop_at=5)
    assert torch.load(tmp_path / 'killed.pt', weights_only=True)['step'] == 4      # the last checkpoint before it
    stale = [tmp_path / 'killed.pt.tmp999999', tmp_path / 'killed_snapshots' / 'step6.pt.tmp999999']  # a kill mid-write
    stale[1].parent.mkdir()
    for f in stale:
        f.write_bytes(b'half')
    resumed = toy_run(tmp_path / 'killed.pt', 7)
    assert not any(f.exists() for f in stale)
    assert resumed['step'] == whole['step'] == 7 and resumed['done']
    assert all(torch.equal(resumed['model'][k], whole['model'][k]) for k in whole['model'])
    rows = lambda name: [(r['step'], r['loss']) for r in data.MetricsLog(str(tmp_path / name), 10 ** 9).rows]
    assert rows('killed_metrics.csv') == rows('whole_metrics.csv') and len(rows('whole_metrics.csv')) == 7


def small_models():
    wm = W.WorldModel(W.WMConfig(**W.PRESETS['test']))
    bc_cfg = D.BCConfig(**D.PRESETS['test'])
    rw_cfg = R.RewardConfig(**R.PRESETS['test'])
    return wm, bc_cfg, D.make_policy(wm.feat_dim, bc_cfg), rw_cfg, R.RewardClassifier(wm.feat_dim, rw_cfg)


def save(path, stage, model, config, task=None, **extra):
    data.save_checkpoint({'stage': stage, 'task': task, 'step': 1, 'done': True, 'key': 'k', 'model': model.state_dict(),
                          'config': dataclasses.asdict(config), **extra}, path)
    return str(path)


def test_checkpoints_that_do_not_fit_are_one_line_data_errors(tmp_path):
    wm, bc_cfg, policy, rw_cfg, clf = small_models()
    wm_path = save(tmp_path / 'wm.pt', 'wm', wm, wm.cfg)
    assert W.load(wm_path)[0].feat_dim == wm.feat_dim
    rw_path = save(tmp_path / 'reward.pt', 'reward', clf, rw_cfg, task='open_drawer', extra={'feat_dim': wm.feat_dim})
    bc_path = save(tmp_path / 'bc.pt', 'bc', policy, bc_cfg, task='open_drawer', extra={'cond_dim': wm.feat_dim},
                   ema={'model': policy.state_dict()})
    assert R.load(rw_path, 'open_drawer', wm.feat_dim)[0].relative == clf.relative
    assert D.load(bc_path, 'open_drawer', wm.feat_dim)[1]['stage'] == 'bc'
    cases = [
        (lambda: W.load(bc_path), r"bc\.pt: holds a 'bc' checkpoint, expected 'wm'"),
        (lambda: R.load(rw_path, 'close_drawer', wm.feat_dim), r"holds task 'open_drawer', expected 'close_drawer'"),
        (lambda: R.load(rw_path, 'open_drawer', wm.feat_dim + 1), r'classifier of \d+-d latents, world model gives'),
        (lambda: D.load(bc_path, 'open_drawer', wm.feat_dim + 1), r'policy conditioned on \d+-d latents'),
        (lambda: data.load_checkpoint(str(tmp_path / 'none.pt'), 'wm'), r'none\.pt: checkpoint not found'),
    ]
    unfinished = torch.load(wm_path, weights_only=True)
    unfinished['done'] = False
    torch.save(unfinished, tmp_path / 'half.pt')
    cases.append((lambda: W.load(str(tmp_path / 'half.pt')), r'half\.pt: world model training is unfinished'))
    other = torch.load(wm_path, weights_only=True)
    other['config']['retired_option'] = 1
    del other['config']['kl_scale']
    torch.save(other, tmp_path / 'other.pt')
    cases.append((lambda: W.load(str(tmp_path / 'other.pt')), r'other\.pt: written by another version of diwa '
                  r'\(settings missing: kl_scale; unknown: retired_option\); rebuild it with --stage wm --force'))
    (tmp_path / 'broken.pt').write_bytes(open(wm_path, 'rb').read()[:100])
    cases.append((lambda: W.load(str(tmp_path / 'broken.pt')), r'broken\.pt: not a readable checkpoint'))
    torch.save([1, 2], tmp_path / 'list.pt')
    cases.append((lambda: W.load(str(tmp_path / 'list.pt')), r'list\.pt: not a diwa checkpoint'))
    for load, message in cases:
        with pytest.raises(data.DataError, match=message) as err:
            load()
        assert '\n' not in str(err.value)


def test_each_results_row_runs_its_own_checkpoint_from_the_same_starts(tmp_path, monkeypatch):
    """eval.candidates / eval.evaluate: the base row runs the BC policy alone, the DiWA row the fine-tuned actor
    stored in diwa_s0.pt with its K', every row from the same start states; a fine-tuned checkpoint made from
    another BC policy gets no row. The simulator is replaced by a recorder: this checks the bookkeeping only."""
    import eval as E
    wm, bc_cfg, policy, _, _ = small_models()
    bc_ckpt = {'key': 'bc-key', 'config': dataclasses.asdict(bc_cfg)}
    torch.manual_seed(1)
    tuned = D.make_policy(wm.feat_dim, bc_cfg)                                # other weights than `policy`
    diwa = save(tmp_path / 'diwa_s0.pt', 'finetune', tuned, dataclasses.replace(bc_cfg), task='open_drawer',
                upstream=['wm-key', 'bc-key'], extra={'cond_dim': wm.feat_dim})
    ck = torch.load(diwa, weights_only=True)
    ck['config'] = {'K_ft': 3}
    torch.save(ck, diwa)
    save(tmp_path / 'dppo_s0.pt', 'dppo', tuned, bc_cfg, task='open_drawer', upstream=['wm-key', 'another-bc'])
    found = E.candidates(bc_ckpt, policy, 'open_drawer', {'diwa': diwa, 'dppo': str(tmp_path / 'dppo_s0.pt')})
    assert list(found) == ['base', 'diwa']                                    # dppo: made from another BC policy
    calls = []
    monkeypatch.setattr(E, 'policy_agent_factory', lambda pre, actor, K_ft, seed, sampler: (pre, actor, K_ft))
    monkeypatch.setattr(E, 'run_episodes', lambda agent, task, starts, *a, **k: calls.append((agent, starts)) or {
        'success': np.array([True, False, False, False]), 'steps': np.full(4, 72), 'sim_steps': 0})
    cfg = E.EvalConfig(episodes=4, envs=4, workers=0)
    rows = E.evaluate(found, policy, 'open_drawer', 0, cfg, None, 'cpu', [str(tmp_path / 'results.csv')], 'test')
    assert [r['policy'] for r in rows] == ['base', 'diwa'] and [r['ckpt_key'] for r in rows] == ['bc-key', 'k']
    (pre0, actor0, k0), (pre1, actor1, k1) = calls[0][0], calls[1][0]
    assert pre0 is policy and actor0 is None and k0 == 0
    assert pre1 is policy and k1 == 3 and all(torch.equal(actor1.state_dict()[k], v) for k, v in tuned.state_dict().items())
    assert calls[0][1] == calls[1][1] and len(calls[0][1]) == 4               # the same start states for both
    again = E.evaluate(found, policy, 'open_drawer', 0, cfg, None, 'cpu', [str(tmp_path / 'results.csv')], 'test')
    assert again == [] and len(calls) == 2                                    # rows up to date: nothing re-run
