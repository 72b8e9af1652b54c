"""Play data, CALVIN's dataset layout, and preprocessing (paper §II, §IV.A, S.2.1, S.4).

DiWA learns from two offline datasets (§II): task-agnostic *play* D_play (world model) and 50 expert demos per skill
D_exp, in CALVIN annotated windows of the same play (S.2.2: "randomly selected from task-annotated episodes"). This file
  1. preprocesses as S.4: images to 64x64 in [-1, 1], TCP Euler angles -> continuous 6-D rotation (Zhou et al. [65]);
  2. reads / writes CALVIN's on-disk layout (mees/calvin): the same code trains on our play data or a real download;
  3. samples world-model sequences and expert windows, and labels frames by the task's success test;
  4. collects human-like play on the built-in desk (env.py) with scripted skills, noise and random timing.

Glossary (symbol -> variable -> shape):
  x_t (two cameras)  -> 'rgb_static', 'rgb_gripper'   (B, T, 3, 64, 64) float in [-1, 1]  (on disk (H, W, 3) uint8)
  proprioception     -> 'proprio'                     (B, T, 18) = [tcp xyz 3, rot6d 6, width 1, joints 7, grip 1]
  scene state        -> 'scene'                       (B, T, 24) raw CALVIN scene_obs
  a_t                -> 'actions'                     (B, T, 7)  rel_action executed AFTER frame t
  segment start      -> 'is_first'                    (B, T) bool
  D_exp window       -> data['windows'][w]            (2,) inclusive [start, end] ROW indices; end = first
                                                      frame where the task's success test holds
CALVIN split folder (one per split, 'training' / 'validation'):
  episode_%07d.npz   one 30 Hz frame, global frame id  (actions, rel_actions, robot_obs, scene_obs, rgb_static,
                                                        rgb_gripper; real CALVIN adds depth_*/tactile: ignored)
  ep_start_end_ids.npy            (E, 2) inclusive frame ids of contiguous segments (gaps between them allowed)
  lang_annotations/auto_lang_ann.npy   pickled dict: ['info']['indx'] [(start, end)] frame ids,
                                       ['language']['task'|'ann'|'emb'] per window (re-read on every load)
  cache_<S>/      ours: one .npy per array + meta.json, images memory-mapped; rebuilt when segments or frames change
collect() resumes from out_dir/collect_config.json (settings) and collect_progress.json (finished episodes, windows).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import pickle
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import env

try:
    import fcntl                    # one writer per checkpoint (writer_lock); absent on Windows
except ImportError:
    fcntl = None

FRAME_SHAPES = {'actions': (7,), 'rel_actions': (7,), 'robot_obs': (15,), 'scene_obs': (24,)}
IMAGE_KEYS = ('rgb_static', 'rgb_gripper')
CACHE_VERSION = 1
EMB_DIM = 384                           # CALVIN's sentence-embedding size; we store zeros
LANG = {                                # one short instruction per task (CALVIN's 'ann')
    'open_drawer': 'pull the handle to open the drawer',
    'close_drawer': 'push the drawer shut',
    'move_slider_left': 'slide the door to the left',
    'move_slider_right': 'slide the door to the right',
    'turn_on_lightbulb': 'flip the switch up to turn on the light bulb',
    'turn_off_lightbulb': 'flip the switch down to turn off the light bulb',
    'turn_on_led': 'press the button to turn on the green light',
    'turn_off_led': 'press the button to turn off the green light',
}


class DataError(ValueError):
    """Bad dataset on disk or bad request: a one-line message that names the file and the problem."""


# ---------------- Preprocessing (S.4): 6-D rotation, 64x64 images in [-1, 1]
def euler_to_rot6d(euler):
    """Euler xyz (..., 3) -> 6-D rotation (..., 6) = the first two columns of R [Zhou et al. 65]: continuous, unlike
    the angles (roll near +-pi, the start pose). CALVIN's angles are pybullet's, R = Rz(yaw) @ Ry(pitch) @ Rx(roll):
        R[:, 0] = ( cy*cp,             sy*cp,             -sp   )
        R[:, 1] = ( cy*sp*sr - sy*cr,  sy*sp*sr + cy*cr,  cp*sr )"""
    lib = torch if torch.is_tensor(euler) else np
    r, p, y = euler[..., 0], euler[..., 1], euler[..., 2]
    cr, sr, cp, sp, cy, sy = lib.cos(r), lib.sin(r), lib.cos(p), lib.sin(p), lib.cos(y), lib.sin(y)
    cols = [cy * cp, sy * cp, -sp, cy * sp * sr - sy * cr, sy * sp * sr + cy * cr, cp * sr]
    return lib.stack(cols, -1)


def rot6d_to_matrix(r6):
    """6-D rotation (..., 6) -> rotation matrix (..., 3, 3) by Gram-Schmidt (numpy); inverse of euler_to_rot6d."""
    a1, a2 = r6[..., 0:3], r6[..., 3:6]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    a2 = a2 - (b1 * a2).sum(-1, keepdims=True) * b1
    b2 = a2 / np.linalg.norm(a2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], -1)                     # columns b1, b2, b3


def matrix_to_euler(R):
    """Rotation matrix (..., 3, 3) -> pybullet Euler xyz (..., 3), pitch in [-pi/2, pi/2] (numpy)."""
    roll = np.arctan2(R[..., 2, 1], R[..., 2, 2])
    pitch = -np.arcsin(np.clip(R[..., 2, 0], -1.0, 1.0))
    yaw = np.arctan2(R[..., 1, 0], R[..., 0, 0])
    return np.stack([roll, pitch, yaw], -1)


def robot_obs_to_proprio(robot_obs):
    """CALVIN robot_obs (..., 15) -> proprio (..., 18): [tcp xyz, rot6d (S.4), width, 7 joints, gripper action]."""
    if robot_obs.shape[-1] != 15:
        raise DataError(f'robot_obs has last dimension {robot_obs.shape[-1]}, expected 15 (CALVIN layout)')
    lib = torch if torch.is_tensor(robot_obs) else np
    parts = [robot_obs[..., 0:3], euler_to_rot6d(robot_obs[..., 3:6]), robot_obs[..., 6:15]]
    return lib.cat(parts, -1) if lib is torch else np.concatenate(parts, -1)


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of area (box-filter) resampling: output pixel o averages the input interval
    [o * n_in / n_out, (o + 1) * n_in / n_out), each input pixel weighted by its overlap. Rows sum to 1."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale                                # (n_out, 1) interval ends
    hi = lo + scale
    i = np.arange(n_in)[None, :]                                          # (1, n_in) pixel [i, i + 1)
    overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
    return overlap / overlap.sum(1, keepdims=True)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (..., H, W, 3) -> (..., size, size, 3) by area resampling (S.4: CALVIN's 200 / 84 px -> 64)."""
    H, W = images.shape[-3:-1]
    if (H, W) == (size, size):
        return images
    wy, wx = torch.from_numpy(area_weights(H, size)), torch.from_numpy(area_weights(W, size))
    # torch, not np.einsum: numpy's BLAS threads spin between calls and took ~40% of a core from each collection
    # worker (torch's pool is one thread there, see _worker_init); the same pixels, rounded half to even as np.rint
    out = torch.einsum('oh,...hwc,pw->...opc', wy, torch.from_numpy(images.astype(np.float64)), wx)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def images_to_tensor(images, device='cpu') -> torch.Tensor:
    """uint8 (..., H, W, 3) numpy/tensor -> float32 (..., 3, H, W) in [-1, 1] (S.4), converted on `device`."""
    with warnings.catch_warnings():  # read-only (memory-mapped) arrays: x is only read here, never written
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        x = torch.as_tensor(images).to(device)
    if x.dtype != torch.uint8:
        raise DataError(f'images must be uint8 in [0, 255], got {x.dtype}')
    return x.movedim(-1, -3).float() / 127.5 - 1.0


