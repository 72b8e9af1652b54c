"""The built-in CALVIN-style desk: a pybullet Panda, CALVIN's observation/action conventions, the 8 tasks.

Paper: §IV.A (CALVIN environment D), S.3.1 (7-D relative action, gripper thresholded at 0). calvin_env's scene D (Mees
et al. 2022; ~18 steps/s with cameras on a laptop) rebuilt from pybullet primitives with its numbers, for 2 CPU cores.

Desk (world frame, metres, z up; +q of each prismatic joint as in CALVIN):

      LED (x -0.20..-0.04)        bulb (x 0.30)          <- on the cabinet top, z ~0.65
    +-----------------------+-----------------+
    | sliding door  <- +q   |  switch (up=+q) |          <- cabinet front, y ~0.075, z 0.44..0.64
    +-----------------------+-----------------+
    | button (-0.40,-0.10)         blocks      |          <- table top, z 0.44
    +------------------[ drawer, +q = -y ]-----+          <- under the table top, z ~0.32
                  Panda base (-0.34,-0.46,0.24), in front of the table (y < -0.19)

Glossary (CALVIN name -> variable -> shape):
  robot_obs  -> obs['robot_obs'] (15,) [tcp xyz, tcp euler xyz, gripper width, 7 arm joints, last gripper action]
  scene_obs  -> obs['scene_obs'] (24,) [door, drawer, button, switch, bulb, led, red xyz+euler, blue ..., pink ...]
  rel_action -> action (7,) [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1,1]; 0.02 m / 0.05 rad per unit
  info       -> env.get_info() {'robot_obs', 'scene_obs'}; task_success compares a start info with a current one

API: DeskEnv(image_size, gripper_size, cameras, seed) .reset(robot_obs, scene_obs, seed) .step(a) .get_info();
task_success / completed_tasks / task_possible / sample_task_start; ScriptedSkill(task, rng, noise, speed, geometry).act
(Geometry: where the parts are); CalvinEnvAdapter (the real simulator, when installed; .geometry() reads its scene).
CLI: python diagnose.py skills [--operator] [--env calvin] | render DIR
"""
import dataclasses
import hashlib
import multiprocessing as mp
import os
import tempfile

import numpy as np


p = pybullet_data = None       # pybullet, imported on first use: the success tests and the imagination need none


def _import_pybullet_quietly():
    """Import pybullet into this module's globals, hiding the build banner its C code prints on stderr."""
    global p, pybullet_data
    if p is not None:
        return
    fd = os.dup(2)
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 2)
            import pybullet
            import pybullet_data
    finally:
        os.dup2(fd, 2)
        os.close(fd)
    p = pybullet

TASKS = ['open_drawer', 'close_drawer', 'move_slider_left', 'move_slider_right',
         'turn_on_lightbulb', 'turn_off_lightbulb', 'turn_on_led', 'turn_off_led']

# ---------------------------------------------------------------- CALVIN constants (calvin_env, scene D)
PHYSICS_HZ, SUBSTEPS, SOLVER_ITERATIONS = 240, 8, 50        # control at 240 / 8 = 30 Hz
ROBOT_BASE = (-0.34, -0.46, 0.24)
Q_INIT = np.array([-1.21779206, 1.03987646, 2.11978261, -2.34205014, -0.87015947, 1.64119353, 0.55344866])
# CALVIN's own evaluation resets the robot to this robot_obs (calvin_models evaluation/utils.py,
# get_env_state_for_initial_condition): TCP xyz, Euler, gripper width, the joints Q_INIT, gripper open
CALVIN_NEUTRAL_ROBOT_OBS = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                                     -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093,
                                     0.55344928, 1.0])
POS_SCALE, ORN_SCALE = 0.02, 0.05                           # metres / radians per action unit
ARM_FORCE, ARM_MAX_VEL = 200.0, 2.0
FINGER_OPEN, FINGER_OPEN_FORCE, FINGER_CLOSE_FORCE = 0.04, 2.0, 200.0
WORKSPACE = np.array([[-0.55, -0.65, 0.26], [0.55, 0.25, 0.80]])  # TCP target box: a jammed hand can't drag it away
ARM, FINGERS, TCP_LINK = list(range(7)), [9, 10], 11        # joint / link indices in pybullet's panda.urdf

# Articulated parts: (joint upper limit, unit direction of +q, link origin at q = 0)
DOOR_MAX, DRAWER_MAX, BUTTON_MAX, SWITCH_MAX = 0.28, 0.22, 0.02, 0.088
DOOR_ORIGIN, DRAWER_ORIGIN = np.array([-0.10, 0.075, 0.535]), np.array([0.18, 0.0, 0.32])
# Button ~0.4 m from the rest pose, like the knob and the switch (at CALVIN's (-0.12, -0.12): too easy, base 87-99%)
BUTTON_ORIGIN, SWITCH_ORIGIN = np.array([-0.40, -0.10, 0.46]), np.array([0.30, 0.061, 0.495])
SWITCH_DIR = np.array([0.0, 0.5, 0.866])
LED_PRESS_THRESHOLD, BULB_SWITCH_THRESHOLD = 0.016, 0.044
TABLE_TOP_Z = 0.44
# Lights on the cabinet top, ~5 cm nearer and ~2 cm lower than CALVIN's: both stay in the static camera's 64x64 frame.
LED_POS, BULB_POS = (-0.12, 0.115, 0.637), (0.30, 0.12, 0.655)
# Handles (knobs) stand out 7 cm so that the hand never touches the surface behind them.
DRAWER_KNOB = np.array([0.0, -0.2275, -0.02])   # knob centre relative to the drawer origin; tip at y = -0.265
DOOR_KNOB = np.array([0.0, -0.0335, -0.005])    # relative to the door origin; door face at y = 0.067
SWITCH_KNOB = np.array([0.0, -0.035, 0.0])      # relative to the switch origin

OFF_RGBA, LED_ON_RGBA, BULB_ON_RGBA = (1, 1, 1, 1), (0.1, 0.9, 0.1, 1), (1.0, 0.85, 0.0, 1)
BLOCKS = {  # name: (half extents, rgba); 1 kg, friction 0.7
    'red': ((0.028, 0.02, 0.02), (0.85, 0.1, 0.1, 1)),
    'blue': ((0.02, 0.02, 0.02), (0.1, 0.25, 0.9, 1)),
    'pink': ((0.04, 0.02, 0.02), (0.95, 0.45, 0.75, 1)),
}
# Block spawn regions (x range, y range): the open table top (away from the button), the shelf behind the door.
BLOCK_REGIONS = [((-0.05, 0.45), (-0.16, 0.0)), ((-0.45, 0.02), (0.14, 0.27))]

STATIC_CAM = dict(eye=(2.8715, -2.1666, 2.5552), target=(-0.0262, -0.0302, 0.3920), up=(0.4041, 0.2263, 0.8863),
                  fov=10.0, near=0.01, far=10.0)
GRIPPER_CAM = dict(fov=75.0, near=0.01, far=2.0, behind=0.1)


