"""CLI smoke tests on the `test` preset: every stage runs end to end in a subprocess, re-runs skip finished
work, invalid flags fail at parse time, bad checkpoints and NaN losses give one-line errors, a SIGKILLed
stage resumes, and the same seed gives the same metrics."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = 'turn_on_led'      # the test preset's play data (seed 0) has a window of it in each split; checked below


def run(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'train.py {" ".join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def read_csv(path):
    with open(path, newline='') as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """One full test-preset run of every stage (collect, wm, bc, reward, finetune, eval) for one task."""
    d = str(tmp_path_factory.mktemp('run'))
    run('--stage', 'collect', '--preset', 'test', '--run', d)
    for split in ('training', 'validation'):
        ann = np.load(os.path.join(d, 'data', split, 'lang_annotations', 'auto_lang_ann.npy'), allow_pickle=True).item()
        assert TASK in ann['language']['task'], f'test-preset play data has no {TASK} window in {split}: pick another TASK'
    run('--stage', 'all', '--preset', 'test', '--run', d, '--tasks', TASK)
    return d


def test_all_stages_write_their_outputs(run_dir):
    for rel in ['data/training/ep_start_end_ids.npy', 'data/validation/ep_start_end_ids.npy', 'wm.pt',
                f'{TASK}/bc.pt', f'{TASK}/reward.pt', f'{TASK}/diwa_s0.pt', 'results.csv', 'wm_metrics.csv']:
        assert os.path.exists(os.path.join(run_dir, rel)), rel
    rows = read_csv(os.path.join(run_dir, 'results.csv'))
    assert {r['policy'] for r in rows} == {'base', 'diwa'}
    diwa = [r for r in rows if r['policy'] == 'diwa'][0]
    assert int(diwa['sim_steps_finetune']) == 0            # DiWA never steps the simulator while fine-tuning
    ckpt = torch.load(os.path.join(run_dir, TASK, 'diwa_s0.pt'), weights_only=True)
    assert ckpt['done'] and ckpt['state']['counters']['sim_steps'] == 0
    assert ckpt['state']['counters']['imagined_steps'] > 0


def test_target_input_world_model_warm_started_runs_every_stage(run_dir, tmp_path):
    """--wm.target_input with --wm-init: the world model continues from the run's, keyed on it, and BC, the
    classifier, DiWA (imagination integrates the target) and the evaluation (the filter resets it to the TCP)
    run on it; a world model that does not fit is a one-line error."""
    d = str(tmp_path / 'target')
    common = ['--preset', 'test', '--run', d, '--data', os.path.join(run_dir, 'data'), '--wm.target_input', 'true']
    out = run('--stage', 'wm', *common, '--wm-init', os.path.join(run_dir, 'wm.pt')).stdout
    assert "new inputs start at zero in: ['img_a.weight']" in out
    src = torch.load(os.path.join(run_dir, 'wm.pt'), weights_only=True)
    ckpt = torch.load(os.path.join(d, 'wm.pt'), weights_only=True)
    assert ckpt['config']['target_input'] and f"init={src['key']}" in ckpt['upstream']
    run('--stage', 'all', *common, '--tasks', TASK)
    rows = read_csv(os.path.join(d, 'results.csv'))
    assert {r['policy'] for r in rows} == {'base', 'diwa'}
    bad = run('--stage', 'wm', *common[:-2], '--run', str(tmp_path / 'hyb'), '--wm.hybrid', 'true', '--wm-init',
              os.path.join(run_dir, 'wm.pt'), check=False)
    assert bad.returncode != 0 and '--wm-init' in bad.stderr and 'Traceback' not in bad.stderr


def test_rerun_skips_everything_and_changes_nothing(run_dir):
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(run_dir) for f in fs if f.endswith(('.pt', '.csv'))]
    before = {f: os.path.getmtime(f) for f in files}
    t0 = time.time()
    out = run('--stage', 'all', '--preset', 'test', '--run', run_dir, '--tasks', TASK)
    assert 'skipped' in out.stdout
    assert {f: os.path.getmtime(f) for f in files} == before
    assert time.time() - t0 < 120


def test_changed_setting_reruns_and_says_which(run_dir, tmp_path):
    d = str(tmp_path / 'copy')
    shutil.copytree(run_dir, d)
    out = run('--stage', 'bc', '--task', TASK, '--preset', 'test', '--run', d, '--bc.epochs', '3')
    assert 'settings changed' in out.stdout and 'epochs' in out.stdout


def test_each_seed_clones_fine_tunes_and_evaluates_its_own_bc_policy(run_dir, tmp_path):
    """--stage bc --seeds 0 1 keeps bc.pt (seed 0, done) and writes bc_s1.pt beside it; the base of seed 1's
    evaluation is bc_s1.pt, and a seed-1 fine-tuning made from bc.pt (as before each seed had its own) is not
    evaluated with it but fine-tuned again from bc_s1.pt, with a message that says why."""
    d = str(tmp_path / 'seeds')
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns('results.csv*'))
    path = lambda name: os.path.join(d, TASK, name)
    load = lambda name: torch.load(path(name), weights_only=True)
    kept = {f: os.path.getmtime(path(f)) for f in ('bc.pt', 'latents_training.pt')}
    bc0 = load('bc.pt')
    legacy = load('diwa_s0.pt')                  # a seed-1 fine-tuning of a run made before: from bc.pt
    legacy['upstream'][-1], legacy['key'] = 1, 'made-from-bc.pt'
    torch.save(legacy, path('diwa_s1.pt'))
    out = run('--stage', 'bc', '--task', TASK, '--preset', 'test', '--run', d, '--seeds', '0', '1').stdout
    assert f'{path("bc.pt")}: already done' in out
    assert {f: os.path.getmtime(path(f)) for f in kept} == kept            # seed 0's policy and demos untouched
    bc1 = load('bc_s1.pt')
    assert bc1['done'] and bc1['key'] != bc0['key'] and bc1['upstream'][-1] == 'seed=1'
    assert os.path.isfile(path('latents_training_s1.pt'))                  # seed 1 draws its own 50 demos
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--preset', 'test', '--run', d,
                           '--task', TASK, '--seed', '1'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'diwa_s1.pt: fine-tuned from another BC policy than bc_s1.pt: not evaluated' in proc.stdout
    rows = read_csv(os.path.join(d, 'results.csv'))
    assert [(r['policy'], r['seed'], r['ckpt_key']) for r in rows] == [('base', '1', bc1['key'])]
    out = run('--stage', 'finetune', '--task', TASK, '--preset', 'test', '--run', d, '--seed', '1').stdout
    assert f'{path("diwa_s1.pt")}: re-running, its BC policy (bc_s1.pt) changed\n' in out
    diwa1 = load('diwa_s1.pt')
    assert diwa1['done'] and diwa1['upstream'][1] == bc1['key'] and bc0['key'] not in diwa1['upstream']


@pytest.mark.parametrize('flags, message', [
    (['--stage', 'bc', '--task', 'fly_to_moon'], 'unknown task'),
    (['--stage', 'all', '--tasks', 'fly_to_moon'], 'unknown task'),
    (['--stage', 'finetune', '--task', TASK, '--ft.K_ft', '30'], 'K_ft'),
    (['--stage', 'wm', '--wm.batch', '-4'], 'must be >= 0'),
    (['--stage', 'bc'], 'needs --task'),
    (['--stage', 'wm', '--run', '/proc/diwa_cannot_write_here'], 'cannot write'),
])
def test_invalid_flags_fail_at_parse_time(flags, message):
    out = run(*flags, '--preset', 'test', check=False)
    assert out.returncode == 2 and 'usage:' in out.stderr and message in out.stderr, out.stderr


def test_bad_checkpoints_give_one_line_errors(run_dir, tmp_path):
    d = str(tmp_path / 'bad')
    shutil.copytree(run_dir, d)
    # the wrong stage: a policy where the world model should be
    shutil.copy(os.path.join(d, TASK, 'bc.pt'), os.path.join(d, 'wm.pt'))
    out = run('--stage', 'bc', '--task', TASK, '--preset', 'test', '--run', d, check=False)
    assert out.returncode == 2 and "holds a 'bc' checkpoint, expected 'wm'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # a truncated file
    shutil.copy(os.path.join(run_dir, 'wm.pt'), os.path.join(d, 'wm.pt'))
    with open(os.path.join(d, 'wm.pt'), 'r+b') as fh:
        fh.truncate(100)
    out = run('--stage', 'reward', '--task', TASK, '--preset', 'test', '--run', d, check=False)
    assert out.returncode == 2 and 'wm.pt: not a readable checkpoint' in out.stderr
    # a policy trained on another world model's latents
    shutil.copy(os.path.join(run_dir, 'wm.pt'), os.path.join(d, 'wm.pt'))
    ck = torch.load(os.path.join(d, TASK, 'bc.pt'), weights_only=True)
    ck['extra']['cond_dim'] += 1
    torch.save(ck, os.path.join(d, TASK, 'bc.pt'))
    out = run('--stage', 'finetune', '--task', TASK, '--preset', 'test', '--run', d, '--force', check=False)
    assert out.returncode == 2 and 'latents' in out.stderr and 'bc.pt' in out.stderr


def test_reward_data_adds_imagined_latents_with_the_recorded_labels(run_dir):
    """RewardConfig.imagined: every demo / play frame a second time, imagined open loop from its sequence's first
    frame; same first deterministic state, other latents later on, labels copied from the recorded frames."""
    sys.path.insert(0, ROOT)
    import data
    import train
    args = train.parse_args(['--stage', 'reward', '--preset', 'test', '--run', run_dir, '--task', TASK])
    device = torch.device('cpu')
    wm, wm_ckpt = train.load_world_model(args, device)
    split = data.load_split(os.path.join(run_dir, 'data', 'training'), wm.cfg.image_size)
    rows = np.arange(40)[None] + np.array([[0], [100]])
    post, imag = train.featurize_rows(wm, split, rows, device), train.featurize_rows(wm, split, rows, device, imagined=True)
    H = wm.cfg.deter
    assert post.shape == imag.shape == (2, 40, wm.feat_dim)
    assert torch.allclose(post[:, 0, :H], imag[:, 0, :H])          # h_0 comes from the same fresh state
    assert (post[:, 10:] - imag[:, 10:]).abs().mean() > 1e-3         # then the prior drifts off the posterior
    f0, st0, y0 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training')
    f1, st1, y1 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training', imagined=True)
    assert len(f1) == 2 * len(f0) and int(y1.sum()) == 2 * int(y0.sum())
    n_demo = int(train.demo_latents(args, wm, wm_ckpt, TASK, device)['valid'].sum())
    assert torch.equal(f1[:n_demo], f0[:n_demo]) and torch.equal(y1[n_demo:2 * n_demo], y0[:n_demo])
    # every frame comes with its sequence's first latent z_0 (a start-conditioned classifier's input): for the demo
    # frames, the filtered first frame of their window (naive loop); the imagined copies start from the same h_0
    demos = train.demo_latents(args, wm, wm_ckpt, TASK, device)
    expect = [demos['feat'][w, 0] for w in range(len(demos['feat'])) for t in range(demos['feat'].shape[1])
              if demos['valid'][w, t]]
    assert st0.shape == f0.shape and st1.shape == f1.shape and torch.equal(st0[:n_demo], torch.stack(expect))
    assert torch.allclose(st1[n_demo:2 * n_demo, :H], st0[:n_demo, :H])
    # relative=True (start_conditioned) changes only the play negatives
    f5, st5, y5 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training', relative=True)
    assert torch.equal(f5[:n_demo], f0[:n_demo]) and torch.equal(y5[:n_demo], y0[:n_demo]) and int(y5.sum()) == int(y0.sum())
    # neg_margin: the `margin` frames before each window's first success are dropped, nothing else (naive loop)
    dropped = 0
    for succ, valid in zip(demos['success'].tolist(), demos['valid'].tolist()):
        first = succ.index(True)
        dropped += sum(valid[t] for t in range(max(0, first - 3), first))
    f2, st2, y2 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training', margin=3)
    assert dropped > 0 and len(f0) - len(f2) == dropped and int(y2.sum()) == int(y0.sum())
    # imagined=n: n imagined copies of every frame, each with its own sampled latents
    f3, st3, y3 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training', imagined=2)
    assert len(f3) == 3 * len(f0) and int(y3.sum()) == 3 * int(y0.sum())
    assert (f3[n_demo:2 * n_demo] - f3[2 * n_demo:3 * n_demo]).abs().mean() > 1e-4
    # play_frac: more play snippets, the same demo frames
    f4, st4, y4 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training', play_frac=1.0)
    assert len(f4) > len(f0) and torch.equal(f4[:n_demo], f0[:n_demo]) and int(y4.sum()) == int(y0.sum())


def test_play_negatives_relative_to_the_snippet_start(run_dir, monkeypatch):
    """play_negatives(relative=True): every frame where the test fails against the snippet's first frame, each with
    that first frame's latent; relative=False: the frames where the task is possible."""
    sys.path.insert(0, ROOT)
    import env
    import train
    args = train.parse_args(['--stage', 'reward', '--preset', 'test', '--run', run_dir, '--task', TASK])
    device = torch.device('cpu')
    wm, _ = train.load_world_model(args, device)

    def negatives(relative, success=None, possible=None):
        if success is not None:
            monkeypatch.setattr(env, 'task_success', lambda task, s0, s1: success(s0['scene_obs'], s1['scene_obs']))
        if possible is not None:
            monkeypatch.setattr(env, 'task_possible', lambda task, s: possible(s))
        return train.play_negatives(args, wm, TASK, device, 'training', n_seq=6, seed=0, relative=relative)

    f, z0 = negatives(True, success=lambda s0, s1: False)            # nothing succeeds: all 6 x 24 scored frames
    assert f.shape == z0.shape == (6 * 24, wm.feat_dim)
    blocks = z0.view(6, 24, -1)
    assert torch.equal(blocks, blocks[:, :1].expand_as(blocks))      # one z_0 per snippet ...
    assert not torch.equal(blocks[0, 0], f[0])                       # ... its first frame, before the scored ones
    assert len(negatives(True, success=lambda s0, s1: True)[0]) == 0
    assert len(negatives(False, possible=lambda s: False)[0]) == 0   # the absolute classifier's: possible frames
    # each scored frame is tested against its snippet's first frame, and exactly those that fail are kept
    calls = []
    f2, _ = negatives(True, success=lambda s0, s1: calls.append((np.array(s0), np.array(s1))) or len(calls) % 3 == 0)
    assert len(calls) == 6 * 24 and len(f2) == sum(1 for i in range(len(calls)) if (i + 1) % 3)
    for b in range(6):
        s0 = [c[0] for c in calls[24 * b:24 * (b + 1)]]
        assert all(np.array_equal(x, s0[0]) for x in s0)              # one start per snippet


