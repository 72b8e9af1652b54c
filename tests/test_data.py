"""data.py: preprocessing math against closed forms, CALVIN layout round trips (real CALVIN shapes), clear errors
on bad input, crash safety, sequence sampling, and a tiny real collection on the built-in desk."""
import json
import shutil
import os

import numpy as np
import pytest
import torch

import data  # noqa: E402
from data import DataError  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------

def naive_matrix(roll, pitch, yaw):
    """R = Rz(yaw) Ry(pitch) Rx(roll) from the elementary rotations (extrinsic x-y-z)."""
    c, s = np.cos, np.sin
    Rx = np.array([[1, 0, 0], [0, c(roll), -s(roll)], [0, s(roll), c(roll)]])
    Ry = np.array([[c(pitch), 0, s(pitch)], [0, 1, 0], [-s(pitch), 0, c(pitch)]])
    Rz = np.array([[c(yaw), -s(yaw), 0], [s(yaw), c(yaw), 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def test_rot6d_is_first_two_columns_of_the_rotation_matrix():
    rng = np.random.default_rng(0)
    euler = rng.uniform(-np.pi, np.pi, (64, 3)) * [1, 0.49, 1]
    r6 = data.euler_to_rot6d(euler)
    for e, r in zip(euler, r6):
        R = naive_matrix(*e)
        np.testing.assert_allclose(r, np.concatenate([R[:, 0], R[:, 1]]), atol=1e-12)
    # the same convention as pybullet (whose Euler angles CALVIN's robot_obs stores)
    pb = pytest.importorskip('pybullet')
    for e, r in zip(euler[:8], r6[:8]):
        R = np.array(pb.getMatrixFromQuaternion(pb.getQuaternionFromEuler(e.tolist()))).reshape(3, 3)
        np.testing.assert_allclose(r, np.concatenate([R[:, 0], R[:, 1]]), atol=1e-6)
    # torch gives the same numbers
    np.testing.assert_allclose(data.euler_to_rot6d(torch.tensor(euler)).numpy(), r6, atol=1e-12)


def test_rot6d_round_trip_and_continuity_at_the_roll_wrap():
    rng = np.random.default_rng(1)
    euler = rng.uniform(-np.pi, np.pi, (200, 3)) * [1, 0.49, 1]
    back = data.matrix_to_euler(data.rot6d_to_matrix(data.euler_to_rot6d(euler)))
    wrapped = (back - euler + np.pi) % (2 * np.pi) - np.pi
    np.testing.assert_allclose(wrapped, 0, atol=1e-9)
    # the desk's start pose has roll near +-pi: the angle jumps by 2 pi, the 6-D rotation does not
    a, b = data.euler_to_rot6d(np.array([[np.pi - 1e-4, 0, 1.5], [-np.pi + 1e-4, 0, 1.5]]))
    assert np.abs(a - b).max() < 1e-3


def test_proprio_layout_numpy_and_torch():
    rng = np.random.default_rng(2)
    robot = rng.normal(size=(3, 5, 15))
    p = data.robot_obs_to_proprio(robot)
    assert p.shape == (3, 5, 18)
    np.testing.assert_array_equal(p[..., :3], robot[..., :3])
    np.testing.assert_allclose(p[..., 3:9], data.euler_to_rot6d(robot[..., 3:6]))
    np.testing.assert_array_equal(p[..., 9:], robot[..., 6:])
    pt = data.robot_obs_to_proprio(torch.tensor(robot, dtype=torch.float32))
    assert pt.dtype == torch.float32 and torch.allclose(pt, torch.tensor(p, dtype=torch.float32), atol=1e-6)
    with pytest.raises(DataError, match='15'):
        data.robot_obs_to_proprio(np.zeros((2, 14)))


def test_area_resize_against_naive_loop_and_exact_cases():
    rng = np.random.default_rng(3)
    W = data.area_weights(200, 64)
    scale = 200 / 64
    for o in (0, 17, 63):
        for i in range(200):
            lo, hi = o * scale, (o + 1) * scale
            assert abs(W[o, i] - max(0.0, min(hi, i + 1) - max(lo, i)) / scale) < 1e-12
    np.testing.assert_allclose(W.sum(1), 1)
    small = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    big = small.repeat(2, 0).repeat(2, 1)                              # 128x128 made of 2x2 blocks
    np.testing.assert_array_equal(data.resize_images(big, 64), small)
    assert data.resize_images(small, 64) is small
    const = np.full((2, 200, 200, 3), 77, np.uint8)
    np.testing.assert_array_equal(data.resize_images(const, 64), np.full((2, 64, 64, 3), 77, np.uint8))


def test_to_torch_and_preprocess_obs():
    rng = np.random.default_rng(4)
    B, T = 2, 3
    batch = {'rgb_static': rng.integers(0, 256, (B, T, 64, 64, 3), dtype=np.uint8),
             'rgb_gripper': np.zeros((B, T, 64, 64, 3), np.uint8) + 255,
             'robot_obs': rng.normal(size=(B, T, 15)), 'scene_obs': rng.normal(size=(B, T, 24)),
             'rel_actions': rng.uniform(-1, 1, (B, T, 7))}
    out = data.to_torch(batch)
    assert out['rgb_static'].shape == (B, T, 3, 64, 64) and out['rgb_static'].dtype == torch.float32
    assert out['rgb_gripper'].min() == 1.0
    assert torch.allclose(out['rgb_static'][1, 2, 0], torch.tensor(batch['rgb_static'][1, 2, :, :, 0] / 127.5 - 1,
                                                                   dtype=torch.float32), atol=1e-6)
    assert out['proprio'].shape == (B, T, 18) and out['scene'].shape == (B, T, 24)
    assert out['actions'].shape == (B, T, 7) and out['is_first'][:, 0].all() and not out['is_first'][:, 1:].any()
    obs = [{'rgb_obs': {'rgb_static': np.full((200, 200, 3), 255, np.uint8), 'rgb_gripper': np.zeros((84, 84, 3), np.uint8)},
            'robot_obs': np.zeros(15), 'scene_obs': np.ones(24)}] * 3
    o = data.preprocess_obs(obs, 64)
    assert o['rgb_static'].shape == (3, 3, 64, 64) and float(o['rgb_static'].min()) == 1.0
    assert o['rgb_gripper'].shape == (3, 3, 64, 64) and float(o['rgb_gripper'].max()) == -1.0
    assert o['proprio'].shape == (3, 18) and o['scene'].shape == (3, 24)


# ----------------------------------------------------------------------------------------------------
# CALVIN layout
# ----------------------------------------------------------------------------------------------------

SEGMENTS = [(100, 111), (130, 139), (150, 165)]                       # gaps between segments, like CALVIN


def calvin_frame(i, static=200, gripper=84):
    """A frame with real CALVIN's keys and shapes; every value encodes the frame id."""
    return {'actions': np.full(7, i, np.float64), 'rel_actions': np.full(7, (i % 10) / 10), 'robot_obs': np.full(15, float(i)),
            'scene_obs': np.full(24, float(i)), 'rgb_static': np.full((static, static, 3), i % 256, np.uint8),
            'rgb_gripper': np.full((gripper, gripper, 3), (3 * i) % 256, np.uint8),
            'depth_static': np.zeros((static, static), np.float32), 'depth_gripper': np.zeros((gripper, gripper), np.float32),
            'rgb_tactile': np.zeros((160, 120, 6), np.uint8), 'depth_tactile': np.zeros((160, 120, 2), np.float32)}


def make_calvin(folder, segments=SEGMENTS, windows=((102, 108), (131, 139), (150, 160)),
                tasks=('open_drawer', 'turn_on_led', 'open_drawer')):
    os.makedirs(os.path.join(folder, 'lang_annotations'), exist_ok=True)
    for s, e in segments:
        for i in range(s, e + 1):
            np.savez_compressed(data.frame_path(folder, i), **calvin_frame(i))
    np.save(os.path.join(folder, 'ep_start_end_ids.npy'), np.array(segments[::-1]))      # unsorted on purpose
    ann = {'info': {'indx': list(windows), 'episodes': []},
           'language': {'task': list(tasks), 'ann': ['x'] * len(tasks), 'emb': np.zeros((len(tasks), 1, 384))}}
    np.save(os.path.join(folder, 'lang_annotations', 'auto_lang_ann.npy'), ann, allow_pickle=True)
    return folder


def test_load_split_reads_real_calvin_shapes_with_gaps(tmp_path, monkeypatch):
    folder = make_calvin(str(tmp_path / 'training'))
    d = data.load_split(folder, 64)
    ids = np.concatenate([np.arange(s, e + 1) for s, e in SEGMENTS])
    np.testing.assert_array_equal(d['frame_ids'], ids)
    N = len(ids)
    assert d['rgb_static'].shape == (N, 64, 64, 3) and d['rgb_gripper'].shape == (N, 64, 64, 3)
    assert d['rgb_static'].dtype == np.uint8 and d['robot_obs'].dtype == np.float32
    np.testing.assert_array_equal(d['rgb_static'][:, 5, 7, 0], ids % 256)       # resized, right frame in each row
    np.testing.assert_array_equal(d['rgb_gripper'][:, 63, 0, 2], (3 * ids) % 256)
    np.testing.assert_array_equal(d['robot_obs'][:, 0], ids)
    np.testing.assert_array_equal(d['episodes'], [[0, 11], [12, 21], [22, 37]])
    np.testing.assert_array_equal(d['frame_ids'][d['windows']], [[102, 108], [131, 139], [150, 160]])
    assert d['window_tasks'].tolist() == ['open_drawer', 'turn_on_led', 'open_drawer']
    assert os.path.isfile(os.path.join(folder, 'cache_64', 'meta.json'))
    # second load comes from the cache: no frame file is opened
    monkeypatch.setattr(data, 'read_frame', lambda *a, **k: pytest.fail('cache not used'))
    d2 = data.load_split(folder, 64)
    np.testing.assert_array_equal(d2['rgb_static'], d['rgb_static'])
    monkeypatch.undo()
    # changed segment list -> cache rebuilt; the new list is honoured
    np.save(os.path.join(folder, 'ep_start_end_ids.npy'), np.array(SEGMENTS[:2]))
    np.save(os.path.join(folder, 'lang_annotations', 'auto_lang_ann.npy'),
            {'info': {'indx': [(102, 108)]}, 'language': {'task': ['open_drawer']}}, allow_pickle=True)
    d3 = data.load_split(folder, 64)
    assert len(d3['frame_ids']) == 22 and len(d3['rgb_static']) == 22 and len(d3['windows']) == 1
    # parallel reading gives the same arrays
    d4 = data.load_split(folder, 32, workers=2)
    np.testing.assert_array_equal(d4['robot_obs'], d3['robot_obs'])
    assert d4['rgb_static'].shape == (22, 32, 32, 3)


def test_writer_round_trip(tmp_path):
    folder = tmp_path / 'validation'
    folder.mkdir()
    for s, e in SEGMENTS:
        for i in range(s, e + 1):
            data.write_frame(folder, i, calvin_frame(i, 64, 64))
    data.write_split_index(folder, SEGMENTS, [(101, 105), (151, 152)], ['close_drawer', 'turn_off_led'])
    ann = np.load(folder / 'lang_annotations' / 'auto_lang_ann.npy', allow_pickle=True).item()
    assert ann['language']['emb'].shape == (2, 1, 384) and isinstance(ann['language']['ann'][0], str)
    d = data.load_split(folder)
    np.testing.assert_array_equal(d['frame_ids'][d['windows']], [[101, 105], [151, 152]])
    np.testing.assert_allclose(d['rel_actions'][:, 0], (d['frame_ids'] % 10) / 10, atol=1e-6)
    assert not [p for p in os.listdir(folder) if data.TMP_TAG in p]


# ----------------------------------------------------------------------------------------------------
# Bad input: DataError naming the file
# ----------------------------------------------------------------------------------------------------

def _frame_file(folder, i):
    return str(data.frame_path(folder, i))


@pytest.mark.parametrize('case', ['missing_folder', 'missing_ep_ids', 'truncated', 'corrupt', 'robot_obs_14',
                                  'missing_frame', 'window_outside', 'window_in_gap', 'bad_annotations'])
def test_bad_input_raises_dataerror_naming_the_file(tmp_path, case):
    folder = make_calvin(str(tmp_path / 'training'), segments=[(0, 3), (10, 12)], windows=[(0, 3)], tasks=['open_drawer'])
    expect = folder
    if case == 'missing_folder':
        folder = expect = str(tmp_path / 'nope')
    elif case == 'missing_ep_ids':
        os.remove(os.path.join(folder, 'ep_start_end_ids.npy'))
        expect = 'ep_start_end_ids.npy'
    elif case == 'truncated':
        raw = open(_frame_file(folder, 2), 'rb').read()
        open(_frame_file(folder, 2), 'wb').write(raw[: len(raw) // 2])
        expect = 'episode_0000002.npz'
    elif case == 'corrupt':
        open(_frame_file(folder, 11), 'wb').write(b'not a zip file at all' * 10)
        expect = 'episode_0000011.npz'
    elif case == 'robot_obs_14':
        f = calvin_frame(1)
        f['robot_obs'] = np.zeros(14)
        np.savez_compressed(_frame_file(folder, 1), **f)
        expect = 'episode_0000001.npz'
    elif case == 'missing_frame':
        os.remove(_frame_file(folder, 12))
        expect = 'episode_0000012.npz'
    elif case in ('window_outside', 'window_in_gap', 'bad_annotations'):
        win = {'window_outside': [(10, 14)], 'window_in_gap': [(2, 11)], 'bad_annotations': [(0, 3), (10, 11)]}[case]
        np.save(os.path.join(folder, 'lang_annotations', 'auto_lang_ann.npy'),
                {'info': {'indx': win}, 'language': {'task': ['open_drawer']}}, allow_pickle=True)
        expect = 'auto_lang_ann.npy'
    with pytest.raises(DataError) as err:
        data.load_split(folder, 16)
    msg = str(err.value)
    assert expect in msg and '\n' not in msg, msg


def test_unknown_task_and_bad_frames_when_writing(tmp_path):
    folder = make_calvin(str(tmp_path / 'training'), segments=[(0, 3)], windows=[(0, 3)], tasks=['rotate_red_block'])
    d = data.load_split(folder, 16)                                    # real CALVIN has 34 tasks: loading is fine
    with pytest.raises(DataError, match="auto_lang_ann.npy: unknown task 'open_the_fridge'"):
        data.expert_windows(d, 'open_the_fridge')
    with pytest.raises(DataError, match='no annotated window'):
        data.expert_windows(d, 'open_drawer')
    with pytest.raises(DataError, match='unknown task'):
        data.write_split_index(folder, [(0, 3)], [(0, 3)], ['open_the_fridge'])
    bad = calvin_frame(5, 64, 64)
    bad['scene_obs'] = np.zeros(23)
    with pytest.raises(DataError, match=r'episode_0000005.npz: scene_obs has shape \(23,\)'):
        data.write_frame(folder, 5, bad)
    assert not os.path.exists(data.frame_path(folder, 5))


def test_interrupted_collection_reads_back_only_finished_episodes(tmp_path):
    folder = tmp_path / 'training'
    folder.mkdir()
    for i in range(0, 8):
        data.write_frame(folder, i, calvin_frame(i, 32, 32))
    data.write_split_index(folder, [(0, 7)], [(1, 4)], ['open_drawer'])
    # the killed second episode: two finished frames, one half-written temp file, not in ep_start_end_ids.npy
    for i in (8, 9):
        data.write_frame(folder, i, calvin_frame(i, 32, 32))
    open(str(data.frame_path(folder, 10)) + data.TMP_TAG + '999', 'wb').write(b'PK\x03\x04 half')
    d = data.load_split(folder, 32)
    np.testing.assert_array_equal(d['frame_ids'], np.arange(8))
    assert len(d['rgb_static']) == 8 and d['windows'].tolist() == [[1, 4]]


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------

def test_sample_sequences_never_cross_a_boundary(tmp_path):
    d = data.load_split(make_calvin(str(tmp_path / 'training')), 16)
    rng = np.random.default_rng(0)
    b = data.sample_sequences(d, 400, 10, rng)
    assert b['rgb_static'].shape == (400, 10, 16, 16, 3) and b['rel_actions'].shape == (400, 10, 7)
    assert b['is_first'][:, 0].all() and not b['is_first'][:, 1:].any()
    ep_of = np.searchsorted(d['episodes'][:, 1], b['rows'])            # segment of each row
    assert (ep_of == ep_of[:, :1]).all()
    assert (np.diff(b['robot_obs'][..., 0], axis=1) == 1).all()          # consecutive global frame ids
    # every valid start is reachable, in proportion to its count (3 + 1 + 7 starts -> 11)
    starts = np.unique(b['rows'][:, 0])
    assert len(starts) == 3 + 1 + 7
    with pytest.raises(DataError, match='no segment has 17 frames'):
        data.sample_sequences(d, 2, 17, rng)


def _lights_split(n=60, episodes=((0, 19), (20, 59))):
    """A split of n frames with only what sample_sequences reads: the LED switches at 5 and 20 (a segment's
    first frame: not an event), the bulb at 30 and back at 31; frame ids in robot_obs[:, 0]."""
    scene = np.zeros((n, 24))
    scene[5:, 5] = 1.0
    scene[20:, 5] = 0.0
    scene[30, 4] = 1.0
    d = {k: np.zeros((n, 1)) for k in data.SEQ_KEYS}
    d.update(scene_obs=scene, robot_obs=np.arange(n, dtype=float)[:, None], episodes=np.array(episodes))
    return d


def test_light_switch_frames():
    d = _lights_split()
    np.testing.assert_array_equal(data.light_switch_frames(d), [5, 30, 31])


def test_sample_sequences_event_frac():
    """event_frac = 1: every sequence holds a light switch, inside one segment, and every start whose window
    holds one is drawn; event_frac = 0 draws exactly what uniform sampling draws."""
    d, L = _lights_split(), 8
    b = data.sample_sequences(d, 2000, L, np.random.default_rng(0), event_frac=1.0)
    rows = b['rows']
    holds = np.isin(rows, [5, 30, 31]).any(1)
    assert holds.all()
    ep_of = np.searchsorted(d['episodes'][:, 1], rows)
    assert (ep_of == ep_of[:, :1]).all()
    # starts holding frame 5 in segment 0..19: 0..5; holding 30 or 31 in 20..59: 23..31
    assert sorted(np.unique(rows[:, 0]).tolist()) == list(range(0, 6)) + list(range(23, 32))
    a = data.sample_sequences(d, 50, L, np.random.default_rng(1))
    z = data.sample_sequences(d, 50, L, np.random.default_rng(1), event_frac=0.0)
    np.testing.assert_array_equal(a['rows'], z['rows'])
    half = data.sample_sequences(d, 4000, L, np.random.default_rng(2), event_frac=0.5)
    uniform_share = np.isin(data.sample_sequences(d, 4000, L, np.random.default_rng(3))['rows'],
                            [5, 30, 31]).any(1).mean()
    share = np.isin(half['rows'], [5, 30, 31]).any(1).mean()
    assert abs(share - (0.5 + 0.5 * uniform_share)) < 0.03


def test_expert_windows_random_subset(tmp_path):
    windows = [(100 + i, 100 + i + 2) for i in range(9)]
    d = data.load_split(make_calvin(str(tmp_path / 'training'), windows=windows, tasks=['open_drawer'] * 9), 16)
    w = data.expert_windows(d, 'open_drawer', n=4, seed=0)
    assert w.shape == (4, 2) and len({tuple(x) for x in w.tolist()}) == 4
    np.testing.assert_array_equal(w, data.expert_windows(d, 'open_drawer', n=4, seed=0))
    assert any(not np.array_equal(w, data.expert_windows(d, 'open_drawer', n=4, seed=s)) for s in range(1, 6))
    assert len(data.expert_windows(d, 'open_drawer', n=10 ** 9)) == 9


# ----------------------------------------------------------------------------------------------------
# A tiny real collection on the built-in desk (test preset: 2 episodes x 150 frames, a few seconds)
# ----------------------------------------------------------------------------------------------------

def test_tiny_collection_windows_hold_at_their_ends_and_resume(tmp_path):
    pytest.importorskip('pybullet')
    cfg = data.CollectConfig(**data.PRESETS['test'])
    out = tmp_path / 'data'
    rep = data.collect(cfg, out)
    assert rep['frames'] == 2 * cfg.episode_len and sum(rep['counts'].values()) >= 2, rep
    seen = 0
    for split in ('training', 'validation'):
        d = data.load_split(out / split, cfg.image_size)
        assert len(d['frame_ids']) == cfg.episode_len and len(d['episodes']) == 1
        assert np.abs(d['rel_actions']).max() <= 1 and set(np.unique(d['actions'][:, 6])) <= {-1.0, 1.0}
        for w, task in zip(d['windows'], d['window_tasks']):
            lab = data.success_labels(d, w)
            assert lab[0] == 0 and lab[-1] == 1, (task, w, lab)     # end = a frame where the test holds
            assert w[1] - w[0] + 1 <= cfg.max_window
            seen += 1
    assert seen == sum(rep['counts'].values())
    # CALVIN's convention: rel_actions[t] is executed after observing frame t, actions[t] is the TCP target it
    # produced. Exact checks: the next frame records that gripper command; targets integrate 0.02 m per unit.
    for split in ('training', 'validation'):
        d = data.load_split(out / split, cfg.image_size)
        np.testing.assert_array_equal(d['robot_obs'][1:, 14], d['actions'][:-1, 6])
        np.testing.assert_array_equal(np.where(d['rel_actions'][:, 6] >= 0, 1, -1), d['actions'][:, 6])
        step = np.diff(d['actions'][:, :3], axis=0) - 0.02 * d['rel_actions'][1:, :3]
        assert np.mean(np.abs(step).max(1) < 1e-5) > 0.95               # all but workspace-clipped steps
        # to_torch's 'target' (the world model's target_input) is the stored target when the frame was seen:
        # the measured TCP at the episode's reset, then the target the previous action produced
        tgt = data.to_torch({k: d[k][None] for k in data.SEQ_KEYS})['target'][0].numpy()
        np.testing.assert_allclose(tgt[0], d['robot_obs'][0, :3], atol=1e-6)
        assert np.mean(np.abs(tgt[1:] - d['actions'][:-1, :3]).max(1) < 1e-5) > 0.95
    # and coarsely: replaying a window's rel_actions open loop from its first frame reproduces the success
    import env
    desk, wins = env.DeskEnv(cameras=False), 0
    d = data.load_split(out / 'training', cfg.image_size)
    for (s, e), task in zip(d['windows'], d['window_tasks']):
        desk.reset(d['robot_obs'][s].astype(float), d['scene_obs'][s].astype(float))
        start = desk.get_info()
        infos = [desk.step(a)[3] for a in d['rel_actions'][s:e + 1]]
        wins += any(env.task_success(task, start, i) for i in infos)
    desk.close()
    assert wins >= len(d['windows']) - 1 and len(d['windows']) >= 2, (wins, len(d['windows']))
    before = data.load_split(out / 'validation', cfg.image_size)
    last = data.frame_path(out / 'validation', 2 * cfg.episode_len - 1)             # episode 1's last frame
    last_before = data.read_frame(last)
    # a run killed during episode 1: it is not in the progress file, a temp file is left behind
    progress = json.loads((out / 'collect_progress.json').read_text())
    del progress['1']
    (out / 'collect_progress.json').write_text(json.dumps(progress))
    (out / 'validation' / (data.frame_path('', cfg.episode_len + 1).name + data.TMP_TAG + '1')).write_bytes(b'PK\x03\x04')
    rep2 = data.collect(cfg, out)                                      # redoes episode 1 only
    assert rep2['frames'] == rep['frames'] and rep2['frames_per_s'] > 0
    assert not [p for p in os.listdir(out / 'validation') if data.TMP_TAG in p]
    after = data.load_split(out / 'validation', cfg.image_size)
    np.testing.assert_array_equal(after['frame_ids'], before['frame_ids'])
    np.testing.assert_array_equal(after['windows'], before['windows'])
    for k, v in data.read_frame(last).items():                        # episodes depend on (seed, e) only
        np.testing.assert_array_equal(v, last_before[k], err_msg=k)
    # other settings in the same folder are refused, naming the settings file
    with pytest.raises(DataError, match=r'collect_config.json: .*action_noise'):
        data.collect(data.CollectConfig(**{**data.PRESETS['test'], 'action_noise': 0.5}), out)
    # a folder written by a version without a setting is refused too, naming it (never silently upgraded)
    settings = json.loads((out / 'collect_config.json').read_text())
    del settings['push_tol_max']
    (out / 'collect_config.json').write_text(json.dumps(settings))
    with pytest.raises(DataError, match=r'collect_config.json: .*push_tol_max: None -> 0.006'):
        data.collect(cfg, out)


def test_dataset_key_depends_on_contents_not_pickle_bytes(tmp_path):
    """Rewriting identical annotations must not change the dataset's key (pickle's bytes depend on object
    identity: equal task strings shared or not); a different window must."""
    d = tmp_path / 'training'
    d.mkdir()
    windows = [(0, 10), (20, 30), (40, 50)]
    shared = 'open_drawer'
    data.write_split_index(d, [(0, 99)], windows, [shared, shared, 'close_drawer'])
    k1 = data.dataset_key(str(tmp_path))
    data.write_split_index(d, [(0, 99)], windows, [''.join(['open_', 'drawer']), 'open_drawer'[:], 'close_drawer'])
    assert data.dataset_key(str(tmp_path)) == k1
    data.write_split_index(d, [(0, 99)], [(0, 10), (20, 31), (40, 50)], [shared, shared, 'close_drawer'])
    assert data.dataset_key(str(tmp_path)) != k1


def test_an_annotation_file_whose_pickle_would_run_code_is_refused(tmp_path):
    """auto_lang_ann.npy is unpickled data-only: a crafted file naming a callable is a one-line DataError naming the
    file, and the callable never runs; CALVIN's own containers, strings and arrays still load."""
    d = tmp_path / 'training'
    data.write_split_index(d, [(0, 99)], [(0, 10)], ['open_drawer'])
    assert data.read_annotations(d)[1] == ['open_drawer']
    marker = tmp_path / 'ran'

    class Crafted:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    ann = {'info': {'indx': [(0, 10)]}, 'language': {'task': [Crafted()]}}
    np.save(d / 'lang_annotations' / 'auto_lang_ann.npy', np.array(ann, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r'auto_lang_ann\.npy: UnpicklingError: refused to load \w+\.system') as err:
        data.read_annotations(d)
    assert not marker.exists() and '\n' not in str(err.value)


def test_the_frame_cache_of_a_read_only_dataset_goes_elsewhere(tmp_path, monkeypatch):
    """A split folder that cannot be written (a shared, read-only copy) keeps nothing of ours: its cache goes to
    $DIWA_CACHE/<split>-<hash of the path>/cache_<S>, and the split reads the same."""
    cfg = data.CollectConfig(**{**data.PRESETS['test'], 'episodes': 1, 'episode_len': 60, 'val_every': 10})
    data.collect(cfg, tmp_path / 'd')
    split = tmp_path / 'd' / 'training'
    own = data.load_split(split, 64)
    shutil.rmtree(split / 'cache_64')
    monkeypatch.setenv('DIWA_CACHE', str(tmp_path / 'elsewhere'))
    monkeypatch.setattr(data, '_writable', lambda folder: False)
    other = data.load_split(split, 64)
    assert not (split / 'cache_64').exists() and len(list((tmp_path / 'elsewhere').glob('training-*/cache_64'))) == 1
    assert all(np.array_equal(own[k], other[k]) for k in ('rgb_static', 'robot_obs', 'windows'))
