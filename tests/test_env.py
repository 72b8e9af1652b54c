"""Tests for env.py: success tests on hand-set states, LED edge logic, exact resets, the controller's
clipping and gripper threshold, observation shapes, determinism, and every scripted skill."""

import numpy as np
import pytest

import env as E  # noqa: E402


@pytest.fixture(scope='module')
def desk():
    d = E.DeskEnv(cameras=False, seed=0)
    yield d
    d.close()


def info_with(**parts):
    """An info dict whose scene_obs has the named parts set (door, drawer, button, switch, bulb, led)."""
    s = np.zeros(24)
    for name, v in parts.items():
        s[['door', 'drawer', 'button', 'switch', 'bulb', 'led'].index(name)] = v
    return {'robot_obs': np.zeros(15), 'scene_obs': s}


# ---------------------------------------------------------------- success tests (pure)

@pytest.mark.parametrize('task, start, yes, no', [
    ('open_drawer', dict(drawer=0.0), dict(drawer=0.13), dict(drawer=0.11)),
    ('close_drawer', dict(drawer=0.2), dict(drawer=0.07), dict(drawer=0.09)),
    ('move_slider_left', dict(door=0.0), dict(door=0.16), dict(door=0.14)),
    ('move_slider_right', dict(door=0.28), dict(door=0.12), dict(door=0.14)),
    ('turn_on_lightbulb', dict(bulb=0), dict(bulb=1), dict(bulb=0)),
    ('turn_off_lightbulb', dict(bulb=1), dict(bulb=0), dict(bulb=1)),
    ('turn_on_led', dict(led=0), dict(led=1), dict(led=0)),
    ('turn_off_led', dict(led=1), dict(led=0), dict(led=1)),
])
def test_task_success_both_ways(task, start, yes, no):
    s0 = info_with(**start)
    assert E.task_success(task, s0, info_with(**yes))
    assert not E.task_success(task, s0, info_with(**no))
    assert task in E.completed_tasks(s0, info_with(**yes))
    assert task not in E.completed_tasks(s0, info_with(**no))


def test_light_tasks_need_the_start_state():
    # bulb already on at the start: staying on is not "turn_on_lightbulb"
    assert not E.task_success('turn_on_lightbulb', info_with(bulb=1), info_with(bulb=1))
    assert not E.task_success('turn_off_led', info_with(led=0), info_with(led=0))
    with pytest.raises(ValueError, match='unknown task'):
        E.task_success('open_door', info_with(), info_with())


def test_task_possible_and_sampled_starts():
    assert E.task_possible('open_drawer', info_with(drawer=0.05)['scene_obs'])
    assert not E.task_possible('open_drawer', info_with(drawer=0.15)['scene_obs'])
    assert not E.task_possible('move_slider_right', info_with(door=0.1)['scene_obs'])
    assert E.task_possible('turn_off_led', info_with(led=1)['scene_obs'])
    rng = np.random.default_rng(0)
    for task in E.TASKS:
        robot_obs, scene_obs = E.sample_task_start(task, rng)
        assert robot_obs.shape == (15,) and scene_obs.shape == (24,)
        assert E.task_possible(task, scene_obs)
        assert np.linalg.norm(robot_obs[:3] - [0.024, -0.232, 0.606]) < 0.15   # near the neutral TCP


def test_wrap_angle():
    np.testing.assert_allclose(E.wrap_angle([np.pi + 0.1, -np.pi - 0.1, 0.3]), [-np.pi + 0.1, np.pi - 0.1, 0.3])
    # difference across the +-pi seam is small, not ~2 pi
    assert abs(E.wrap_angle(-3.1 - 3.1)) < 0.1


# ---------------------------------------------------------------- simulator

def drive(desk, obs, goal, steps, grip=-1.0):
    """Move the TCP towards goal with a P-law on relative actions; returns the list of observations."""
    out = []
    for _ in range(steps):
        a = np.zeros(7)
        a[:3] = 0.5 * (np.asarray(goal) - obs['robot_obs'][:3]) / E.POS_SCALE
        a[3:6] = 0.5 * E.wrap_angle(E.DOWN_EULER - obs['robot_obs'][3:6]) / E.ORN_SCALE
        a[6] = grip
        obs = desk.step(np.clip(a, -1, 1))[0]
        out.append(obs)
    return out


