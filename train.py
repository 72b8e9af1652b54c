"""DiWA end to end: the command line that runs every phase of Algorithm 1.

    python train.py --stage collect            # play data on the built-in desk   (data.py,        §II)
    python train.py --stage wm                 # world model on play frames        (world_model.py, §III.A)
    python train.py --stage bc     --task T    # diffusion policy from 50 demos    (diffusion_policy.py, §III.B)
    python train.py --stage reward --task T    # latent success classifier         (reward.py,      §III.C)
    python train.py --stage finetune --task T  # DiWA: PPO in imagination, 0 simulator steps (dream_ppo.py, §III.D-E)
    python train.py --stage dppo   --task T    # baseline: the same PPO in the simulator
    python train.py --stage eval   --task T    # success in the simulator           (eval.py, §IV)
    python train.py --stage all --tasks all --seeds 0 1 2   # everything missing, skipping what is done

Each stage's hyperparameters are the fields of the dataclass config in the file that owns the stage
(defaults = the paper's appendix tables), shifted by a preset (`paper`, `cpu`, `test`) and then by any
`--<prefix>.<field> value` flag, e.g. `--wm.steps 2000 --ft.alpha_bc 0.0`. The values in force are printed
at start and stored in every checkpoint.

Run folder (default runs/<preset>/):
    data/{training,validation}/   wm.pt   <task>/bc.pt   <task>/reward.pt   <task>/diwa_s<seed>.pt ...
<task>/bc.pt is BC seed 0's policy, <task>/bc_s<seed>.pt another seed's: fine-tuning seed S (diwa_s<S>.pt,
dppo_s<S>.pt) starts from BC seed S, and the base policy of seed S's evaluation is BC seed S.
Checkpoints are plain dicts {'stage','task','step','done','key','config','model','optim',...}, written to a
temp file and renamed, loaded with weights_only=True. 'key' is a hash of the stage's config and of the keys
of the checkpoints it was built from: `--stage all` re-runs a stage exactly when its key changed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import sys
import time
import tokenize

import numpy as np
import torch


class StageError(RuntimeError):
    """A stage cannot go on (bad checkpoint, NaN loss, ...). main() prints it as one line and exits 2."""


# ----------------------------------------------------------------------------------------------------
# Configs -> argparse flags. Each module's dataclass documents its fields with a trailing comment;
# that comment becomes the flag's help text, so the paper's table citation shows up in --help.
# ----------------------------------------------------------------------------------------------------

def field_comments(cls) -> dict:
    """{field name: trailing comment} read from the dataclass source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, line_field = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip('#').strip()
    return out


def _parse_value(kind, text):
    if kind is bool:
        if text.lower() in ('1', 'true', 'yes', 'on'):
            return True
        if text.lower() in ('0', 'false', 'no', 'off'):
            return False
        raise argparse.ArgumentTypeError(f'expected true/false, got {text!r}')
    if kind in (tuple, list):
        return tuple(int(v) if re.fullmatch(r'-?\d+', v) else float(v) for v in text.split(','))
    return kind(text)


def add_config_flags(parser: argparse.ArgumentParser, prefix: str, cls) -> None:
    """One flag `--<prefix>.<field>` per dataclass field (default None = keep the preset's value)."""
    group = parser.add_argument_group(f'{prefix}: {cls.__name__} ({cls.__module__}.py)')
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default)
        group.add_argument(f'--{prefix}.{f.name}', dest=f'{prefix}.{f.name}', default=None, metavar=kind.__name__.upper(),
                           type=lambda s, k=kind: _parse_value(k, s),
                           help=f"{helps.get(f.name, '')} (paper: {default})".replace('%', '%%'))


def build_config(cls, presets: dict, preset: str, args: argparse.Namespace, prefix: str):
    """paper defaults <- preset overrides <- command-line flags."""
    cfg = dataclasses.replace(cls(), **presets.get(preset, {}))
    flags = {f.name: getattr(args, f'{prefix}.{f.name}') for f in dataclasses.fields(cls)
             if getattr(args, f'{prefix}.{f.name}', None) is not None}
    return dataclasses.replace(cfg, **flags)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: plain dicts, atomic writes, loud and specific errors.
# ----------------------------------------------------------------------------------------------------

def atomic_torch_save(obj: dict, path: str) -> None:
    """Write to <path>.tmp<pid>, fsync, rename: a kill at any moment leaves either the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove_stale_temps(path: str) -> None:
    """Delete <path>.tmp<pid> files left by a process killed in the middle of atomic_torch_save (the
    checkpoint itself is intact: the rename never happened)."""
    import glob
    for tmp in glob.glob(glob.escape(path) + '.tmp*'):
        pid = tmp.rsplit('.tmp', 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            os.remove(tmp)


@contextlib.contextmanager
def writer_lock(path: str):
    """One writer per checkpoint. Two processes resuming the same checkpoint (a report and a hand-started
    stage, say) would each overwrite the other's progress; the second one stops instead, naming the first.
    The lock is flock() on .<name>.lock beside the checkpoint: the kernel drops it when its holder exits, even on
    kill -9, so it never goes stale. (On a system without fcntl, no lock is taken.)"""
    try:
        import fcntl
    except ImportError:     # Windows
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    head, name = os.path.split(path)
    fh = open(os.path.join(head, f'.{name}.lock'), 'a+')
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or 'another process'
        fh.close()
        raise StageError(f'{path}: {holder} is writing this checkpoint; wait for it to finish, or stop it') from None
    fh.truncate(0)
    fh.write(f'pid {os.getpid()}')
    fh.flush()
    try:
        yield
    finally:
        fh.close()          # closing the file releases the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: str, stage: str | None = None, task: str | None = None) -> dict:
    """Load a checkpoint as data (weights_only=True) and check it holds what the caller expects."""
    if not os.path.isfile(path):
        raise StageError(f'{path}: checkpoint not found' + (f' (run --stage {stage} first)' if stage else ''))
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code ...
        raise StageError(f'{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})') from None
    if not isinstance(ckpt, dict) or 'stage' not in ckpt or 'model' not in ckpt:
        raise StageError(f'{path}: not a diwa checkpoint (expected a dict with stage/model keys)')
    if stage is not None and ckpt['stage'] != stage:
        raise StageError(f"{path}: holds a '{ckpt['stage']}' checkpoint, expected '{stage}'")
    if task is not None and ckpt.get('task') != task:
        raise StageError(f"{path}: holds task '{ckpt.get('task')}', expected '{task}'")
    return ckpt


# Settings added after checkpoints with the earlier behaviour existed: at these values (that behaviour) they are
# left out of the key, so that adding an option does not make every finished checkpoint stale.
LATER_FIELDS = {'proprio_scaled': False, 'latent_sample': True, 'proprio_pos_std': 0.01, 'target_input': False,
                'event_frac': 0.0, 'play_frac': 0.125,
                'drop_relapses': False, 'imagined_samples': 1, 'start_conditioned': False}


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def config_key(config: dict, upstream: list) -> str:
    """Hash of a stage's settings and of the keys of the checkpoints it consumes (a Merkle chain)."""
    blob = json.dumps({'config': _comparable(config), 'upstream': list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def can_extend(ckpt: dict, config: dict, upstream: list, extendable: tuple, n_steps: int) -> bool:
    """True when `ckpt` differs from (config, upstream) only by raised `extendable` fields (train_loop)."""
    old, config = _comparable(ckpt.get('config', {})), _comparable(config)
    changed = {k for k in set(old) | set(config) if old.get(k) != config.get(k)}
    return (bool(changed) and changed <= set(extendable) and list(ckpt.get('upstream', [])) == list(upstream)
            and all(isinstance(old.get(k), int) and config[k] > old[k] for k in changed)
            and ckpt.get('step', n_steps + 1) <= n_steps)


def _seed_of(upstream: list) -> int:
    """The seed named by a 'seed=N' entry of a checkpoint's upstream list (seed_tag); 0 when there is none."""
    return next((int(u[5:]) for u in upstream if isinstance(u, str) and u.startswith('seed=')), 0)


def describe_change(old: dict, new: dict) -> str:
    """'epochs 2 -> 3, lr 0.0001 -> 0.0003' for the settings that differ."""
    old, new = _comparable(old), _comparable(new)
    diffs = [f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ', '.join(diffs) if diffs else 'an upstream checkpoint changed'


def rerun_reason(ckpt: dict, config: dict, upstream: list, upstream_names: dict) -> str:
    """Why train_loop starts `ckpt` over: 'settings changed: epochs 2 -> 3' and/or, for the entries of `upstream`
    named in `upstream_names` ({key: name}) that `ckpt` was not built from, 'its BC policy (bc_s1.pt) changed'."""
    reasons = [f'its {name} changed' for key, name in upstream_names.items()
               if key in upstream and key not in ckpt.get('upstream', [])]
    if _comparable(ckpt.get('config', {})) != _comparable(config) or not reasons:
        reasons.insert(0, f"settings changed: {describe_change(ckpt.get('config', {}), config)}")
    return ', '.join(reasons)


# ----------------------------------------------------------------------------------------------------
# Metrics: one csv per stage output, rows appended as training goes; on resume, rows newer than the
# checkpoint are dropped so that a killed run leaves a consistent history.
# ----------------------------------------------------------------------------------------------------

class MetricsLog:
    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        self.rows = []
        if resume_step > 0 and os.path.isfile(path):
            with open(path, newline='') as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(float(r['step'])) <= resume_step]
            self.flush()
        # a fresh run leaves an older file alone until its first checkpoint replaces both: a re-run stopped before
        # that keeps the old checkpoint *and* its metrics

    def log(self, step: int, metrics: dict) -> None:
        self.rows.append({'step': step, **{k: f'{v:.6g}' if isinstance(v, float) else v for k, v in metrics.items()}})

    def flush(self) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r)) or ['step']
        tmp = self.path + '.tmp'
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(tmp, 'w', newline='') as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)