def to_torch(batch: dict, device='cpu') -> dict:
    """numpy batch of sample_sequences (images (B,T,S,S,3) uint8, ...) -> the world-model batch: rgb_* (B,T,3,S,S)
    [-1,1], proprio (B,T,18), scene (B,T,24), actions (B,T,7), is_first (B,T) bool, target (B,T,3)."""
    f32 = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=device)
    B, T = batch['robot_obs'].shape[:2]
    if 'is_first' in batch:
        is_first = torch.as_tensor(np.asarray(batch['is_first'], bool), device=device)
    else:
        is_first = torch.zeros(B, T, dtype=torch.bool, device=device)
        is_first[:, 0] = True
    # The controller's TCP target at frame t (the world model's target_input): our play data's absolute 'actions'
    # hold it after a_t, so before a_t it is actions[:3] - POS_SCALE * rel_actions[:3] (exact unless the workspace
    # clip hits). In a real CALVIN dataset 'actions' is the measured TCP pose of the next frame instead: there this
    # 'target' is only an estimate, and --wm.target_input (off in every preset) should stay off.
    target = {'target': f32(np.asarray(batch['actions'])[..., :3] - env.POS_SCALE * np.asarray(batch['rel_actions'])[..., :3])} \
        if 'actions' in batch else {}
    return {'rgb_static': images_to_tensor(batch['rgb_static'], device),
            'rgb_gripper': images_to_tensor(batch['rgb_gripper'], device),
            'proprio': robot_obs_to_proprio(f32(batch['robot_obs'])),
            'scene': f32(batch['scene_obs']),
            'actions': f32(batch['rel_actions']),
            'is_first': is_first, **target}


def preprocess_obs(obs_list: list, image_size: int = 64, device='cpu') -> dict:
    """B env observations -> rgb_* (B,3,S,S) [-1,1], proprio (B,18), scene (B,24), preprocessed as the training data."""
    out = {k: images_to_tensor(np.stack([resize_images(o['rgb_obs'][k], image_size) for o in obs_list]), device)
           for k in IMAGE_KEYS}
    robot = torch.as_tensor(np.stack([o['robot_obs'] for o in obs_list]).astype(np.float32), device=device)
    out['proprio'] = robot_obs_to_proprio(robot)
    out['scene'] = torch.as_tensor(np.stack([o['scene_obs'] for o in obs_list]).astype(np.float32), device=device)
    return out


# ---------------- CALVIN layout: writing via atomic_write; ep_start_end_ids.npy never lists unfinished episodes' frames

TMP_TAG = '.tmp-'                                                      # <name>.tmp-<pid>: never read


def frame_path(folder, frame_id: int) -> Path:
    return Path(folder) / f'episode_{int(frame_id):07d}.npz'


def seed_everything(seed: int) -> None:      # Python's, NumPy's and torch's global random streams
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:        # 'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else torch.device(name)


def init_distributed(device: torch.device) -> tuple:
    """(rank, world size) of this process: (0, 1) when started without torchrun. Under `torchrun --nproc_per_node N`
    (WORLD_SIZE > 1) it joins the process group (nccl on CUDA, each process on GPU LOCAL_RANK; gloo on CPU)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if device.type == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world


def is_rank0() -> bool:             # the process that writes checkpoints, metrics and progress (all, without torchrun)
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def atomic_write(path, write_fn, sync: bool = False) -> None:
    """write_fn(file object) into <path>.tmp-<pid>, then os.replace: a kill leaves the old file or the new one."""
    path = str(path)
    tmp = f'{path}{TMP_TAG}{os.getpid()}'
    try:
        with open(tmp, 'wb') as fh:
            write_fn(fh)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_frame(frame: dict, where) -> None:
    for k, shape in FRAME_SHAPES.items():
        if k not in frame:
            raise DataError(f'{where}: missing key {k!r}')
        if np.shape(frame[k]) != shape:
            raise DataError(f'{where}: {k} has shape {np.shape(frame[k])}, expected {shape}')
    for k in IMAGE_KEYS:
        if k not in frame:
            raise DataError(f'{where}: missing key {k!r}')
        a = frame[k]
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise DataError(f'{where}: {k} is {a.dtype} {a.shape}, expected uint8 (H, W, 3)')


def write_frame(folder, frame_id: int, frame: dict, compress: bool = True) -> None:
    path = frame_path(folder, frame_id)
    check_frame(frame, path)
    save = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda fh: save(fh, **{k: frame[k] for k in (*FRAME_SHAPES, *IMAGE_KEYS)}))


def write_split_index(folder, episodes, windows, tasks) -> None:
    """ep_start_end_ids.npy ((E, 2) frame ids) and lang_annotations/auto_lang_ann.npy (windows (W, 2), task names).
    Episodes first: between the two writes a reader sees fewer windows, never one outside the listed episodes."""
    folder = Path(folder)
    unknown = sorted(set(tasks) - set(LANG))
    if unknown:
        raise DataError(f'{folder}: unknown task name(s) {unknown}; known: {list(LANG)}')
    episodes = np.asarray(episodes, np.int64).reshape(-1, 2)
    windows = np.asarray(windows, np.int64).reshape(-1, 2)
    assert len(windows) == len(tasks), f'{len(windows)} windows but {len(tasks)} task names'
    (folder / 'lang_annotations').mkdir(parents=True, exist_ok=True)
    atomic_write(folder / 'ep_start_end_ids.npy', lambda fh: np.save(fh, episodes), sync=True)
    ann = {'info': {'indx': [(int(s), int(e)) for s, e in windows], 'episodes': []},
           'language': {'task': list(tasks), 'ann': [LANG[t] for t in tasks],
                        'emb': np.zeros((len(tasks), 1, EMB_DIM), np.float32)}}
    atomic_write(folder / 'lang_annotations' / 'auto_lang_ann.npy',
                 lambda fh: np.save(fh, np.array(ann, dtype=object), allow_pickle=True), sync=True)


# ---------------- CALVIN layout: reading (our play data or a real CALVIN download) into a memory-mapped cache
def _one_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ''
    return f'{type(e).__name__}: {text[:120]}'


def read_frame(path, image_size: int | None = None) -> dict:
    """One episode_%07d.npz -> dict of the 6 CALVIN arrays (extra keys ignored), images resized if asked."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: frame file missing (listed in ep_start_end_ids.npy)')
    try:
        with open(path, 'rb') as fh:
            if fh.read(4) != b'PK\x03\x04':
                raise DataError(f'{path}: corrupt npz (not a zip archive)')
        with np.load(path) as z:
            missing = [k for k in (*FRAME_SHAPES, *IMAGE_KEYS) if k not in z.files]
            if missing:
                raise DataError(f'{path}: missing keys {missing}')
            frame = {k: z[k] for k in (*FRAME_SHAPES, *IMAGE_KEYS)}
    except DataError:
        raise
    except Exception as e:                      # BadZipFile, EOFError, zlib.error, pickled data, ...
        raise DataError(f'{path}: corrupt or truncated npz ({_one_line(e)})') from None
    check_frame(frame, path)
    if image_size is not None:
        for k in IMAGE_KEYS:
            frame[k] = resize_images(frame[k], image_size)
    return frame