def test_led_toggles_once_per_press(desk):
    scene = E.random_scene(np.random.default_rng(1), led_on=False)
    obs = desk.reset(scene_obs=scene)
    top = E.BUTTON_ORIGIN + (0, 0, 0.027)
    obs = drive(desk, obs, top + (0, 0, 0.08), 30)[-1]
    assert obs['scene_obs'][5] == 0
    held = drive(desk, obs, top + (0, 0, -0.015), 15)          # press and hold
    assert max(o['scene_obs'][2] for o in held) > E.LED_PRESS_THRESHOLD
    assert held[-1]['scene_obs'][2] > E.LED_PRESS_THRESHOLD  # still held down at the end
    leds = [o['scene_obs'][5] for o in held]
    assert leds[-1] == 1 and np.count_nonzero(np.diff(leds)) == 1   # toggled exactly once while held
    released = drive(desk, held[-1], top + (0, 0, 0.08), 15)
    assert released[-1]['scene_obs'][2] < 0.005 and released[-1]['scene_obs'][5] == 1   # springs back, stays on
    again = drive(desk, released[-1], top + (0, 0, -0.015), 15)
    assert again[-1]['scene_obs'][5] == 0                     # second press toggles it off


def test_bulb_follows_switch(desk):
    scene = E.random_scene(np.random.default_rng(2), switch_on=False)
    for q, bulb in ((0.040, 0.0), (0.050, 1.0)):
        scene[3], scene[4] = q, 1.0 - bulb     # deliberately inconsistent: one step must fix it
        desk.reset(scene_obs=scene)
        obs = desk.step(np.zeros(7))[0]
        assert obs['scene_obs'][4] == bulb, (q, obs['scene_obs'][3])


def test_reset_reproduces_state(desk):
    rng = np.random.default_rng(3)
    obs = desk.reset(seed=3)
    for _ in range(20):
        obs = desk.step(np.r_[rng.uniform(-1, 1, 3), 0, 0, 0, -1])[0]
    info = desk.get_info()
    assert info['robot_obs'][14] == -1
    info['scene_obs'][5] = 1.0                     # LED state is part of the state
    desk.reset(seed=4)                             # somewhere else entirely
    back = desk.reset(info['robot_obs'], info['scene_obs'])
    np.testing.assert_allclose(back['robot_obs'], info['robot_obs'], atol=1e-4)
    np.testing.assert_allclose(back['scene_obs'], info['scene_obs'], atol=1e-5)
    # the controller's target is the measured pose: a zero action keeps the hand still
    still = desk.step(np.r_[np.zeros(6), -1])[0]
    np.testing.assert_allclose(still['robot_obs'][:3], info['robot_obs'][:3], atol=3e-3)


def test_action_clipping_and_gripper_threshold(desk):
    desk.reset(seed=0)
    t0 = desk.target_pos.copy()
    obs = desk.step([5.0, -7.0, 0.0, 0.0, 0.0, 0.0, 0.3])[0]
    np.testing.assert_allclose(desk.target_pos - t0, [E.POS_SCALE, -E.POS_SCALE, 0.0], atol=1e-9)
    assert obs['robot_obs'][14] == 1.0
    assert desk.step([0, 0, 0, 0, 0, 0, -0.01])[0]['robot_obs'][14] == -1.0
    assert desk.step([0, 0, 0, 0, 0, 0, 0.0])[0]['robot_obs'][14] == 1.0      # >= 0 opens (paper S.3.1)
    closed = None
    for _ in range(10):
        closed = desk.step([0, 0, 0, 0, 0, 0, -1])[0]
    assert closed['robot_obs'][6] < 0.01                                       # fingers closed
    with pytest.raises(ValueError, match='7 finite'):
        desk.step(np.zeros(6))
    with pytest.raises(ValueError, match='7 finite'):
        desk.step([np.nan] * 7)