# ---------------------------------------------------------------- small math helpers
def wrap_angle(a):
    """Map angles to [-pi, pi): TCP roll sits near +-pi, so raw Euler differences jump by 2 pi."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


# ---------------------------------------------------------------- the desk as a generated URDF
def _box(xyz, half, rgba, collide=True, visual=True):
    """URDF <visual> (+ <collision>) of a box given its centre (in the link frame) and half extents."""
    o = f'<origin xyz="{xyz[0]} {xyz[1]} {xyz[2]}"/>'
    g = f'<geometry><box size="{2 * half[0]} {2 * half[1]} {2 * half[2]}"/></geometry>'
    s = f'<visual>{o}{g}<material name="c{abs(hash(rgba)) % 10**8}"><color rgba="{" ".join(map(str, rgba))}"/></material></visual>'
    return (s if visual else '') + (f'<collision>{o}{g}</collision>' if collide else '')


def _link(name, shapes, mass=0.0):
    inertial = (f'<inertial><mass value="{mass}"/><inertia ixx="0.01" ixy="0" ixz="0" iyy="0.01" iyz="0" '
                f'izz="0.01"/></inertial>')
    return f'<link name="{name}">{inertial}{"".join(shapes)}</link>'


def _joint(name, kind, child, origin, axis=(0, 0, 1), upper=0.0):
    lim = f'<limit lower="0" upper="{upper}" effort="100" velocity="1"/>' if kind == 'prismatic' else ''
    return (f'<joint name="{name}" type="{kind}"><parent link="base"/><child link="{child}"/>'
            f'<origin xyz="{origin[0]} {origin[1]} {origin[2]}"/><axis xyz="{axis[0]} {axis[1]} {axis[2]}"/>{lim}</joint>')


def desk_urdf():
    """One multibody: table + cabinet (base), door, drawer, button, switch, LED, bulb; task states show at 64x64."""
    wood, body, cab, dark = (0.78, 0.6, 0.42, 1), (0.55, 0.55, 0.6, 1), (0.85, 0.8, 0.7, 1), (0.15, 0.15, 0.18, 1)
    top = TABLE_TOP_Z
    base = [
        _box((0, 0, -0.01), (1.5, 1.5, 0.01), (0.45, 0.45, 0.45, 1), visual=False),        # floor (hidden: pixels cost)
        _box((0, 0.065, top - 0.015), (0.62, 0.255, 0.015), wood),                          # table top y -0.19..0.32
        _box((-0.31, 0.075, 0.205), (0.31, 0.24, 0.205), body),                             # left block under the top
        _box((0.49, 0.075, 0.205), (0.13, 0.24, 0.205), body),                              # right block
        _box((0.18, 0.075, 0.12), (0.18, 0.24, 0.12), body),                                # below the drawer slot
        _box((0.18, 0.30, 0.32), (0.18, 0.015, 0.09), dark),                                # back of the drawer slot
        _box(ROBOT_BASE[:2] + (0.115,), (0.09, 0.09, 0.115), dark, collide=False),        # robot pedestal
        # cabinet on the back of the table: x -0.52..0.46, y 0.09..0.32, z 0.44..0.625
        _box((-0.03, 0.205, 0.615), (0.49, 0.115, 0.01), wood),                             # cabinet top
        _box((-0.03, 0.31, 0.5225), (0.49, 0.01, 0.0825), dark, collide=False),             # back (dark interior)
        _box((-0.51, 0.205, 0.5225), (0.01, 0.115, 0.0825), cab),                           # left side
        _box((0.45, 0.205, 0.5225), (0.01, 0.115, 0.0825), cab),                            # right side
        _box((0.09, 0.205, 0.5225), (0.01, 0.115, 0.0825), cab),                            # divider
        _box((0.27, 0.095, 0.5225), (0.17, 0.005, 0.0825), cab),                            # right front panel
        _box((BUTTON_ORIGIN[0], BUTTON_ORIGIN[1], top + 0.004), (0.032, 0.032, 0.004), dark),  # button housing
    ]
    door = [_box((0, 0, 0), (0.13, 0.008, 0.07), (0.2, 0.45, 0.8, 1)),
            _box(DOOR_KNOB, (0.01, 0.0335, 0.025), dark)]
    drawer = [_box((0, -0.18, 0), (0.17, 0.01, 0.07), (0.95, 0.55, 0.1, 1)),               # front, face y = -0.19
              _box((0, 0.0, -0.06), (0.16, 0.17, 0.01), (0.6, 0.35, 0.1, 1)),             # bottom
              _box((-0.155, 0, -0.02), (0.005, 0.17, 0.04), (0.6, 0.35, 0.1, 1)),
              _box((0.155, 0, -0.02), (0.005, 0.17, 0.04), (0.6, 0.35, 0.1, 1)),
              _box(DRAWER_KNOB, (0.012, 0.0375, 0.015), dark)]
    button = [_box((0, 0, 0), (0.009, 0.009, 0.027), (0.8, 0.1, 0.1, 1))]  # 1.8 cm: pressing it takes aim
    switch = [_box((0, 0.015, 0), (0.03, 0.015, 0.03), dark),
              _box(SWITCH_KNOB, (0.015, 0.035, 0.012), (0.1, 0.1, 0.1, 1))]
    led = [_box((0, 0, 0), (0.09, 0.035, 0.02), OFF_RGBA, collide=False)]   # ~9x4 px at 64x64
    bulb = [_box((0, 0, 0), (0.03, 0.03, 0.03), OFF_RGBA, collide=False)]
    parts = [_link('base', base),
             _link('door', door, 1.0), _joint('door_joint', 'prismatic', 'door', DOOR_ORIGIN, (-1, 0, 0), DOOR_MAX),
             _link('drawer', drawer, 1.0),
             _joint('drawer_joint', 'prismatic', 'drawer', DRAWER_ORIGIN, (0, -1, 0), DRAWER_MAX),
             _link('button', button, 0.1),
             _joint('button_joint', 'prismatic', 'button', BUTTON_ORIGIN, (0, 0, -1), BUTTON_MAX),
             _link('switch', switch, 0.1),
             _joint('switch_joint', 'prismatic', 'switch', SWITCH_ORIGIN, SWITCH_DIR, SWITCH_MAX),
             _link('led', led, 0.0), _joint('led_joint', 'fixed', 'led', LED_POS),
             _link('bulb', bulb, 0.0), _joint('bulb_joint', 'fixed', 'bulb', BULB_POS)]
    # (one element per line: pybullet's XML reader fails on very long lines)
    return ('<?xml version="1.0"?>\n<robot name="desk">\n' + '\n'.join(parts) + '\n</robot>\n').replace('><', '>\n<')


DOOR, DRAWER, BUTTON, SWITCH, LED, BULB = range(6)          # link/joint indices of the desk


def _cached_file(name, text):
    """Write text once (atomically) to a per-user cache file named after its hash (checkouts never clash) -> path."""
    folder = os.path.join(tempfile.gettempdir(), f'diwa_env_{os.getuid() if hasattr(os, "getuid") else 0}')
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    path = os.path.join(folder, f'{stem}_{hashlib.sha1(text.encode()).hexdigest()[:12]}{ext}')
    if not os.path.exists(path) or open(path).read() != text:
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def _decimated_obj(src, cell=0.02):
    """Vertex-clustering decimation of an OBJ mesh (snap to a `cell` grid, drop collapsed triangles, keep winding)."""
    V, F = [], []
    for line in open(src):
        t = line.split()
        if t and t[0] == 'v':
            V.append([float(x) for x in t[1:4]])
        elif t and t[0] == 'f':
            f = [int(x.split('/')[0]) - 1 for x in t[1:]]
            F += [[f[0], f[i], f[i + 1]] for i in range(1, len(f) - 1)]
    V, F = np.array(V), np.array(F)
    _, first, inv = np.unique(np.round(V / cell).astype(int), axis=0, return_index=True, return_inverse=True)
    T = inv.reshape(-1)[F]
    T = T[(T[:, 0] != T[:, 1]) & (T[:, 1] != T[:, 2]) & (T[:, 0] != T[:, 2])]
    _, keep = np.unique(np.sort(T, axis=1), axis=0, return_index=True)
    lines = [f'v {x:.5f} {y:.5f} {z:.5f}' for x, y, z in V[first]] + [f'f {a + 1} {b + 1} {c + 1}' for a, b, c in T[np.sort(keep)]]
    return '\n'.join(lines) + '\n'


def panda_urdf():
    """pybullet_data's panda.urdf with decimated collision meshes as visuals (TinyRenderer: 100k -> 1.4k triangles)."""
    _import_pybullet_quietly()
    root = os.path.join(pybullet_data.getDataPath(), 'franka_panda')
    text = open(os.path.join(root, 'panda.urdf')).read()
    collision_dir = os.path.join(root, 'meshes', 'collision')
    for name in sorted(os.listdir(collision_dir)):
        if name.endswith('.obj'):
            light = _cached_file('visual_' + name, _decimated_obj(os.path.join(collision_dir, name)))
            text = text.replace(f'package://meshes/visual/{name}', light)
            # link0 and link7 use their collision mesh as visual: rewrite only <visual>, <collision> stays full
            text = text.replace(f'<visual>\n      <geometry>\n        <mesh filename="package://meshes/collision/{name}"/>',
                                f'<visual>\n      <geometry>\n        <mesh filename="{light}"/>')
    text = text.replace('package://meshes/collision/', collision_dir + os.sep)
    return _cached_file('panda_light_visuals.urdf', text)