def test_reward_data_drops_post_success_relapses_only(run_dir, monkeypatch):
    """RewardConfig.drop_relapses: post-success frames where the test fails again are left out; with it off they
    are negatives. A relapse is written into the cached demo labels (the test desk's demos have none)."""
    sys.path.insert(0, ROOT)
    import train
    args = train.parse_args(['--stage', 'reward', '--preset', 'test', '--run', run_dir, '--task', TASK])
    device = torch.device('cpu')
    wm, wm_ckpt = train.load_world_model(args, device)
    demos = dict(train.demo_latents(args, wm, wm_ckpt, TASK, device))
    success = demos['success'].clone()
    first = success.float().argmax(1)
    rows = [w for w in range(len(success)) if first[w] + 3 < success.shape[1] and demos['valid'][w, first[w] + 3]]
    assert rows, 'the test demos need post-success frames'
    for w in rows:
        success[w, first[w] + 2: first[w] + 4] = False              # two frames after the first success fail again
    demos['success'] = success
    relapses = sum(int(demos['valid'][w, first[w] + 2: first[w] + 4].sum()) for w in rows)
    monkeypatch.setattr(train, 'demo_latents', lambda *a, **k: demos)
    f0, st0, y0 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training')
    f1, st1, y1 = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training', drop_relapses=True)
    assert relapses > 0 and len(f0) - len(f1) == relapses and int(y0.sum()) == int(y1.sum())
    # the frames before the first success are kept in both
    f2, st2, _ = train.reward_dataset(args, wm, wm_ckpt, TASK, device, 'training', margin=2, drop_relapses=True)
    assert len(f1) - len(f2) == sum(int(demos['valid'][w, max(0, int(first[w]) - 2):first[w]].sum())
                                    for w in range(len(success)))