def test_obs_shapes_dtypes_custom_resolution():
    d = E.DeskEnv(image_size=40, gripper_size=24, seed=0)
    try:
        for obs in (d.reset(), d.step(np.zeros(7))[0]):
            assert obs['rgb_obs']['rgb_static'].shape == (40, 40, 3)
            assert obs['rgb_obs']['rgb_gripper'].shape == (24, 24, 3)
            assert obs['rgb_obs']['rgb_static'].dtype == np.uint8
            assert obs['robot_obs'].shape == (15,) and obs['robot_obs'].dtype == np.float32
            assert obs['scene_obs'].shape == (24,) and obs['scene_obs'].dtype == np.float32
            assert obs['rgb_obs']['rgb_static'].std() > 10          # not a blank image
        # the LED is visible: switching it on changes the static image
        s = d.get_info()['scene_obs']
        s[5] = 0.0
        off = d.reset(scene_obs=s)['rgb_obs']['rgb_static'].astype(int)
        s[5] = 1.0
        on = d.reset(scene_obs=s)['rgb_obs']['rgb_static'].astype(int)
        assert np.abs(on - off).sum() > 0
    finally:
        d.close()
    with pytest.raises(ValueError, match='image sizes'):
        E.DeskEnv(image_size=0)


def test_deterministic(desk):
    rng = np.random.default_rng(7)
    robot_obs, scene_obs = E.sample_task_start('open_drawer', rng)
    actions = rng.uniform(-1, 1, (15, 7))
    runs = []
    for _ in range(2):
        desk.reset(robot_obs, scene_obs)
        runs.append(np.stack([np.r_[o['robot_obs'], o['scene_obs']] for o in (desk.step(a)[0] for a in actions)]))
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)


@pytest.mark.parametrize('task', E.TASKS)
def test_scripted_skill_solves_task(desk, task):
    rng = np.random.default_rng(11)
    for _ in range(2):
        robot_obs, scene_obs = E.sample_task_start(task, rng)
        obs = desk.reset(robot_obs, scene_obs)
        start, skill = desk.get_info(), E.ScriptedSkill(task, rng)
        for _ in range(150):
            action = skill.act(obs)
            assert action.shape == (7,) and np.all(np.abs(action) <= 1)
            obs, reward, done, info = desk.step(action)
            if skill.done:
                break
        assert skill.done and E.task_success(task, start, info), (task, info['scene_obs'][:6])


def test_reach_and_pause_skills(desk):
    rng = np.random.default_rng(0)
    obs = desk.reset(seed=0)
    goal = np.array([0.1, -0.2, 0.55])
    skill = E.ScriptedSkill('reach', rng, reach_target=goal)
    for _ in range(60):
        obs = desk.step(skill.act(obs))[0]
        if skill.done:
            break
    assert skill.done and np.linalg.norm(obs['robot_obs'][:3] - goal) < 0.03
    pause, target = E.ScriptedSkill('pause', rng, pause_steps=5), desk.target_pos.copy()
    actions = []
    while not pause.done:
        actions.append(pause.act(obs))
        obs = desk.step(actions[-1])[0]
    assert len(actions) == 5 and np.all(np.stack(actions)[:, :6] == 0)
    np.testing.assert_array_equal(desk.target_pos, target)     # zero actions leave CALVIN's target alone
    with pytest.raises(ValueError, match='unknown skill'):
        E.ScriptedSkill('fly', rng)


def test_calvin_adapter_explains_missing_install():
    try:
        import calvin_env  # noqa: F401
        pytest.skip('calvin_env is installed')
    except ImportError:
        pass
    with pytest.raises(ImportError, match='mees/calvin_env'):
        E.CalvinEnvAdapter()


def test_operator_style_drift_detour_hesitation(desk):
    """The play data's operator (data.CollectConfig): AR(1) action noise keeps its stationary std, a detour
    prepends one via point off the straight line, a hesitation holds still (3 to hesitate_max steps), and the
    skill still succeeds."""
    rng = np.random.default_rng(3)
    skill = E.ScriptedSkill('reach', rng, noise=0.2, noise_corr=0.8)
    draws = []
    for _ in range(4000):                 # the noise recursion alone, as act() runs it
        skill.drift = 0.8 * skill.drift + np.sqrt(1 - 0.8 ** 2) * rng.normal(0.0, 0.2, 6)
        draws.append(skill.drift.copy())
    draws = np.stack(draws)
    assert abs(draws.std() - 0.2) < 0.02
    assert abs(np.corrcoef(draws[1:, 0], draws[:-1, 0])[0, 1] - 0.8) < 0.05

    robot_obs, scene_obs = E.sample_task_start('open_drawer', rng)
    obs = desk.reset(robot_obs, scene_obs)
    clean = E.ScriptedSkill('open_drawer', np.random.default_rng(0))
    styled = E.ScriptedSkill('open_drawer', np.random.default_rng(0), p_via=1.0, p_hesitate=1.0, hesitate_max=4)
    clean.act(obs), styled.act(obs)
    assert len(styled.phases) == len(clean.phases) + 1           # the via point comes first
    via, first = styled.phases[0]['goal'], clean.phases[0]['goal']
    assert not np.allclose(via, first) and via[2] >= min(obs['robot_obs'][2], first[2]) - 1e-9
    start, zero_runs, run = desk.get_info(), [], 0
    for _ in range(200):
        a = styled.act(obs)
        run = run + 1 if np.all(a[:6] == 0) else 0
        zero_runs.append(run)
        obs, _, _, info = desk.step(a)
        if styled.done:
            break
    assert styled.done and E.task_success('open_drawer', start, info)
    assert 3 <= max(zero_runs) <= 4                     # it hesitated between phases, at most hesitate_max steps