# ---------------------------------------------------------------- the environment
class DeskEnv:
    """CALVIN-style desk. obs = {'rgb_obs': {'rgb_static', 'rgb_gripper'}, 'robot_obs' (15,), 'scene_obs' (24,)}.
    gripper_size defaults to image_size (CALVIN's dataset: 200 / 84); cameras=False: no 'rgb_obs', ~5x faster."""

    def __init__(self, image_size=64, gripper_size=None, cameras=True, seed=None):
        if int(image_size) < 8 or (gripper_size is not None and int(gripper_size) < 8):
            raise ValueError(f'DeskEnv: image sizes must be >= 8 pixels, got {image_size}, {gripper_size}')
        _import_pybullet_quietly()
        self.image_size, self.gripper_size = int(image_size), int(gripper_size or image_size)
        self.cameras = bool(cameras)
        self.rng = np.random.default_rng(seed)
        self.cid = p.connect(p.DIRECT)
        c = self.cid
        p.setGravity(0, 0, -9.81, physicsClientId=c)
        p.setPhysicsEngineParameter(fixedTimeStep=1.0 / PHYSICS_HZ, numSolverIterations=SOLVER_ITERATIONS,
                                    deterministicOverlappingPairs=1, physicsClientId=c)
        self.desk = p.loadURDF(_cached_file('desk.urdf', desk_urdf()), useFixedBase=True, physicsClientId=c)
        self.robot = p.loadURDF(panda_urdf(), ROBOT_BASE, useFixedBase=True, physicsClientId=c)
        for link in range(-1, 12):  # light-grey arm, dark hand and fingers: the hand stands out on the desk
            rgba = (0.25, 0.25, 0.28, 1) if link >= 8 else (0.9, 0.9, 0.92, 1)
            p.changeVisualShape(self.robot, link, rgbaColor=rgba, physicsClientId=c)
        for j in FINGERS:
            p.changeDynamics(self.robot, j, lateralFriction=1.0, physicsClientId=c)
        self._block_shapes = [(p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=c),
                               p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=rgba, physicsClientId=c))
                              for half, rgba in BLOCKS.values()]
        self.blocks = []
        # Door / drawer / switch hold still (velocity motor, force 4 = friction); the button springs back (position).
        for j in (DOOR, DRAWER, SWITCH):
            p.setJointMotorControl2(self.desk, j, p.VELOCITY_CONTROL, targetVelocity=0, force=4, physicsClientId=c)
        p.setJointMotorControl2(self.desk, BUTTON, p.POSITION_CONTROL, targetPosition=0, force=4, physicsClientId=c)
        info = [p.getJointInfo(self.robot, j, physicsClientId=c) for j in ARM]
        self._ik_lower = [i[8] for i in info] + [0.0, 0.0]
        self._ik_upper = [i[9] for i in info] + [0.04, 0.04]
        self._ik_range = [u - l for l, u in zip(self._ik_lower, self._ik_upper)]
        self._ik_rest = list(Q_INIT) + [0.0, 0.0]
        self._proj_static = p.computeProjectionMatrixFOV(STATIC_CAM['fov'], 1.0, STATIC_CAM['near'], STATIC_CAM['far'])
        self._view_static = p.computeViewMatrix(STATIC_CAM['eye'], STATIC_CAM['target'], STATIC_CAM['up'])
        self._proj_gripper = p.computeProjectionMatrixFOV(GRIPPER_CAM['fov'], 1.0, GRIPPER_CAM['near'],
                                                          GRIPPER_CAM['far'])
        self.reset()

    # ------------------------------------------------------------ state <-> simulator
    def _read_state(self):
        """robot_obs (15,) and scene_obs (24,) in CALVIN's layout, with one batched query per body."""
        c = self.cid
        ls = p.getLinkState(self.robot, TCP_LINK, computeForwardKinematics=1, physicsClientId=c)
        self._tcp_pos, self._tcp_quat = np.array(ls[4]), ls[5]
        js = p.getJointStates(self.robot, ARM + FINGERS, physicsClientId=c)
        q = [s[0] for s in js]
        robot_obs = np.empty(15)
        robot_obs[0:3] = self._tcp_pos
        robot_obs[3:6] = p.getEulerFromQuaternion(self._tcp_quat)
        robot_obs[6] = q[7] + q[8]                                   # gripper opening width
        robot_obs[7:14] = q[:7]
        robot_obs[14] = self._gripper_action
        ds = p.getJointStates(self.desk, [DOOR, DRAWER, BUTTON, SWITCH], physicsClientId=c)
        scene_obs = np.empty(24)
        scene_obs[0:4] = [s[0] for s in ds]
        scene_obs[4], scene_obs[5] = float(self._bulb_on), float(self._led_on)
        for i, uid in enumerate(self.blocks):
            pos, quat = p.getBasePositionAndOrientation(uid, physicsClientId=c)
            scene_obs[6 + 6 * i:9 + 6 * i] = pos
            scene_obs[9 + 6 * i:12 + 6 * i] = p.getEulerFromQuaternion(quat)
        self._robot_obs, self._scene_obs = robot_obs, scene_obs

    def _set_lights(self, led_on, bulb_on, force=False):
        c = self.cid
        if force or led_on != self._led_on:
            p.changeVisualShape(self.desk, LED, rgbaColor=LED_ON_RGBA if led_on else OFF_RGBA, physicsClientId=c)
        if force or bulb_on != self._bulb_on:
            p.changeVisualShape(self.desk, BULB, rgbaColor=BULB_ON_RGBA if bulb_on else OFF_RGBA, physicsClientId=c)
        self._led_on, self._bulb_on = bool(led_on), bool(bulb_on)

    def reset(self, robot_obs=None, scene_obs=None, seed=None):
        """Reset to a CALVIN state (robot via joints [7:14] + gripper, scene exactly; None: neutral / random). -> obs"""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        if robot_obs is None:
            robot_obs = np.zeros(15)
            robot_obs[7:14], robot_obs[6], robot_obs[14] = Q_INIT, 2 * FINGER_OPEN, 1.0
        if scene_obs is None:
            scene_obs = random_scene(self.rng)
        robot_obs, scene_obs = np.asarray(robot_obs, float), np.asarray(scene_obs, float)
        if robot_obs.shape != (15,) or scene_obs.shape != (24,):
            raise ValueError(f'reset: need robot_obs (15,) and scene_obs (24,), got {robot_obs.shape}, {scene_obs.shape}')
        c = self.cid
        for j, q in zip(ARM, robot_obs[7:14]):
            p.resetJointState(self.robot, j, q, 0.0, physicsClientId=c)
        for j in FINGERS:
            p.resetJointState(self.robot, j, np.clip(robot_obs[6] / 2, 0, FINGER_OPEN), 0.0, physicsClientId=c)
        for j, q in zip((DOOR, DRAWER, BUTTON, SWITCH), scene_obs[0:4]):
            p.resetJointState(self.desk, j, q, 0.0, physicsClientId=c)
        # Re-creating the blocks drops the solver's cached contacts: one state, one trajectory, whatever came before.
        for uid in self.blocks:
            p.removeBody(uid, physicsClientId=c)
        self.blocks = []
        for i, (col, vis) in enumerate(self._block_shapes):
            s = scene_obs[6 + 6 * i:12 + 6 * i]
            uid = p.createMultiBody(1.0, col, vis, s[:3], p.getQuaternionFromEuler(s[3:]), physicsClientId=c)
            p.changeDynamics(uid, -1, lateralFriction=0.7, physicsClientId=c)
            self.blocks.append(uid)
        self._led_on = self._bulb_on = None
        self._set_lights(scene_obs[5] > 0.5, scene_obs[4] > 0.5, force=True)
        self._gripper_action = 1.0 if robot_obs[14] >= 0 else -1.0
        self._button_prev = scene_obs[2]
        # Hold the measured arm pose and the gripper state until the first action arrives.
        for j, q in zip(ARM, robot_obs[7:14]):
            p.setJointMotorControl2(self.robot, j, p.POSITION_CONTROL, targetPosition=q, force=ARM_FORCE,
                                    maxVelocity=ARM_MAX_VEL, physicsClientId=c)
        self._command_gripper(self._gripper_action)
        self._read_state()
        self.target_pos = self._robot_obs[0:3].copy()                  # CALVIN: target reset to the measured TCP
        self.target_euler = self._robot_obs[3:6].copy()
        return self._obs()

    def _command_gripper(self, g):
        target, force = (FINGER_OPEN, FINGER_OPEN_FORCE) if g > 0 else (0.0, FINGER_CLOSE_FORCE)
        p.setJointMotorControlArray(self.robot, FINGERS, p.POSITION_CONTROL, targetPositions=[target, target],
                                    forces=[force, force], physicsClientId=self.cid)

    # ------------------------------------------------------------ control
    def step(self, action):
        """Apply one 7-D relative action (clipped to [-1,1]) for 8 physics substeps. -> (obs, 0., False, info)"""
        a = np.asarray(action, dtype=float).reshape(-1)
        if a.shape != (7,) or not np.all(np.isfinite(a)):
            raise ValueError(f'step: action must be 7 finite numbers [dx,dy,dz,droll,dpitch,dyaw,gripper], got {action!r}')
        a = np.clip(a, -1.0, 1.0)
        c = self.cid
        # CALVIN's relative controller: integrate the action into a stored target TCP pose.
        self.target_pos = np.clip(self.target_pos + POS_SCALE * a[:3], WORKSPACE[0], WORKSPACE[1])
        self.target_euler = wrap_angle(self.target_euler + ORN_SCALE * a[3:6])
        q = p.calculateInverseKinematics(self.robot, TCP_LINK, self.target_pos,
                                         p.getQuaternionFromEuler(self.target_euler),
                                         lowerLimits=self._ik_lower, upperLimits=self._ik_upper,
                                         jointRanges=self._ik_range, restPoses=self._ik_rest, physicsClientId=c)
        for j in ARM:
            p.setJointMotorControl2(self.robot, j, p.POSITION_CONTROL, targetPosition=q[j], force=ARM_FORCE,
                                    maxVelocity=ARM_MAX_VEL, physicsClientId=c)
        # Paper S.3.1: the continuous gripper output is thresholded at 0 (>= 0 opens, < 0 closes).
        self._gripper_action = 1.0 if a[6] >= 0 else -1.0
        self._command_gripper(self._gripper_action)
        for _ in range(SUBSTEPS):
            p.stepSimulation(physicsClientId=c)
        # The LED toggles when the button sinks past LED_PRESS_THRESHOLD (1.6 of its 2 cm travel: a firm press).
        button, switch = [s[0] for s in p.getJointStates(self.desk, [BUTTON, SWITCH], physicsClientId=c)]
        led = (not self._led_on) if (self._button_prev <= LED_PRESS_THRESHOLD < button) else self._led_on
        self._button_prev = button
        self._set_lights(led, switch > BULB_SWITCH_THRESHOLD)
        self._read_state()
        return self._obs(), 0.0, False, self.get_info()

    def get_info(self):
        return {'robot_obs': self._robot_obs.copy(), 'scene_obs': self._scene_obs.copy()}

    # ------------------------------------------------------------ cameras
    def render(self):
        """-> (rgb_static (S,S,3) uint8, rgb_gripper (s,s,3) uint8) with the CPU TinyRenderer."""
        c, S, s = self.cid, self.image_size, self.gripper_size
        static = p.getCameraImage(S, S, self._view_static, self._proj_static, renderer=p.ER_TINY_RENDERER,
                                  flags=p.ER_NO_SEGMENTATION_MASK, shadow=0, physicsClientId=c)[2]
        # Gripper camera: 0.1 m behind the TCP along the fingers (hand z), looking along them, image up = hand x.
        R = np.array(p.getMatrixFromQuaternion(self._tcp_quat)).reshape(3, 3)
        eye = self._tcp_pos - GRIPPER_CAM['behind'] * R[:, 2]
        view = p.computeViewMatrix(eye, self._tcp_pos, R[:, 0])
        grip = p.getCameraImage(s, s, view, self._proj_gripper, renderer=p.ER_TINY_RENDERER,
                                flags=p.ER_NO_SEGMENTATION_MASK, shadow=0, physicsClientId=c)[2]
        as_rgb = lambda img, n: np.asarray(img, dtype=np.uint8).reshape(n, n, 4)[:, :, :3].copy()
        return as_rgb(static, S), as_rgb(grip, s)

    def _obs(self):
        rgb = {}
        if self.cameras:
            rgb['rgb_static'], rgb['rgb_gripper'] = self.render()
        return {'rgb_obs': rgb, 'robot_obs': self._robot_obs.astype(np.float32),
                'scene_obs': self._scene_obs.astype(np.float32)}

    def close(self):
        if self.cid is not None and p.isConnected(self.cid):
            p.disconnect(self.cid)
        self.cid = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def random_scene(rng, door=None, drawer=None, switch_on=None, led_on=None):
    """A random scene_obs (24,): door, drawer, switch (down / up), LED, blocks apart; pass a value to fix a part."""
    s = np.zeros(24)
    s[0] = rng.uniform(0, DOOR_MAX) if door is None else door
    s[1] = rng.uniform(0, DRAWER_MAX) if drawer is None else drawer
    on = rng.random() < 0.5 if switch_on is None else switch_on
    s[3] = rng.uniform(0.065, SWITCH_MAX) if on else rng.uniform(0.0, 0.02)
    s[4] = float(s[3] > BULB_SWITCH_THRESHOLD)
    s[5] = float(rng.random() < 0.5 if led_on is None else led_on)
    placed = []
    for i, (half, _) in enumerate(BLOCKS.values()):
        while True:
            (x0, x1), (y0, y1) = BLOCK_REGIONS[rng.integers(len(BLOCK_REGIONS))]
            xy = rng.uniform([x0, y0], [x1, y1])
            if np.linalg.norm(xy - BUTTON_ORIGIN[:2]) > 0.12 and all(np.linalg.norm(xy - o) > 0.1 for o in placed):
                break
        placed.append(xy)
        s[6 + 6 * i:12 + 6 * i] = [xy[0], xy[1], TABLE_TOP_Z + half[2], 0.0, 0.0, rng.uniform(-np.pi, np.pi)]
    return s


