"""`train.py --stage eval` on the `test` preset: the snapshots kept along fine-tuning, and resume after SIGKILL."""
import os
import shutil
import signal
import subprocess
import sys
import time


from conftest import ROOT, TASK, read_csv, run


def test_eval_snapshots_flag_evaluates_the_weights_kept_along_fine_tuning(run_dir):
    """--stage eval --eval-snapshots (Fig. 3 outside the report): one results.csv row per kept snapshot, named
    'diwa@<step>' after its file; a second call finds them all up to date."""
    kept = sorted(int(f[4:-3]) for f in os.listdir(os.path.join(run_dir, TASK, 'diwa_s0_snapshots')))
    assert kept
    cmd = ['--stage', 'eval', '--preset', 'test', '--run', run_dir, '--task', TASK, '--policies', 'diwa',
           '--eval-snapshots']
    run(*cmd)
    rows = read_csv(os.path.join(run_dir, 'results.csv'))
    assert sorted(int(r['policy'][5:]) for r in rows if r['policy'].startswith('diwa@')) == kept
    again = run(*cmd)
    assert again.stdout.count('up to date') == len(kept) + 1
    assert len(read_csv(os.path.join(run_dir, 'results.csv'))) == len(rows)


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


def test_eval_sampler_writes_its_own_rows_and_the_report_reads_one_sampler(run_dir, tmp_path):
    """--eval.sampler ddpm evaluates the base policy again (its rows sit beside the 'mean' ones, named in the
    'sampler' column), is then up to date, and the report reads the rows of the sampler it is given only."""
    import report
    d = str(tmp_path / 'sampler')
    shutil.copytree(run_dir, d)
    args = ['--stage', 'eval', '--task', TASK, '--preset', 'test', '--run', d, '--policies', 'base']
    run(*args)
    first = run(*args, '--eval.sampler', 'ddpm')
    assert 'up to date' not in first.stdout
    base = {r['sampler']: r for r in read_csv(os.path.join(d, 'results.csv')) if r['policy'] == 'base'}
    assert sorted(base) == ['ddpm', 'mean'] and base['ddpm']['ckpt_key'] == base['mean']['ckpt_key']
    assert 'base seed 0: up to date' in run(*args, '--eval.sampler', 'ddpm').stdout
    assert {r['sampler'] for r in report.results_of(d, 'ddpm')} == {'ddpm'}
    assert [r for r in report.results_of(d, 'mean') if r['policy'] == 'base'] == [base['mean']]