def test_led_miss_presses_beside_the_button_then_succeeds(desk):
    """p_miss (play data that shows what a miss looks like): the operator first comes down beside the button
    onto the table, the LED does not change there, and the skill then presses it."""
    for seed, task in enumerate(['turn_on_led', 'turn_off_led']):
        rng = np.random.default_rng(seed)
        obs = desk.reset(*E.sample_task_start(task, rng))
        skill = E.ScriptedSkill(task, np.random.default_rng(seed), p_miss=1.0)
        start, infos = desk.get_info(), []
        skill.act(obs)
        miss = skill.phases[1]['goal']
        assert len(skill.phases) == 6 and E.MISS_DIST[0] <= np.linalg.norm((miss - E.BUTTON_ORIGIN)[:2]) <= E.MISS_DIST[1]
        for _ in range(200):
            obs, _, _, info = desk.step(skill.act(obs))
            infos.append((skill.i, info))
            if skill.done:
                break
        low = [i for phase, i in infos if phase <= 2 and i['robot_obs'][2] < E.BUTTON_ORIGIN[2]]   # below the top
        assert low and all(i['scene_obs'][5] == start['scene_obs'][5] for i in low)   # down there: no toggle
        assert skill.done and E.task_success(task, start, info)


@pytest.mark.parametrize('task', ['open_drawer', 'move_slider_right', 'turn_on_lightbulb', 'turn_on_led'])
def test_retry_abandons_the_first_attempt_part_way_then_succeeds(desk, task):
    """p_retry (play data that shows unfinished attempts): the operator stops part-way (between RETRY_AT[0] of
    the success threshold and the threshold itself, the task not done), lets go and lifts, then starts over
    and succeeds. LED: a press too light to switch it, then the press."""
    obs = desk.reset(*E.sample_task_start(task, np.random.default_rng(0)))
    skill = E.ScriptedSkill(task, np.random.default_rng(0), p_retry=1.0)
    start, abort, light = desk.get_info(), None, []
    for _ in range(200):
        had = skill.retry_at
        a = skill.act(obs)
        if 'led' not in task and had is not None and skill.retry_at is None:      # the attempt is abandoned now
            abort = (E.task_progress(task, start['scene_obs'], obs['scene_obs']), E.task_success(task, start, desk.get_info()))
        obs, _, _, info = desk.step(a)
        if 'led' in task and len(skill.phases) == 6 and skill.i <= 2:               # the light press
            light.append((obs['scene_obs'][2], obs['scene_obs'][5]))
        if skill.done:
            break
    if 'led' in task:
        assert max(d for d, _ in light) > 0.2 * E.LED_PRESS_THRESHOLD                # the button went down ...
        assert all(led == start['scene_obs'][5] for _, led in light)                  # ... and the LED stayed
    else:
        assert abort is not None and E.RETRY_AT[0] <= abort[0] < 1 and not abort[1], abort
    assert skill.done and E.task_success(task, start, info)


