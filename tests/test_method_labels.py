"""Method tests of the reward classifier's labels (§III.C, Tab. S.4): a demo frame is a positive when the task's
success test holds between the annotated window's FIRST frame and that frame (env.task_success(task, start, now)),
not in absolute terms, not against the episode start or the previous frame.

Where the label code lives: diffusion_policy.demo_latents (labels of the expert windows, moved out of train.py)
and reward.reward_dataset (which frames the classifier trains on); env.task_success is the test itself.
The world model is replaced by a stand-in featurize_rows whose feature names its row, so the expected labels are
written by hand from a scripted drawer trajectory.
"""
import numpy as np
import pytest
import torch

import data
import diffusion_policy as D
import env
import reward as R
import world_model as W


def info(drawer=0.0, door=0.0, bulb=0.0, led=0.0):
    s = np.zeros(24)
    s[0], s[1], s[4], s[5] = door, drawer, bulb, led
    return {'robot_obs': np.zeros(15), 'scene_obs': s}


# ----------------------------------------------------------------------------- the test itself, relative to start
def test_success_is_relative_to_the_start_and_strict():
    # a drawer already open at the start is no success for open_drawer, however open it is
    assert not env.task_success('open_drawer', info(drawer=0.2), info(drawer=0.2))
    assert not env.task_success('open_drawer', info(drawer=0.15), info(drawer=0.22))
    assert env.task_success('open_drawer', info(drawer=0.05), info(drawer=0.18))
    # ... and a drawer that was open and stayed open is no close_drawer success
    assert not env.task_success('close_drawer', info(drawer=0.05), info(drawer=0.0))
    # CALVIN's task thresholds are strict: exactly 0.12 / 0.15 of travel is not yet a success
    assert not env.task_success('open_drawer', info(drawer=0.0), info(drawer=0.12))
    assert not env.task_success('close_drawer', info(drawer=0.12), info(drawer=0.0))
    assert not env.task_success('move_slider_left', info(door=0.0), info(door=0.15))
    assert not env.task_success('move_slider_right', info(door=0.15), info(door=0.0))
    assert env.task_success('move_slider_left', info(door=0.0), info(door=0.151))
    # a slider moved 0.13 (a drawer's success distance) is not a slider success
    assert not env.task_success('move_slider_left', info(door=0.0), info(door=0.13))
    # lights: on -> on is not turning it on; off -> on is
    assert not env.task_success('turn_on_led', info(led=1), info(led=1))
    assert env.task_success('turn_on_led', info(led=0), info(led=1))
    assert not env.task_success('turn_off_lightbulb', info(bulb=0), info(bulb=0))


# ----------------------------------------------------------------------------- labels of the expert windows
ROWS = 30
DRAWER = 0.011 * np.arange(ROWS)      # one episode in which the drawer opens steadily, 1.1 cm per frame


def synthetic_split():
    scene = np.zeros((ROWS, 24))
    scene[:, 1] = DRAWER
    rel = np.repeat(np.arange(ROWS, dtype=np.float64)[:, None], 7, 1)   # action of row r = r in every entry
    return {'scene_obs': scene, 'robot_obs': np.zeros((ROWS, 15)), 'rel_actions': rel,
            'episodes': np.array([[0, ROWS - 1]]),
            # window A starts closed; window B starts at row 5 (drawer 0.055 open); C is another task
            'windows': np.array([[0, 15], [5, 18], [2, 9]]),
            'window_tasks': np.array(['open_drawer', 'open_drawer', 'move_slider_left'])}


@pytest.fixture
def row_features(monkeypatch):
    """featurize_rows stand-in: feature of a frame = (its row, imagined flag, 0)."""
    def fake(wm, split, rows, device, chunk=16, imagined=False):
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.float32)
        return torch.stack([rows, torch.full_like(rows, float(imagined)), torch.zeros_like(rows)], -1)
    monkeypatch.setattr(W, 'featurize_rows', fake)