def test_nan_loss_stops_with_stage_step_and_term(tmp_path):
    sys.path.insert(0, ROOT)
    import train
    lin = torch.nn.Linear(2, 2)
    path = str(tmp_path / 'x.pt')
    values = iter([1.0, 0.5, float('nan')])
    with pytest.raises(train.StageError, match=r"stage demo, step 3: loss term 'kl' is nan.*kept at"):
        train.train_loop(stage='demo', task=None, path=path, config={}, upstream=[], objects={'model': lin},
                         step_fn=lambda s: {'loss': 1.0, 'kl': next(values)}, n_steps=5, ckpt_every=2, quiet=True)
    kept = torch.load(path, weights_only=True)
    assert kept['step'] == 2 and not kept['done']           # the last good checkpoint is untouched


def test_rerun_with_new_settings_keeps_old_metrics_until_its_first_checkpoint(tmp_path):
    sys.path.insert(0, ROOT)
    import train
    lin, path = torch.nn.Linear(2, 2), str(tmp_path / 'x.pt')
    kw = dict(stage='demo', task=None, path=path, upstream=[], objects={'model': lin}, n_steps=4, ckpt_every=2, quiet=True)
    train.train_loop(config={'lr': 1}, step_fn=lambda s: {'loss': 1.0}, **kw)
    metrics = open(str(tmp_path / 'x_metrics.csv')).read()

    def crash(step):
        raise KeyboardInterrupt    # stopped before the new run's first checkpoint
    with pytest.raises(KeyboardInterrupt):
        train.train_loop(config={'lr': 2}, step_fn=crash, **kw)
    assert open(str(tmp_path / 'x_metrics.csv')).read() == metrics
    assert torch.load(path, weights_only=True)['config'] == {'lr': 1}
    train.train_loop(config={'lr': 2}, step_fn=lambda s: {'loss': 2.0}, **kw)    # the new run replaces both
    assert [r['loss'] for r in read_csv(str(tmp_path / 'x_metrics.csv'))] == ['2'] * 4