def check_finite(stage: str, step: int, metrics: dict, ckpt_path: str) -> None:
    """A NaN/inf loss stops the stage, naming the term; the last good checkpoint on disk is untouched."""
    for k, v in metrics.items():
        if isinstance(v, (float, int)) and not math.isfinite(v):
            kept = f'last good checkpoint kept at {ckpt_path}' if os.path.isfile(ckpt_path) else 'no checkpoint written yet'
            raise StageError(f"stage {stage}, step {step}: loss term '{k}' is {v}; stopped ({kept})")


def user_errors() -> tuple:
    """Errors that are the user's to fix (a missing file, a bad dataset, a NaN loss): printed as one line."""
    from data import DataError
    return StageError, DataError, OSError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def finished(stage: str, task: str | None, path: str, config: dict, upstream: list, force: bool = False,
             inherited: list | None = None) -> dict | None:
    """The checkpoint that train_loop would skip to, or None: `path` finished with the same key (settings and
    inputs), or, while `path` does not exist, such a checkpoint in a run it inherits from. Stages ask before
    their set-up (datasets, start pools, simulator processes), so that re-running finished work takes seconds."""
    if force:
        return None
    key = config_key(config, upstream)
    for p in [path] if os.path.isfile(path) else list(inherited or []):
        if os.path.isfile(p):
            ckpt = load_checkpoint(p, stage, task)
            if ckpt.get('key') == key and ckpt.get('done'):
                print(f'[{stage}] {p}: ' + (f'already done ({ckpt["step"]} steps, same settings)' if p == path
                                             else 'inherited (same settings)') + ': skipped')
                return ckpt
    return None


# ----------------------------------------------------------------------------------------------------
# The one training loop every learned stage shares: resume, periodic atomic checkpoints, NaN guard,
# metrics.csv, progress bar. Stages differ only in what `step_fn` does (an update_* of their module).
# ----------------------------------------------------------------------------------------------------

def train_loop(*, stage: str, task: str | None, path: str, config: dict, upstream: list, objects: dict,
               step_fn, n_steps: int, ckpt_every: int, force: bool = False, rng: np.random.Generator | None = None,
               extra: dict | None = None, log_every: int = 1, quiet: bool = False, snapshot_every: int = 0,
               inherited: list | None = None, extendable: tuple = (), upstream_names: dict | None = None) -> dict:
    """Run `step_fn(step) -> metrics` for steps [resume, n_steps) with checkpoints every `ckpt_every` steps.

    objects: {'model': nn.Module, 'optim': Optimizer, ...} — everything with state_dict()/load_state_dict()
    that defines the run's state; saved under the same names. Returns the final checkpoint dict.
    snapshot_every > 0 also keeps the model weights every that many steps in <path>_snapshots/step<N>.pt
    (small: model only), for curves of real success during training (Fig. 3).
    inherited: the same checkpoint in the runs this one inherits from (--inherit); when `path` does not exist
    yet and one of them is finished with the same key, it is used as it is and nothing runs.
    extendable: config fields (e.g. 'steps') that may be raised on an existing checkpoint without starting
    over: when they are the only change and the checkpoint is at or below the new n_steps, training goes on
    from it under the new key. Only for stages whose schedule does not depend on n_steps (constant lr), so
    that 5000 + 5000 steps equal 10000 steps.
    upstream_names: {upstream key: what it is} for the message when a changed input makes `path` start over.
    """
    from tqdm import tqdm

    key = config_key(config, upstream)
    done = finished(stage, task, path, config, upstream, force, inherited)
    if done is not None:
        return done
    with writer_lock(path):     # a second writer of the same checkpoint stops here, naming the first
        status, ckpt = 'fresh', None
        remove_stale_temps(path)
        if os.path.isfile(path) and not force:
            ckpt = load_checkpoint(path, stage, task)
            theirs, ours = _seed_of(ckpt.get('upstream', [])), _seed_of(upstream)
            if theirs != ours:      # a second seed must not overwrite the first one's checkpoint (seed_tag)
                raise StageError(f'{path} was trained with --seed {theirs}, this run has --seed {ours}: give it its '
                                 f'own --run folder (or --force to replace it)')
            if ckpt.get('key') == key:
                status = 'done' if ckpt.get('done') else 'resume'
            elif can_extend(ckpt, config, upstream, extendable, n_steps):
                status = 'resume'
                print(f'[{stage}] {path}: extending, {describe_change(ckpt.get("config", {}), config)}')
            else:
                print(f'[{stage}] {path}: re-running, {rerun_reason(ckpt, config, upstream, upstream_names or {})}')
        if status == 'done':            # finished by another writer since finished() looked
            print(f'[{stage}] {path}: already done ({ckpt["step"]} steps, same settings): skipped')
            return ckpt
        start = 0
        if status == 'resume':
            for name, obj in objects.items():
                obj.load_state_dict(ckpt[name])
            torch.set_rng_state(ckpt['rng']['torch'])
            if rng is not None and 'numpy' in ckpt['rng']:
                rng.bit_generator.state = ckpt['rng']['numpy']
            start = ckpt['step']
            print(f'[{stage}] {path}: resuming from step {start}/{n_steps}')
        log = MetricsLog(os.path.splitext(path)[0] + '_metrics.csv', resume_step=start)

        wall0 = float(ckpt.get('wall_s', 0.0)) if status == 'resume' else 0.0    # wall-clock of earlier runs

        def save(step: int, metrics: dict, done: bool) -> dict:
            out = {'stage': stage, 'task': task, 'step': step, 'done': done, 'key': key, 'config': config,
                   'wall_s': wall0 + time.time() - t0,
                   'upstream': list(upstream), 'metrics': metrics, 'extra': extra or {},
                   'rng': {'torch': torch.get_rng_state(),
                           **({'numpy': rng.bit_generator.state} if rng is not None else {})}}
            out.update({name: obj.state_dict() for name, obj in objects.items()})
            atomic_torch_save(out, path)
            log.flush()
            return out

        metrics, t0 = {}, time.time()
        bar = tqdm(range(start, n_steps), desc=f'{stage}{"/" + task if task else ""}', disable=quiet,
                   initial=start, total=n_steps, mininterval=2.0, dynamic_ncols=True)
        for step in bar:
            metrics = step_fn(step)
            check_finite(stage, step + 1, metrics, path)
            if (step + 1) % log_every == 0 or step + 1 == n_steps:
                log.log(step + 1, {**metrics, 'time': round(time.time() - t0, 2)})
            if 'loss' in metrics:
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
            if snapshot_every and (step + 1) % snapshot_every == 0:
                atomic_torch_save({'stage': stage, 'task': task, 'step': step + 1, 'key': key, 'config': config,
                                   'model': objects['model'].state_dict(), 'extra': extra or {}},
                                  os.path.join(os.path.splitext(path)[0] + '_snapshots', f'step{step + 1}.pt'))
            if (step + 1) % ckpt_every == 0 and step + 1 < n_steps:
                save(step + 1, metrics, done=False)
        if start >= n_steps and ckpt is not None:
            return save(start, ckpt.get('metrics', {}), done=True)
        return save(n_steps, metrics, done=True)