def test_task_progress_reaches_one_at_each_success_threshold():
    """task_progress is 1 exactly where task_success switches (the drawer / door displacement tests; the
    switch and button thresholds that toggle the lights)."""
    rng = np.random.default_rng(0)
    for task in E.TASKS:
        s0 = E.random_scene(rng)
        s1 = s0.copy()
        i, d = {'open_drawer': (1, 0.12), 'close_drawer': (1, -0.12), 'move_slider_left': (0, 0.15),
                'move_slider_right': (0, -0.15)}.get(task, (None, None))
        if i is not None:
            s1[i] += d
        elif 'lightbulb' in task:
            s0[3] = 0.0 if task == 'turn_on_lightbulb' else E.SWITCH_MAX
            s1[3] = E.BULB_SWITCH_THRESHOLD
        else:
            s1[2] = E.LED_PRESS_THRESHOLD
        assert E.task_progress(task, s0, s1) == pytest.approx(1.0), task
        assert E.task_progress(task, s0, s0) == pytest.approx(0.0 if 'led' not in task else s0[2] / E.LED_PRESS_THRESHOLD)


def test_clean_skills_draw_no_style_randomness():
    """Default (clean) skills must not consume random numbers for the style: eval.py's scripted rows and
    check_skills stay what they were."""
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    skill = E.ScriptedSkill('open_drawer', a)
    robot_obs, scene_obs = E.sample_task_start('open_drawer', np.random.default_rng(1))
    skill.act({'robot_obs': robot_obs, 'scene_obs': scene_obs})
    assert a.random() == b.random()


def run_styled_skill(desk, task, seed, max_steps=200, **style):
    """Run one styled ScriptedSkill from a random start of `task` until it is done -> (skill, success)."""
    rng = np.random.default_rng(seed)
    robot_obs, scene_obs = E.sample_task_start(task, rng)
    obs = desk.reset(robot_obs, scene_obs)
    skill, start = E.ScriptedSkill(task, rng, **style), desk.get_info()
    for _ in range(max_steps):
        obs, _, _, info = desk.step(skill.act(obs))
        if skill.done:
            break
    return skill, skill.done and E.task_success(task, start, info)


def test_drawer_grasp_tolerance_is_drawn_per_attempt_and_still_opens(desk):
    """drawer_tol_max (the play data's operator, FINDINGS.md: open_drawer's grasp): the knob is grasped once the hand is
    within a tolerance drawn from [DRAWER_GRASP_TOL, drawer_tol_max]; the drawer still opens."""
    tols = []
    for seed in range(3):
        skill, success = run_styled_skill(desk, 'open_drawer', seed, drawer_tol_max=0.015)
        tols.append(skill.phases[2]['tol'])     # above the knob, down to it (this tolerance), close, pull
        assert skill.phases[3]['grip'] == -1 and skill.phases[2]['grip'] == 1
        assert success, seed
    assert all(E.DRAWER_GRASP_TOL <= t <= 0.015 for t in tols) and len(set(tols)) == 3


def test_close_drawer_push_tolerance_is_drawn_per_attempt_and_still_closes(desk):
    """push_tol_max (the play data's operator, FINDINGS.md "How fast is the operator"): close_drawer starts pushing
    once the hand is within a tolerance drawn from [DRAWER_PUSH_TOL, push_tol_max] of the point in front of the
    knob; the clean skill keeps DRAWER_PUSH_TOL (6 mm) and draws nothing."""
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    clean = E.ScriptedSkill('close_drawer', a)
    robot_obs, scene_obs = E.sample_task_start('close_drawer', np.random.default_rng(1))
    clean.act({'robot_obs': robot_obs, 'scene_obs': scene_obs})
    assert clean.phases[2]['tol'] == E.DRAWER_PUSH_TOL == 0.006 and a.random() == b.random()
    tols = []
    for seed in range(3):
        skill, success = run_styled_skill(desk, 'close_drawer', seed, push_tol_max=0.015)
        tols.append(skill.phases[2]['tol'])      # above the knob, down in front of it (this tolerance), push
        assert skill.phases[3]['until'] is not None and success, seed
    assert all(E.DRAWER_PUSH_TOL <= t <= 0.015 for t in tols) and len(set(tols)) == 3


def test_task_success_batch_matches_task_success():
    """The vectorised success test (decoded-state reward, Fig. 2) agrees with the per-frame one."""
    rng = np.random.default_rng(0)
    s0 = np.stack([E.random_scene(rng) for _ in range(300)])
    s1 = s0.copy()
    s1[:, :2] += rng.uniform(-0.25, 0.25, (300, 2))
    s1[:, 4:6] = rng.random((300, 2)) < 0.5
    for task in E.TASKS:
        batch = E.task_success_batch(task, s0, s1)
        loop = [E.task_success(task, {'scene_obs': a}, {'scene_obs': b}) for a, b in zip(s0, s1)]
        np.testing.assert_array_equal(batch, loop)
        assert 0 < np.sum(loop) < 300, task              # both outcomes occur
        import torch
        np.testing.assert_array_equal(E.task_success_batch(task, torch.tensor(s0), torch.tensor(s1)).numpy(), loop)