def test_second_writer_of_a_checkpoint_stops_and_a_killed_writer_leaves_no_stale_lock(tmp_path):
    """While one process trains into x.pt, a second train_loop on x.pt stops with a one-line error naming the
    first (it would otherwise overwrite that process's progress), and touches neither file. Once the holder is
    killed (-9: no cleanup code runs), the kernel has dropped the lock and training goes on."""
    sys.path.insert(0, ROOT)
    import train
    lin, path = torch.nn.Linear(2, 2), str(tmp_path / 'x.pt')
    kw = dict(stage='demo', task=None, path=path, config={'lr': 1}, upstream=[], objects={'model': lin},
              n_steps=4, ckpt_every=2, quiet=True, step_fn=lambda s: {'loss': 1.0})
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time, train\nwith train.writer_lock(sys.argv[1]):\n'
                               '    print("held", flush=True); time.sleep(60)', path],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(train.StageError, match=rf'x\.pt: pid {holder.pid} is writing this checkpoint'):
            train.train_loop(**kw)
        assert not os.path.exists(path) and not os.path.exists(str(tmp_path / 'x_metrics.csv'))
    finally:
        holder.kill()
        holder.wait()
    assert train.train_loop(**kw)['done']


def test_another_seed_refuses_to_overwrite_a_checkpoint_and_seed_0_keeps_old_keys(tmp_path):
    """wm.pt / reward.pt do not name the seed in their path: --seed 1 on a run with a seed-0 checkpoint is
    an error that names both seeds and leaves the checkpoint as it was; --force replaces it. Seed 0 adds
    nothing to the key, so checkpoints written before the seed was keyed stay 'already done'."""
    sys.path.insert(0, ROOT)
    import argparse
    import train
    path = str(tmp_path / 'wm.pt')
    kw = dict(stage='demo', task=None, path=path, config={'lr': 1}, objects={'model': torch.nn.Linear(2, 2)},
              step_fn=lambda s: {'loss': 1.0}, n_steps=2, ckpt_every=1, quiet=True)
    tag = lambda seed: train.seed_tag(argparse.Namespace(seed=seed))
    assert tag(0) == [] and tag(3) == ['seed=3']
    first = train.train_loop(upstream=['data'] + tag(0), **kw)
    assert first['key'] == train.config_key({'lr': 1}, ['data'])
    with pytest.raises(train.StageError, match=r'wm\.pt was trained with --seed 0, this run has --seed 1'):
        train.train_loop(upstream=['data'] + tag(1), **kw)
    assert torch.load(path, weights_only=True)['key'] == first['key']       # untouched
    second = train.train_loop(upstream=['data'] + tag(1), force=True, **kw)
    assert second['key'] != first['key'] and torch.load(path, weights_only=True)['upstream'] == ['data', 'seed=1']
    with pytest.raises(train.StageError, match=r'--seed 1, this run has --seed 0'):
        train.train_loop(upstream=['data'] + tag(0), **kw)


