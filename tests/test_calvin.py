"""The real CALVIN simulator (calvin_env, installed from a git checkout: README, "The real CALVIN"): the adapter,
the scripted skills retargeted to its scene, a dataset recorded with calvin_env in CALVIN's layout and read back, and
evaluation and a DPPO iteration in CALVIN from CALVIN's own start states. Every test here is skipped, saying why,
when calvin_env is not installed."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import diagnose
import env
import eval as E
from conftest import ROOT, TASK, read_csv, run

pytest.importorskip('calvin_env', reason='calvin_env is not installed (README: "The real CALVIN")')
pytestmark = pytest.mark.calvin


def record(adapter, folder, first_id: int, n: int, seed: int) -> tuple:
    """n frames of a slow random walk of the arm from CALVIN's own reset, written in CALVIN's layout from frame id
    first_id; rel_actions[t] is executed after frame t, actions[t] the pose it produced (real CALVIN's meaning of
    the absolute actions: the measured TCP pose of the next frame). -> (robot_obs, scene_obs) of every frame."""
    rng = np.random.default_rng(seed)
    obs = adapter.reset()
    frames = [obs]
    rel = np.zeros((n, 7))
    for t in range(n - 1):
        rel[t] = np.append(np.clip(rel[t - 1, :6] * 0.8 + rng.normal(0, 0.3, 6), -1, 1), 1.0 if t < n // 2 else -1.0)
        frames.append(adapter.step(rel[t])[0])
    rel[-1] = rel[-2]
    for t, o in enumerate(frames):
        nxt = frames[min(t + 1, n - 1)]['robot_obs']
        data.write_frame(folder, first_id + t, {
            'rel_actions': rel[t], 'actions': np.append(nxt[:6], rel[t, 6]), 'robot_obs': o['robot_obs'],
            'scene_obs': o['scene_obs'], 'rgb_static': o['rgb_obs']['rgb_static'],
            'rgb_gripper': o['rgb_obs']['rgb_gripper']})
    return np.stack([f['robot_obs'] for f in frames]), np.stack([f['scene_obs'] for f in frames])


@pytest.fixture(scope='module')
def calvin_data(tmp_path_factory):
    """Two 40-frame segments per split recorded in calvin_env, each annotated with a window of TASK (possible at
    CALVIN's reset: the LED is off) from its first frame."""
    root = tmp_path_factory.mktemp('calvin')
    adapter = env.CalvinEnvAdapter(seed=0)
    try:
        for s, split in enumerate(('training', 'validation')):
            folder = root / split
            folder.mkdir()
            segments = [(1000 * (2 * s + k), 1000 * (2 * s + k) + 39) for k in range(2)]
            for k, (a, b) in enumerate(segments):
                _, scene = record(adapter, folder, a, b - a + 1, seed=2 * s + k)
                assert env.task_possible(TASK, scene[0]), 'CALVIN reset with the LED on: pick another TASK'
            data.write_split_index(folder, segments, [(a, a + 30) for a, _ in segments], [TASK] * len(segments))
    finally:
        adapter.close()
    return str(root)


def test_adapter_resets_to_stored_states_and_closes_cleanly(calvin_data):
    """A reset to a recorded (robot_obs, scene_obs) puts the gripper where robot_obs says and restores the stored
    gripper command (not the last episode's); close() disconnects once, so the destructor prints no error."""
    split = data.load_split(os.path.join(calvin_data, 'validation'), 64)
    code = f'''
import numpy as np, data, env, eval as E
split = data.load_split({os.path.join(calvin_data, 'validation')!r}, 64)
a = env.CalvinEnvAdapter(seed=0)
a.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))           # the last command of an earlier episode: closed
for r, s in E.window_starts(split, {TASK!r}, 3, 0):
    o = a.reset(robot_obs=r, scene_obs=s)
    print('ERR', np.abs(o['robot_obs'][:3] - r[:3]).max(), 'GRIP', o['robot_obs'][14], r[14])
a.close()
del a
'''
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith('ERR')]
    assert len(lines) == 3 and all(float(x[1]) < 2e-3 and float(x[3]) == float(x[4]) for x in lines), proc.stdout
    out = (proc.stdout + proc.stderr).lower()
    assert 'not connected' not in out and 'physics client' not in out and 'from server' not in out, out[-2000:]
    assert len(split['windows']) == 2 and split['rgb_static'].shape[1:] == (64, 64, 3)


