"""CLI of the policy stages on the `test` preset (bc, reward, finetune, dppo, all): outputs, re-runs that skip or
say why they re-run, one BC policy per seed, one-line errors for bad checkpoints, the classifier's data, resume
after SIGKILL."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import reward as R
import world_model as W
from conftest import ROOT, TASK, read_csv, run


def reward_data(args, wm, wm_ckpt, device, **kw):
    """The classifier's training set of TASK (reward.reward_dataset on this run's demos), with `kw` settings."""
    import train
    split = train.split_of(args, 'training', wm.cfg.image_size)
    demos = train.demo_latents(args, wm, wm_ckpt, TASK, device)
    return R.reward_dataset(wm, demos, split, TASK, device, args.post_success_frames, seed=args.seed, **kw)


def test_all_stages_write_their_outputs(run_dir):
    for rel in ['data/training/ep_start_end_ids.npy', 'data/validation/ep_start_end_ids.npy', 'wm.pt',
                f'{TASK}/bc_s0.pt', f'{TASK}/reward.pt', f'{TASK}/diwa_s0.pt', 'results.csv', 'wm_metrics.csv']:
        assert os.path.exists(os.path.join(run_dir, rel)), rel
    rows = read_csv(os.path.join(run_dir, 'results.csv'))
    assert {r['policy'].split('@')[0] for r in rows} == {'base', 'diwa'}     # (@: snapshots, --eval-snapshots)
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
    """--stage bc --seeds 0 1 keeps bc_s0.pt (done) and writes bc_s1.pt beside it from its own demos; the base of
    seed 1's evaluation is bc_s1.pt, and a seed-1 fine-tuning made from another BC policy (here bc_s0.pt) is not
    evaluated with it but fine-tuned again from bc_s1.pt, with a message that says why."""
    d = str(tmp_path / 'seeds')
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns('results.csv*'))
    path = lambda name: os.path.join(d, TASK, name)
    load = lambda name: torch.load(path(name), weights_only=True)
    kept = {f: os.path.getmtime(path(f)) for f in ('bc_s0.pt', 'latents_training_s0.pt')}
    bc0 = load('bc_s0.pt')
    other = load('diwa_s0.pt')                   # a seed-1 fine-tuning made from another BC policy (bc_s0.pt)
    other['upstream'][-1], other['key'] = 1, 'made-from-bc_s0.pt'
    torch.save(other, path('diwa_s1.pt'))
    out = run('--stage', 'bc', '--task', TASK, '--preset', 'test', '--run', d, '--seeds', '0', '1').stdout
    assert f'{path("bc_s0.pt")}: already done' in out
    assert {f: os.path.getmtime(path(f)) for f in kept} == kept            # seed 0's policy and demos untouched
    bc1 = load('bc_s1.pt')
    assert bc1['done'] and bc1['key'] != bc0['key'] and bc1['upstream'][-1] == 'seed=1'
    assert os.path.isfile(path('latents_training_s1.pt'))                  # seed 1 draws its own 50 demos
    out = run('--stage', 'eval', '--preset', 'test', '--run', d, '--task', TASK, '--seed', '1').stdout
    assert 'diwa_s1.pt: fine-tuned from another BC policy than this seed\'s: not evaluated' in out
    rows = read_csv(os.path.join(d, 'results.csv'))
    assert [(r['policy'], r['seed'], r['ckpt_key']) for r in rows] == [('base', '1', bc1['key'])]
    out = run('--stage', 'finetune', '--task', TASK, '--preset', 'test', '--run', d, '--seed', '1').stdout
    assert f'{path("diwa_s1.pt")}: re-running, its BC policy (bc_s1.pt) changed\n' in out
    diwa1 = load('diwa_s1.pt')
    assert diwa1['done'] and diwa1['upstream'][1] == bc1['key'] and bc0['key'] not in diwa1['upstream']


def test_checkpoints_of_another_version_give_one_line_errors(run_dir, tmp_path):
    """A run folder written by another version of diwa is never silently upgraded: a checkpoint whose settings
    miss a field or hold an unknown one, or a BC policy under its old name, stops the stage with one line that
    names what does not match and how to rebuild it."""
    d = str(tmp_path / 'old')
    shutil.copytree(run_dir, d)
    ck = torch.load(os.path.join(d, 'wm.pt'), weights_only=True)
    del ck['config']['proprio_scaled']
    ck['config']['retired_option'] = 1
    torch.save(ck, os.path.join(d, 'wm.pt'))
    out = run('--stage', 'finetune', '--task', TASK, '--preset', 'test', '--run', d, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert 'wm.pt: written by another version of diwa (settings missing: proprio_scaled; unknown: retired_option); ' \
           'rebuild it with --stage wm --force' in out.stderr
    shutil.copy(os.path.join(run_dir, 'wm.pt'), os.path.join(d, 'wm.pt'))
    os.rename(os.path.join(d, TASK, 'bc_s0.pt'), os.path.join(d, TASK, 'bc.pt'))
    out = run('--stage', 'eval', '--task', TASK, '--preset', 'test', '--run', d, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert 'bc_s0.pt: no BC policy of seed 0 (bc.pt there was written by an older version of diwa); run --stage bc' \
        in out.stderr


def test_bad_checkpoints_give_one_line_errors(run_dir, tmp_path):
    d = str(tmp_path / 'bad')
    shutil.copytree(run_dir, d)
    # the wrong stage: a policy where the world model should be
    shutil.copy(os.path.join(d, TASK, 'bc_s0.pt'), os.path.join(d, 'wm.pt'))
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
    ck = torch.load(os.path.join(d, TASK, 'bc_s0.pt'), weights_only=True)
    ck['extra']['cond_dim'] += 1
    torch.save(ck, os.path.join(d, TASK, 'bc_s0.pt'))
    out = run('--stage', 'finetune', '--task', TASK, '--preset', 'test', '--run', d, '--force', check=False)
    assert out.returncode == 2 and 'latents' in out.stderr and 'bc_s0.pt' in out.stderr


def test_reward_data_adds_imagined_latents_with_the_recorded_labels(run_dir):
    """RewardConfig.imagined: every demo / play frame a second time, imagined open loop from its sequence's first
    frame; same first deterministic state, other latents later on, labels copied from the recorded frames."""
    import data
    import train
    args = train.parse_args(['--stage', 'reward', '--preset', 'test', '--run', run_dir, '--task', TASK])
    device = torch.device('cpu')
    wm, wm_ckpt = train.load_world_model(args, device)
    split = data.load_split(os.path.join(run_dir, 'data', 'training'), wm.cfg.image_size)
    rows = np.arange(40)[None] + np.array([[0], [100]])
    post, imag = W.featurize_rows(wm, split, rows, device), W.featurize_rows(wm, split, rows, device, imagined=True)
    H = wm.cfg.deter
    assert post.shape == imag.shape == (2, 40, wm.feat_dim)
    assert torch.allclose(post[:, 0, :H], imag[:, 0, :H])          # h_0 comes from the same fresh state
    assert (post[:, 10:] - imag[:, 10:]).abs().mean() > 1e-3         # then the prior drifts off the posterior
    f0, st0, y0 = reward_data(args, wm, wm_ckpt, device)
    f1, st1, y1 = reward_data(args, wm, wm_ckpt, device, imagined=True)
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
    f5, st5, y5 = reward_data(args, wm, wm_ckpt, device, relative=True)
    assert torch.equal(f5[:n_demo], f0[:n_demo]) and torch.equal(y5[:n_demo], y0[:n_demo]) and int(y5.sum()) == int(y0.sum())
    # neg_margin: the `margin` frames before each window's first success are dropped, nothing else (naive loop)
    dropped = 0
    for succ, valid in zip(demos['success'].tolist(), demos['valid'].tolist()):
        first = succ.index(True)
        dropped += sum(valid[t] for t in range(max(0, first - 3), first))
    f2, st2, y2 = reward_data(args, wm, wm_ckpt, device, margin=3)
    assert dropped > 0 and len(f0) - len(f2) == dropped and int(y2.sum()) == int(y0.sum())
    # imagined=n: n imagined copies of every frame, each with its own sampled latents
    f3, st3, y3 = reward_data(args, wm, wm_ckpt, device, imagined=2)
    assert len(f3) == 3 * len(f0) and int(y3.sum()) == 3 * int(y0.sum())
    assert (f3[n_demo:2 * n_demo] - f3[2 * n_demo:3 * n_demo]).abs().mean() > 1e-4
    # play_frac: more play snippets, the same demo frames
    f4, st4, y4 = reward_data(args, wm, wm_ckpt, device, play_frac=1.0)
    assert len(f4) > len(f0) and torch.equal(f4[:n_demo], f0[:n_demo]) and int(y4.sum()) == int(y0.sum())


def test_play_negatives_relative_to_the_snippet_start(run_dir, monkeypatch):
    """play_negatives(relative=True): every frame where the test fails against the snippet's first frame, each with
    that first frame's latent; relative=False: the frames where the task is possible."""
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
        split = train.split_of(args, 'training', wm.cfg.image_size)
        return R.play_negatives(wm, split, TASK, device, n_seq=6, seed=0, relative=relative)

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
    f0, st0, y0 = reward_data(args, wm, wm_ckpt, device)
    f1, st1, y1 = reward_data(args, wm, wm_ckpt, device, drop_relapses=True)
    assert relapses > 0 and len(f0) - len(f1) == relapses and int(y0.sum()) == int(y1.sum())
    # the frames before the first success are kept in both
    f2, st2, _ = reward_data(args, wm, wm_ckpt, device, margin=2, drop_relapses=True)
    assert len(f1) - len(f2) == sum(int(demos['valid'][w, max(0, int(first[w]) - 2):first[w]].sum())
                                    for w in range(len(success)))