def test_raising_an_extendable_field_continues_and_equals_one_long_run(tmp_path):
    """--wm.steps 5000 then --wm.steps 10000 trains 5000 more steps, not 10000 from scratch, and ends
    bit-identical to one 10000-step run (constant lr, rng states restored)."""
    sys.path.insert(0, ROOT)
    import train

    def run(path, steps, lr=0.1, calls=None):
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(lin.parameters(), lr=lr)

        def step_fn(step):
            if calls is not None:
                calls.append(step)
            x = torch.randn(8, 3)                  # drawn from torch's rng: the checkpoint must restore it
            loss = (lin(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad(), loss.backward(), opt.step()
            return {'loss': loss.item()}
        return train.train_loop(stage='demo', task=None, path=path, config={'steps': steps, 'lr': lr}, upstream=['u'],
                                objects={'model': lin, 'optim': opt}, step_fn=step_fn, n_steps=steps, ckpt_every=2,
                                quiet=True, extendable=('steps',))
    long = run(str(tmp_path / 'long.pt'), 6)
    calls = []
    run(str(tmp_path / 'ext.pt'), 3)
    ext = run(str(tmp_path / 'ext.pt'), 6, calls=calls)
    assert calls == [3, 4, 5] and ext['step'] == 6 and ext['done']
    assert all(torch.equal(long['model'][k], ext['model'][k]) for k in long['model'])
    assert ext['key'] == long['key']                       # downstream stages see a 6-step model either way
    assert [int(r['step']) for r in read_csv(str(tmp_path / 'ext_metrics.csv'))] == list(range(1, 7))
    for steps, lr in [(8, 0.2), (4, 0.2)]:                 # another change too, or fewer steps: from scratch
        calls = []
        run(str(tmp_path / 'ext.pt'), steps, lr=lr, calls=calls)
        assert calls[0] == 0


def test_sigkill_mid_stage_resumes(run_dir, tmp_path):
    d = str(tmp_path / 'kill')
    os.makedirs(d)
    shutil.copytree(os.path.join(run_dir, 'data'), os.path.join(d, 'data'))
    args = ['--stage', 'wm', '--preset', 'test', '--run', d, '--wm.steps', '400', '--ckpt-every', '5']
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(d, 'wm.pt')
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(ckpt):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)['step']
    assert 0 < killed_at < 400
    out = run(*args[:-2], '--wm.steps', '400', '--ckpt-every', '5')
    assert f'resuming from step {killed_at}' in out.stdout
    final = torch.load(ckpt, weights_only=True)
    assert final['done'] and final['step'] == 400
    steps = [int(r['step']) for r in read_csv(os.path.join(d, 'wm_metrics.csv'))]
    assert steps == sorted(set(steps)) and steps[-1] == 400     # no duplicated rows after the resume
    assert not [f for f in os.listdir(d) if '.tmp' in f]        # no half-written files left


def test_same_seed_same_metrics(run_dir, tmp_path):
    metrics = []
    for name in ('a', 'b'):
        d = str(tmp_path / name)
        os.makedirs(d)
        shutil.copytree(os.path.join(run_dir, 'data'), os.path.join(d, 'data'))
        run('--stage', 'wm', '--preset', 'test', '--run', d)
        metrics.append([{k: v for k, v in r.items() if k != 'time'} for r in read_csv(os.path.join(d, 'wm_metrics.csv'))])
    assert metrics[0] == metrics[1]


def test_eval_reports_and_scripted_loop(run_dir):
    """eval.py's world-model report (csv + Fig. S.7 figure), reward report, and the scripted skills through the
    evaluation loop, which must report their known success."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--preset', 'test', '--run', run_dir,
                           '--task', TASK, '--wm-report', '--reward-report', '--scripted', '--episodes', '3'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(os.path.join(run_dir, 'wm_open_loop.csv'))
    assert {r['part'] for r in rows} == {'door', 'drawer', 'led', 'bulb'} and {r['horizon'] for r in rows} == {'1', '10', '25', '50'}
    assert os.path.getsize(os.path.join(run_dir, 'figures', 'wm_rollout.png')) > 10_000
    assert f'[reward/{TASK}] held-out recorded: precision' in proc.stdout
    assert f'{TASK}   scripted seed 0: 3/3 = 100.0%' in proc.stdout


def test_button_presses_against_a_naive_scan():
    """eval.press_runs: each run of frames deeper than 3 mm is one press, (frame before, deepest, frame after),
    inside its episode; eval.button_presses windows it around its deepest frame, inside its episode; a press too
    close to the episode start is skipped."""
    sys.path.insert(0, ROOT)
    import eval as E
    depth = np.zeros(120)
    depth[30:36] = [0.004, 0.01, 0.02, 0.015, 0.005, 0.004]       # deepest at 32
    depth[50:52] = 0.002                                          # never deeper than 3 mm: not a press
    depth[60:62] = 0.01                                           # from episode 2's first frame: no frame before
    depth[64:70] = [0.01, 0.012, 0.02, 0.021, 0.01, 0.004]        # episode 2 (60..119), too early for a window
    depth[100:103] = [0.01, 0.03, 0.01]                           # deepest at 101
    split = {'scene_obs': np.zeros((120, 24)), 'episodes': np.array([[0, 59], [60, 119]])}
    split['scene_obs'][:, 2] = depth
    assert E.press_runs(split).tolist() == [[29, 32, 36], [63, 67, 70], [99, 101, 103]]
    got = E.button_presses(split, before=10, after=30)
    assert got.tolist() == [[22, 32, 59], [91, 101, 119]]          # ends clipped to the episode


def test_knn_loo_accuracy_against_a_naive_vote_and_press_features_read_the_deepest_frame():
    """eval.knn_loo_accuracy: a leave-one-out 3-NN majority vote written out as a loop; a label that is a
    function of x is predicted, one independent of x is not. eval.press_features: each feature taken at the
    press's deepest frame (the commanded target one frame earlier), Euler angles as sin/cos."""
    sys.path.insert(0, ROOT)
    import eval as E
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2)) * [1.0, 5.0]
    y = x[:, 0] > 0
    z = (x - x.mean(0)) / x.std(0)
    hits = 0
    for i in range(len(x)):
        d = sorted((float(((z[i] - z[j]) ** 2).sum()), bool(y[j])) for j in range(len(x)) if j != i)
        hits += (sum(l for _, l in d[:3]) >= 2) == y[i]
    assert E.knn_loo_accuracy(x, y, k=3) == pytest.approx(hits / len(x)) and hits / len(x) >= 0.8
    assert E.knn_loo_accuracy(x, rng.random(60) > 0.5, k=3) < 0.8
    split = {'scene_obs': rng.normal(size=(50, 24)), 'robot_obs': rng.normal(size=(50, 15)), 'actions': rng.normal(size=(50, 7))}
    f = E.press_features(split, np.array([[0, 30, 40], [5, 35, 45]]))
    assert f['button depth'][:, 0].tolist() == split['scene_obs'][[30, 35], E.BUTTON].tolist()
    assert f['hand height (TCP z)'][:, 0].tolist() == split['robot_obs'][[30, 35], 2].tolist()
    assert np.allclose(f['hand pose'][0], np.r_[split['robot_obs'][30, :3], np.sin(split['robot_obs'][30, 3:6]),
                                                 np.cos(split['robot_obs'][30, 3:6]), split['robot_obs'][30, 6]])
    assert np.allclose(f['commanded TCP target'][1, :3], split['actions'][34, :3]) and f['commanded TCP target'].shape == (2, 9)


def test_press_report_rates(run_dir):
    """eval.py --press-report on the test run: presses found in the held-out play, every figure a rate or None
    (the test operator never presses lightly)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--preset', 'test', '--run', run_dir,
                           '--press-report'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(run_dir, 'press_report.json')) as fh:
        rep = json.load(fh)
    assert rep['presses'] >= 1 and 0 <= rep['switched'] <= rep['presses'] and '[press]' in proc.stdout
    for k in ('imagined_switch_on_switched', 'imagined_switch_on_light', 'filtered_switch_on_switched',
              'filtered_switch_on_light'):
        assert rep[k] is None or 0.0 <= rep[k] <= 1.0, (k, rep[k])
    for k, v in rep['knn_accuracy'].items():
        assert k in ('presses', 'k') or v is None or 0.0 <= v <= 1.0, (k, v)
    assert sorted(rep['imagined_from_frames_before_deepest']) == ['-2', '0', '6']
    for v in rep['imagined_from_frames_before_deepest'].values():
        assert len(v) == 2 and all(r is None or 0.0 <= r <= 1.0 for r in v), v


def test_gap_report_runs_the_evaluation_unchanged(run_dir):
    """eval.py --gap-report: its simulator episodes are the evaluation's (same starts, same success as the
    results.csv row), and imagined / replayed success rates are rates."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--preset', 'test', '--run', run_dir,
                           '--task', TASK, '--gap-report', '--policy', 'base', 'diwa'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(os.path.join(run_dir, 'results.csv'))
    for policy in ('base', 'diwa'):
        with open(os.path.join(run_dir, TASK, f'gap_{policy}_s0.json')) as fh:
            gap = json.load(fh)
        row = [r for r in rows if r['policy'] == policy and r['seed'] == '0'][-1]
        assert gap['episodes'] == int(row['episodes']) and gap['real_success'] == float(row['success'])
        for k in ('imagined_success', 'imagined_on_real_success', 'imagined_on_real_failure',
                  'replay_on_real_success', 'replay_on_real_failure', 'posterior_on_real_success',
                  'posterior_on_real_failure'):
            assert gap[k] is None or 0.0 <= gap[k] <= 1.0, (k, gap[k])
        assert f'[gap/{TASK}] {policy} seed 0: simulator' in proc.stdout


