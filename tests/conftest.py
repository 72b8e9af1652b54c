"""Shared by every test file: the project root on sys.path (the core files are flat modules, not a package), the
command-line helpers, and one test-preset run folder per stage, built once per test run: a stage that fails
fails its own tests (and those of the stages after it), not the earlier stages'."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TASK = 'turn_on_led'      # the test preset's play data (seed 0) has a window of it in each split; checked below


def pytest_configure(config):
    config.addinivalue_line('markers', 'calvin: needs the real calvin_env (skipped with the reason when absent)')


def run(*args, check=True, timeout=600, script='train.py'):
    """`python <script> args...` in the project root; with check, a non-zero exit fails with its output."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} {" ".join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                             f'{proc.stderr[-3000:]}')
    return proc


def read_csv(path):
    with open(path, newline='') as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope='package')
def data_dir(tmp_path_factory):
    """`--stage collect` on the test preset: a run folder holding play data only."""
    d = str(tmp_path_factory.mktemp('run'))
    run('--stage', 'collect', '--preset', 'test', '--run', d)
    for split in ('training', 'validation'):
        ann = np.load(os.path.join(d, 'data', split, 'lang_annotations', 'auto_lang_ann.npy'), allow_pickle=True).item()
        assert TASK in ann['language']['task'], f'test-preset play data has no {TASK} window in {split}: pick another TASK'
    return d


@pytest.fixture(scope='package')
def run_dir(data_dir):
    """The same folder after `--stage all` for TASK: world model, BC, classifier, DiWA and their evaluation."""
    run('--stage', 'all', '--preset', 'test', '--run', data_dir, '--tasks', TASK)
    return data_dir


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules use it with pytestmark): on a shared 2-core machine OpenMP contention
    makes the small models of the unit tests about 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