# ---------------------------------------------------------------- the 8 tasks (CALVIN's success tests)
def task_success(task, start_info, info):
    return bool(task_success_batch(task, np.asarray(start_info['scene_obs']), np.asarray(info['scene_obs'])))


def task_success_batch(task, s0, s1):
    """Success tests on scenes s0 (start), s1 (now) (..., 24), numpy or torch -> bool (...); Fig. 2's decoder reward."""
    d = lambda i: s1[..., i] - s0[..., i]
    off_on = lambda i: (s0[..., i] < 0.5) & (s1[..., i] > 0.5)
    on_off = lambda i: (s0[..., i] > 0.5) & (s1[..., i] < 0.5)
    tests = {'open_drawer': lambda: d(1) > 0.12, 'close_drawer': lambda: d(1) < -0.12,
             'move_slider_left': lambda: d(0) > 0.15, 'move_slider_right': lambda: d(0) < -0.15,
             'turn_on_lightbulb': lambda: off_on(4), 'turn_off_lightbulb': lambda: on_off(4),
             'turn_on_led': lambda: off_on(5), 'turn_off_led': lambda: on_off(5)}
    if task not in tests:
        raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
    return tests[task]()


def task_progress(task, s0, s1, switch_on=BULB_SWITCH_THRESHOLD, press_depth=LED_PRESS_THRESHOLD) -> float:
    """Progress of `task` from scene s0 to s1 as a share of its success threshold: drawer / door displacement over 0.12
    / 0.15 m, switch travel towards switch_on, button depth over press_depth (the desk's by default; for p_retry)."""
    s0, s1 = np.asarray(s0, float), np.asarray(s1, float)
    sign = {'open_drawer': 1, 'close_drawer': -1, 'move_slider_left': 1, 'move_slider_right': -1,
            'turn_on_lightbulb': 1, 'turn_off_lightbulb': -1}
    if task in ('open_drawer', 'close_drawer'):
        return float(sign[task] * (s1[1] - s0[1]) / 0.12)
    if task in ('move_slider_left', 'move_slider_right'):
        return float(sign[task] * (s1[0] - s0[0]) / 0.15)
    if task in ('turn_on_lightbulb', 'turn_off_lightbulb'):
        return float(sign[task] * (s1[3] - s0[3]) / max(sign[task] * (switch_on - s0[3]), 1e-3))
    if task in ('turn_on_led', 'turn_off_led'):
        return float(s1[2] / press_depth)
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')


def completed_tasks(start_info, info):
    """The set of tasks completed between two infos (CALVIN's tasks.get_task_info)."""
    return {t for t in TASKS if task_success(t, start_info, info)}


def task_possible(task, scene_obs):
    """Whether the joint ranges / light states of scene_obs allow the task to succeed from there."""
    s = np.asarray(scene_obs)
    tests = {
        'open_drawer': s[1] < DRAWER_MAX - 0.12, 'close_drawer': s[1] > 0.12,
        'move_slider_left': s[0] < DOOR_MAX - 0.15, 'move_slider_right': s[0] > 0.15,
        'turn_on_lightbulb': s[4] < 0.5, 'turn_off_lightbulb': s[4] > 0.5,
        'turn_on_led': s[5] < 0.5, 'turn_off_led': s[5] > 0.5,
    }
    if task not in tests:
        raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
    return bool(tests[task])


_KIN = {}


def _kinematics():
    """A private pybullet client holding only the Panda (IK / FK of start poses)."""
    _import_pybullet_quietly()
    if 'cid' not in _KIN or not p.isConnected(_KIN['cid']):
        cid = p.connect(p.DIRECT)
        _KIN.update(cid=cid, robot=p.loadURDF(panda_urdf(), ROBOT_BASE, useFixedBase=True, physicsClientId=cid))
    return _KIN['cid'], _KIN['robot']