def test_demo_labels_use_the_window_start(row_features):
    split = synthetic_split()
    demos = D.demo_latents(None, split, 'open_drawer', n=50, seed=0, post=2, device='cpu')
    assert demos['windows'].tolist() == [[0, 15], [5, 18]]                 # only the task's windows
    rows = demos['feat'][..., 0].long()
    assert rows[0].tolist() == list(range(0, 18))                          # window A + 2 post frames
    assert rows[1, :16].tolist() == list(range(5, 21))                     # window B + 2 post frames (then padding)
    # by hand: A: 0.011 r - 0 > 0.12 from r = 11; B: 0.011 r - 0.055 > 0.12 from r = 16 (r = 15: 0.11 only)
    lab_a = [0] * 11 + [1] * 7
    lab_b = [0] * 11 + [1] * 5 + [0] * 2                                   # rows 5..20, then 2 padded (invalid)
    assert demos['success'][0].long().tolist() == lab_a
    assert demos['success'][1].long().tolist() == lab_b
    assert demos['valid'][1].tolist() == [True] * 16 + [False] * 2
    # negative control: against the episode's first frame (or in absolute terms), B would turn positive at r = 11
    absolute = [int(env.task_success('open_drawer', {'scene_obs': split['scene_obs'][0]}, {'scene_obs': split['scene_obs'][r]}))
                for r in range(5, 21)]
    assert absolute != lab_b[:16]
    # data.success_labels, the split-level helper, agrees on the window proper
    np.testing.assert_array_equal(data.success_labels(split, (5, 18)), lab_b[:14])
    # BC chunks: a_t..a_{t+3} of the window, never read past its end (edge-padded)
    ch = demos['chunks'][..., 0].long()
    assert ch[1, 0].tolist() == [5, 6, 7, 8] and ch[1, 12].tolist() == [17, 18, 18, 18]
    assert demos['in_window'][1].long().tolist() == [1] * 14 + [0] * 4


def test_reward_dataset_frames_labels_and_start_latents(monkeypatch):
    """Which frames train the classifier (Tab. S.4), by hand: margin frames just before the first success and
    post-success relapses are left out; labels are the relative-success labels; z_0 = the window's first latent;
    play negatives are labelled 0."""
    W_, T = 2, 8
    success = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 1],
                            [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1] * 8, [1] * 6 + [0] * 2], dtype=torch.bool)
    feat = torch.zeros(W_, T, 3)
    feat[..., 0] = torch.arange(T)[None] + 10 * torch.arange(W_)[:, None]      # feature names (window, frame)
    demos = {'success': success, 'valid': valid, 'feat': feat, 'windows': torch.tensor([[0, 7], [20, 27]])}
    neg = torch.full((3, 3), -1.0)
    monkeypatch.setattr(R, 'play_negatives', lambda *a, **k: (neg, neg.clone()))
    f, start, label = R.reward_dataset(None, demos, {}, 'open_drawer', 'cpu', post=0, seed=0, imagined=0,
                                       margin=2, drop_relapses=True)
    ids = f[:, 0].long().tolist()
    # window 0: first success at t=4 -> t=2,3 (margin) and t=6 (relapse) left out; window 1 never succeeds: no margin
    assert ids == [0, 1, 4, 5, 7, 10, 11, 12, 13, 14, 15, -1, -1, -1]
    assert label.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert start[:, 0].long().tolist() == [0] * 5 + [10] * 6 + [-1] * 3
    # without drop_relapses the relapse frame is a negative; with margin 0 the frames before success are negatives
    f, _, label = R.reward_dataset(None, demos, {}, 'open_drawer', 'cpu', post=0, seed=0, imagined=0, margin=0)
    assert f[:8, 0].long().tolist() == list(range(8)) and label[:8].tolist() == [0, 0, 0, 0, 1, 1, 0, 1]