def _read_chunk(job):
    folder, ids, size = job
    frames = [read_frame(frame_path(folder, i), size) for i in ids]
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]}


def read_episodes(folder) -> np.ndarray:
    """ep_start_end_ids.npy -> (E, 2) int64 inclusive frame ids, sorted, checked for overlaps."""
    path = Path(folder) / 'ep_start_end_ids.npy'
    if not path.is_file():
        raise DataError(f'{path}: missing (a CALVIN split folder lists its segments there)')
    try:
        ep = np.load(path)
    except Exception as e:
        raise DataError(f'{path}: unreadable ({_one_line(e)})') from None
    if ep.ndim != 2 or ep.shape[1] != 2 or len(ep) == 0 or not np.issubdtype(ep.dtype, np.integer):
        raise DataError(f'{path}: expected a non-empty (E, 2) integer array, got {ep.dtype} {ep.shape}')
    ep = ep.astype(np.int64)[np.argsort(ep[:, 0], kind='stable')]
    if (ep[:, 1] < ep[:, 0]).any() or (ep < 0).any():
        raise DataError(f'{path}: a segment ends before it starts (or has negative ids)')
    if (ep[1:, 0] <= ep[:-1, 1]).any():
        raise DataError(f'{path}: segments overlap')
    return ep


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers, strings, numbers and numpy arrays only: a pickle that names any other callable (the
    way a crafted file runs code) is refused before anything is called."""
    ALLOWED = {(m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray') for n in ('_reconstruct', 'scalar')}
    ALLOWED |= {('numpy', 'ndarray'), ('numpy', 'dtype'), ('builtins', 'slice'), ('collections', 'OrderedDict')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refused to load {module}.{name}: the file may run code')
        return super().find_class(module, name)


def load_pickled_npy(path) -> np.ndarray:
    """np.load(path, allow_pickle=True) of CALVIN's annotation object arrays via _DataOnlyUnpickler (runs no code)."""
    with open(path, 'rb') as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                                 np.lib.format.read_array_header_2_0)(fh)
        if not dtype.hasobject:
            return np.fromfile(fh, dtype=dtype).reshape(shape, order='F' if fortran else 'C')
        try:
            return _DataOnlyUnpickler(fh).load()
        except pickle.UnpicklingError as e:
            raise DataError(f'{path}: {_one_line(e)}') from None


def read_annotations(folder) -> tuple[np.ndarray, list]:
    """lang_annotations/auto_lang_ann.npy -> (windows (W, 2) frame ids, task names). Missing file = no windows."""
    path = Path(folder) / 'lang_annotations' / 'auto_lang_ann.npy'
    if not path.is_file():
        return np.zeros((0, 2), np.int64), []
    try:
        ann = load_pickled_npy(path).item()
        indx, tasks = ann['info']['indx'], list(ann['language']['task'])
        windows = np.asarray(indx, np.int64).reshape(-1, 2)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a CALVIN annotation dict with ['info']['indx'] and ['language']['task'] "
                        f'({_one_line(e)})') from None
    if len(windows) != len(tasks):
        raise DataError(f'{path}: {len(windows)} windows but {len(tasks)} task names')
    return windows, tasks


def _windows_to_rows(windows: np.ndarray, ep: np.ndarray, row0: np.ndarray, where) -> np.ndarray:
    """Global frame-id windows -> row windows; each must lie inside one listed segment."""
    if len(windows) == 0:
        return np.zeros((0, 2), np.int64)
    e = np.clip(np.searchsorted(ep[:, 0], windows[:, 0], side='right') - 1, 0, None)
    bad = (windows[:, 0] < ep[e, 0]) | (windows[:, 1] > ep[e, 1]) | (windows[:, 1] < windows[:, 0])
    if bad.any():
        w = int(np.flatnonzero(bad)[0])
        raise DataError(f'{where}: window {w} = frames {tuple(windows[w].tolist())} is not inside one segment of '
                        f'ep_start_end_ids.npy ({int(bad.sum())} such windows)')
    return windows - ep[e, :1] + row0[e, None]


def _fingerprint(folder: Path, ep: np.ndarray, image_size: int) -> str:
    """Hash of the segment list, the size of each segment's first/last frame file and the image size."""
    h = hashlib.sha1(f'v{CACHE_VERSION} size{image_size} '.encode() + ep.tobytes())
    for s, e in ep:
        for i in (s, e):
            p = frame_path(folder, i)
            h.update(str(p.stat().st_size if p.is_file() else -1).encode())
    return h.hexdigest()


CACHE_KEYS = {'rgb_static': np.uint8, 'rgb_gripper': np.uint8, 'robot_obs': np.float32, 'scene_obs': np.float32,
              'rel_actions': np.float32, 'actions': np.float32}


def _load_cache(cdir: Path, fingerprint: str, n: int, size: int):
    try:
        meta = json.loads((cdir / 'meta.json').read_text())
        if meta.get('fingerprint') != fingerprint:
            return None
        out = {k: np.load(cdir / f'{k}.npy', mmap_mode='r' if k in IMAGE_KEYS else None) for k in CACHE_KEYS}
    except (OSError, ValueError):
        return None
    ok = all(len(v) == n for v in out.values()) and all(out[k].shape[1:] == (size, size, 3) for k in IMAGE_KEYS)
    return out if ok else None