def random_robot_obs(rng, pos_noise=(0.08, 0.06, 0.05), yaw_noise=0.3, tilt_noise=0.05, kinematics=None):
    """robot_obs (15,) near the neutral pose: TCP uniform in +-pos_noise (= REST_BOX), Euler noise, IK (rest Q_INIT),
    gripper +-1. kinematics: (pybullet client, robot, TCP link) to solve on, e.g. calvin_env's; None: the desk's."""
    _import_pybullet_quietly()
    cid, robot, tcp_link = kinematics or (*_kinematics(), TCP_LINK)
    for j, q in zip(ARM, Q_INIT):
        p.resetJointState(robot, j, q, physicsClientId=cid)
    neutral = p.getLinkState(robot, tcp_link, computeForwardKinematics=1, physicsClientId=cid)
    pos = np.array(neutral[4]) + rng.uniform(-1, 1, 3) * pos_noise
    euler = np.array([np.pi, 0.0, np.pi / 2]) + rng.uniform(-1, 1, 3) * [tilt_noise, tilt_noise, yaw_noise]
    quat = p.getQuaternionFromEuler(euler)
    for _ in range(4):  # a few restarts from the last solution: pybullet's IK takes damped steps
        q = p.calculateInverseKinematics(robot, tcp_link, pos, quat, restPoses=list(Q_INIT) + [0, 0],
                                         maxNumIterations=100, residualThreshold=1e-5, physicsClientId=cid)
        for j in ARM:
            p.resetJointState(robot, j, q[j], physicsClientId=cid)
    ls = p.getLinkState(robot, tcp_link, computeForwardKinematics=1, physicsClientId=cid)
    r = np.zeros(15)
    r[0:3], r[3:6], r[7:14] = ls[4], p.getEulerFromQuaternion(ls[5]), q[:7]
    r[14] = 1.0 if rng.random() < 0.5 else -1.0
    r[6] = 2 * FINGER_OPEN if r[14] > 0 else 0.0
    return r


REST_BOX = np.array([0.08, 0.06, 0.05])      # random_robot_obs: TCP within +-REST_BOX of the neutral pose


def neutral_tcp() -> np.ndarray:
    """TCP position (3,) of the neutral joints Q_INIT."""
    if 'neutral_tcp' not in _KIN:
        cid, robot = _kinematics()
        for j, q in zip(ARM, Q_INIT):
            p.resetJointState(robot, j, q, physicsClientId=cid)
        _KIN['neutral_tcp'] = np.array(p.getLinkState(robot, TCP_LINK, computeForwardKinematics=1,
                                                      physicsClientId=cid)[4])
    return _KIN['neutral_tcp']


def near_rest(robot_obs, margin: float = 0.02) -> np.ndarray:
    """robot_obs (..., 15) -> bool (...): TCP within REST_BOX + margin (m) of the neutral pose, as evaluations start."""
    return np.all(np.abs(np.asarray(robot_obs)[..., :3] - neutral_tcp()) <= REST_BOX + margin, axis=-1)


def sample_task_start(task, rng, calvin=None):
    """A random start (robot_obs (15,), scene_obs (24,)) from which `task` is possible (with a margin).
    calvin: a CalvinEnvAdapter: its robot, the blocks where calvin_env's own reset places them (scene_obs[6:])."""
    kw = {'open_drawer': dict(drawer=rng.uniform(0, 0.06)), 'close_drawer': dict(drawer=rng.uniform(0.16, DRAWER_MAX)),
          'move_slider_left': dict(door=rng.uniform(0, 0.1)), 'move_slider_right': dict(door=rng.uniform(0.18, DOOR_MAX)),
          'turn_on_lightbulb': dict(switch_on=False), 'turn_off_lightbulb': dict(switch_on=True),
          'turn_on_led': dict(led_on=False), 'turn_off_led': dict(led_on=True)}
    if task not in kw:
        raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
    scene = random_scene(rng, **kw[task])
    assert task_possible(task, scene)
    if calvin is None:
        return random_robot_obs(rng), scene
    scene[6:] = calvin.reset()['scene_obs'][6:]
    return calvin.random_robot_obs(rng), scene


