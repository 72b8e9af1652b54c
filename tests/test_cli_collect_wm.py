"""CLI of the first stages on the `test` preset: invalid flags fail at parse time; the shared training loop's NaN guard,
writer lock, seeds, extension and resume; a SIGKILLed world model resumes; the same seed gives the same metrics."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TASK, read_csv, run


@pytest.mark.parametrize('flags, message', [
    (['--stage', 'bc', '--task', 'fly_to_moon'], 'unknown task'),
    (['--stage', 'all', '--tasks', 'fly_to_moon'], 'unknown task'),
    (['--stage', 'finetune', '--task', TASK, '--ft.K_ft', '30'], 'K_ft'),
    (['--stage', 'finetune', '--task', TASK, '--ft.objective', 'bogus'], "objective must be one of"),
    (['--stage', 'eval', '--task', TASK, '--eval.sampler', 'noisy'], '--eval.sampler must be one of'),
    (['--stage', 'bc', '--task', TASK, '--demos', '0'], '--demos must be > 0'),
    (['--stage', 'wm', '--wm.batch', '-4'], 'must be >= 0'),
    (['--stage', 'bc'], 'needs --task'),
    (['--stage', 'wm', '--run', '/proc/diwa_cannot_write_here'], 'cannot write'),
])
def test_invalid_flags_fail_at_parse_time(flags, message):
    out = run(*flags, '--preset', 'test', check=False)
    assert out.returncode == 2 and 'usage:' in out.stderr and message in out.stderr, out.stderr


def test_nan_loss_stops_with_stage_step_and_term(tmp_path):
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
    import train
    lin, path = torch.nn.Linear(2, 2), str(tmp_path / 'x.pt')
    kw = dict(stage='demo', task=None, path=path, config={'lr': 1}, upstream=[], objects={'model': lin},
              n_steps=4, ckpt_every=2, quiet=True, step_fn=lambda s: {'loss': 1.0})
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time, data\nwith data.writer_lock(sys.argv[1]):\n'
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


def test_another_seed_refuses_to_overwrite_a_checkpoint(tmp_path):
    """wm.pt / reward.pt do not name the seed in their path: --seed 1 on a run with a seed-0 checkpoint is
    an error that names both seeds and leaves the checkpoint as it was; --force replaces it."""
    import argparse
    import train
    path = str(tmp_path / 'wm.pt')
    kw = dict(stage='demo', task=None, path=path, config={'lr': 1}, objects={'model': torch.nn.Linear(2, 2)},
              step_fn=lambda s: {'loss': 1.0}, n_steps=2, ckpt_every=1, quiet=True)
    tag = lambda seed: train.seed_tag(argparse.Namespace(seed=seed))
    assert tag(0) == ['seed=0'] and tag(3) == ['seed=3']
    first = train.train_loop(upstream=['data'] + tag(0), **kw)
    assert first['key'] == train.data.config_key({'lr': 1}, ['data', 'seed=0'])
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


def test_sigkill_mid_stage_resumes(data_dir, tmp_path):
    d = str(tmp_path / 'kill')
    os.makedirs(d)
    shutil.copytree(os.path.join(data_dir, 'data'), os.path.join(d, 'data'))
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


def test_same_seed_same_metrics(data_dir, tmp_path):
    metrics = []
    for name in ('a', 'b'):
        d = str(tmp_path / name)
        os.makedirs(d)
        shutil.copytree(os.path.join(data_dir, 'data'), os.path.join(d, 'data'))
        run('--stage', 'wm', '--preset', 'test', '--run', d)
        metrics.append([{k: v for k, v in r.items() if k != 'time'} for r in read_csv(os.path.join(d, 'wm_metrics.csv'))])
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize('script', ['train.py', 'report.py', 'diagnose.py', 'bench.py'])
def test_help_prints(script):
    """--help lists every flag (a '%' in a help string once crashed argparse)."""
    out = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and 'usage:' in out.stdout, out.stderr[-500:]


def test_bench_names_what_bounds_a_loop_below_half_the_bf16_limit():
    """bench.py's fraction of the limits: a loop under half the bf16 matmul limit says what bounds it; above it,
    or with no bf16 limit measured, it does not."""
    import bench
    limits = {'fp32': 100.0, 'bf16': 400.0}
    low, high = bench.of_limits(150.0, limits, 'ppo'), bench.of_limits(250.0, limits, 'ppo')
    assert '150% of the fp32 limit, 38% of the bf16 limit; bound by' in low and bench.BOUNDS['ppo'] in low
    assert high == '250.0 GFLOP/s (250% of the fp32 limit, 62% of the bf16 limit)'
    assert 'bound' not in bench.of_limits(10.0, {'fp32': 100.0}, 'ppo') + bench.of_limits(10.0, limits, 'bc')


def test_bench_dppo_without_dppo_code_says_so_in_one_line(tmp_path, capsys):
    """bench.py dppo times our update against DPPO's own code: without a checkout of it (no --dppo-src, or a folder
    without model/diffusion/) it prints one line saying what it needs, and runs nothing."""
    import bench
    bench.bench_dppo(torch.device('cpu'), True, None)
    bench.bench_dppo(torch.device('cpu'), True, str(tmp_path))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith('dppo: skipped (--dppo-src: a checkout of irom-lab/dppo') for l in lines)


def test_collect_with_data_or_calvin_without_calvin_env_fails_with_one_line(tmp_path, monkeypatch, capsys):
    """--stage collect with --data (a dataset brought by the user) is refused in one line; --env calvin without
    calvin_env installed fails at parse time, naming it."""
    out = run('--stage', 'collect', '--preset', 'test', '--run', str(tmp_path), '--data', str(tmp_path), check=False)
    assert out.returncode == 2 and 'needs no collect' in out.stderr and len(out.stderr.strip().splitlines()) == 1
    import importlib.util
    import train
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'calvin_env' else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(['--stage', 'collect', '--preset', 'test', '--run', str(tmp_path), '--env', 'calvin'])
    assert exit_.value.code == 2 and '--env calvin needs the real CALVIN simulator' in capsys.readouterr().err