def _build_cache(folder: Path, cdir: Path, frame_ids: np.ndarray, size: int, fingerprint: str, workers: int):
    """Read every listed frame once (N worker processes), write one .npy per array, meta.json last."""
    N, tag = len(frame_ids), f'{TMP_TAG}{os.getpid()}'
    tmp = {k: cdir / f'{k}.npy{tag}' for k in CACHE_KEYS}
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / 'meta.json').unlink(missing_ok=True)                      # invalid until rebuilt
        arrays = {k: np.lib.format.open_memmap(tmp[k], 'w+', CACHE_KEYS[k], (N, size, size, 3)) for k in IMAGE_KEYS}
    except OSError as e:
        raise DataError(f'{cdir}: cannot write the frame cache ({_one_line(e)}); make the split folder writable '
                        'or copy the dataset') from None
    arrays.update({k: np.zeros((N, FRAME_SHAPES[k][0]), CACHE_KEYS[k]) for k in FRAME_SHAPES})
    chunk = 256
    jobs = [(str(folder), frame_ids[i:i + chunk], size) for i in range(0, N, chunk)]
    pool = mp.get_context('fork').Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_read_chunk, jobs) if pool else map(_read_chunk, jobs)
        bar = tqdm(total=N, desc=f'caching {folder.name} at {size}x{size}', unit='frame', disable=N < 5000)
        for i, part in zip(range(0, N, chunk), results):
            for k in CACHE_KEYS:
                arrays[k][i:i + len(part[k])] = part[k]
            bar.update(len(part['robot_obs']))
        bar.close()
        for k in FRAME_SHAPES:
            atomic_write(cdir / f'{k}.npy', lambda fh, a=arrays[k]: np.save(fh, a))
        for k in IMAGE_KEYS:
            arrays[k].flush()
            del arrays[k]
            os.replace(tmp[k], cdir / f'{k}.npy')
        atomic_write(cdir / 'meta.json', lambda fh: fh.write(json.dumps(
            {'version': CACHE_VERSION, 'fingerprint': fingerprint, 'n': N, 'image_size': size}).encode()), sync=True)
    finally:
        if pool:
            pool.terminate()
        for p in tmp.values():
            p.unlink(missing_ok=True)


def cache_dir(folder: Path, image_size: int) -> Path:
    """<split>/cache_<S>, or, when the split folder cannot be written (a read-only or shared copy of a dataset),
    $DIWA_CACHE (default ~/.cache/diwa)/<name of the split>-<hash of its path>/cache_<S>."""
    own = folder / f'cache_{image_size}'
    if own.is_dir() or _writable(folder):
        return own
    root = Path(os.environ.get('DIWA_CACHE', Path.home() / '.cache' / 'diwa'))
    tag = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    return root / f'{folder.name}-{tag}' / f'cache_{image_size}'


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried: permission bits do not bind root, read-only mounts do)."""
    probe = folder / f'.write_test{TMP_TAG}{os.getpid()}'
    try:
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def load_split(folder, image_size: int = 64, workers: int | None = None) -> dict:
    """A CALVIN split folder -> dict of numpy arrays (see the module docstring), images at image_size. workers:
    processes that read frames when cache_<S>/ is built (None: 1 below 20k frames, else up to 4)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f'{folder}: split folder not found')
    ep = read_episodes(folder)                                            # (E, 2) frame ids
    win_ids, tasks = read_annotations(folder)
    lengths = ep[:, 1] - ep[:, 0] + 1
    row0 = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    frame_ids = np.concatenate([np.arange(s, e + 1) for s, e in ep])      # (N,) global ids, row order
    windows = _windows_to_rows(win_ids, ep, row0, folder / 'lang_annotations' / 'auto_lang_ann.npy')
    fingerprint = _fingerprint(folder, ep, image_size)
    cdir = cache_dir(folder, image_size)
    arrays = _load_cache(cdir, fingerprint, len(frame_ids), image_size)
    if arrays is None:
        if workers is None:
            workers = 1 if len(frame_ids) < 20000 else min(4, os.cpu_count() or 1)
        _build_cache(folder, cdir, frame_ids, image_size, fingerprint, workers)
        arrays = _load_cache(cdir, fingerprint, len(frame_ids), image_size)
        assert arrays is not None, f'{cdir}: cache unreadable right after writing it'
    return {**arrays, 'frame_ids': frame_ids, 'episodes': np.stack([row0, row0 + lengths - 1], 1),
            'windows': windows, 'window_tasks': np.array(tasks, dtype=str).reshape(-1)}


# ---------------- Sampling: world-model sequences, the 50 expert windows of a task (S.2.2), success labels (§III.C)
SEQ_KEYS = ('rgb_static', 'rgb_gripper', 'robot_obs', 'scene_obs', 'rel_actions', 'actions')


def light_switch_frames(data: dict) -> np.ndarray:
    """Rows t where a light (scene_obs 4: bulb, 5: LED) differs from frame t-1 of its segment (LED: ~1 frame in 500)."""
    lights = np.asarray(data['scene_obs'][:, 4:6])
    changed = np.flatnonzero((lights[1:] != lights[:-1]).any(1)) + 1
    first = np.zeros(len(lights), bool)
    first[data['episodes'][:, 0]] = True
    return changed[~first[changed]]


def sample_sequences(data: dict, B: int, L: int, rng: np.random.Generator, event_frac: float = 0.0,
                     shard: tuple = (0, 1)) -> dict:
    """B sequences of L consecutive frames in one segment, start uniform over all valid starts; a share event_frac holds
    a light switching (a light_switch_frames row drawn uniformly, then a start whose window holds it; FINDINGS.md, "The
    LED: does imagination know a press switched it?"). -> SEQ_KEYS (B, L, ...), 'rows', 'is_first' (B, L).
    shard (rank, world size): the starts of a global batch of B x world are drawn (the same in every process, whose
    rng states are equal) and this process loads its B: N processes train on what one process would draw."""
    rank, world = shard
    B, B_own = B * world, B
    ep = data['episodes']
    n_starts = np.clip(ep[:, 1] - ep[:, 0] + 2 - L, 0, None)             # (E,) valid starts per segment
    if n_starts.sum() == 0:
        raise DataError(f'no segment has {L} frames (longest: {int((ep[:, 1] - ep[:, 0]).max()) + 1}); '
                        'use a shorter sequence length')
    cum = np.cumsum(n_starts)
    k = rng.integers(0, cum[-1], B)                                       # (B,) index among all valid starts
    e = np.searchsorted(cum, k, side='right')
    start = ep[e, 0] + k - (cum[e] - n_starts[e])
    if event_frac > 0:
        events = light_switch_frames(data)
        seg = np.searchsorted(ep[:, 0], events, side='right') - 1
        events, seg = events[n_starts[seg] > 0], seg[n_starts[seg] > 0]   # inside a segment of >= L frames
        n_ev = int(rng.binomial(B, event_frac)) if len(events) else 0
        if n_ev:
            pick = rng.integers(0, len(events), n_ev)
            t, a, b = events[pick], ep[seg[pick], 0], ep[seg[pick], 1]
            lo, hi = np.maximum(a, t - L + 1), np.minimum(t, b - L + 1)   # starts whose window holds t
            start[:n_ev] = lo + (rng.random(n_ev) * (hi - lo + 1)).astype(np.int64)
    rows = start[rank * B_own:(rank + 1) * B_own, None] + np.arange(L)   # (B_own, L): this process's sequences
    out = {key: np.asarray(data[key][rows]) for key in SEQ_KEYS}
    out['rows'] = rows
    out['is_first'] = np.zeros((B_own, L), bool)
    out['is_first'][:, 0] = True
    return out