def test_geometry_is_read_from_the_scene_at_joint_value_zero():
    """CalvinEnvAdapter.geometry() finds scene D's parts where calvin_env's URDF puts them (REFERENCE.md: +q of the
    drawer along -y, of the sliding door along -x, of the switch up and back; ranges 0.22 / 0.28 / 0.088; the
    button at (-0.12, -0.12), 3.5 cm in radius, toggling the LED 1 cm down), the same whatever the joints' current
    values."""
    adapter = env.CalvinEnvAdapter(seed=0, cameras=False)
    try:
        geo = adapter.geometry()
        scene = adapter.reset()['scene_obs'].copy()
        scene[:4] = [0.2, 0.15, 0.0, 0.08]                           # door, drawer, button, switch moved
        adapter.reset(scene_obs=scene)
        moved = adapter.geometry()
        obs = adapter.reset()
        assert adapter.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))[0]['completed'] == set()   # CALVIN's oracle: none
        skill = env.ScriptedSkill('turn_on_led', np.random.default_rng(0), p_miss=1.0, geometry=geo)
        skill.act(obs)
        miss = np.linalg.norm((skill.phases[1]['goal'] - geo.button_top)[:2])   # p_miss: beside CALVIN's wider button
    finally:
        adapter.close()
    close = lambda a, b: np.allclose(a, b, atol=1e-3)
    assert close(geo.drawer_dir, (0, -1, 0)) and close(geo.door_dir, (-1, 0, 0))
    assert close(geo.switch_dir, (0, 0.5, np.sqrt(3) / 2))
    assert close([geo.drawer_max, geo.door_max, geo.switch_max], [0.22, 0.28, 0.088])
    assert close(geo.button_top, (-0.12, -0.12, 0.484)) and close(geo.drawer_knob[1], -0.2612)
    # the button and the switch trigger half-way (calvin_env's button.py / switch.py); a miss clears the button's edge
    assert close([geo.press_depth, geo.switch_on], [0.01, 0.044]) and 0.025 < geo.button_radius < 0.05
    assert geo.button_radius + env.MISS_DIST[0] - env.DESK_GEOMETRY.button_radius <= miss
    for field in ('drawer_knob', 'door_push', 'switch_knob', 'button_top'):
        assert close(getattr(moved, field), getattr(geo, field)), field


def test_scripted_skills_solve_every_task_in_calvin():
    """The scripted skills with the geometry read from calvin_env's scene solve each task from possible starts (its
    robot near its neutral pose, blocks where its own reset puts them), by CALVIN's own task oracle; with the built-in
    desk's geometry the hand presses the table where the desk's button is and the LED stays off."""
    rates = diagnose.check_skills(episodes=2, tasks=env.TASKS, env_kind='calvin', verbose=False)
    assert rates == {task: 1.0 for task in env.TASKS}
    desk = diagnose.check_skills(episodes=1, tasks=['turn_on_led'], env_kind='calvin', verbose=False,
                                 geometry=env.DESK_GEOMETRY)
    assert desk == {'turn_on_led': 0.0}