def test_start_conditioned_classifier_trains_finetunes_and_reports(run_dir, tmp_path):
    """--reward.start_conditioned: a classifier of (z_t, z_t - z_0) is trained on the inherited run, DiWA is
    fine-tuned on it (dream_ppo passes each episode's first latent), and eval.py's reward and gap reports score
    with it, including the classifier on the real frames' latents."""
    d = str(tmp_path / 'start')
    common = ['--preset', 'test', '--run', d, '--inherit', run_dir, '--task', TASK]
    run('--stage', 'reward', *common, '--reward.start_conditioned', 'true')
    ckpt = torch.load(os.path.join(d, TASK, 'reward.pt'), weights_only=True)
    feat_dim = ckpt['extra']['feat_dim']
    assert ckpt['config']['start_conditioned'] and ckpt['model']['f_psi.0.weight'].shape[1] == 2 * feat_dim
    run('--stage', 'finetune', *common, '--reward.start_conditioned', 'true')
    for flags in (['--reward-report'], ['--gap-report', '--policy', 'diwa']):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), *common, *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(d, TASK, 'reward_report.json')) as fh:
        rep = json.load(fh)
    with open(os.path.join(d, TASK, 'gap_diwa_s0.json')) as fh:
        gap = json.load(fh)
    assert all(0.0 <= rep[k] <= 1.0 for k in ('precision', 'recall', 'imagined_final_success',
                                          'imagined_success_frame', 'imagined_false_alarm'))
    posterior = [gap[k] for k in ('posterior_on_real_success', 'posterior_on_real_failure') if gap[k] is not None]
    assert posterior and all(0.0 <= p <= 1.0 for p in posterior)     # scored on the real frames, against z_0


def test_eval_snapshots_flag_evaluates_the_weights_kept_along_fine_tuning(run_dir):
    """eval.py --snapshots (Fig. 3 outside --stage report): one results.csv row per kept snapshot, named
    'diwa@<step>' after its file; a second call finds them all up to date."""
    kept = sorted(int(f[4:-3]) for f in os.listdir(os.path.join(run_dir, TASK, 'diwa_s0_snapshots')))
    assert kept
    cmd = [sys.executable, os.path.join(ROOT, 'eval.py'), '--preset', 'test', '--run', run_dir, '--task', TASK,
           '--policy', 'diwa', '--snapshots']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(os.path.join(run_dir, 'results.csv'))
    assert sorted(int(r['policy'][5:]) for r in rows if r['policy'].startswith('diwa@')) == kept
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count('up to date') == len(kept) + 1
    assert len(read_csv(os.path.join(run_dir, 'results.csv'))) == len(rows)


def test_options_added_later_keep_old_keys_at_their_old_behaviour():
    """A setting in train.LATER_FIELDS at its default (the earlier behaviour) leaves a checkpoint's key as it
    was without it; any other value changes the key and is named as the change."""
    sys.path.insert(0, ROOT)
    import train as TR
    old = {'lr': 3e-4, 'steps': 10}
    for field, default in TR.LATER_FIELDS.items():
        assert TR.config_key({**old, field: default}, ['u']) == TR.config_key(old, ['u'])
        assert TR.config_key({**old, field: not default}, ['u']) != TR.config_key(old, ['u'])
        assert field in TR.describe_change(old, {**old, field: not default})
        assert TR.describe_change(old, {**old, field: default}) == 'an upstream checkpoint changed'


@pytest.mark.parametrize('script', ['train.py', 'eval.py', 'bench.py', 'env.py'])
def test_help_prints(script):
    """--help lists every flag (a '%' in a help string once crashed argparse)."""
    out = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and 'usage:' in out.stdout, out.stderr[-500:]


def test_report_runs_variants_and_a_rerun_changes_nothing(run_dir, tmp_path):
    """--stage report on top of a finished run: the variants inherit what they do not change (no world model,
    BC or classifier is retrained for the alpha_BC variants), the hybrid one trains its own world model, DPPO
    counts its simulator steps; results.md / results.csv / figures appear, and a second run only rewrites them."""
    d, out = str(tmp_path / 'rep'), str(tmp_path / 'results')
    shutil.copytree(run_dir, d)
    args = ['--stage', 'report', '--preset', 'test', '--run', d, '--tasks', TASK, '--report-task', TASK,
            '--seeds', '0', '--report-dir', out]
    first = run(*args).stdout
    alpha = os.path.join(d, 'variants', 'alpha_bc_0')
    assert sorted(f for f in os.listdir(os.path.join(alpha, TASK)) if not f.startswith('.')) == [
        'diwa_s0.pt', 'diwa_s0_metrics.csv', 'diwa_s0_snapshots']                # (.diwa_s0.pt.lock: its writer lock)
    assert 'wm.pt: inherited' in first and os.path.isfile(os.path.join(d, 'variants', 'hybrid', 'wm.pt'))
    assert torch.load(os.path.join(alpha, TASK, 'diwa_s0.pt'), weights_only=True)['config']['alpha_bc'] == 0.0
    dppo = torch.load(os.path.join(d, TASK, 'dppo_s0.pt'), weights_only=True)['state']['counters']
    assert dppo['sim_steps'] > 0 and dppo['imagined_steps'] == 0
    md = open(os.path.join(out, 'results.md')).read()
    for needle in ['## Table I', '## Fig. 3', 'alpha_BC = 0.5', 'decoded-state reward', 'DPPO on', '## Fig. S.7']:
        assert needle in md, needle
    row = next(line for line in md.splitlines() if line.startswith(f'| {TASK} |')).split('|')
    # Table I's DPPO column: steps to match DiWA, or 0 where DiWA does not beat the base policy
    base_pct, diwa_pct = (float(row[i].split('±')[0]) for i in (2, 3))
    # (first on DPPO's evaluated snapshots, then on its rollouts)
    assert (row[7].strip() == '0 (DiWA ≤ base)') if diwa_pct <= base_pct else \
        re.fullmatch(r'((0|\d+k)-\d+k|> \d+k) \(rollouts (> )?\d+k\)', row[7].strip()), row
    ir = next(line for line in md.split('## Imagined vs. real')[1].splitlines() if line.startswith(f'| {TASK} |'))
    assert all(0 <= float(c) <= 100 for c in ir.split('|')[2:5]), ir   # imagined first / last 10 it., real base
    for fig in ['fig3_finetuning_curves.png', 'figS5_dppo_vs_diwa.png', 'fig2_s6_variants.png', 'figS7_wm_rollout.png']:
        assert os.path.getsize(os.path.join(out, 'figures', fig)) > 5_000, fig
    rows = read_csv(os.path.join(out, 'results.csv'))
    assert {r['variant'] for r in rows} >= {'main', 'alpha_bc_0', 'hybrid_decoder'}
    assert any(r['policy'].startswith('diwa@') for r in rows)          # Fig. 3: the snapshots were evaluated
    # Fig. S.5 / Table I: DPPO's snapshots too, each with the simulator steps DPPO had taken by then
    snaps = sorted((int(r['policy'][5:]), int(r['sim_steps_finetune'])) for r in rows if r['policy'].startswith('dppo@'))
    assert snaps and all(0 < a[1] < b[1] for a, b in zip(snaps, snaps[1:])), snaps
    assert snaps[-1][1] == dppo['sim_steps'], (snaps, dppo)
    ckpts = {os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
             for dp, _, fs in os.walk(d) for f in fs if f.endswith(('.pt', '.csv'))}
    readme = open(os.path.join(ROOT, 'README.md')).read()
    t0 = time.time()
    second = run(*args).stdout
    assert time.time() - t0 < 120
    assert {f: os.path.getmtime(f) for f in ckpts} == ckpts                # nothing re-ran
    assert open(os.path.join(out, 'results.md')).read() == md                # the same report,
    assert second.count('results.md updated') == 1, second                   # written once, not after every unit
    assert open(os.path.join(ROOT, 'README.md')).read() == readme            # a report outside the repo: not its README