def expert_windows(data: dict, task: str, n: int = 50, seed: int = 0) -> np.ndarray:
    """D_exp: n annotated windows of `task` chosen at random (S.2.2: N = 50), all if fewer. (n', 2) rows."""
    idx = np.flatnonzero(data['window_tasks'] == task)
    if len(idx) == 0:
        present = sorted(set(data['window_tasks'].tolist()))
        what = 'unknown task' if task not in LANG else 'no annotated window of task'
        raise DataError(f"lang_annotations/auto_lang_ann.npy: {what} {task!r} in this split (present: {present})")
    pick = np.random.default_rng(seed).choice(idx, min(n, len(idx)), replace=False)
    return data['windows'][np.sort(pick)]


def success_labels(data: dict, window, task: str | None = None) -> np.ndarray:
    """(T,) int64 over rows start..end: 1 where `task` (default: the window's own) succeeds relative to the start."""
    s, e = int(window[0]), int(window[1])
    if task is None:
        match = np.flatnonzero((data['windows'] == (s, e)).all(1))
        if len(match) == 0:
            raise DataError(f'window {(s, e)} is not an annotated window of this split; pass task=')
        task = str(data['window_tasks'][match[0]])
    if task not in env.TASKS:
        raise DataError(f'lang_annotations/auto_lang_ann.npy: unknown task {task!r}; known: {env.TASKS}')
    info = lambda t: {'robot_obs': data['robot_obs'][t], 'scene_obs': data['scene_obs'][t]}
    start = info(s)
    return np.array([env.task_success(task, start, info(t)) for t in range(s, e + 1)], np.int64)


# ---------------- Play-data collection (§IV.A: CALVIN's teleoperated play; here human-like scripted skills)
#   episode e:  frames e*L .. e*L+L-1 (global ids), one continuous play segment, split = validation every
#               val_every-th episode. Segments follow each other without reset:
#     [ task skill | home | task skill | reach | task skill | pause | ... ]   (home = back near the rest pose)
#       ^anchor      ^anchor                                         each segment's first frame is its anchor
#   annotation: whenever completed_tasks(anchor, frame t) gains a task, window = [max(anchor, t-max_window+1), t]
#               (t = FIRST frame where the test holds; kept only if it holds from the clipped start, else 'dropped')

@dataclass
class CollectConfig:
    episodes: int = 250         # §IV.A: ~500k play transitions (6 h at 30 Hz) = episodes x episode_len
    episode_len: int = 2000     # frames per episode, one continuous play segment (not in the paper)
    val_every: int = 10         # every val_every-th episode goes to validation/ (10%); 0 = none
    workers: int = 2            # collection processes, each with its own DeskEnv and its own episodes
    image_size: int = 200       # static camera pixels (CALVIN's dataset: 200; load_split resizes to 64, S.4)
    gripper_size: int = 84      # gripper camera pixels (CALVIN's dataset: 84)
    seed: int = 0               # episode e is generated from (seed, e) alone: the same data for any #workers
    p_task: float = 0.85  # not in the paper: share of segments that are tasks (FINDINGS.md, "The play data's operator")
    p_pause: float = 0.3  # not in the paper: share of pauses among the rest (FINDINGS.md, "The play data's operator")
    p_home: float = 0.5  # not in the paper: P(a reach home after a task) (FINDINGS.md, "The play data's operator")
    action_noise: float = 0.3  # not in the paper: std of the arm-action noise (FINDINGS.md, "The play data's operator")
    speed_min: float = 0.7  # not in the paper: lowest per-segment top speed (FINDINGS.md, "The play data's operator")
    speed_max: float = 1.0  # not in the paper: highest per-segment top speed (FINDINGS.md, "The play data's operator")
    gain_min: float = 0.35  # not in the paper: lowest per-segment P-gain (FINDINGS.md, "The play data's operator")
    gain_max: float = 0.6  # not in the paper: highest per-segment P-gain (FINDINGS.md, "The play data's operator")
    noise_corr: float = 0.7  # not in the paper: its AR(1) coefficient (FINDINGS.md, "The play data's operator")
    p_via: float = 0.4  # not in the paper: P(a task takes a detour) (FINDINGS.md, "The play data's operator")
    via_scale: float = 0.08  # not in the paper: size (m) of that detour (FINDINGS.md, "The play data's operator")
    p_hesitate: float = 0.25  # not in the paper: P(a pause after a phase) (FINDINGS.md, "The play data's operator")
    hesitate_max: int = 15  # not in the paper: longest such pause, steps (FINDINGS.md, "The play data's operator")
    p_miss: float = 0.5  # not in the paper: P(an LED press misses first) (FINDINGS.md, "The play data's operator")
    p_retry: float = 0.3  # not in the paper: P(a task is restarted) (FINDINGS.md, "The play data's operator")
    drawer_tol_max: float = 0.010  # not in the paper: max grasp tolerance (m) (FINDINGS.md, "The play data's operator")
    push_tol_max: float = 0.015  # not in the paper: max push tolerance (m) (FINDINGS.md, "The play data's operator")
    skill_timeout: int = 150    # frames after which an unfinished segment is abandoned
    max_window: int = 64        # longest annotation window in frames (CALVIN's windows are 64 frames)
    compress: bool = True       # np.savez_compressed frames, like CALVIN (~3 KB instead of 25 KB at 64x64)


PRESETS = {
    'paper': {},
    'cpu': {'episodes': 100, 'episode_len': 1500, 'image_size': 64, 'gripper_size': 64},
    # test: 350-frame episodes with a turn_on_led window in each split (2 / 1 at seed 11, brisk operator): CLI tests
    'test': {'episodes': 2, 'episode_len': 350, 'val_every': 2, 'workers': 1, 'image_size': 64, 'gripper_size': 64,
             'seed': 11,
             'p_task': 1.0, 'action_noise': 0.2, 'noise_corr': 0.0, 'p_via': 0.0, 'p_hesitate': 0.0, 'p_miss': 0.0, 'p_retry': 0.0,
             'speed_min': 0.6, 'gain_min': 0.3, 'drawer_tol_max': 0.006, 'push_tol_max': 0.006},
}


