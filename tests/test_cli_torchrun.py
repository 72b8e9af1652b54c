"""`torchrun --nproc_per_node 2 train.py --stage wm` on the `test` preset (gloo on CPU): data-parallel world-model
training equals one process's on the global batch, rank 0 alone writes, and a killed run resumes."""
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, read_csv, run


def torchrun(*args, **popen):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(ROOT, 'train.py'), *args, '--threads', '1']
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own process groups)."""
    children = []
    for p in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{p}/stat') as fh:
                if int(fh.read().rsplit(')', 1)[1].split()[1]) == pid:   # field 4: the parent's pid
                    children.append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    os.kill(pid, signal.SIGKILL)
    for child in children:
        kill_tree(int(child))


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_processes_train_the_world_model_that_one_process_trains_on_the_global_batch(run_dir, tmp_path):
    """2 processes x batch 2 and 1 process x batch 4 draw the same sequences and the same latent noise (each process
    keeps its rows of the global batch): after 6 steps the weights agree to 1e-6 (float summation order; measured
    7e-8) and the metrics rows are the same to 5 digits. The checkpoint records world size 2 and global batch 4, and
    its key differs from the single process's."""
    common = ['--stage', 'wm', '--preset', 'test', '--data', os.path.join(run_dir, 'data'), '--wm.steps', '6',
              '--ckpt-every', '2']
    out = finish(torchrun(*common, '--run-dir', str(tmp_path / 'two'), '--wm.batch', '2'))
    assert out.count('2 process(es) x batch 2 = global batch 4') == 1, out      # rank 0 alone prints
    run(*common, '--run', str(tmp_path / 'one'), '--wm.batch', '4', '--threads', '1')
    one, two = (torch.load(str(tmp_path / d / 'wm.pt'), weights_only=True) for d in ('one', 'two'))
    assert two['done'] and two['extra']['world_size'] == 2 and two['extra']['global_batch'] == 4
    assert two['key'] != one['key'] and 'world_size=2' in two['upstream']
    for k, v in one['model'].items():
        torch.testing.assert_close(two['model'][k], v, atol=1e-6, rtol=1e-5, msg=k)
    rows = [read_csv(str(tmp_path / d / 'wm_metrics.csv')) for d in ('one', 'two')]
    assert [r['step'] for r in rows[0]] == [r['step'] for r in rows[1]] == [str(s) for s in range(1, 7)]
    for a, b in zip(*rows):
        assert all(abs(float(a[k]) - float(b[k])) <= 1e-4 * abs(float(a[k])) + 1e-6 for k in a if k != 'time'), (a, b)


def test_killed_torchrun_resumes_with_the_same_command(run_dir, tmp_path):
    """SIGKILL to torchrun and its workers after a checkpoint; the same command resumes from it and finishes, with
    one metrics row per logged step and no temp file. A stage other than wm refuses to run under torchrun."""
    d = str(tmp_path / 'kill')
    args = ['--stage', 'wm', '--preset', 'test', '--data', os.path.join(run_dir, 'data'), '--run-dir', d,
            '--wm.steps', '100', '--wm.batch', '2', '--ckpt-every', '2']
    proc, ckpt = torchrun(*args), os.path.join(d, 'wm.pt')
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(ckpt) and torch.load(ckpt, weights_only=True)['step'] >= 4:
            break
        time.sleep(0.1)
    kill_tree(proc.pid)
    proc.communicate()
    killed = torch.load(ckpt, weights_only=True)
    assert not killed['done'], 'the run finished before it could be killed: lengthen it'
    out = finish(torchrun(*args))
    assert f"resuming from step {killed['step']}/100" in out, out[-2000:]
    final = torch.load(ckpt, weights_only=True)
    assert final['done'] and final['step'] == 100
    steps = [int(r['step']) for r in read_csv(os.path.join(d, 'wm_metrics.csv'))]
    assert steps == sorted(set(steps)) and steps[-1] == 100
    assert not [f for f in os.listdir(d) if '.tmp' in f]
    bc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--stage', 'bc', '--task', 'open_drawer',
                         '--preset', 'test', '--run', d], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, 'WORLD_SIZE': '2'})
    assert bc.returncode == 2 and 'only --stage wm runs under torchrun' in bc.stderr, bc.stderr