class _StandInCalvin:
    """The interface of the real calvin_env: CALVIN-resolution images, depth keys, a step that
    insists on a gripper action of exactly +-1, info dicts for the task oracle, and a robot whose gripper command
    survives a reset."""

    def __init__(self):
        self.actions, self.t = [], 0
        self.robot = type('Robot', (), {'gripper_action': -1})()

    def _obs(self):
        rng = np.random.default_rng(self.t)
        return {'rgb_obs': {'rgb_static': rng.integers(0, 255, (200, 200, 3), dtype=np.uint8),
                            'rgb_gripper': rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)},
                'depth_obs': {'depth_static': np.zeros((200, 200)), 'depth_gripper': np.zeros((84, 84))},
                'robot_obs': np.arange(15, dtype=np.float64) + self.t, 'scene_obs': np.zeros(24) + self.t}

    def reset(self, robot_obs=None, scene_obs=None):
        self.t = 0
        return self._obs()

    def step(self, action):
        assert action[6] in (-1.0, 1.0), f'calvin_env needs a gripper action of exactly +-1, got {action[6]}'
        self.actions.append(np.array(action))
        self.t += 1
        return self._obs(), 0, False, {'scene_obs': self._obs()['scene_obs']}

    def get_info(self):
        return {'scene_obs': self._obs()['scene_obs']}


class _StandInTasks:
    def get_task_info(self, start_info, info):
        return {'open_drawer'} if info['scene_obs'][1] - start_info['scene_obs'][1] > 0.12 else set()

    def get_task_info_for_set(self, start_info, info, tasks):
        return self.get_task_info(start_info, info) & set(tasks)


def test_calvin_adapter_maps_observations_and_gripper_sign():
    import data
    fake = _StandInCalvin()
    adapter = E.CalvinEnvAdapter.wrap(fake, _StandInTasks())
    obs = adapter.reset()
    assert fake.robot.gripper_action == 1                                 # a reset opens: no command carried over
    assert set(obs) == {'rgb_obs', 'robot_obs', 'scene_obs'} and set(obs['rgb_obs']) == {'rgb_static', 'rgb_gripper'}
    assert obs['robot_obs'].dtype == np.float32 and obs['robot_obs'].shape == (15,) and obs['scene_obs'].shape == (24,)
    for a6, expected in [(0.3, 1.0), (-0.2, -1.0), (0.0, 1.0), (-1.7, -1.0), (5.0, 1.0)]:
        adapter.step(np.r_[np.full(6, 2.0), a6])
        assert fake.actions[-1][6] == expected                           # CALVIN: +1 open, -1 close, nothing else
        assert np.all(fake.actions[-1][:6] == 1.0)                        # relative actions clipped to [-1, 1]
    start = adapter.get_info()
    fake.t += 1                                                           # every scene value grows by 1
    assert adapter.task_success('open_drawer', start, adapter.get_info())
    assert not adapter.task_success('close_drawer', start, adapter.get_info())
    assert adapter.completed_tasks(start, adapter.get_info()) == {'open_drawer'}
    batch = data.preprocess_obs([adapter.reset(), obs])                   # 200 / 84 px -> the world model's 64
    assert batch['rgb_static'].shape == (2, 3, 64, 64) and batch['rgb_gripper'].shape == (2, 3, 64, 64)
    assert batch['proprio'].shape == (2, 18) and float(batch['rgb_static'].abs().max()) <= 1.0


def test_near_rest_matches_the_evaluation_start_poses():
    """DiWA's imagined episodes start from recorded frames near the rest pose: every start pose the evaluation
    samples counts as near, a pose 20 cm away does not."""
    rng = np.random.default_rng(0)
    poses = np.stack([E.random_robot_obs(rng) for _ in range(50)])
    assert E.near_rest(poses).all()
    far = poses.copy()
    far[:, 0] += 0.2
    assert not E.near_rest(far).any()