def episode_split(cfg: CollectConfig, e: int) -> str:
    return 'validation' if cfg.val_every and e % cfg.val_every == cfg.val_every - 1 else 'training'


def next_segment(cfg: CollectConfig, rng: np.random.Generator, scene_obs, prev_kind, home, geometry=env.DESK_GEOMETRY):
    """The next play segment -> (kind, skill): after a task, sometimes a reach back near the rest pose `home` (p_home;
    evaluation and imagined episodes start there); else a task possible now (p_task), a pause or a random reach."""
    speed, gain = rng.uniform(cfg.speed_min, cfg.speed_max), rng.uniform(cfg.gain_min, cfg.gain_max)
    if prev_kind in env.TASKS and rng.random() < cfg.p_home:      # near the rest pose, like env.random_robot_obs
        target = home + rng.uniform(-1, 1, 3) * (0.08, 0.06, 0.05)
        return 'home', env.ScriptedSkill('reach', rng, noise=cfg.action_noise, speed=speed, gain=gain,
                                         reach_target=target, noise_corr=cfg.noise_corr, geometry=geometry)
    # tasks possible now; a part stuck between its two tests (e.g. drawer at 0.11: neither opening nor closing
    # can move it 0.12) is pushed back to 0 by its second task, which succeeds in no test but frees the part
    pairs = [env.TASKS[i:i + 2] for i in range(0, len(env.TASKS), 2)]
    options = []
    for pair in pairs:
        options += [k for k in pair if env.task_possible(k, scene_obs)] or pair[1:]
    if rng.random() < cfg.p_task:
        kind = str(rng.choice(options))
    else:
        kind = 'pause' if rng.random() < cfg.p_pause else 'reach'
    style = operator_style(cfg)
    if kind not in env.TASKS:
        style['p_hesitate'] = 0.0                                   # pauses and reaches do not hesitate
    return kind, env.ScriptedSkill(kind, rng, speed=speed, gain=gain, geometry=geometry, **style)


def operator_style(cfg: CollectConfig) -> dict:
    """env.ScriptedSkill's style arguments for the play data's operator (all but the per-segment speed and gain,
    drawn from [speed_min, speed_max] and [gain_min, gain_max]); also `python diagnose.py skills --operator`."""
    return dict(noise=cfg.action_noise, noise_corr=cfg.noise_corr, p_via=cfg.p_via, via_scale=cfg.via_scale,
                p_hesitate=cfg.p_hesitate, hesitate_max=cfg.hesitate_max, p_miss=cfg.p_miss, p_retry=cfg.p_retry,
                drawer_tol_max=cfg.drawer_tol_max, push_tol_max=cfg.push_tol_max)


def run_episode(desk, cfg: CollectConfig, e: int, out_dir) -> dict:
    """Play one episode on `desk`, write its frames, return its summary (windows in global frame ids). `desk` may be
    the real calvin_env (env.CalvinEnvAdapter): the skills use its scene's geometry, its own task oracle labels the
    windows, and its 200 / 84 px images are stored resized as load_split resizes CALVIN's (S.4)."""
    rng = np.random.default_rng([cfg.seed, e])
    t_start = time.time()
    split = episode_split(cfg, e)
    folder = Path(out_dir) / split
    start_id = e * cfg.episode_len
    calvin = isinstance(desk, env.CalvinEnvAdapter)
    oracle, geometry = (desk, desk.geometry()) if calvin else (env, env.DESK_GEOMETRY)
    if calvin:       # CALVIN's neutral robot and blocks, the parts (drawer, door, switch, button) drawn as the desk's
        scene = desk.reset()['scene_obs'].copy()
        scene[:6] = env.random_scene(rng)[:6]
        obs = desk.reset(scene_obs=scene)
    else:
        obs = desk.reset(seed=int(rng.integers(2 ** 31)))             # rest pose, random scene
    home = obs['robot_obs'][:3].astype(np.float64)
    kind, skill, anchor, reported, seg_t = None, None, 0, set(), 0
    infos, windows, tasks = [], [], []
    stats = {'attempts': {}, 'skill_success': {}, 'dropped': 0}
    for t in range(cfg.episode_len):
        infos.append(desk.get_info() if calvin else {'robot_obs': obs['robot_obs'], 'scene_obs': obs['scene_obs']})
        for task in sorted(oracle.completed_tasks(infos[anchor], infos[t]) & set(env.TASKS) - reported):   # vs anchor
            reported.add(task)
            s = max(anchor, t - cfg.max_window + 1)
            if oracle.task_success(task, infos[s], infos[t]):
                windows.append((start_id + s, start_id + t))
                tasks.append(task)
            else:
                stats['dropped'] += 1
            if task == kind:
                stats['skill_success'][task] = stats['skill_success'].get(task, 0) + 1
        if skill is None or skill.done or seg_t >= cfg.skill_timeout:
            kind, skill = next_segment(cfg, rng, obs['scene_obs'], kind, home, geometry)
            anchor, reported, seg_t = t, set(), 0
            if kind in env.TASKS and env.task_possible(kind, obs['scene_obs']):
                stats['attempts'][kind] = stats['attempts'].get(kind, 0) + 1
        a = np.asarray(skill.act(obs), np.float64)
        seg_t += 1
        images = {k: resize_images(v, cfg.image_size if k == 'rgb_static' else cfg.gripper_size) if calvin else v
                  for k, v in obs['rgb_obs'].items()}
        frame = {'rel_actions': a, 'robot_obs': obs['robot_obs'], 'scene_obs': obs['scene_obs'], **images}
        obs, _, _, _ = desk.step(a)
        # The absolute action: the TCP target pose the relative action produced, and the gripper command (see to_torch)
        frame['actions'] = np.concatenate([desk.target_pos, desk.target_euler, [1.0 if a[6] >= 0 else -1.0]])
        write_frame(folder, start_id + t, frame, compress=cfg.compress)
        if _PARENT is not None and t % 100 == 0 and os.getppid() != _PARENT:
            raise SystemExit('collect: parent process is gone, worker stops')   # killed run: no orphans
    return {'episode': e, 'split': split, 'start': start_id, 'end': start_id + cfg.episode_len - 1,
            'windows': [list(w) for w in windows], 'tasks': tasks, 'wall_s': round(time.time() - t_start, 2), **stats}


_DESK, _PARENT = None, None                         # one DeskEnv per worker process; the collecting process


def _worker_init(cfg: CollectConfig, parent: int | None = None, env_kind: str = 'desk') -> None:
    global _DESK, _PARENT
    torch.set_num_threads(1)                        # one process per core: no thread pool to spin beside the renderer
    _DESK = env.CalvinEnvAdapter() if env_kind == 'calvin' else \
        env.DeskEnv(image_size=cfg.image_size, gripper_size=cfg.gripper_size, cameras=True)
    _PARENT = parent