def test_diwa_beats_base_decides_table_i_dppo(tmp_path):
    """The report runs DPPO on a task only where DiWA's mean real success beats the base policy's, the
    latest row per seed counting; where it does not, Table I's DPPO cell says 0 without any DPPO run."""
    import eval as E
    run_ = str(tmp_path)
    row = lambda task, policy, seed, success: {
        'task': task, 'policy': policy, 'seed': seed, 'episodes': 10, 'successes': int(10 * success),
        'success': success, 'ci_low': 0.0, 'ci_high': 1.0, 'mean_steps': 72, 'sim_steps_finetune': 0,
        'preset': 'test', 'env': 'desk', 'ckpt_key': 'k', 'commit': 'c', 'wall_s': 1.0}
    E.write_rows(os.path.join(run_, 'results.csv'), [
        row('open_drawer', 'base', 0, 0.2), row('open_drawer', 'diwa', 0, 0.5), row('open_drawer', 'base', 1, 0.3),
        row('turn_on_led', 'base', 0, 0.6), row('turn_on_led', 'diwa', 0, 0.7), row('turn_on_led', 'diwa', 0, 0.4),
        row('close_drawer', 'base', 0, 0.8)])
    assert E.diwa_beats_base(run_, 'open_drawer', [0, 1])            # 0.5 > mean(0.2, 0.3)
    assert not E.diwa_beats_base(run_, 'turn_on_led', [0])           # the latest DiWA row (0.4) counts
    assert not E.diwa_beats_base(run_, 'close_drawer', [0])          # no DiWA yet
    md = open(E.write_report(run_, str(tmp_path / 'out'), 'test', seeds=[0])).read()
    led = next(line for line in md.splitlines() if line.startswith('| turn_on_led |')).split('|')
    assert led[7].strip() == '0 (DiWA ≤ base)', led


def test_report_names_tasks_whose_seeds_share_one_bc_policy(tmp_path):
    """Table I's base is the mean over seeds of each seed's own BC policy; where the base rows of several seeds
    have one checkpoint key (a run made when every seed fine-tuned bc.pt), the text says so for those tasks."""
    import eval as E
    row = lambda task, seed, key: {'task': task, 'policy': 'base', 'seed': seed, 'episodes': 10, 'successes': 5,
                                   'success': 0.5, 'preset': 'test', 'env': 'desk', 'ckpt_key': key, 'commit': 'c'}
    E.write_rows(os.path.join(tmp_path, 'results.csv'), [row('open_drawer', 0, 'a'), row('open_drawer', 1, 'a'),
                                                         row('turn_on_led', 0, 'b'), row('turn_on_led', 1, 'c')])
    md = open(E.write_report(str(tmp_path), str(tmp_path / 'out'), 'test', seeds=[0, 1])).read()
    assert "base column is the mean over seeds of each seed's own BC policy" in md
    assert "| task | base (each seed's BC) |" in md
    note = md.split('Not so for ')[1].split('Paper numbers')[0]
    assert note.startswith('open_drawer, from a run made before') and 'turn_on_led' not in note


def test_dppo_steps_to_match_read_on_its_evaluated_snapshots():
    """Table I: the interval of simulator steps in which DPPO's evaluated policy (snapshots and final, by steps,
    the latest row of each) first reaches DiWA's success; hi None when none does; (0, None, 0) unevaluated."""
    import eval as E
    row = lambda policy, success, sim, seed=0: {'task': 'close_drawer', 'policy': policy, 'seed': str(seed),
                                                'success': str(success), 'sim_steps_finetune': str(sim)}  # as read
    rows = [row('dppo', 1.0, 144000), row('dppo@16', 0.95, 57600), row('dppo@8', 0.5, 28800),
            row('dppo@16', 0.9, 57600),                                   # a later row of the same snapshot counts
            row('dppo@8', 0.99, 28800, seed=1), row('diwa@8', 1.0, 0)]    # another seed, another policy: ignored
    assert E.dppo_evaluated_steps_to_match(rows, 'close_drawer', 0, 0.85) == (28800, 57600, 144000)
    assert E.dppo_evaluated_steps_to_match(rows, 'close_drawer', 0, 0.92) == (57600, 144000, 144000)
    assert E.dppo_evaluated_steps_to_match(rows, 'close_drawer', 0, 0.5) == (0, 28800, 144000)
    assert E.dppo_evaluated_steps_to_match(rows[:4], 'close_drawer', 0, 1.01) == (144000, None, 144000)
    assert E.dppo_evaluated_steps_to_match(rows, 'open_drawer', 0, 0.5) == (0, None, 0)


