"""diagnose.py: the world-model, reward, press and gap reports on the test run, their maths against naive loops,
the scripted skills through the evaluation loop and the skills table."""
import json
import os

import numpy as np
import pytest
import torch

import diagnose as E
from conftest import TASK, read_csv, run


def test_eval_reports_and_scripted_loop(run_dir):
    """The world-model report (csv + Fig. S.7 figure), the reward report, and the scripted skills through the
    evaluation loop, which must report their known success."""
    common = ['--preset', 'test', '--run', run_dir, '--task', TASK, '--episodes', '3']
    out = ''.join(run(report, *common, script='diagnose.py').stdout for report in ('wm', 'reward', 'scripted'))
    rows = read_csv(os.path.join(run_dir, 'wm_open_loop.csv'))
    assert {r['part'] for r in rows} == {'door', 'drawer', 'led', 'bulb'} and {r['horizon'] for r in rows} == {'1', '10', '25', '50'}
    assert os.path.getsize(os.path.join(run_dir, 'figures', 'wm_rollout.png')) > 10_000
    assert f'[reward/{TASK}] held-out recorded: precision' in out
    assert f'{TASK}   scripted seed 0: 3/3 = 100.0%' in out


def test_button_presses_against_a_naive_scan():
    """diagnose.press_runs: each run of frames deeper than 3 mm is one press, (frame before, deepest, frame after),
    inside its episode; diagnose.button_presses windows it around its deepest frame, inside its episode; a press too
    close to the episode start is skipped."""
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
    """diagnose.knn_loo_accuracy: a leave-one-out 3-NN majority vote written out as a loop; a label that is a
    function of x is predicted, one independent of x is not. diagnose.press_features: each feature taken at the
    press's deepest frame (the commanded target one frame earlier), Euler angles as sin/cos."""
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
    """diagnose.py press on the test run: presses found in the held-out play, every figure a rate or None
    (the test operator never presses lightly)."""
    out = run('press', '--preset', 'test', '--run', run_dir, script='diagnose.py').stdout
    with open(os.path.join(run_dir, 'press_report.json')) as fh:
        rep = json.load(fh)
    assert rep['presses'] >= 1 and 0 <= rep['switched'] <= rep['presses'] and '[press]' in out
    for k in ('imagined_switch_on_switched', 'imagined_switch_on_light', 'filtered_switch_on_switched',
              'filtered_switch_on_light'):
        assert rep[k] is None or 0.0 <= rep[k] <= 1.0, (k, rep[k])
    for k, v in rep['knn_accuracy'].items():
        assert k in ('presses', 'k') or v is None or 0.0 <= v <= 1.0, (k, v)
    assert sorted(rep['imagined_from_frames_before_deepest']) == ['-2', '0', '6']
    for v in rep['imagined_from_frames_before_deepest'].values():
        assert len(v) == 2 and all(r is None or 0.0 <= r <= 1.0 for r in v), v


def test_gap_report_runs_the_evaluation_unchanged(run_dir):
    """diagnose.py gap: its simulator episodes are the evaluation's (same starts, same success as the
    results.csv row), and imagined / replayed success rates are rates."""
    out = run('gap', '--preset', 'test', '--run', run_dir, '--task', TASK, '--policy', 'base', 'diwa',
              script='diagnose.py').stdout
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
        per = gap['per_episode']                     # per start: the rates above are their means
        assert all(len(v) == gap['episodes'] for v in per.values()), {k: len(v) for k, v in per.items()}
        assert abs(np.mean(per['real']) - gap['real_success']) < 1e-9
        assert abs(np.mean(per['imagined']) - gap['imagined_success']) < 1e-3
        # a flagged state exactly where the classifier flagged the episode, with the simulator's state sizes
        assert [f is not None for f in per['flagged']] == [bool(x) for x in per['posterior']], per['flagged']
        assert all(f['step'] >= 0 and (f['scene_obs'] is None or len(f['scene_obs']) == 24 and
                                       len(f['robot_obs']) == 15) for f in per['flagged'] if f is not None)
        assert f'[gap/{TASK}] {policy} seed 0 (desk starts, sampler mean): simulator' in out and gap['starts'] == 'desk'