def _worker_episode(job) -> dict:
    cfg, e, out_dir = job
    return run_episode(_DESK, cfg, e, out_dir)


SETTINGS_EXEMPT = ('workers', 'episodes')           # may change between runs: they do not change any episode


def collect(cfg: CollectConfig, out_dir, env_kind: str = 'desk') -> dict:
    """Collect play data into <out_dir>/{training,validation} in CALVIN's layout; resumable, with the same settings
    only (see the module docstring); env_kind 'calvin': in the real calvin_env, scene D (run_episode).
    -> {'frames', 'episodes', 'seconds', 'frames_per_s', 'counts', ...}"""
    global _DESK
    for name in ('episodes', 'episode_len', 'workers', 'image_size', 'gripper_size', 'skill_timeout', 'max_window'):
        if getattr(cfg, name) < 1:
            raise ValueError(f'collect.{name} must be >= 1, got {getattr(cfg, name)}')
    if not 0 <= cfg.speed_min <= cfg.speed_max or not 0 < cfg.gain_min <= cfg.gain_max:
        raise ValueError('collect: need 0 <= speed_min <= speed_max and 0 < gain_min <= gain_max')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SETTINGS_EXEMPT}
    settings.update({'env': env_kind} if env_kind != 'desk' else {})     # (the desk's files predate the key)
    spath, ppath = out / 'collect_config.json', out / 'collect_progress.json'
    if spath.is_file():
        old = json.loads(spath.read_text())
        diff = [f'{k}: {old.get(k)!r} -> {settings.get(k)!r}' for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)]
        if diff:
            raise DataError(f"{spath}: this folder holds play data collected with other settings ({'; '.join(diff)}); "
                            'use another output folder or the same settings to resume')
    else:
        atomic_write(spath, lambda fh: fh.write(json.dumps(settings, indent=1).encode()), sync=True)
    progress = json.loads(ppath.read_text()) if ppath.is_file() else {}
    for split in ('training', 'validation'):
        (out / split).mkdir(exist_ok=True)
        for p in (out / split).iterdir():           # temp files of a killed run
            if TMP_TAG in p.name and p.is_file():
                p.unlink()
    todo = [e for e in range(cfg.episodes) if str(e) not in progress]
    if not any(episode_split(cfg, e) == 'validation' for e in range(cfg.episodes)):
        print(f'[collect] note: no validation episode (val_every={cfg.val_every}, episodes={cfg.episodes})')
    print(f'[collect] {out}: {cfg.episodes - len(todo)} of {cfg.episodes} episodes done, {len(todo)} to go '
          f'({cfg.episode_len} frames each, {cfg.workers} workers)')

    def finish(summary):                            # parent only: progress first, then the split indexes
        progress[str(summary['episode'])] = summary
        atomic_write(ppath, lambda fh: fh.write(json.dumps(progress).encode()), sync=True)
        write_indexes(out, progress, summary['split'])

    t0 = time.time()
    bar = tqdm(total=len(todo) * cfg.episode_len, unit='frame', desc='collect', smoothing=0.1)
    jobs = [(cfg, e, str(out)) for e in todo]
    if cfg.workers > 1 and len(todo) > 1:
        with mp.get_context('fork').Pool(cfg.workers, initializer=_worker_init,
                                         initargs=(cfg, os.getpid(), env_kind)) as pool:
            for summary in pool.imap_unordered(_worker_episode, jobs):
                finish(summary)
                bar.update(cfg.episode_len)
    elif todo:                                      # one worker: in this process (easier to debug)
        _worker_init(cfg, env_kind=env_kind)
        try:
            for job in jobs:
                finish(_worker_episode(job))
                bar.update(cfg.episode_len)
        finally:
            _DESK.close()
            _DESK = None
    bar.close()
    seconds = time.time() - t0
    for split in ('training', 'validation'):         # also (re)writes the index of a split with no new episode
        write_indexes(out, progress, split)
    report = summarize(progress)
    report.update(seconds=seconds, frames_per_s=len(todo) * cfg.episode_len / max(seconds, 1e-9))
    print(f"[collect] {report['frames']} frames in {report['episodes']} episodes; this run: "
          f"{len(todo) * cfg.episode_len} frames in {seconds:.0f} s = {report['frames_per_s']:.0f} frames/s")
    for task, n in report['counts'].items():
        att, ok = report['attempts'].get(task, 0), report['skill_success'].get(task, 0)
        print(f'  {task:20s} {n:6d} windows   scripted skill {ok}/{att} = {ok / max(att, 1):.0%}')
    return report


def write_indexes(out: Path, progress: dict, split: str) -> None:
    """ep_start_end_ids.npy + annotations of one split from the finished episodes in `progress`."""
    eps = sorted((s for s in progress.values() if s['split'] == split), key=lambda s: s['start'])
    if not eps:
        return
    windows = [w for s in eps for w in s['windows']]
    tasks = [t for s in eps for t in s['tasks']]
    write_split_index(out / split, [(s['start'], s['end']) for s in eps], windows, tasks)


def summarize(progress: dict) -> dict:
    """Totals over finished episodes: frames, per-task window counts, scripted-skill attempts/successes."""
    counts = {k: 0 for k in env.TASKS}
    attempts, success = {k: 0 for k in env.TASKS}, {k: 0 for k in env.TASKS}
    for s in progress.values():
        for t in s['tasks']:
            counts[t] += 1
        for t, n in s['attempts'].items():
            attempts[t] += n
        for t, n in s['skill_success'].items():
            success[t] += n
    frames = sum(s['end'] - s['start'] + 1 for s in progress.values())
    return {'frames': frames, 'episodes': len(progress), 'counts': counts, 'attempts': attempts,
            'skill_success': success, 'dropped': sum(s['dropped'] for s in progress.values())}


# ---------------- Checkpoints: plain dicts on disk ({'stage', 'task', 'step', 'done', 'key', 'config', 'model', ...})
# Keys: a checkpoint is up to date when it was made with the same settings from the same inputs.