# ----------------------------------------------------------------------------------------------------
# Stages. Each one: build its config, load what it consumes (checking it), run the shared loop.
# ----------------------------------------------------------------------------------------------------

def find(args, *parts) -> str:
    """Path of a file of this run. A variant run (--inherit PARENT ...) reads what it lacks from its parents:
    `--run runs/cpu/alpha0 --inherit runs/cpu --ft.alpha_bc 0` fine-tunes the parent's policy with another
    alpha_BC and writes only the new checkpoint (and results.csv) into runs/cpu/alpha0."""
    for root in [args.run] + list(getattr(args, 'inherit', None) or []):
        if os.path.exists(os.path.join(root, *parts)):
            return os.path.join(root, *parts)
    return os.path.join(args.run, *parts)


def out_path(args, *parts) -> dict:
    """train_loop's path= and inherited= for a checkpoint this stage writes."""
    return {'path': os.path.join(args.run, *parts),
            'inherited': [os.path.join(root, *parts) for root in getattr(args, 'inherit', None) or []]}


def data_root(args) -> str:
    return args.data or find(args, 'data')


def data_key(root: str) -> str:
    """Fingerprint of a dataset in CALVIN's layout: its segment list and annotation windows / tasks (cheap, no
    frame reads). It hashes the *contents*, not the file bytes: the annotations are a pickled dict, and pickle's
    bytes depend on which equal strings happen to be the same object, so rewriting identical annotations
    could change a byte hash (and make --stage all retrain the world model for nothing)."""
    import data
    h = hashlib.sha1()
    for split in ('training', 'validation'):
        folder = os.path.join(root, split)
        if not os.path.isfile(os.path.join(folder, 'ep_start_end_ids.npy')):
            continue
        episodes, (windows, tasks) = data.read_episodes(folder), data.read_annotations(folder)
        h.update(np.ascontiguousarray(episodes, np.int64).tobytes())
        h.update(np.ascontiguousarray(windows, np.int64).tobytes())
        h.update('\n'.join(map(str, tasks)).encode())
    return h.hexdigest()[:16]


def stage_collect(args) -> None:
    """Play data on the built-in desk, written in CALVIN's layout (data.py, paper §II, S.3)."""
    import data
    cfg = build_config(data.CollectConfig, data.PRESETS, args.preset, args, 'collect')
    if args.data:
        raise StageError(f'--data {args.data}: collect writes into the run folder; drop --data to collect, '
                         'or skip collect when you bring your own (e.g. real CALVIN) dataset')
    print_config('collect', cfg)
    data.collect(cfg, data_root(args))


def load_world_model(args, device):
    """The frozen world model of this run: (wm, ckpt). Fails clearly if missing or of another stage."""
    from world_model import WMConfig, WorldModel
    ckpt = load_checkpoint(find(args, 'wm.pt'), 'wm')
    if not ckpt.get('done'):
        raise StageError(f"{find(args, 'wm.pt')}: world model training is unfinished "
                         f"(step {ckpt['step']}); run --stage wm to complete it")
    wm = WorldModel(WMConfig(**ckpt['config'])).to(device)
    wm.load_state_dict(ckpt['model'])
    wm.eval().requires_grad_(False)
    return wm, ckpt


def seed_tag(args) -> list:
    """--seed's part of a checkpoint key for stages whose output path does not name the seed (wm.pt, reward.pt;
    also BC's, whose file names seeds > 0 only: bc_file). Seed 0 adds nothing, so keys written before the seed
    was keyed stay valid. train_loop refuses to resume or overwrite a checkpoint of another seed: a second
    world-model or classifier seed needs its own --run (or --force)."""
    return [f'seed={args.seed}'] if args.seed else []


def seed_file(name: str, seed: int) -> str:
    """A per-seed file name: `name` itself for seed 0 (the name runs made before there was one file per seed
    use, so that their files stay valid), 'bc_s2.pt' for name 'bc.pt' and seed 2."""
    stem, ext = os.path.splitext(name)
    return f'{stem}_s{seed}{ext}' if seed else name


def bc_file(seed: int) -> str:
    """<task>/<this>: the policy behaviour-cloned with --seed `seed` (bc.pt, bc_s1.pt, ...). Each seed clones
    its own: fine-tuning seed S starts from BC seed S, and results.csv's base row for seed S evaluates it, so
    that Table I's mean over seeds also averages over BC seeds (one BC seed alone moves a base figure by tens
    of points on this desk). The reward classifier stays one per task (reward.pt, --seed, default 0)."""
    return seed_file('bc.pt', seed)


def with_seed(args, seed: int) -> argparse.Namespace:
    """A copy of `args` with --seed `seed` (--seeds runs a stage once per seed)."""
    return argparse.Namespace(**{**vars(args), 'seed': seed})


def _warm_start_tag(args) -> list:
    """The 'init=<key>' entry of the run's existing wm.pt (own or inherited) when it was warm-started with
    --wm-init, so that later commands keep it instead of retraining it from scratch; [] otherwise."""
    where = out_path(args, 'wm.pt')
    path = next((p for p in [where['path']] + where['inherited'] if os.path.isfile(p)), None)
    try:
        upstream = load_checkpoint(path, 'wm').get('upstream', []) if path else []
    except StageError:                # unreadable: train_loop says so (or --force replaces it)
        upstream = []
    return [u for u in upstream if str(u).startswith('init=')]