def test_start_conditioned_classifier_trains_finetunes_and_reports(run_dir, tmp_path):
    """--reward.start_conditioned: a classifier of (z_t, z_t - z_0) is trained on the inherited run, DiWA is
    fine-tuned on it (dream_ppo passes each episode's first latent), and diagnose.py's reward and gap reports score
    with it, including the classifier on the real frames' latents."""
    d = str(tmp_path / 'start')
    common = ['--preset', 'test', '--run', d, '--inherit', run_dir, '--task', TASK]
    run('--stage', 'reward', *common, '--reward.start_conditioned', 'true')
    ckpt = torch.load(os.path.join(d, TASK, 'reward.pt'), weights_only=True)
    feat_dim = ckpt['extra']['feat_dim']
    assert ckpt['config']['start_conditioned'] and ckpt['model']['f_psi.0.weight'].shape[1] == 2 * feat_dim
    run('--stage', 'finetune', *common, '--reward.start_conditioned', 'true')
    for flags in (['reward'], ['gap', '--policy', 'diwa']):
        run(*flags, *common, script='diagnose.py')
    with open(os.path.join(d, TASK, 'reward_report.json')) as fh:
        rep = json.load(fh)
    with open(os.path.join(d, TASK, 'gap_diwa_s0.json')) as fh:
        gap = json.load(fh)
    assert all(0.0 <= rep[k] <= 1.0 for k in ('precision', 'recall', 'imagined_final_success',
                                          'imagined_success_frame', 'imagined_false_alarm'))
    posterior = [gap[k] for k in ('posterior_on_real_success', 'posterior_on_real_failure') if gap[k] is not None]
    assert posterior and all(0.0 <= p <= 1.0 for p in posterior)     # scored on the real frames, against z_0


def test_imagined_demo_end_rates_by_hand():
    """demo_end_rates: the last frame, the recorded demo's own success frame, and any frame, each p > thr."""
    scores = [np.array([0.1, 0.9, 0.2, 0.95]),      # own success frame 1: hit there, hit at the end
              np.array([0.1, 0.3, 0.85, 0.7]),       # own success frame 1: lags (0.3), reached at 2, gone at the end
              np.array([0.0, 0.1, 0.2])]             # never
    final, at_success, reached = E.demo_end_rates(scores, np.array([1, 1, 2]), 0.8)
    assert (final, at_success, reached) == (1 / 3, 1 / 3, 2 / 3)
    assert E.demo_end_rates(scores, np.array([3, 2, 0]), 0.5)[1] == 2 / 3    # 0.95 and 0.85 above, 0.0 not


def test_check_skills_reports_the_share_within_a_window_and_an_episode(capsys):
    """check_skills' table: the clean LED press (~34 steps) fits a 64-frame CALVIN window and a 72-step episode;
    a slow operator (speed drawn per episode from [0.25, 0.26]: a quarter of the clean skill's) still presses the
    button, but only after 70-80 steps: neither within a window nor within an episode."""
    rates = E.check_skills(episodes=2, tasks=['turn_on_led'])
    line = capsys.readouterr().out
    assert rates == {'turn_on_led': 1.0} and 'within 64: 100.0%' in line and 'within 72: 100.0%' in line
    E.check_skills(episodes=2, max_steps=300, tasks=['turn_on_led'], speed_range=(0.25, 0.26), gain_range=(0.5, 0.5))
    line = capsys.readouterr().out
    assert '2/2' in line and 'within 64:   0.0%' in line and 'within 72:   0.0%' in line


def test_arm_outside_calvin_fails_at_parse_time(tmp_path):
    """--arm picks the arm at CALVIN's starts: with the desk it is refused in one line before anything runs."""
    out = run('gap', '--preset', 'test', '--run', str(tmp_path), '--arm', 'neutral', script='diagnose.py', check=False)
    assert out.returncode == 2 and '--arm' in out.stderr.strip().splitlines()[-1] and os.listdir(tmp_path) == []