def test_report_drops_figures_whose_data_are_gone(tmp_path):
    """A figure left in results/figures by an earlier report is removed when the run no longer has its data,
    so the committed figures are always the ones results.md links."""
    import eval as E
    out, run_ = tmp_path / 'results', tmp_path / 'run'
    (out / 'figures').mkdir(parents=True), run_.mkdir()
    stale = out / 'figures' / 'fig2_s6_variants.png'
    stale.write_bytes(b'old figure')
    md = open(E.write_report(str(run_), str(out), 'test', seeds=[0])).read()
    assert not stale.exists() and 'fig2_s6_variants.png' not in md and '## Table I' in md


def test_report_rewrites_only_the_readme_block_and_is_idempotent(tmp_path):
    """The README's <!-- report:begin/end --> block gets results.md's Table I and wall-clock (headings one level
    down, figure links relative to the README); the text around it is kept byte for byte, a second report
    with nothing new leaves the file unchanged, and a README without the markers is not touched."""
    import eval as E
    run_, out = tmp_path / 'run', tmp_path / 'results'
    run_.mkdir()
    E.write_rows(str(run_ / 'results.csv'), [{
        'task': 'open_drawer', 'policy': p, 'seed': 0, 'episodes': 10, 'successes': int(10 * s), 'success': s,
        'ci_low': 0.0, 'ci_high': 1.0, 'mean_steps': 72, 'sim_steps_finetune': 0, 'preset': 'test', 'env': 'desk',
        'ckpt_key': 'k', 'commit': 'c', 'wall_s': 1.0} for p, s in [('base', 0.2), ('diwa', 0.5)]])
    readme = tmp_path / 'README.md'
    before, after = '# Project\n\n## Results\nhand-written intro\n', '\nhand-written analysis\n## License\n'
    readme.write_text(before + E.README_BEGIN + '\nold numbers\n' + E.README_END + after)
    E.write_report(str(run_), str(out), 'test', seeds=[0], readme=str(readme))
    text = readme.read_text()
    assert text.startswith(before + E.README_BEGIN) and text.endswith(E.README_END + after)
    block = text[len(before):-len(after)]
    assert 'old numbers' not in block and '\n### Table I: base vs. DiWA\n' in block and '### Wall-clock' in block
    assert '| open_drawer | 20.0 ± 0.0 (n=1) | 50.0 ± 0.0 (n=1) | +30.0 |' in block
    assert '](figures/' not in block and 'DiWA on the built-in desk' not in block    # no title, links fixed
    E.write_report(str(run_), str(out), 'test', seeds=[0], readme=str(readme))
    assert readme.read_text() == text
    plain = tmp_path / 'PLAIN.md'
    plain.write_text('no markers\n')
    assert not E.update_readme(str(plain), str(out), ['x']) and plain.read_text() == 'no markers\n'
    inner = tmp_path / 'docs' / 'README.md'             # results/ lies outside docs/: not this README's report
    inner.parent.mkdir()
    inner.write_text(E.README_BEGIN + E.README_END)
    assert not E.update_readme(str(inner), str(out), ['x']) and inner.read_text() == E.README_BEGIN + E.README_END


@pytest.mark.parametrize('stage, flags, n_steps', [
    ('bc', ['--bc.epochs', '300'], None),
    ('reward', ['--reward.epochs', '200'], None),
    ('finetune', ['--ft.iterations', '30'], 30),
    ('dppo', ['--ft.iterations', '12'], 12),
])
def test_sigkill_any_learned_stage_resumes(run_dir, tmp_path, stage, flags, n_steps):
    """SIGKILL in the middle of bc / reward / finetune / dppo (after a few checkpoints), then the same command:
    it resumes from the last checkpoint, finishes, and leaves no temp file or duplicated metrics row."""
    d = str(tmp_path / stage)
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns('diwa_s*', 'dppo_s*', 'results.csv'))
    name = {'bc': 'bc', 'reward': 'reward', 'finetune': 'diwa_s0', 'dppo': 'dppo_s0'}[stage]
    ckpt = os.path.join(d, TASK, f'{name}.pt')
    if os.path.exists(ckpt):
        os.remove(ckpt)
        os.remove(os.path.join(d, TASK, f'{name}_metrics.csv'))
    args = ['--stage', stage, '--task', TASK, '--preset', 'test', '--run', d, *flags, '--ckpt-every', '2']
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(ckpt) and torch.load(ckpt, weights_only=True)['step'] >= 4:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = torch.load(ckpt, weights_only=True)
    assert not killed['done'], f'{stage} finished before it could be killed: lengthen it'
    out = run(*args)
    assert f"resuming from step {killed['step']}" in out.stdout
    final = torch.load(ckpt, weights_only=True)
    assert final['done'] and (n_steps is None or final['step'] == n_steps)
    steps = [int(r['step']) for r in read_csv(os.path.join(d, TASK, f'{name}_metrics.csv'))]
    assert steps == sorted(set(steps)) and steps[-1] == final['step']
    assert not [f for _, _, fs in os.walk(d) for f in fs if '.tmp' in f]


def test_sigkill_mid_eval_keeps_finished_rows(run_dir, tmp_path):
    """Evaluation writes one results.csv row per policy (atomically): killed while the second policy runs, the
    re-run keeps the first row, evaluates only what is missing, and leaves one row per policy."""
    d = str(tmp_path / 'eval')
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns('results.csv*'))
    results = os.path.join(d, 'results.csv')
    args = ['--stage', 'eval', '--task', TASK, '--preset', 'test', '--run', d, '--eval.episodes', '6']
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not os.path.exists(results):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = read_csv(results)
    assert [r['policy'] for r in first] == ['base'], 'the kill came too late: both policies were done'
    out = run(*args)
    assert 'base seed 0: up to date' in out.stdout
    rows = read_csv(results)
    assert sorted(r['policy'] for r in rows) == ['base', 'diwa'] and rows[0] == first[0]
    assert not [f for f in os.listdir(d) if '.tmp' in f]