def stage_wm(args, device) -> dict:
    """World model on play frames only: Eq. 10-11, Table S.2 (world_model.py, paper §III.A)."""
    import data
    import world_model as W
    cfg = build_config(W.WMConfig, W.PRESETS, args.preset, args, 'wm')
    print_config('wm', cfg)
    train = data.load_split(os.path.join(data_root(args), 'training'), cfg.image_size)
    wm = W.WorldModel(cfg).to(device)
    upstream = [data_key(data_root(args))] + seed_tag(args)
    if not args.wm_init and not args.force:   # a warm-started model stays so without naming --wm-init again
        upstream += _warm_start_tag(args)
    if args.wm_init:                  # continue from a trained world model (e.g. to add --wm.target_input)
        src = load_checkpoint(args.wm_init, 'wm')
        try:
            grown = W.warm_start(wm, src['model'])
        except ValueError as e:
            raise StageError(f'--wm-init {args.wm_init}: {e}') from None
        print(f"[wm] warm start from {args.wm_init} (step {src['step']}); new inputs start at zero in: {grown or 'none'}")
        upstream.append(f"init={src['key']}")
    opt = W.make_optimizer(wm, cfg)
    rng = np.random.default_rng(args.seed)

    def step_fn(step):
        batch = data.to_torch(data.sample_sequences(train, cfg.batch, cfg.seq_len, rng, cfg.event_frac), device)
        return W.update_wm(wm, opt, batch)

    return train_loop(stage='wm', task=None, **out_path(args, 'wm.pt'), config=dataclasses.asdict(cfg),
                      upstream=upstream, objects={'model': wm, 'optim': opt}, step_fn=step_fn,
                      n_steps=cfg.steps, ckpt_every=args.ckpt_every or max(1, cfg.steps // 20), force=args.force,
                      rng=rng, log_every=max(1, cfg.steps // 500),
                      extendable=('steps',))          # constant lr (Tab. S.2): --wm.steps N continues a run


def print_config(stage: str, cfg) -> None:
    print(f'[{stage}] config: ' + ', '.join(f'{k}={v}' for k, v in dataclasses.asdict(cfg).items()))


# ----------------------------------------------------------------------------------------------------
# Demonstrations in latent space (Alg. 1 line 2): the 50 expert windows of a task, filtered by the frozen
# world model from each window's first frame. Cached in <run>/<task>/latents.pt, keyed by the world model.
#
#   window      s ............ e  (first frame where the task's success test holds)  + post frames
#   feat        z_s ........... z_e ......... z_{e+P}            (W, T, F)
#   chunk       a_t..a_{t+3}    for t in [s, e]  (padded with the window's last action)  (W, T, Ta, 7)
#   success     test(start=s, now=t) for t in [s, e+P]                                     (W, T)
# ----------------------------------------------------------------------------------------------------

def window_rows(episodes: np.ndarray, windows: np.ndarray, extra: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (W, T) covering each window plus `extra` frames after it (clipped to its episode), and a
    (W, T) mask of the rows that belong to the window proper or its extension."""
    ep_end = np.array([episodes[(episodes[:, 0] <= s) & (s <= episodes[:, 1])][0, 1] for s, _ in windows])
    stop = np.minimum(windows[:, 1] + extra, ep_end)                    # (W,) inclusive
    T = int((stop - windows[:, 0]).max()) + 1
    rows = windows[:, :1] + np.arange(T)[None]                          # (W, T)
    mask = rows <= stop[:, None]
    return np.minimum(rows, stop[:, None]), mask


@torch.no_grad()
def featurize_rows(wm, split: dict, rows: np.ndarray, device, chunk: int = 16, imagined: bool = False) -> torch.Tensor:
    """Features (W, T, F) of frame sequences rows[w], each from a fresh state: posterior (filtered on every
    frame), or with imagined=True prior (frame rows[w, 0] filtered, the rest imagined open loop along the
    recorded actions with sampled latents, as in the Dream Diffusion MDP)."""
    import data
    import world_model as W
    feats = []
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        batch = {k: split[k][r] for k in data.SEQ_KEYS}
        batch['is_first'] = np.zeros(r.shape, bool)
        batch['is_first'][:, 0] = True
        batch = data.to_torch(batch, device)
        f = W.open_loop_features(wm, batch, 1, r.shape[1] - 1, sample=True) if imagined else wm.featurize(batch)
        feats.append(f.float().cpu())
    return torch.cat(feats)


def demo_latents(args, wm, wm_ckpt, task: str, device, split_name: str = 'training') -> dict:
    """Latents, action chunks and success labels of the task's expert windows (see the diagram above)."""
    import data
    import env
    name = seed_file(f'latents_{split_name}.pt', args.seed)    # the seed draws the demos: one cache per seed
    path = os.path.join(args.run, task, name)
    key = config_key({'task': task, 'demos': args.demos, 'seed': args.seed, 'post': args.post_success_frames,
                      'split': split_name}, [wm_ckpt['key'], data_key(data_root(args))])
    for cache in dict.fromkeys([path, find(args, task, name)]):           # ours, else a parent's
        if os.path.isfile(cache):
            cached = torch.load(cache, weights_only=True)
            if cached.get('key') == key:
                return cached
    split = data.load_split(os.path.join(data_root(args), split_name), wm.cfg.image_size)
    n = args.demos if split_name == 'training' else 10 ** 9
    win = data.expert_windows(split, task, n=n, seed=args.seed)                  # (W, 2) row windows
    rows, mask = window_rows(split['episodes'], win, args.post_success_frames)   # (W, T)
    feat = featurize_rows(wm, split, rows, device)                               # (W, T, F)
    # action chunks a_t .. a_{t+Ta-1}, never reading past the window's end (edge-padded)
    Ta = 4
    idx = np.minimum(rows[:, :, None] + np.arange(Ta), win[:, 1:2, None])       # (W, T, Ta)
    chunks = torch.as_tensor(split['rel_actions'][idx], dtype=torch.float32)      # (W, T, Ta, 7)
    in_window = torch.as_tensor(rows <= win[:, 1:2]) & torch.as_tensor(mask)     # (W, T) frames s..e
    start_scene = split['scene_obs'][win[:, 0]]
    success = np.array([[env.task_success(task, {'scene_obs': start_scene[w]}, {'scene_obs': split['scene_obs'][r]})
                         for r in rows[w]] for w in range(len(win))]) & mask
    out = {'key': key, 'task': task, 'feat': feat, 'chunks': chunks, 'in_window': in_window,
           'valid': torch.as_tensor(mask), 'success': torch.as_tensor(success), 'windows': torch.as_tensor(win),
           'start_rows': torch.as_tensor(win[:, 0])}
    atomic_torch_save(out, path)
    return out


def stage_bc(args, device, task: str) -> dict:
    """Pre-train the diffusion policy on the task's 50 demos in latent space: Eq. 12, Table S.3 (§III.B).
    --seed draws the demos and the initial weights; each seed writes its own file (bc_file)."""
    import diffusion_policy as D
    cfg = build_config(D.BCConfig, D.PRESETS, args.preset, args, 'bc')
    print_config('bc', cfg)
    seed_everything(args.seed)       # initial weights and noise: the same in any process, after any other stage
    wm, wm_ckpt = load_world_model(args, device)
    demos = demo_latents(args, wm, wm_ckpt, task, device)
    sel = demos['in_window']                                             # frames s..e of each window
    b_cond = demos['feat'][sel].to(device)                               # (N, F)
    b_x0 = demos['chunks'][sel].to(device)                               # (N, Ta, 7)
    N = len(b_cond)
    steps_per_epoch = max(1, math.ceil(N / cfg.batch))
    n_steps = cfg.epochs * steps_per_epoch
    policy = D.make_policy(wm.feat_dim, cfg).to(device)
    opt = D.make_optimizer(policy, cfg)
    sched = D.make_scheduler(opt, cfg, n_steps)                          # cosine 1e-4 -> 1e-5 (Tab. S.3)
    ema = D.make_ema(policy, cfg)
    gen = torch.Generator(device='cpu').manual_seed(args.seed)
    print(f'[bc/{task}] {demos["windows"].shape[0]} demos, {N} (latent, chunk) pairs, {n_steps} steps')

    def step_fn(step):
        idx = torch.randint(0, N, (min(cfg.batch, N),), generator=gen)
        return D.update_bc(policy, opt, ema, {'actions': b_x0[idx], 'cond': b_cond[idx]},
                           epoch=step // steps_per_epoch, sched=sched)

    return train_loop(stage='bc', task=task, **out_path(args, task, bc_file(args.seed)),
                      config=dataclasses.asdict(cfg), upstream=[demos['key']] + seed_tag(args),
                      objects={'model': policy, 'optim': opt, 'sched': sched, 'ema': ema}, step_fn=step_fn,
                      n_steps=n_steps, ckpt_every=args.ckpt_every or max(1, n_steps // 10), force=args.force,
                      extra={'cond_dim': wm.feat_dim}, log_every=max(1, n_steps // 500))


def load_policy(path: str, task: str, feat_dim: int, device, stage: str = 'bc'):
    """The policy of a checkpoint (the EMA weights of a BC checkpoint), checked against the world model's
    latent size: a policy only makes sense on the latents it was trained on."""
    import diffusion_policy as D
    ckpt = load_checkpoint(path, stage, task)
    cond_dim = ckpt['extra'].get('cond_dim')
    if cond_dim != feat_dim:
        raise StageError(f'{path}: policy conditioned on {cond_dim}-d latents, but the world model gives '
                         f'{feat_dim}-d features (checkpoints from different runs?)')
    cfg = D.BCConfig(**ckpt['extra'].get('bc_config', ckpt['config']))
    policy = D.make_policy(cond_dim, cfg).to(device)
    policy.load_state_dict(ckpt['ema']['model'] if stage == 'bc' else ckpt['model'])
    return policy.eval().requires_grad_(False), ckpt


def load_bc_policy(args, task: str, seed: int, feat_dim: int, device):
    """pi_pre of BC seed `seed` (bc_file; this run's or a parent's): what fine-tuning seed `seed` starts from,
    and the base policy of that seed's evaluation. -> (policy, ckpt)."""
    path = find(args, task, bc_file(seed))
    if not os.path.isfile(path):
        raise StageError(f'{path}: no BC policy of seed {seed}; run --stage bc --task {task} --seed {seed} first')
    return load_policy(path, task, feat_dim, device)


def play_negatives(args, wm, task: str, device, split_name: str, n_seq: int, seed: int,
                   imagined: int = 0, relative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of play frames where the task is still possible, i.e. certainly not its success state
    (Table S.4: 'distant/unsuccessful frames'). Filtered over 32-frame play snippets; the first 8 frames of a
    snippet are context only. imagined=n adds the same frames n times more, each imagined open loop from the
    snippet's first frame with its own sampled latents. -> (feat (N, F), start (N, F)): each frame's latent and
    its snippet's first latent (z_0 of a start-conditioned classifier). relative=True (RewardConfig.start_conditioned)
    takes instead every frame where the test fails relative to the snippet's first frame: a classifier that sees
    z_0 can be told that a closed drawer is no success when it was closed at the start (an absolute one cannot:
    that is where a close_drawer demo ends)."""
    import data
    import env
    split = data.load_split(os.path.join(data_root(args), split_name), wm.cfg.image_size)
    rng = np.random.default_rng(seed)
    starts = data.sample_sequences(split, n_seq, 32, rng)['rows'][:, 0]
    rows = starts[:, None] + np.arange(32)                                # (n_seq, 32)
    scene = split['scene_obs']
    if relative:        # every frame where the test fails relative to the snippet's start
        keep = ~np.array([[env.task_success(task, {'scene_obs': scene[r[0]]}, {'scene_obs': scene[t]}) for t in r[8:]]
                          for r in rows], bool)
    else:
        keep = np.vectorize(lambda r: env.task_possible(task, scene[r]))(rows[:, 8:])
    keep = torch.as_tensor(keep)
    feats, firsts = [], []
    for i in range(1 + int(imagined)):                                    # recorded, then n imagined copies
        f = featurize_rows(wm, split, rows, device, imagined=i > 0)       # (n_seq, 32, F)
        feats.append(f[:, 8:][keep])
        firsts.append(f[:, :1].expand(-1, 24, -1)[keep])
    return torch.cat(feats), torch.cat(firsts)


def reward_dataset(args, wm, wm_ckpt, task: str, device, split_name: str, imagined: int = 0,
                   margin: int = 0, play_frac: float = 0.125, drop_relapses: bool = False,
                   relative: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feat (N, F), start (N, F), label (N,)): demo frames labelled by the success test relative to the window
    start, each with the latent of its sequence's first frame (z_0 of a start-conditioned classifier),
    plus play frames where the task is possible as extra negatives. imagined=n (RewardConfig.imagined and
    .imagined_samples) adds every one of these frames n times more as the world model imagines it from the
    sequence's first frame along the recorded actions (each time with its own sampled latents), with the
    recorded frame's label. The `margin` demo frames just before a window's first success are left out
    (RewardConfig.neg_margin: Table S.4's negatives are *distant* frames).
    drop_relapses leaves out the post-success frames where the test no longer holds (RewardConfig.drop_relapses:
    a drawer bouncing back after the push; episodes end at their first success, so such states are never judged).
    play_frac: play snippets (32 frames, the last 24 scored) drawn per demo success frame (RewardConfig.play_frac;
    the held-out set of eval.py --reward-report keeps the default, so its figures compare across settings).
    relative: see play_negatives."""
    demos = demo_latents(args, wm, wm_ckpt, task, device, split_name)
    success = demos['success']
    first = success.float().argmax(1, keepdim=True)                   # (W, 1) first success frame (window end)
    offset = torch.arange(success.shape[1])[None] - first             # (W, T) frames relative to it
    done = success.any(1, keepdim=True)                               # (W, 1) windows that reach success
    valid = demos['valid'] & ~((offset < 0) & (offset >= -margin) & done)
    if drop_relapses:
        valid &= ~((offset > 0) & ~success & done)

    def z0_of(f):                                                     # (W, T, F) -> each frame's z_0, (N, F)
        return f[:, :1].expand_as(f)[valid]

    feat, start, label = [demos['feat'][valid]], [z0_of(demos['feat'])], [demos['success'][valid].long()]
    if imagined:
        import data
        split = data.load_split(os.path.join(data_root(args), split_name), wm.cfg.image_size)
        rows, _ = window_rows(split['episodes'], demos['windows'].numpy(), args.post_success_frames)
        for _ in range(int(imagined)):
            f = featurize_rows(wm, split, rows, device, imagined=True)
            feat.append(f[valid]), start.append(z0_of(f)), label.append(label[0])
    n_seq = max(8, int(label[0].sum().item() * play_frac))
    neg, neg_start = play_negatives(args, wm, task, device, split_name, n_seq, imagined=imagined, relative=relative,
                                    seed=args.seed + (split_name != 'training'))
    return (torch.cat(feat + [neg]), torch.cat(start + [neg_start]),
            torch.cat(label + [torch.zeros(len(neg), dtype=torch.long)]))


def stage_reward(args, device, task: str) -> dict:
    """Latent success classifier C_psi: NT-Xent + cross-entropy, Eq. 13-14, Table S.4 (§III.C)."""
    import reward as R
    cfg = build_config(R.RewardConfig, R.PRESETS, args.preset, args, 'reward')
    print_config('reward', cfg)
    seed_everything(args.seed)       # initial weights and imagined latents: the same in any process, any order
    wm, wm_ckpt = load_world_model(args, device)
    where = out_path(args, task, 'reward.pt')
    upstream = [wm_ckpt['key'], args.demos, args.post_success_frames] + seed_tag(args)
    done = finished('reward', task, config=dataclasses.asdict(cfg), upstream=upstream, force=args.force, **where)
    if done is not None:
        return done
    b_feat, b_start, b_label = reward_dataset(args, wm, wm_ckpt, task, device, 'training',
                                              imagined=cfg.imagined_samples if cfg.imagined else 0,
                                              margin=cfg.neg_margin, play_frac=cfg.play_frac,
                                              drop_relapses=cfg.drop_relapses, relative=cfg.start_conditioned)
    pos, neg = torch.nonzero(b_label == 1)[:, 0], torch.nonzero(b_label == 0)[:, 0]
    if len(pos) == 0 or len(neg) == 0:
        raise StageError(f'reward/{task}: {len(pos)} positive and {len(neg)} negative frames; need both')
    print(f'[reward/{task}] {len(pos)} success frames, {len(neg)} non-success frames')
    clf = R.RewardClassifier(wm.feat_dim, cfg).to(device)
    opt = R.make_optimizer(clf, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = max(1, math.ceil(2 * max(len(pos), len(neg)) / cfg.batch))
    n_steps = cfg.epochs * steps_per_epoch

    def step_fn(step):  # class-balanced minibatch: half success, half not
        half = cfg.batch // 2
        idx = torch.cat([pos[torch.randint(0, len(pos), (half,), generator=gen)],
                         neg[torch.randint(0, len(neg), (cfg.batch - half,), generator=gen)]])
        return R.update_reward(clf, opt, b_feat[idx].to(device), b_label[idx].to(device),
                               b_start[idx].to(device) if clf.relative else None)

    ckpt = train_loop(stage='reward', task=task, **where, config=dataclasses.asdict(cfg), upstream=upstream,
                      objects={'model': clf, 'optim': opt}, step_fn=step_fn, n_steps=n_steps,
                      ckpt_every=args.ckpt_every or max(1, n_steps // 10), force=args.force,
                      extra={'feat_dim': wm.feat_dim}, log_every=max(1, n_steps // 500))
    return ckpt


def load_reward(args, task: str, feat_dim: int, device):
    """The task's latent success classifier C_psi, checked against the world model's latent size."""
    import reward as R
    path = find(args, task, 'reward.pt')
    ckpt = load_checkpoint(path, 'reward', task)
    if ckpt['extra'].get('feat_dim') != feat_dim:
        raise StageError(f"{path}: classifier of {ckpt['extra'].get('feat_dim')}-d latents, world model gives {feat_dim}-d")
    clf = R.RewardClassifier(feat_dim, R.RewardConfig(**ckpt['config'])).to(device)
    clf.load_state_dict(ckpt['model'])
    return clf.eval().requires_grad_(False), ckpt


@torch.no_grad()
def start_pool(args, wm, task: str, device, n: int = 1024, where: str = 'rest') -> dict:
    """Imagined episodes start from recorded play frames where the task's precondition holds (e.g. drawer
    closed for open_drawer) and, with where='rest', the robot is near its rest pose, where the evaluation's
    episodes start (Alg. 1 l. 10 'sample initial observation x_0'; frames in the middle of a task would make
    imagined episodes easier than real ones). Each frame is encoded alone from a fresh state, as the evaluation
    encodes its first frame. No simulator is created: the pool is read from the dataset."""
    import data
    import dream_ppo as P
    import env
    split = data.load_split(os.path.join(data_root(args), 'training'), wm.cfg.image_size)
    ok = np.array([env.task_possible(task, s) for s in split['scene_obs']], bool)
    if where == 'rest':
        rest = ok & env.near_rest(split['robot_obs'])
        if rest.sum() >= 64:
            ok = rest
        else:
            print(f'[finetune/{task}] only {rest.sum()} recorded frames near the rest pose where the task is '
                  'possible: starting imagined episodes from any such frame')
    possible = np.flatnonzero(ok)
    if len(possible) == 0:
        raise StageError(f'finetune/{task}: no recorded frame where the task is possible')
    rows = np.random.default_rng(args.seed).choice(possible, min(n, len(possible)), replace=False)[:, None]  # (n, 1)
    pool = []
    for i in range(0, len(rows), 256):
        batch = {k: split[k][rows[i:i + 256]] for k in data.SEQ_KEYS}
        pool.append(P.encode_start_pool(wm, data.to_torch(batch, device)))
    return {k: torch.cat([p[k] for p in pool]) for k in pool[0]}


class StateBox:
    """Plain-dict state (counters, a torch.Generator) behind the state_dict interface train_loop saves."""

    def __init__(self, counters: dict | None = None, generator: torch.Generator | None = None):
        self.counters, self.generator = counters, generator

    def state_dict(self):
        return {'counters': dict(self.counters or {}),
                'generator': self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, d):
        if self.counters is not None:
            self.counters.update(d['counters'])
        if self.generator is not None and d['generator'] is not None:
            self.generator.set_state(d['generator'])


def finetuned_checkpoints(args, task: str, seed: int) -> dict:
    """Policy name (results.csv) -> checkpoint path, for the fine-tuned policies of a task and seed."""
    names = {'diwa': f'diwa_s{seed}.pt', 'dppo': f'dppo_s{seed}.pt'}
    return {k: os.path.join(args.run, task, v) for k, v in names.items()
            if os.path.isfile(os.path.join(args.run, task, v))}


def fine_tuned_from(ckpt: dict, bc_ckpt: dict) -> bool:
    """Whether a finetune/dppo checkpoint was fine-tuned from BC checkpoint `bc_ckpt` (its key is upstream). Only
    then do the two make a policy: DiWA's runs pi_pre's first K - K' denoising steps, then pi_theta's."""
    return bc_ckpt.get('key') in ckpt.get('upstream', [])


def load_finetuned_actor(ckpt: dict, policy_pre, device):
    """The fine-tuned copy pi_theta stored in a finetune/dppo checkpoint (same architecture as pi_pre)."""
    import copy
    actor = copy.deepcopy(policy_pre)
    actor.load_state_dict(ckpt['model'])
    return actor.eval().requires_grad_(False)


def stage_finetune(args, device, task: str, seed: int, simulator: bool = False) -> dict:
    """DiWA (Alg. 1): PPO on the diffusion policy inside the frozen world model, reward from the classifier,
    0 simulator steps. With simulator=True: the DPPO baseline, the same update driven by the built-in desk.
    Seed `seed` fine-tunes BC seed `seed`'s policy (bc_file) and writes diwa_s<seed>.pt / dppo_s<seed>.pt."""
    import dream_ppo as P
    stage = 'dppo' if simulator else 'finetune'
    cfg = build_config(P.FinetuneConfig, P.PRESETS, args.preset, args, 'ft')
    print_config(stage, cfg)
    seed_everything(seed)
    wm, wm_ckpt = load_world_model(args, device)
    policy_pre, bc_ckpt = load_bc_policy(args, task, seed, wm.feat_dim, device)     # BC seed `seed`
    actor = P.make_actor(policy_pre)
    critic = P.make_critic(wm.feat_dim, cfg).to(device)
    opts = P.make_optimizers(actor, critic, cfg)
    scaler = P.RunningRewardScaler(cfg.gamma)
    counters = P.new_counters()
    gen = torch.Generator(device=device).manual_seed(seed)
    upstream = [wm_ckpt['key'], bc_ckpt['key']]
    names = {bc_ckpt['key']: f'BC policy ({bc_file(seed)})'}     # says so when it changed (train_loop)
    if not simulator and cfg.reward == 'decoder':     # Fig. 2: the task's test on scene states decoded by a hybrid WM
        import reward as R
        try:
            clf = R.DecodedStateReward(wm, task)
        except ValueError as e:
            raise StageError(f"{find(args, 'wm.pt')}: {e}") from None
    elif not simulator:                                 # §III.C: the latent success classifier
        clf, rw_ckpt = load_reward(args, task, wm.feat_dim, device)
        upstream.append(rw_ckpt['key'])
    path = os.path.join(args.run, task, f"{'dppo' if simulator else 'diwa'}_s{seed}.pt")
    ckpt = finished(stage, task, path, dataclasses.asdict(cfg), upstream + [seed], args.force)
    if ckpt is None:                                    # not done yet: start pool or simulators, then train
        if simulator:
            import env
            rng = np.random.default_rng(seed)
            sims = env.make_vec_env('desk', cfg.n_envs, workers=cfg.sim_workers, seed=seed,
                                    image_size=wm.cfg.image_size)
            step = lambda it: P.dppo_iteration(sims, wm, policy_pre, actor, critic, opts, scaler, task, cfg,
                                               counters, rng, gen, device)
        else:
            pool = start_pool(args, wm, task, device, where=cfg.start_states)
            step = lambda it: P.iteration(wm, policy_pre, actor, critic, clf, opts, scaler, pool, task, cfg,
                                          counters, gen)
        extra = {'cond_dim': wm.feat_dim, 'bc_config': bc_ckpt['config'], 'alpha_bc': P.alpha_bc_for(task, cfg)}
        try:
            ckpt = train_loop(stage=stage, task=task, path=path, config=dataclasses.asdict(cfg),
                              upstream=upstream + [seed],
                              objects={'model': actor, 'critic': critic, 'optim_actor': opts['actor'],
                                       'optim_critic': opts['critic'], 'scaler': scaler,
                                       'state': StateBox(counters, gen)},
                              step_fn=step, n_steps=cfg.iterations,
                              ckpt_every=args.ckpt_every or max(1, cfg.iterations // 10), force=args.force,
                              extra=extra, upstream_names=names,
                              snapshot_every=max(1, cfg.iterations // args.snapshots) if args.snapshots else 0)
        finally:
            if simulator:
                sims.close()
    state = ckpt['state']['counters']
    print(f"[{stage}/{task}] seed {seed}: {state.get('iteration')} iterations, {state.get('imagined_steps')} imagined "
          f"steps, {state.get('sim_steps')} simulator steps")
    return ckpt


def stage_dppo(args, device, task: str, seed: int) -> dict:
    return stage_finetune(args, device, task, seed, simulator=True)


def stage_all(args, device, tasks: list) -> None:
    """Everything missing, in Algorithm 1's order; each stage skips itself when its checkpoint is done and was
    made with the same settings and inputs (train_loop compares keys), so a re-run of a finished run is fast."""
    import eval as E
    if not args.data:           # with --data the user brings the dataset (e.g. real CALVIN)
        stage_collect(args)        # resumable: finished episodes are kept
    stage_wm(args, device)
    for task in tasks:
        for seed in args.seeds:                 # one BC policy per seed (bc_file)
            stage_bc(with_seed(args, seed), device, task)
        stage_reward(args, device, task)        # one classifier per task (--seed)
        for seed in args.seeds:
            stage_finetune(args, device, task, seed)
            E.evaluate_stage(with_seed(args, seed), device, task)


def variant_args(args, name: str) -> argparse.Namespace:
    """The arguments of a report variant (eval.VARIANTS): its own run folder under <run>/variants/, its setting
    overrides, and the parent runs it inherits every unchanged checkpoint from."""
    import eval as E
    v = E.VARIANTS[name]
    out = argparse.Namespace(**vars(args))
    out.run = E.variant_run(args.run, name)
    out.inherit = [E.variant_run(args.run, p) for p in v['inherit']] + [args.run]
    out.data = data_root(args)
    for flag, value in v['overrides'].items():
        setattr(out, flag, value)
    os.makedirs(out.run, exist_ok=True)
    return out


def _report_inputs(run: str) -> list:
    """(path, size, mtime) of every file write_report reads from `run` and its variants (checkpoints, metrics,
    results.csv, reports, figures; not the play data or logs): equal lists mean an identical report."""
    out = []
    for d, dirs, files in os.walk(run):
        dirs[:] = sorted(x for x in dirs if x not in ('data', 'logs'))
        for f in sorted(files):
            if f.endswith(('.pt', '.csv', '.json', '.png')):
                try:
                    st = os.stat(os.path.join(d, f))
                except FileNotFoundError:       # replaced or removed while we walked: counts as a change
                    continue
                out.append((os.path.join(d, f), st.st_size, st.st_mtime_ns))
    return out


def stage_report(args, device) -> str:
    """The paper's experiments on the built-in desk (README, results.md): everything missing is run, in an order
    that gives a useful partial report early; what is done is skipped (checkpoint keys, results.csv rows), so
    the command continues where a stopped run left off. results.md / results.csv / figures are rewritten after
    every piece of work.
      1. play data, world model, its open-loop report (Fig. S.7)
      2. every task: BC, reward (+ its report), the base policy's evaluation (BC and evaluation: first seed)
      3. every task with the first seed: DiWA, its evaluation incl. the snapshots (Fig. 3)
      4. the variants on --report-task, first seed: alpha_BC 0 / 0.5 (Fig. S.6), Gaussian policy
         (Table S.6), hybrid world model with classifier / decoded-state reward (Fig. 2)
      5. DPPO on --report-task, its evaluation incl. the snapshots (steps to match DiWA, Table I, Fig. S.5)
      6. the other seeds of every task, each from its own BC policy (Table I's mean ± std)
      7. DPPO on the other tasks where DiWA beats the base policy, --dppo-cap iterations each (Table I's DPPO
         column: steps to match DiWA, or '> cap')"""
    import eval as E
    ecfg = build_config(E.EvalConfig, E.PRESETS, args.preset, args, 'eval')
    t0 = time.time()

    last_inputs = None

    def report():       # rewritten when a file it reads has changed (~7 s of checkpoint loading), so a re-run
        nonlocal last_inputs                    # with everything done takes seconds
        inputs = _report_inputs(args.run)
        if inputs == last_inputs:
            return
        path = E.write_report(args.run, args.report_dir, args.preset, args.seeds, args.report_task, args.readme)
        last_inputs = inputs
        print(f'[report] {path} updated ({(time.time() - t0) / 60:.1f} min into this run)', flush=True)

    def pretrain(a, task: str, seed: int, reward: bool = True):
        sa = with_seed(a, seed)
        stage_bc(sa, device, task)                  # BC seed `seed`; the classifier below: --seed's, one per task
        if reward:
            stage_reward(a, device, task)
            rr = os.path.join(a.run, task, 'reward_report.json')
            rw = find(a, task, 'reward.pt')
            if rw.startswith(a.run) and (not os.path.isfile(rr) or os.path.getmtime(rr) < os.path.getmtime(rw)):
                E.reward_report(a, device, task)
        E.evaluate_checkpoints(sa, device, task, ecfg, policies=['base'])

    def task_unit(a, task: str, seed: int, snapshots: bool = False, reward: bool = True):
        pretrain(a, task, seed, reward)
        sa = with_seed(a, seed)
        stage_finetune(sa, device, task, seed)
        E.evaluate_checkpoints(sa, device, task, ecfg, snapshots=snapshots)
        report()

    if not args.data:
        stage_collect(args)
    stage_wm(args, device)
    wm_csv = os.path.join(args.run, 'wm_open_loop.csv')
    if not os.path.isfile(wm_csv) or os.path.getmtime(wm_csv) < os.path.getmtime(os.path.join(args.run, 'wm.pt')):
        E.wm_report(args, device)
    first, rest = args.seeds[0], args.seeds[1:]
    for task in args.tasks:
        pretrain(args, task, first)
        report()
    for task in args.tasks:
        task_unit(args, task, first, snapshots=True)
    for name in E.VARIANTS:
        va = variant_args(args, name)
        stage_wm(va, device)
        task_unit(va, args.report_task, first, reward=va.__dict__.get('ft.reward') != 'decoder')
    sa = with_seed(args, first)
    stage_dppo(sa, device, args.report_task, first)
    E.evaluate_checkpoints(sa, device, args.report_task, ecfg, policies=['dppo'], snapshots=True)
    report()
    for seed in rest:
        for task in args.tasks:
            task_unit(args, task, seed)
    if args.dppo_cap:
        ca = argparse.Namespace(**{**vars(args), 'seed': first, 'ft.iterations': args.dppo_cap})
        for task in args.tasks:
            if task == args.report_task:
                continue
            if not E.diwa_beats_base(args.run, task, args.seeds):
                print(f'[report] DPPO on {task}: skipped, DiWA does not beat the base policy (nothing to match)')
                continue
            stage_dppo(ca, device, task, first)
            E.evaluate_checkpoints(ca, device, task, ecfg, policies=['dppo'], snapshots=True)  # and its snapshots
            report()
    return os.path.join(args.report_dir, 'results.md')


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

STAGES = ['collect', 'wm', 'bc', 'reward', 'finetune', 'dppo', 'eval', 'all', 'report']


def config_classes() -> dict:
    """prefix -> (dataclass, presets) of every stage; imported here so that `--help` lists every field."""
    import data, diffusion_policy, dream_ppo, eval, reward, world_model
    return {'eval': (eval.EvalConfig, eval.PRESETS),'collect': (data.CollectConfig, data.PRESETS), 'wm': (world_model.WMConfig, world_model.PRESETS),
            'bc': (diffusion_policy.BCConfig, diffusion_policy.PRESETS),
            'reward': (reward.RewardConfig, reward.PRESETS), 'ft': (dream_ppo.FinetuneConfig, dream_ppo.PRESETS)}


def make_parser() -> argparse.ArgumentParser:
    from env import TASKS
    p = argparse.ArgumentParser(description='DiWA: diffusion policy adaptation with world models (CoRL 2025)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--stage', choices=STAGES, required=True, help='phase of Algorithm 1 to run')
    p.add_argument('--preset', choices=['paper', 'cpu', 'test'], default='cpu',
                   help='paper = appendix tables (GPU); cpu = scaled for a laptop; test = seconds')
    p.add_argument('--run', default=None, help='run folder (default runs/<preset>)')
    p.add_argument('--inherit', nargs='+', default=[], metavar='RUN',
                   help='parent run folder(s): checkpoints this run lacks are read from them, and stages whose '
                        'settings match a finished parent checkpoint are skipped (variants and ablations)')
    p.add_argument('--report-dir', default='results',
                   help='--stage report writes results.md, results.csv and figures/ here')
    p.add_argument('--readme', default='README.md',
                   help="--stage report also rewrites this README's <!-- report:begin/end --> block (Table I, the "
                        "figures, the wall-clock); '' for none")
    p.add_argument('--report-task', choices=TASKS, default='open_drawer',
                   help='--stage report: the task of the ablations / variants and of the DPPO baseline')
    p.add_argument('--dppo-cap', type=int, default=40,
                   help='--stage report: DPPO iterations on each task other than --report-task, for Table I\'s '
                        'DPPO column (an iteration is n_envs x n_steps x 4 simulator steps: 3,600 at the cpu '
                        'preset); 0 skips them')
    p.add_argument('--data', default=None, help='dataset root in CALVIN layout (default <run>/data; a real CALVIN '
                                                'download works too)')
    p.add_argument('--tasks', '--task', dest='tasks', nargs='+', default=None,
                   help="task(s) for bc/reward/finetune/dppo/eval/all ('all' = the 8; --stage all: open_drawer)")
    p.add_argument('--seed', type=int, default=0, help='seeds Python, NumPy, torch and the simulator')
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help='seeds for bc (one policy each), finetune, dppo, eval and all (default: --seed)')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if present), 'cpu' or 'cuda'")
    p.add_argument('--threads', type=int, default=0,
                   help='torch CPU threads (0 = torch default); 1 is faster when other jobs share the cores')
    p.add_argument('--force', action='store_true', help='re-run stages even if their outputs are up to date')
    p.add_argument('--wm-init', default=None, metavar='WM_PT',
                   help='--stage wm: start from this trained world model (wm.pt) instead of random weights; inputs '
                        'it lacks (--wm.target_input) start at zero. --wm.steps counts the steps added')
    p.add_argument('--ckpt-every', type=int, default=0, help='checkpoint interval in steps (0 = about 1/20 of the stage)')
    p.add_argument('--demos', type=int, default=50, help='expert demonstrations per task (paper: N = 50, Tab. S.3)')
    p.add_argument('--snapshots', type=int, default=5, help='policy snapshots kept during fine-tuning (Fig. 3)')
    p.add_argument('--post-success-frames', type=int, default=16,
                   help='frames after a demo succeeds that still count as success examples for the classifier')
    p.add_argument('--env', choices=['desk', 'calvin'], default='desk', help='simulator for eval: the built-in desk '
                   'or the real calvin_env (installed separately)')
    for prefix, (cls, _) in config_classes().items():
        add_config_flags(p, prefix, cls)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate: every invalid flag fails here with argparse's usage message."""
    from env import TASKS
    p = make_parser()
    args = p.parse_args(argv)
    if args.stage in ('bc', 'reward', 'finetune', 'dppo', 'eval') and args.tasks is None:
        p.error(f'--stage {args.stage} needs --task (one or more of {", ".join(TASKS)}, or all)')
    if args.stage == 'report':      # the report's defaults: every task, three seeds (Table I)
        args.tasks, args.seeds = args.tasks or ['all'], args.seeds if args.seeds is not None else [0, 1, 2]
    args.tasks = args.tasks or ['open_drawer']
    args.seeds = args.seeds if args.seeds is not None else [args.seed]
    if args.tasks == ['all']:
        args.tasks = list(TASKS)
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        p.error(f'--tasks: unknown task(s) {", ".join(bad)}; choose from {", ".join(TASKS)} or all')
    for name in ('seed', 'ckpt_every', 'demos', 'post_success_frames', 'snapshots', 'threads'):
        if getattr(args, name) < 0:
            p.error(f'--{name.replace("_", "-")} must be >= 0, got {getattr(args, name)}')
    if args.demos == 0:
        p.error('--demos must be > 0')
    for key, value in vars(args).items():      # config flags: sizes and rates are never negative
        if '.' in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            p.error(f'--{key} must be >= 0, got {value}')
    classes = config_classes()
    bc_cfg = build_config(*classes['bc'], args.preset, args, 'bc')
    ft_cfg = build_config(*classes['ft'], args.preset, args, 'ft')
    if ft_cfg.K_ft > bc_cfg.K:
        p.error(f"--ft.K_ft {ft_cfg.K_ft} exceeds the number of denoising steps --bc.K {bc_cfg.K} (need K' <= K)")
    args.run = args.run or os.path.join('runs', args.preset)
    try:                                       # the run folder must be writable before hours of work start
        os.makedirs(args.run, exist_ok=True)
        probe = os.path.join(args.run, f'.write_test{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        p.error(f'--run {args.run}: cannot write there ({e.strerror})')
    if args.data and not os.path.isdir(args.data):
        p.error(f'--data {args.data}: no such folder')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = pick_device(args.device)
    tasks = args.tasks
    try:
        if args.stage == 'collect':
            stage_collect(args)
        elif args.stage == 'wm':
            stage_wm(args, device)
        elif args.stage == 'all':
            stage_all(args, device, tasks)
        elif args.stage == 'report':
            stage_report(args, device)
        for task in tasks if args.stage in ('bc', 'reward', 'finetune', 'dppo', 'eval') else []:
            if args.stage == 'reward':
                stage_reward(args, device, task)
            for seed in args.seeds if args.stage in ('bc', 'finetune', 'dppo', 'eval') else []:
                seed_args = with_seed(args, seed)
                if args.stage == 'bc':
                    stage_bc(seed_args, device, task)
                elif args.stage == 'finetune':
                    stage_finetune(seed_args, device, task, seed)
                elif args.stage == 'dppo':
                    stage_dppo(seed_args, device, task, seed)
                else:
                    import eval as E
                    E.evaluate_stage(seed_args, device, task)
    except KeyboardInterrupt:
        print('interrupted: re-run the same command to continue from the last checkpoint', file=sys.stderr)
        return 130
    except user_errors() as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