# ---------------------------------------------------------------- scripted skills (play data and demos)
DOWN_EULER = np.array([np.pi, 0.0, np.pi / 2])   # fingers down, opening along x (the neutral orientation)
# The switch's top is at the edge of the Panda's reach (both desks): the hand tilts 0.3 rad towards +y for it.
SWITCH_EULER = np.array([np.pi, -0.3, np.pi / 2])
SAFE_Z = 0.60                                    # travel height: fingertips above every desk part but the cabinet
SWITCH_GRASP_TOL = 0.015   # how close (m) the hand comes to the switch's grasp point before it closes
DRAWER_GRASP_TOL = 0.006   # ... and to the drawer knob's grasp point (open_drawer)
DRAWER_PUSH_TOL = 0.006    # ... and to the point in front of the knob from which close_drawer pushes
MISS_DIST = (0.025, 0.10)   # p_miss: how far beside the desk button's axis a missed press comes down (metres)
RETRY_AT = (0.3, 0.8)       # p_retry: the share of the success threshold at which an attempt is abandoned
LEASH = 0.03     # metres the skill lets CALVIN's integrated TCP target lead the measured TCP (anti-windup)
SKILLS = TASKS + ['reach', 'pause']


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the scripted skills find the parts (world frame, metres; points at joint value 0, +q along *_dir).
    DESK_GEOMETRY: the built-in desk; CalvinEnvAdapter.geometry(): read from a live calvin_env scene."""
    drawer_knob: np.ndarray    # (3,) handle point; its front (the face close_drawer pushes) is drawer_tip along +q
    drawer_tip: float          # m from drawer_knob to the handle's front
    drawer_grip: float         # m behind that front where open_drawer closes the hand
    drawer_dir: np.ndarray     # (3,) unit direction of +q (opening)
    drawer_max: float          # joint upper limit
    door_push: np.ndarray      # (3,) point on the handle that the sliding-door pushes aim at from either side
    door_dir: np.ndarray
    door_max: float
    switch_knob: np.ndarray    # (3,) switch handle; the hand closes at switch_knob + switch_grip
    switch_grip: np.ndarray    # (3,) offset of the grasp point
    switch_dir: np.ndarray
    switch_max: float
    switch_euler: np.ndarray   # (3,) TCP Euler angles for the switch tasks
    button_top: np.ndarray     # (3,) centre of the button's top face, unpressed
    button_radius: float       # m from the button's axis to the edge of what a press comes down on
    press_depth: float         # button depth (m) past which the LED toggles
    switch_on: float           # switch travel past which the lightbulb is on
    clearance: float           # m above the door's / switch's grasp point (at least SAFE_Z) the hand comes down from


_DOOR_KNOB = DOOR_ORIGIN + DOOR_KNOB
DESK_GEOMETRY = Geometry(
    drawer_knob=DRAWER_ORIGIN + DRAWER_KNOB, drawer_tip=0.0375, drawer_grip=0.02, drawer_dir=np.array([0.0, -1.0, 0.0]),
    drawer_max=DRAWER_MAX, door_push=np.array([_DOOR_KNOB[0], 0.03, _DOOR_KNOB[2] - 0.005]),   # on the knob
    door_dir=np.array([-1.0, 0.0, 0.0]), door_max=DOOR_MAX, switch_knob=SWITCH_ORIGIN + SWITCH_KNOB,
    switch_grip=np.array([0.0, -0.015, 0.0]), switch_dir=SWITCH_DIR, switch_max=SWITCH_MAX, switch_euler=SWITCH_EULER,
    button_top=BUTTON_ORIGIN + (0, 0, 0.027), button_radius=0.009, press_depth=LED_PRESS_THRESHOLD,
    switch_on=BULB_SWITCH_THRESHOLD, clearance=0.0)


class ScriptedSkill:
    """A waypoint controller that solves `task` with CALVIN relative actions only: act(obs) -> action (7,) in [-1,1].

    The plan comes from the first observation (scene_obs + `geometry`: DESK_GEOMETRY, or CalvinEnvAdapter.geometry()
    in calvin_env, whose robot and parts differ); each phase moves the TCP towards a goal with
    a P-law and ends at its goal, when its scene condition holds, or at a timeout; .done turns True after the last one.
      speed, gain    max |action| (1 = 2 cm per step); P-gain on the TCP error (0.5 = half per step)
      noise          std of the Gaussian noise on the 6 motion dims; pause_steps, reach_target: random if None
    Operator style (CALVIN's play is teleoperated; cloning 50 demos is not trivial: base policies 36-63%, Table I):
      noise_corr     AR(1) coefficient of the noise: the hand drifts for a while instead of jittering
      p_via          P(a task first swings through a random via point ~via_scale m off the line to its waypoint)
      p_hesitate     P(holding still for 3 to hesitate_max steps after a phase)
      p_miss         P(an LED press first misses, onto the table 1.6-9.1 cm beyond the button's edge)
      drawer_tol_max, push_tol_max  open_drawer grasps / close_drawer pushes within a tolerance drawn per attempt up to
                     it from DRAWER_GRASP_TOL / DRAWER_PUSH_TOL (no draw when equal): humans don't always creep to 6 mm
      p_retry        P(abandoning the motion at a share RETRY_AT of the success threshold: let go, lift, start over)
    All default to 0 (eval.py's clean skills). FINDINGS.md: "The play data's operator", "The LED: does imagination know
    a press switched it?"."""

    def __init__(self, task, rng, noise=0.0, speed=1.0, gain=0.5, pause_steps=None, reach_target=None,
                 noise_corr=0.0, p_via=0.0, via_scale=0.08, p_hesitate=0.0, hesitate_max=10, p_miss=0.0,
                 p_retry=0.0, drawer_tol_max=DRAWER_GRASP_TOL, push_tol_max=DRAWER_PUSH_TOL, geometry=DESK_GEOMETRY):
        if task not in SKILLS:
            raise ValueError(f'unknown skill {task!r}; expected one of {SKILLS}')
        self.task, self.rng, self.noise, self.speed, self.gain = task, rng, float(noise), float(speed), float(gain)
        self.pause_steps, self.reach_target = pause_steps, reach_target
        self.noise_corr, self.p_via, self.via_scale, self.p_hesitate = (float(noise_corr), float(p_via),
                                                                       float(via_scale), float(p_hesitate))
        self.phases, self.i, self.t, self.done = None, 0, 0, False
        self.hesitate_max, self.p_miss = max(3, int(hesitate_max)), float(p_miss)
        self.drift, self.hesitating = np.zeros(6), 0
        self.p_retry, self.retry_at, self.s0 = float(p_retry), None, None
        self.drawer_tol_max, self.push_tol_max = float(drawer_tol_max), float(push_tol_max)
        self.geometry = geometry

    def _detour(self, tcp, phases, P):
        """Prepend a random via point between the TCP and the first waypoint, never below or behind (+y) both."""
        first = phases[0]['goal']
        if (self.p_via <= 0 or self.task not in TASKS or isinstance(first, str) or first is None
                or self.rng.random() >= self.p_via):
            return phases
        via = tcp + self.rng.uniform(0.3, 0.7) * (first - tcp) + self.rng.uniform(-1, 1, 3) * self.via_scale * (1, 1, 0.5)
        via[1] = min(via[1], max(tcp[1], first[1]))
        via[2] = max(via[2], min(tcp[2], first[2]))
        return [P(np.clip(via, WORKSPACE[0], WORKSPACE[1]), phases[0]['grip'], 0.03)] + phases

    # phase = dict(goal=(3,), grip=+-1, tol=metres, until=callable(scene_obs) or None, wait=steps, max=steps)
    def _plan(self, robot_obs, s):
        P = lambda goal, grip, tol=0.01, until=None, wait=0, max_steps=40: dict(
            goal=goal if goal is None or isinstance(goal, str) else np.asarray(goal, float),
            grip=grip, tol=tol, until=until, wait=wait, max=max_steps)
        tcp, task, G = robot_obs[:3], self.task, self.geometry
        up = lambda g, z=SAFE_Z: (g[0], g[1], max(z, g[2]))
        above = lambda g: up(g, max(SAFE_Z, g[2] + G.clearance))      # where the hand comes down onto a handle from
        if task in ('open_drawer', 'close_drawer'):
            q = s[1]
            tip = G.drawer_knob + q * G.drawer_dir + G.drawer_tip * G.drawer_dir     # front of the handle
            if task == 'open_drawer':        # close the hand on (behind) the handle from above, pull along +q
                g = tip - G.drawer_grip * G.drawer_dir
                tol = (DRAWER_GRASP_TOL if self.drawer_tol_max <= DRAWER_GRASP_TOL   # no draw: same rng stream
                       else self.rng.uniform(DRAWER_GRASP_TOL, self.drawer_tol_max))
                return [P(up(tcp, 0.5) if tcp[1] > -0.2 else tcp, 1, 0.03), P(g + (0, 0, 0.1), 1, 0.015),
                        P(g, 1, tol), P(g, -1, wait=6),
                        P(g + 0.17 * G.drawer_dir, -1, until=lambda x: x[1] > min(q + 0.15, G.drawer_max - 0.01)),
                        P(None, 1, wait=4), P('up', 1, 0.02)]
            g = tip + 0.03 * G.drawer_dir + (0, 0, -0.005)     # push the handle's front along -q ...
            shut = G.drawer_knob + G.drawer_tip * G.drawer_dir + 0.02 * G.drawer_dir   # ... to 2 cm out of q = 0
            tol = (DRAWER_PUSH_TOL if self.push_tol_max <= DRAWER_PUSH_TOL   # no draw: same rng stream
                   else self.rng.uniform(DRAWER_PUSH_TOL, self.push_tol_max))
            return [P(up(tcp, 0.5) if tcp[1] > -0.2 else tcp, -1, 0.03), P(g + (0, 0, 0.1), -1, 0.015),
                    P(g, -1, tol), P((g[0], shut[1], g[2]), -1, until=lambda x: x[1] < max(q - 0.15, 0.01)),  # along y
                    P('back', -1, 0.02)]
        if task in ('move_slider_left', 'move_slider_right'):
            side = 1 if task == 'move_slider_left' else -1    # push from the -q side to move the door along +q
            g = G.door_push + s[0] * G.door_dir - side * 0.05 * G.door_dir
            stop = (lambda x: x[0] > min(s[0] + 0.17, G.door_max - 0.01)) if side > 0 else \
                   (lambda x: x[0] < max(s[0] - 0.17, 0.01))
            return [P(above(g), -1, 0.02), P(g, -1, 0.008), P(g + side * 0.22 * G.door_dir, -1, until=stop),
                    P('up', -1, 0.02)]
        if task in ('turn_on_lightbulb', 'turn_off_lightbulb'):
            q = s[3]
            g = G.switch_knob + q * G.switch_dir + G.switch_grip
            sign = 1 if task == 'turn_on_lightbulb' else -1
            stop = (lambda x: x[3] > 0.075) if sign > 0 else (lambda x: x[3] < 0.015)
            return [P(above(g), 1, 0.02), P(g, 1, SWITCH_GRASP_TOL), P(g, -1, wait=5),   # a firm grasp, then push
                    P(g + sign * 0.09 * G.switch_dir, -1, 0.005, until=stop), P(None, 1, wait=2), P('back', 1, 0.02)]
        if task in ('turn_on_led', 'turn_off_led'):
            b = G.button_top
            led0 = s[5]
            press = [P(b + (0, 0, 0.08), -1, 0.015), P(b + (0, 0, -0.022), -1, 0.004, until=lambda x: x[5] != led0),
                     P(b + (0, 0, 0.08), -1, 0.02)]
            if self.retry_at is not None:   # p_retry: first a press too light to switch the LED, then the press
                # The hand comes down 1.5 cm a step, too fast to stop a full press part-way: the light press aims at
                # the top and lets go at retry_at of the way to switching (a drifting hand may still switch the LED).
                f, self.retry_at = self.retry_at, None
                press = [P(b + (0, 0, 0.08), -1, 0.015),
                         P(b + (0, 0, 0.003), -1, 0.003, until=lambda x: x[2] > f * G.press_depth, max_steps=10),
                         P(None, -1, wait=2), P(b + (0, 0, 0.06), -1, 0.02)] + press[1:]
            if self.p_miss > 0 and self.rng.random() < self.p_miss:      # first a press beside the button,
                # as far beyond its edge as on the desk (a wider button, as in CALVIN, moves the misses out)
                angle = self.rng.uniform(0, 2 * np.pi)
                dist = self.rng.uniform(*MISS_DIST) + (G.button_radius - DESK_GEOMETRY.button_radius)
                m = b + dist * np.array([np.cos(angle), np.sin(angle), 0.0])
                press = [P(m + (0, 0, 0.08), -1, 0.015), P(m + (0, 0, -0.06), -1, 0.004, max_steps=15),
                         P(m + (0, 0, 0.06), -1, 0.02)] + press
            return press
        if task == 'reach':
            goal = self.reach_target if self.reach_target is not None else \
                self.rng.uniform([-0.3, -0.35, 0.5], [0.35, -0.05, 0.72])
            return [P(goal, 1 if self.rng.random() < 0.5 else -1, 0.02)]
        n = self.pause_steps if self.pause_steps is not None else int(self.rng.integers(5, 20))
        return [P(None, robot_obs[14], wait=n)]                 # 'pause': hold still, keep the gripper

    def act(self, obs):
        r, s = np.asarray(obs['robot_obs'], float), np.asarray(obs['scene_obs'], float)
        if self.phases is None:
            P = lambda goal, grip, tol: dict(goal=goal, grip=grip, tol=tol, until=None, wait=0, max=40)
            if self.p_retry > 0 and self.task in TASKS and self.rng.random() < self.p_retry:
                self.retry_at, self.s0 = self.rng.uniform(*RETRY_AT), s.copy()
            self.phases = self._detour(r[:3], self._plan(r, s), P)
            self.hold = r[:3].copy()
            self.target = r[:3].copy()     # estimate of the env's stored TCP target (reset to the measured TCP)
            self.euler = self.geometry.switch_euler if 'lightbulb' in self.task else DOWN_EULER
        a = np.zeros(7)
        if self.done:
            a[6] = r[14]
            return a
        ph = self.phases[self.i]
        if isinstance(ph['goal'], str) and ph['goal'] == 'replan':   # after an abandoned attempt: start over
            self.p_miss = 0.0                                        # (no second miss in a row)
            self.phases, self.i, self.t = self._plan(r, s), 0, 0
            self.hold = r[:3].copy()
            ph = self.phases[0]
        if self.hesitating:                  # the operator pauses between two phases: hold still
            self.hesitating -= 1
            a[6] = ph['grip'] if self.i == 0 else self.phases[self.i - 1]['grip']
            return a
        if isinstance(ph['goal'], str):      # relative retreat, fixed when the phase starts
            ph['goal'] = r[:3] + ((0, -0.03, 0.1) if ph['goal'] == 'up' else (0, -0.06, 0.06))
        goal = self.hold if ph['goal'] is None else ph['goal']
        err = goal - r[:3]
        if self.task != 'pause':
            a[:3] = err * self.gain / POS_SCALE                                  # P-law on the TCP error
            a[3:6] = wrap_angle(self.euler - r[3:6]) * self.gain / ORN_SCALE      # wrapped: roll sits at +-pi
            a[:6] *= min(1.0, self.speed / max(np.abs(a[:6]).max(), 1e-9))       # cap the speed, keep the direction
            if self.noise > 0:        # AR(1) noise with stationary std `noise` (iid when noise_corr = 0)
                rho = self.noise_corr
                self.drift = rho * self.drift + np.sqrt(1.0 - rho ** 2) * self.rng.normal(0.0, self.noise, 6)
                a[:6] += self.drift
            # Anti-windup: a blocked hand must not let the integrated target run away (CALVIN's controller).
            lo, hi = (r[:3] - LEASH - self.target) / POS_SCALE, (r[:3] + LEASH - self.target) / POS_SCALE
            a[:3] = np.clip(np.clip(a[:3], lo, hi), -1.0, 1.0)
            self.target = np.clip(self.target + POS_SCALE * a[:3], WORKSPACE[0], WORKSPACE[1])
        a[6] = ph['grip']
        self.t += 1
        if (self.retry_at is not None and ph['until'] is not None
                and self.retry_at <= task_progress(self.task, self.s0, s, self.geometry.switch_on,
                                                   self.geometry.press_depth) < 1 and not ph['until'](s)):
            # abandon the attempt part-way: stop, let go (grasping tasks), lift, then 'replan' from the new state
            grip = 1 if self.task in ('open_drawer', 'turn_on_lightbulb', 'turn_off_lightbulb') else ph['grip']
            P = lambda goal, wait=0, tol=0.02: dict(goal=goal, grip=grip, tol=tol, until=None, wait=wait, max=40)
            self.phases = self.phases[:self.i + 1] + [P(None, wait=3), P('up'), P('replan')]
            self.retry_at, self.hold, self.t = None, r[:3].copy(), 0
            self.i += 1
            # This step already stops pushing. The action is measured from the estimate this step's push already
            # advanced, so the real target ends one push behind the hand (it eases off the part) and the estimate
            # stays one push (<= 2 cm) ahead, the leash that much off: kept, as fixing it would change the play data.
            a[:3] = np.clip((r[:3] - self.target) / POS_SCALE, -1.0, 1.0)
            a[3:6] = 0.0
            self.target = self.target + POS_SCALE * a[:3]
            a[6] = grip
            return a
        if ph['wait']:
            finished = self.t >= ph['wait']
        else:
            finished = np.linalg.norm(err) < ph['tol'] or (ph['until'] is not None and ph['until'](s))
        if finished or self.t >= ph['max']:
            if ph['goal'] is not None:
                self.hold = goal
            self.i, self.t = self.i + 1, 0
            self.done = self.i >= len(self.phases)
            if not self.done and self.p_hesitate > 0 and self.rng.random() < self.p_hesitate:
                self.hesitating = int(self.rng.integers(3, self.hesitate_max + 1))
        return np.clip(a, -1.0, 1.0)


# ---------------------------------------------------------------- the real CALVIN simulator (optional)
# Points of CALVIN's handles in their links' frames, in metres before the scene's global scaling (0.8 in scene D),
# read off the collision meshes calvin_env/data/calvin_table_*/meshes/*_vhacd2.obj (the same in scenes A-D).
CALVIN_DRAWER_FRONT = (0.0, 0.035, 0.3265)   # drawer handle: a bar 19 cm wide, 8 cm out of the drawer's face; the
CALVIN_DRAWER_GAP = 0.064                    # middle of the 5.6 cm gap behind it is this far behind its front
CALVIN_DOOR_PUSH = (0.175, 0.0, 0.075)       # sliding door: the middle of its handle, an upright bar 4 cm wide
CALVIN_SWITCH_POST = (-0.0624, 0.03, -0.01)  # switch: a frame 12 cm wide on two rails; its left post, 2 cm wide


class CalvinEnvAdapter:
    """The real calvin_env (scene D: Hydra config, reset/step/get_info, task oracle) as DeskEnv (tests/test_calvin.py).
    Images at 200 / 84 px (data.preprocess_obs resizes); gripper action exactly +-1 (CALVIN asserts it).
    cameras=False: no 'rgb_obs' (calvin_env's no_cameras config): ~500 steps/s instead of ~15 on 2 CPU cores."""

    def __init__(self, scene='calvin_scene_D', seed=None, cameras=True):
        try:
            import hydra
            from hydra import compose, initialize_config_dir
            import calvin_env
        except ImportError as err:
            raise ImportError('CalvinEnvAdapter needs the real CALVIN simulator, installed from a git checkout: '
                              'git clone https://github.com/mees/calvin_env DIR && pip install -e DIR '
                              f'({err})') from err
        conf = os.path.join(os.path.dirname(os.path.dirname(calvin_env.__file__)), 'conf')
        overrides = ['cameras=' + ('static_and_gripper' if cameras else 'no_cameras'), f'scene={scene}',
                     'robot=panda_longer_finger', 'use_vr=false', 'env.use_egl=false']
        with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
            cfg = compose(config_name='config_data_collection', overrides=overrides)
        self.env = hydra.utils.instantiate(cfg.env, show_gui=False, use_vr=False, use_scene_info=True)
        self.tasks = hydra.utils.instantiate(cfg.tasks)
        self.rng, self.start_info = np.random.default_rng(seed), None

    @classmethod
    def wrap(cls, calvin_env, task_oracle, seed=None):
        """The adapter around an already built env and task oracle (a custom Hydra set-up, or the tests' stand-in)."""
        self = cls.__new__(cls)
        self.env, self.tasks, self.rng, self.start_info = calvin_env, task_oracle, np.random.default_rng(seed), None
        return self

    def geometry(self) -> Geometry:
        """Geometry of the live scene for ScriptedSkill: link poses, joint axes and limits from pybullet, for the joints
        CALVIN's task oracle names (conf/tasks: base__drawer, base__slide) and its button and switch."""
        pb, cid, scale, scene = self.env.p, self.env.cid, self.env.scene.global_scaling, self.env.scene
        doors = {d.name: d for d in scene.doors}

        def part(obj, local):    # -> (link-frame point `local` in the world at q = 0, unit +q direction, upper limit)
            info = pb.getJointInfo(obj.uid, obj.joint_index, physicsClientId=cid)
            pos, orn = pb.getLinkState(obj.uid, obj.joint_index, computeForwardKinematics=1, physicsClientId=cid)[4:6]
            R = np.array(pb.getMatrixFromQuaternion(orn)).reshape(3, 3)
            axis, q = R @ np.array(info[13]), pb.getJointState(obj.uid, obj.joint_index, physicsClientId=cid)[0]
            return np.array(pos) - q * axis + R @ (scale * np.array(local)), axis, float(info[9])

        drawer, drawer_dir, drawer_max = part(doors['base__drawer'], CALVIN_DRAWER_FRONT)
        door, door_dir, door_max = part(doors['base__slide'], CALVIN_DOOR_PUSH)
        switch, switch_dir, switch_max = part(scene.switches[0], CALVIN_SWITCH_POST)
        button = part(scene.buttons[0], (0.0, 0.03, 0.0))[0]          # the top of button_link.STL
        lo, hi = pb.getAABB(scene.buttons[0].uid, scene.buttons[0].joint_index, physicsClientId=cid)
        # CALVIN's button and switch trigger half-way along their travel (calvin_env scene/objects button.py, switch.py)
        half = lambda obj: sum(pb.getJointInfo(obj.uid, obj.joint_index, physicsClientId=cid)[8:10]) / 2
        return Geometry(drawer_knob=drawer, drawer_tip=0.0, drawer_grip=scale * CALVIN_DRAWER_GAP,
                        drawer_dir=drawer_dir, drawer_max=drawer_max, door_push=door, door_dir=door_dir,
                        door_max=door_max, switch_knob=switch, switch_grip=np.zeros(3), switch_dir=switch_dir,
                        switch_max=switch_max, switch_euler=SWITCH_EULER, button_top=button,
                        button_radius=max(hi[0] - lo[0], hi[1] - lo[1]) / 2, press_depth=half(scene.buttons[0]),
                        switch_on=half(scene.switches[0]), clearance=0.1)

    def random_robot_obs(self, rng):
        """robot_obs (15,) near CALVIN's neutral pose (env.random_robot_obs's noise), solved on calvin_env's robot."""
        robot = self.env.robot
        return random_robot_obs(rng, kinematics=(self.env.cid, robot.robot_uid, robot.tcp_link_id))

    @staticmethod
    def _obs(obs):
        return {'rgb_obs': {k: obs['rgb_obs'][k] for k in ('rgb_static', 'rgb_gripper') if k in obs['rgb_obs']},
                'robot_obs': np.asarray(obs['robot_obs'], np.float32),
                'scene_obs': np.asarray(obs['scene_obs'], np.float32)}

    def reset(self, robot_obs=None, scene_obs=None, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        # calvin_env's robot keeps the last episode's gripper command through a reset: start from the stored one
        self.env.robot.gripper_action = 1 if robot_obs is None or robot_obs[14] >= 0 else -1
        obs = self.env.reset() if robot_obs is None and scene_obs is None else \
            self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        self.start_info = self.env.get_info()          # what CALVIN's oracle compares each step with (step)
        return self._obs(obs)

    def close(self):
        """Disconnect calvin_env's pybullet client once: its close() (run by its destructor too) prints or retries."""
        if getattr(self.env, 'ownsPhysicsClient', False) and getattr(self.env, 'p', None) is not None:
            self.env.p.disconnect(physicsClientId=self.env.cid)
        self.env.ownsPhysicsClient = False
        self.env.close = lambda: None

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=float).reshape(7), -1.0, 1.0)
        a[6] = 1.0 if a[6] >= 0 else -1.0                        # paper S.3.1
        obs, _, _, info = self.env.step(a)
        out = self._obs(obs)       # + the 8 tasks CALVIN's oracle finds done since the reset (eval, DPPO: success)
        if self.start_info is not None:
            out['completed'] = self.tasks.get_task_info_for_set(self.start_info, info, set(TASKS))
        return out, 0.0, False, info

    def get_info(self):
        return self.env.get_info()

    @property
    def target_pos(self):      # the TCP target that relative actions move (CALVIN's absolute 'actions'), as DeskEnv's
        return np.asarray(self.env.robot.target_pos, float)

    @property
    def target_euler(self):
        return np.asarray(self.env.robot.target_orn, float)

    def task_success(self, task, start_info, info):
        return task in self.tasks.get_task_info_for_set(start_info, info, {task})

    def completed_tasks(self, start_info, info):
        return set(self.tasks.get_task_info(start_info, info))


# -------------------------------- many desks at once, for evaluation and DPPO: one pybullet client per worker process

def _make_env(kind: str, seed: int, env_kwargs: dict):
    if kind == 'calvin':
        return CalvinEnvAdapter(seed=seed)
    return DeskEnv(seed=seed, **env_kwargs)


def _vec_worker(conn, kind: str, n: int, seed: int, env_kwargs: dict) -> None:
    """Own `n` desks; answer ('reset', states) / ('step', (actions, active)) / ('close', None)."""
    envs = [_make_env(kind, seed + i, env_kwargs) for i in range(n)]
    try:
        while True:
            cmd, payload = conn.recv()
            if cmd == 'reset':   # payload: [(local index, (robot_obs, scene_obs)), ...]
                conn.send([envs[i].reset(robot_obs=r, scene_obs=s) for i, (r, s) in payload])
            elif cmd == 'step':
                actions, active = payload
                conn.send([e.step(a)[0] if on else None for e, a, on in zip(envs, actions, active)])
            elif cmd == 'close':
                break
    finally:
        for e in envs:
            e.close()
        conn.close()


class VecDeskEnv:
    """`n` desks split over `workers` processes. Lists in, lists out, in env order.
        venv = VecDeskEnv(8, workers=2, image_size=64)         # kind='calvin': the real simulator
        obs = venv.reset(states)                 # states: list of (robot_obs (15,), scene_obs (24,))
        obs = venv.step(actions, active)         # actions (n, 7); inactive desks are not stepped -> None"""

    def __init__(self, n: int, workers: int = 2, seed: int = 0, kind: str = 'desk', **env_kwargs):
        self.n = n
        self.workers = min(workers, n)
        if self.workers == 0:
            self.envs = [_make_env(kind, seed + i, env_kwargs) for i in range(n)]
            return
        ctx = mp.get_context('spawn')           # fresh interpreters: safe next to torch's thread pools
        sizes = [n // self.workers + (w < n % self.workers) for w in range(self.workers)]
        self.splits = np.cumsum([0] + sizes)
        self.conns, self.procs = [], []
        for w in range(self.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_vec_worker, args=(child, kind, sizes[w], seed + int(self.splits[w]), env_kwargs),
                               daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def _call(self, cmd: str, payloads: list) -> list:
        for w, conn in enumerate(self.conns):
            conn.send((cmd, payloads[w]))
        return [o for conn in self.conns for o in conn.recv()]

    def _split(self, seq) -> list:
        return [seq[self.splits[w]:self.splits[w + 1]] for w in range(self.workers)]

    def reset(self, states: list, ids=None) -> list:
        """Reset desks `ids` (default all) to states [(robot_obs, scene_obs)]; observations in `ids` order."""
        ids = list(range(self.n)) if ids is None else [int(i) for i in ids]
        if self.workers == 0:
            return [self.envs[i].reset(robot_obs=r, scene_obs=s) for i, (r, s) in zip(ids, states)]
        owner = np.searchsorted(self.splits, ids, side='right') - 1          # worker of each desk
        jobs = [[(i - self.splits[w], st) for i, st, o in zip(ids, states, owner) if o == w]
                for w in range(self.workers)]
        for w, conn in enumerate(self.conns):
            if jobs[w]:
                conn.send(('reset', jobs[w]))
        by_worker = {w: iter(conn.recv()) for w, conn in enumerate(self.conns) if jobs[w]}
        return [next(by_worker[o]) for o in owner]

    def step(self, actions, active=None) -> list:
        actions = np.asarray(actions, dtype=np.float64)
        active = np.ones(self.n, bool) if active is None else np.asarray(active, bool)
        if self.workers == 0:
            return [e.step(a)[0] if on else None for e, a, on in zip(self.envs, actions, active)]
        return self._call('step', [(a, m) for a, m in zip(self._split(actions), self._split(active))])

    def close(self) -> None:
        if self.workers == 0:
            for e in self.envs:
                e.close()
            return
        for conn in self.conns:
            try:
                conn.send(('close', None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_vec_env(kind: str, n: int, workers: int = 2, seed: int = 0, image_size: int = 64) -> VecDeskEnv:
    """n simulators of `kind` ('desk'; 'calvin': real, own image sizes) in `workers` processes (0: in this one)."""
    if kind == 'calvin':
        return VecDeskEnv(n, workers=workers, seed=seed, kind='calvin')
    if kind != 'desk':
        raise ValueError(f"unknown simulator {kind!r}; use 'desk' or 'calvin'")
    return VecDeskEnv(n, workers=workers, seed=seed, image_size=image_size)