def config_key(config: dict, upstream: list) -> str:
    """Hash of a stage's settings and of the keys of the checkpoints it consumes (a Merkle chain)."""
    blob = json.dumps({'config': config, 'upstream': list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def can_extend(ckpt: dict, config: dict, upstream: list, extendable: tuple, n_steps: int) -> bool:
    """True when `ckpt` differs from (config, upstream) only by raised `extendable` fields (train.train_loop)."""
    old = ckpt.get('config', {})
    changed = {k for k in set(old) | set(config) if old.get(k) != config.get(k)}
    return (bool(changed) and changed <= set(extendable) and list(ckpt.get('upstream', [])) == list(upstream)
            and all(isinstance(old.get(k), int) and config[k] > old[k] for k in changed)
            and ckpt.get('step', n_steps + 1) <= n_steps)


def describe_change(old: dict, new: dict) -> str:
    """'epochs 2 -> 3, lr 0.0001 -> 0.0003' for the settings that differ."""
    diffs = [f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ', '.join(diffs) if diffs else 'an upstream checkpoint changed'


def rerun_reason(ckpt: dict, config: dict, upstream: list, upstream_names: dict) -> str:
    """Why train.train_loop starts `ckpt` over: 'settings changed: epochs 2 -> 3' and/or, for the entries of
    `upstream` named in `upstream_names` ({key: name}) that `ckpt` was not built from, 'its BC policy changed'."""
    reasons = [f'its {name} changed' for key, name in upstream_names.items()
               if key in upstream and key not in ckpt.get('upstream', [])]
    if ckpt.get('config', {}) != config or not reasons:
        reasons.insert(0, f"settings changed: {describe_change(ckpt.get('config', {}), config)}")
    return ', '.join(reasons)


def seed_of(upstream: list) -> int | None:
    """The seed named by a 'seed=N' entry of a checkpoint's upstream list (seed_tag)."""
    return next((int(u[5:]) for u in upstream if isinstance(u, str) and u.startswith('seed=')), None)


def save_checkpoint(obj: dict, path) -> None:
    """torch.save to <path>.tmp<pid>, fsync, rename: a kill at any moment leaves the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove_stale_temps(path, folder=None) -> None:
    """Delete <path>.tmp<pid> files (and any in `folder`, e.g. the snapshots') left by a process killed inside
    save_checkpoint (the checkpoint is intact)."""
    patterns = [glob.escape(str(path)) + '.tmp*'] + ([os.path.join(glob.escape(str(folder)), '*.tmp*')] if folder else [])
    for tmp in [t for pattern in patterns for t in glob.glob(pattern)]:
        pid = tmp.rsplit('.tmp', 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f'/proc/{pid}'):
            os.remove(tmp)


@contextlib.contextmanager
def writer_lock(path, error=None):
    """One writer per checkpoint: a second process resuming the same one raises `error` (DataError), naming the
    first. flock() on .<name>.lock beside it; the kernel drops the lock when its holder exits, even on kill -9."""
    if fcntl is None:                           # Windows: no lock
        yield
        return
    head, name = os.path.split(os.path.abspath(path))
    os.makedirs(head, exist_ok=True)
    with open(os.path.join(head, f'.{name}.lock'), 'a+') as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise (error or DataError)(f'{path}: {fh.read().strip() or "another process"} is writing this '
                                       'checkpoint; wait for it to finish, or stop it') from None
        fh.truncate(0)
        fh.write(f'pid {os.getpid()}')
        fh.flush()
        yield                                   # leaving the with-block closes the file: the lock is released


class MetricsLog:
    """<checkpoint>_metrics.csv, one row per logged step. Resuming drops rows newer than the checkpoint (a killed run
    leaves a consistent history); a fresh run leaves an older file alone until its first checkpoint replaces both."""

    def __init__(self, path: str | None, resume_step: int = 0):       # path None: keeps nothing (a rank > 0)
        self.path, self.rows = path, []
        if path and resume_step > 0 and os.path.isfile(path):
            with open(path, newline='') as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(float(r['step'])) <= resume_step]
            self.flush()

    def log(self, step: int, metrics: dict) -> None:
        self.rows.append({'step': step, **{k: f'{v:.6g}' if isinstance(v, float) else v for k, v in metrics.items()}})

    def flush(self) -> None:
        if not self.path:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r)) or ['step']
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + '.tmp', 'w', newline='') as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(self.path + '.tmp', self.path)


def check_finite(stage: str, step: int, metrics: dict, ckpt_path: str, error=None) -> None:
    """A NaN/inf loss stops the stage with `error` (DataError), naming the term; the last good checkpoint stays."""
    for k, v in metrics.items():
        if isinstance(v, (float, int)) and not math.isfinite(v):
            kept = f'last good checkpoint kept at {ckpt_path}' if os.path.isfile(ckpt_path) else 'no checkpoint written yet'
            raise (error or DataError)(f"stage {stage}, step {step}: loss term '{k}' is {v}; stopped ({kept})")


def load_checkpoint(path, stage: str | None = None, task: str | None = None) -> dict:
    """Load a checkpoint as data (weights_only=True) and check it holds what the caller expects."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: checkpoint not found' + (f' (run --stage {stage} first)' if stage else ''))
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code ...
        raise DataError(f'{path}: not a readable checkpoint ({type(e).__name__}: {_one_line(e)[:120]})') from None
    if not isinstance(ckpt, dict) or 'stage' not in ckpt or 'model' not in ckpt:
        raise DataError(f'{path}: not a diwa checkpoint (expected a dict with stage/model keys)')
    if stage is not None and ckpt['stage'] != stage:
        raise DataError(f"{path}: holds a '{ckpt['stage']}' checkpoint, expected '{stage}'")
    if task is not None and ckpt.get('task') != task:
        raise DataError(f"{path}: holds task '{ckpt.get('task')}', expected '{task}'")
    return ckpt


def config_from(cls, config: dict, path, stage: str):
    """A checkpoint's settings as dataclass `cls`; another diwa version's are an error (never a silent upgrade)."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = sorted(names - set(config)), sorted(set(config) - names)
    if missing or unknown:
        raise DataError(f"{path}: written by another version of diwa (settings missing: {', '.join(missing) or '-'}; "
                        f"unknown: {', '.join(unknown) or '-'}); rebuild it with --stage {stage} --force")
    return cls(**config)


def dataset_key(root) -> str:
    """Fingerprint of a dataset's segments and annotations (their contents: pickles of equal ones can differ)."""
    h = hashlib.sha1()
    for split in ('training', 'validation'):
        folder = os.path.join(root, split)
        if not os.path.isfile(os.path.join(folder, 'ep_start_end_ids.npy')):
            continue
        episodes, (windows, tasks) = read_episodes(folder), read_annotations(folder)
        h.update(np.ascontiguousarray(episodes, np.int64).tobytes())
        h.update(np.ascontiguousarray(windows, np.int64).tobytes())
        h.update('\n'.join(map(str, tasks)).encode())
    return h.hexdigest()[:16]


def window_rows(episodes: np.ndarray, windows: np.ndarray, extra: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (W, T) of each window plus `extra` frames after it (clipped to its episode), and their (W, T) mask."""
    ep_end = np.array([episodes[(episodes[:, 0] <= s) & (s <= episodes[:, 1])][0, 1] for s, _ in windows])
    stop = np.minimum(windows[:, 1] + extra, ep_end)                    # (W,) inclusive
    T = int((stop - windows[:, 0]).max()) + 1
    rows = windows[:, :1] + np.arange(T)[None]                          # (W, T)
    mask = rows <= stop[:, None]
    return np.minimum(rows, stop[:, None]), mask