@pytest.mark.parametrize('stage, flags, n_steps', [
    ('bc', ['--bc.epochs', '300'], None),
    ('reward', ['--reward.epochs', '200'], None),
    ('finetune', ['--ft.iterations', '30'], 30),
    ('dppo', ['--ft.iterations', '12'], 12),
])
def test_sigkill_any_learned_stage_resumes(run_dir, tmp_path, stage, flags, n_steps):
    """SIGKILL in the middle of bc / reward / finetune / dppo (after a few checkpoints), then the same command:
    it resumes from the last checkpoint, finishes, and leaves no temp file or duplicated metrics row. For bc,
    reward and finetune the result equals an uninterrupted run's, weight for weight and metric for metric (DPPO's
    simulators restart from new episodes on a resume, so its continuation differs)."""
    d = str(tmp_path / stage)
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns('diwa_s*', 'dppo_s*', 'results.csv'))
    name = {'bc': 'bc_s0', 'reward': 'reward', 'finetune': 'diwa_s0', 'dppo': 'dppo_s0'}[stage]
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
    metrics = read_csv(os.path.join(d, TASK, f'{name}_metrics.csv'))
    steps = [int(r['step']) for r in metrics]
    assert steps == sorted(set(steps)) and steps[-1] == final['step']
    assert not [f for _, _, fs in os.walk(d) for f in fs if '.tmp' in f]
    if stage == 'dppo':
        return
    u = str(tmp_path / f'{stage}_uninterrupted')
    shutil.copytree(run_dir, u, ignore=shutil.ignore_patterns('diwa_s*', 'dppo_s*', 'results.csv', f'{name}.pt',
                                                              f'{name}_metrics.csv'))
    run(*[u if a == d else a for a in args])
    whole = torch.load(os.path.join(u, TASK, f'{name}.pt'), weights_only=True)
    assert whole['step'] == final['step'] and all(torch.equal(whole['model'][k], final['model'][k]) for k in final['model'])
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != 'time'} for r in rows]
    assert drop_time(read_csv(os.path.join(u, TASK, f'{name}_metrics.csv'))) == drop_time(metrics)