def test_play_data_collected_in_calvin(tmp_path):
    """--stage collect --env calvin: the operator plays in calvin_env with its scene's geometry; frames in CALVIN's
    layout at the preset's 64 px (CALVIN's 200 / 84 px renders resized as load_split resizes them), windows labelled by
    CALVIN's own oracle; the folder remembers it was calvin_env's (a desk collect there is refused)."""
    d = str(tmp_path / 'run')
    args = ['--stage', 'collect', '--env', 'calvin', '--preset', 'test', '--run', d, '--collect.episodes', '1',
            '--collect.episode_len', '120']
    run(*args, timeout=600)
    split = data.load_split(os.path.join(d, 'data', 'training'), 64)
    assert split['rgb_static'].shape == (120, 64, 64, 3) and split['rgb_gripper'].shape == (120, 64, 64, 3)
    assert len(split['windows']) >= 1 and set(split['window_tasks']) <= set(env.TASKS)
    assert json.load(open(os.path.join(d, 'data', 'collect_config.json')))['env'] == 'calvin'
    desk = run(*args[:2], '--preset', 'test', '--run', d, '--collect.episodes', '1', '--collect.episode_len', '120',
               check=False)
    assert desk.returncode == 2 and "env: 'calvin' -> None" in desk.stderr, desk.stderr


def test_recorded_dataset_reads_back_in_calvin_layout(calvin_data):
    """The reader on calvin_env's own frames: segments, windows and the 200 / 84 pixel images resized to 64."""
    train = data.load_split(os.path.join(calvin_data, 'training'), 64)
    assert len(train['frame_ids']) == 80 and train['episodes'].tolist() == [[0, 39], [40, 79]]
    assert train['windows'].tolist() == [[0, 30], [40, 70]] and list(train['window_tasks']) == [TASK, TASK]
    assert train['rgb_gripper'].shape == (80, 64, 64, 3) and np.abs(train['rel_actions']).max() <= 1
    starts = E.window_starts(train, TASK, 5, seed=0)
    assert len(starts) == 5 and {tuple(r[:3]) for r, _ in starts} <= {tuple(train['robot_obs'][i, :3]) for i in (0, 40)}
    neutral = E.window_starts(train, TASK, 5, seed=0, arm='neutral')      # the same scenes, CALVIN's neutral arm
    assert all(np.array_equal(s, s2) for (_, s), (_, s2) in zip(starts, neutral))
    assert all(np.array_equal(r, env.CALVIN_NEUTRAL_ROBOT_OBS) and r[14] == 1 for r, _ in neutral)
    with pytest.raises(ValueError, match='arm'):
        E.window_starts(train, TASK, 5, seed=0, arm='rest')


def test_evaluation_and_dppo_in_calvin_from_its_own_starts(run_dir, calvin_data, tmp_path):
    """`--stage eval --env calvin` writes a row per policy, with env=calvin; `--stage dppo --env calvin` runs a
    DPPO iteration in CALVIN (simulator steps counted), both from the validation windows' starts."""
    d = str(tmp_path / 'run')
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns('results.csv*', 'data'))
    common = ['--preset', 'test', '--run', d, '--data', calvin_data, '--task', TASK, '--env', 'calvin']
    run('--stage', 'eval', *common, '--eval.episodes', '2', '--eval.envs', '2', timeout=900)
    rows = read_csv(os.path.join(d, 'results.csv'))
    assert sorted(r['policy'] for r in rows) == ['base', 'diwa'] and {r['env'] for r in rows} == {'calvin'}
    assert all(int(r['episodes']) == 2 for r in rows)
    # diagnose.py gap in calvin_env: its simulator episodes are the evaluation's (same starts, same success)
    run('gap', '--preset', 'test', '--run', d, '--data', calvin_data, '--task', TASK, '--env', 'calvin',
        '--episodes', '2', script='diagnose.py', timeout=900)
    gap = json.load(open(os.path.join(d, TASK, 'gap_base_s0_calvin_recorded_mean.json')))
    base = [r for r in rows if r['policy'] == 'base'][-1]
    assert gap['starts'] == 'calvin, arm recorded' and gap['sampler'] == 'mean'
    assert gap['real_success'] == float(base['success'])
    run('--stage', 'dppo', *common, '--ft.iterations', '1', '--ft.n_envs', '2', '--ft.n_steps', '2',
        '--ft.sim_workers', '0', timeout=900)
    ckpt = torch.load(os.path.join(d, TASK, 'dppo_s0.pt'), weights_only=True)
    assert ckpt['done'] and ckpt['state']['counters']['sim_steps'] > 0

