"""DiWA end to end: the command line that runs every phase of Algorithm 1.

    python train.py --stage collect|wm                 # play data (data.py, §II); world model (world_model.py, §III.A)
    python train.py --stage bc|reward --task T         # policy (diffusion_policy.py, §III.B); reward (reward.py, §III.C)
    python train.py --stage finetune|dppo --task T     # DiWA in imagination / DPPO in the simulator (dream_ppo.py)
    python train.py --stage eval --task T              # success in the simulator (eval.py, §IV)
    python train.py --stage all --tasks all --seeds 0 1 2   # everything missing, skipping what is done
    torchrun --nproc_per_node N train.py --stage wm --run-dir R   # the world model on N processes (GPUs)

Hyperparameters: the dataclass config of the file that owns the stage (defaults = the paper's appendix tables),
shifted by a preset (`paper`, `cpu`, `test`), then by `--<prefix>.<field> value` flags (`--ft.alpha_bc 0.0`).
Run folder (default runs/<preset>/): data/, wm.pt, <task>/{bc_s<seed>,reward,diwa_s<seed>,dppo_s<seed>}.pt.
Checkpoints are plain dicts (data.save_checkpoint); their 'key' hashes the stage's config and the keys of the
checkpoints it was built from: a stage re-runs exactly when its key changed, and resumes when it was killed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import json
import math
import os
import re
import sys
import time
import tokenize

import numpy as np
import torch
from tqdm import tqdm

import data
import diffusion_policy as D
import dream_ppo as P
import env
import eval as E
import reward as R
import world_model as W


class StageError(RuntimeError):
    """A stage cannot go on (a NaN loss, a second writer, no data for a task). main() prints one line, exits 2."""


# ---- Configs -> argparse flags: each dataclass field's trailing comment (its paper citation) is its --help text.

CONFIGS = {'collect': (data.CollectConfig, data.PRESETS), 'wm': (W.WMConfig, W.PRESETS),
           'bc': (D.BCConfig, D.PRESETS), 'reward': (R.RewardConfig, R.PRESETS),
           'ft': (P.FinetuneConfig, P.PRESETS), 'eval': (E.EvalConfig, E.PRESETS)}


def field_comments(cls) -> dict:
    """{field name: trailing comment} read from the dataclass source."""
    out, line_field = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip('#').strip()
    return out


def _parse_value(kind, text):
    if kind is bool:
        if text.lower() in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
            return text.lower() in ('1', 'true', 'yes', 'on')
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
        group.add_argument(f'--{prefix}.{f.name}', dest=f'{prefix}.{f.name}', default=None,
                           metavar=type(default).__name__.upper(), type=lambda s, k=type(default): _parse_value(k, s),
                           help=f"{helps.get(f.name, '')} (paper: {default})".replace('%', '%%'))


def build_config(prefix: str, args: argparse.Namespace, stage: str = ''):
    """paper defaults <- preset overrides <- command-line flags; with `stage`, printed as it is in force."""
    cls, presets = CONFIGS[prefix]
    cfg = dataclasses.replace(cls(), **presets.get(args.preset, {}))
    cfg = dataclasses.replace(cfg, **{f.name: getattr(args, f'{prefix}.{f.name}') for f in dataclasses.fields(cls)
                                      if getattr(args, f'{prefix}.{f.name}', None) is not None})
    if stage:
        print(f'[{stage}] config: ' + ', '.join(f'{k}={v}' for k, v in dataclasses.asdict(cfg).items()))
    return cfg


# ---- The training loop of every learned stage: resume, atomic checkpoints, NaN guard, metrics.csv, progress bar.
# Stages differ only in what `step_fn` does (an update_* of their module).

def finished(stage: str, task: str | None, path: str, config: dict, upstream: list, force: bool = False,
             inherited: list | None = None) -> dict | None:
    """The checkpoint that train_loop would skip to (`path`, else an inherited one, finished with the same key), or
    None. Stages ask before their set-up (datasets, simulators), so that re-running finished work takes seconds."""
    if force:
        return None
    key = data.config_key(config, upstream)
    for p in [path] if os.path.isfile(path) else list(inherited or []):
        if os.path.isfile(p):
            ckpt = data.load_checkpoint(p, stage, task)
            if ckpt.get('key') == key and ckpt.get('done'):
                print(f'[{stage}] {p}: ' + (f'already done ({ckpt["step"]} steps, same settings)' if p == path
                                             else 'inherited (same settings)') + ': skipped')
                return ckpt
    return None


def _resume_point(stage, task, path, config, upstream, force, extendable, n_steps, upstream_names):
    """('fresh' | 'resume' | 'done', checkpoint or None) for the checkpoint at `path`, saying why it starts over."""
    if not os.path.isfile(path) or force:
        return 'fresh', None
    ckpt = data.load_checkpoint(path, stage, task)
    theirs, ours = data.seed_of(ckpt.get('upstream', [])), data.seed_of(upstream)
    if theirs != ours:          # a second seed must not overwrite the first one's checkpoint (seed_tag)
        raise StageError(f'{path} was trained with --seed {theirs}, this run has --seed {ours}: give it its '
                         f'own --run folder (or --force to replace it)')
    if ckpt.get('key') == data.config_key(config, upstream):
        return ('done' if ckpt.get('done') else 'resume'), ckpt
    if data.can_extend(ckpt, config, upstream, extendable, n_steps):
        print(f'[{stage}] {path}: extending, {data.describe_change(ckpt.get("config", {}), config)}')
        return 'resume', ckpt
    print(f'[{stage}] {path}: re-running, {data.rerun_reason(ckpt, config, upstream, upstream_names or {})}')
    return 'fresh', None


def train_loop(*, stage: str, task: str | None, path: str, config: dict, upstream: list, objects: dict,
               step_fn, n_steps: int, ckpt_every: int, force: bool = False, rng: np.random.Generator | None = None,
               generator: torch.Generator | None = None, extra: dict | None = None, log_every: int = 1,
               quiet: bool = False, snapshot_every: int = 0,
               inherited: list | None = None, extendable: tuple = (), upstream_names: dict | None = None) -> dict:
    """Run `step_fn(step) -> metrics` for steps [resume, n_steps) with checkpoints every `ckpt_every` steps.

    objects: {'model': nn.Module, 'optim': Optimizer, ...}: everything with state_dict()/load_state_dict() that
    defines the run's state, saved under the same names; rng / generator: the stage's own random streams, saved
    with torch's, so that a resumed run draws what an uninterrupted one would. Returns the final checkpoint dict.
    snapshot_every > 0 also keeps the model weights every that many steps in <path>_snapshots/step<N>.pt (Fig. 3).
    inherited: the same checkpoint in parent runs (--inherit). extendable: fields (e.g. 'steps') that may be raised
    on a checkpoint to go on from it (constant learning rate: 5000 + 5000 steps equal 10000 steps).
    upstream_names: {upstream key: what it is} for the message when a changed input makes `path` start over."""
    key = data.config_key(config, upstream)
    done = finished(stage, task, path, config, upstream, force, inherited)
    if done is not None:
        return done
    rank0 = data.is_rank0()                      # under torchrun, only rank 0 writes (all ranks read)
    with data.writer_lock(path, StageError) if rank0 else contextlib.nullcontext():   # a second writer stops here
        data.remove_stale_temps(path, os.path.splitext(path)[0] + '_snapshots')   # of dead processes only
        status, ckpt = _resume_point(stage, task, path, config, upstream, force, extendable, n_steps, upstream_names)
        if status == 'done':            # finished by another writer since finished() looked
            print(f'[{stage}] {path}: already done ({ckpt["step"]} steps, same settings): skipped')
            return ckpt
        start, wall0 = 0, 0.0
        if status == 'resume':
            for name, obj in objects.items():
                obj.load_state_dict(ckpt[name])
            torch.set_rng_state(ckpt['rng']['torch'])
            if rng is not None and 'numpy' in ckpt['rng']:
                rng.bit_generator.state = ckpt['rng']['numpy']
            if generator is not None and 'generator' in ckpt['rng']:
                generator.set_state(ckpt['rng']['generator'])
            start, wall0 = ckpt['step'], float(ckpt.get('wall_s', 0.0))
            print(f'[{stage}] {path}: resuming from step {start}/{n_steps}')
        log = data.MetricsLog(os.path.splitext(path)[0] + '_metrics.csv' if rank0 else None, resume_step=start)
        meta = {'stage': stage, 'task': task, 'key': key, 'config': config, 'extra': extra or {}}
        t0 = time.time()

        def save(step: int, metrics: dict, done: bool) -> dict:
            out = {**meta, 'step': step, 'done': done, 'wall_s': wall0 + time.time() - t0,
                   'upstream': list(upstream), 'metrics': metrics,
                   'rng': {'torch': torch.get_rng_state(), **({'numpy': rng.bit_generator.state} if rng else {}),
                           **({'generator': generator.get_state()} if generator is not None else {})},
                   **{name: obj.state_dict() for name, obj in objects.items()}}
            if rank0:
                log.flush()      # rows first: a kill between the two leaves rows past the checkpoint, which resume drops
                data.save_checkpoint(out, path)
            return out

        metrics = (ckpt or {}).get('metrics', {}) if start >= n_steps else {}
        bar = tqdm(range(start, n_steps), desc=f'{stage}{"/" + task if task else ""}', initial=start,
                   total=n_steps, mininterval=2.0, dynamic_ncols=True, disable=quiet or not rank0)
        for step in bar:
            metrics = step_fn(step)
            data.check_finite(stage, step + 1, metrics, path, StageError)
            if (step + 1) % log_every == 0 or step + 1 == n_steps:
                log.log(step + 1, {**metrics, 'time': round(time.time() - t0, 2)})
            if 'loss' in metrics:
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
            if snapshot_every and (step + 1) % snapshot_every == 0 and rank0:
                data.save_checkpoint({**meta, 'step': step + 1, 'model': objects['model'].state_dict()},
                                     os.path.join(os.path.splitext(path)[0] + '_snapshots', f'step{step + 1}.pt'))
            if (step + 1) % ckpt_every == 0 and step + 1 < n_steps:
                save(step + 1, metrics, done=False)
        return save(max(start, n_steps), metrics, done=True)


# ---- The run folder. A variant run reads what it lacks from its parents: `--run runs/cpu/alpha0 --inherit
# runs/cpu --ft.alpha_bc 0` fine-tunes the parent's policy and writes only diwa_s0.pt (and results.csv) there.

def find(args, *parts) -> str:
    """Path of a file of this run, or of the first parent run that has it."""
    for root in [args.run] + list(args.inherit or []):
        if os.path.exists(os.path.join(root, *parts)):
            return os.path.join(root, *parts)
    return os.path.join(args.run, *parts)


def out_path(args, *parts) -> dict:
    """train_loop's path= and inherited= for a checkpoint this stage writes."""
    return {'path': os.path.join(args.run, *parts), 'inherited': [os.path.join(r, *parts) for r in args.inherit or []]}


def data_root(args) -> str:
    return args.data or find(args, 'data')


def split_of(args, name: str, image_size: int) -> dict:
    return data.load_split(os.path.join(data_root(args), name), image_size)


def seed_tag(args) -> list:
    """--seed in the key of wm.pt / reward.pt: train_loop refuses to overwrite a checkpoint of another seed."""
    return [f'seed={args.seed}']


def bc_file(seed: int) -> str:
    """<task>/<this>: BC seed `seed` (its own 50 demos and weights), the start and the base of fine-tuning seed S."""
    return f'bc_s{seed}.pt'


def with_seed(args, seed: int) -> argparse.Namespace:     # --seeds runs a stage once per seed
    return argparse.Namespace(**{**vars(args), 'seed': seed})


def load_world_model(args, device):
    return W.load(find(args, 'wm.pt'), device)


def load_bc_policy(args, task: str, seed: int, feat_dim: int, device):
    """pi_pre of BC seed `seed` (this run's or a parent's) -> (policy, ckpt)."""
    path = find(args, task, bc_file(seed))
    if not os.path.isfile(path):
        old = ' (bc.pt there was written by an older version of diwa)' if os.path.isfile(find(args, task, 'bc.pt')) else ''
        raise StageError(f'{path}: no BC policy of seed {seed}{old}; run --stage bc --task {task} --seed {seed}')
    return D.load(path, task, feat_dim, device)


# ---- Stages. Each one: build its config, load what it consumes (checked), run the shared loop.

def stage_collect(args) -> None:
    """Play data on the built-in desk (--env calvin: in calvin_env), in CALVIN's layout (data.py, paper §II, S.3)."""
    cfg = build_config('collect', args, 'collect')
    if args.data:
        raise StageError('--data: collect records play data into the run folder; a CALVIN dataset given with --data '
                         'needs no collect')
    data.collect(cfg, data_root(args), env_kind=args.env)


def _warm_start(args, wm) -> list:
    """Loads --wm-init's weights; -> its 'init=<key>' upstream entry, kept by later commands that do not name it."""
    if args.wm_init:
        src = data.load_checkpoint(args.wm_init, 'wm')
        try:
            grown = W.warm_start(wm, src['model'])
        except ValueError as e:
            raise StageError(f'--wm-init {args.wm_init}: {e}') from None
        print(f"[wm] warm start from {args.wm_init} (step {src['step']}); new inputs start at zero in: {grown or 'none'}")
        return [f"init={src['key']}"]
    path = find(args, 'wm.pt')
    try:
        upstream = [] if args.force or not os.path.isfile(path) else data.load_checkpoint(path, 'wm').get('upstream', [])
    except data.DataError:        # unreadable: train_loop says so (or --force replaces it)
        upstream = []
    return [u for u in upstream if str(u).startswith('init=')]


def stage_wm(args, device) -> dict:
    """World model on play frames only: Eq. 10-11, Table S.2 (world_model.py, paper §III.A)."""
    cfg = build_config('wm', args, 'wm')
    train = split_of(args, 'training', cfg.image_size)
    wm = W.WorldModel(cfg).to(device)
    ddp, world = W.data_parallel(wm, device), wm.shard[1]             # under torchrun: DDP, else None and 1
    upstream = [data.dataset_key(data_root(args))] + seed_tag(args) + _warm_start(args, wm) + \
        ([f'world_size={world}'] if world > 1 else [])
    print(f'[wm] {world} process(es) x batch {cfg.batch} = global batch {world * cfg.batch}')
    opt = W.make_optimizer(wm, cfg)
    rng = np.random.default_rng(args.seed)     # the same in every process: each loads its share of one global batch

    def step_fn(step):
        batch = data.sample_sequences(train, cfg.batch, cfg.seq_len, rng, cfg.event_frac, shard=wm.shard)
        return W.update_wm(wm, opt, data.to_torch(batch, device), ddp)

    return train_loop(stage='wm', task=None, **out_path(args, 'wm.pt'), config=dataclasses.asdict(cfg),
                      extra={'world_size': world, 'global_batch': world * cfg.batch},
                      upstream=upstream, objects={'model': wm, 'optim': opt}, step_fn=step_fn,
                      n_steps=cfg.steps, ckpt_every=args.ckpt_every or max(1, cfg.steps // 20), force=args.force,
                      rng=rng, log_every=max(1, cfg.steps // 500), extendable=('steps',))   # constant lr (Tab. S.2)


def demo_latents(args, wm, wm_ckpt, task: str, device, split_name: str = 'training') -> dict:
    """diffusion_policy.demo_latents of the task's expert windows (BC seed --seed draws them), cached in
    <run>/<task>/latents_<split>_s<seed>.pt, keyed by the world model and the dataset."""
    path = os.path.join(args.run, task, f'latents_{split_name}_s{args.seed}.pt')
    key = data.config_key({'task': task, 'demos': args.demos, 'seed': args.seed, 'post': args.post_success_frames,
                      'split': split_name}, [wm_ckpt['key'], data.dataset_key(data_root(args))])
    for cache in dict.fromkeys([path, find(args, task, os.path.basename(path))]):     # ours, else a parent's
        if os.path.isfile(cache):
            cached = torch.load(cache, weights_only=True)
            if cached.get('key') == key:
                return cached
    split = split_of(args, split_name, wm.cfg.image_size)
    n = args.demos if split_name == 'training' else 10 ** 9
    out = {'key': key, **D.demo_latents(wm, split, task, n, args.seed, args.post_success_frames, device)}
    data.save_checkpoint(out, path)
    return out


def stage_bc(args, device, task: str) -> dict:
    """Pre-train the diffusion policy on the task's 50 demos in latent space: Eq. 12, Table S.3 (§III.B).
    --seed draws the demos and the initial weights; each seed writes its own file (bc_file)."""
    cfg = build_config('bc', args, 'bc')
    data.seed_everything(args.seed)       # initial weights and noise: the same in any process, after any other stage
    wm, wm_ckpt = load_world_model(args, device)
    demos = demo_latents(args, wm, wm_ckpt, task, device)
    sel = demos['in_window']                                             # frames s..e of each window
    b_cond, b_x0 = demos['feat'][sel].to(device), demos['chunks'][sel].to(device)     # (N, F), (N, Ta, 7)
    N, steps_per_epoch = len(b_cond), max(1, math.ceil(len(b_cond) / cfg.batch))
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
                      generator=gen, extra={'cond_dim': wm.feat_dim}, log_every=max(1, n_steps // 500))


def stage_reward(args, device, task: str) -> dict:
    """Latent success classifier C_psi: NT-Xent + cross-entropy, Eq. 13-14, Table S.4 (§III.C)."""
    cfg = build_config('reward', args, 'reward')
    data.seed_everything(args.seed)       # initial weights and imagined latents: the same in any process, any order
    wm, wm_ckpt = load_world_model(args, device)
    where = out_path(args, task, 'reward.pt')
    upstream = [wm_ckpt['key'], args.demos, args.post_success_frames] + seed_tag(args)
    done = finished('reward', task, config=dataclasses.asdict(cfg), upstream=upstream, force=args.force, **where)
    if done is not None:
        return done
    b_feat, b_start, b_label = R.reward_dataset(
        wm, demo_latents(args, wm, wm_ckpt, task, device), split_of(args, 'training', wm.cfg.image_size), task, device,
        args.post_success_frames, seed=args.seed, imagined=cfg.imagined_samples if cfg.imagined else 0,
        margin=cfg.neg_margin, play_frac=cfg.play_frac, drop_relapses=cfg.drop_relapses, relative=cfg.start_conditioned)
    pos, neg = torch.nonzero(b_label == 1)[:, 0], torch.nonzero(b_label == 0)[:, 0]
    if len(pos) == 0 or len(neg) == 0:
        raise StageError(f'reward/{task}: {len(pos)} positive and {len(neg)} negative frames; need both')
    print(f'[reward/{task}] {len(pos)} success frames, {len(neg)} non-success frames')
    clf = R.RewardClassifier(wm.feat_dim, cfg).to(device)
    opt = R.make_optimizer(clf, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    n_steps = cfg.epochs * max(1, math.ceil(2 * max(len(pos), len(neg)) / cfg.batch))

    def step_fn(step):  # class-balanced minibatch: half success, half not
        half = cfg.batch // 2
        idx = torch.cat([pos[torch.randint(0, len(pos), (half,), generator=gen)],
                         neg[torch.randint(0, len(neg), (cfg.batch - half,), generator=gen)]])
        return R.update_reward(clf, opt, b_feat[idx].to(device), b_label[idx].to(device),
                               b_start[idx].to(device) if clf.relative else None)

    return train_loop(stage='reward', task=task, **where, config=dataclasses.asdict(cfg), upstream=upstream,
                      objects={'model': clf, 'optim': opt}, step_fn=step_fn, n_steps=n_steps,
                      ckpt_every=args.ckpt_every or max(1, n_steps // 10), force=args.force, generator=gen,
                      extra={'feat_dim': wm.feat_dim}, log_every=max(1, n_steps // 500))


def fine_tuning_step(args, wm, policy_pre, actor, critic, clf, opts, scaler, counters, gen, task, cfg, seed,
                     device, simulator: bool):
    """(iteration -> metrics, close): DiWA's in imagination, or with simulator=True DPPO's in the built-in desk."""
    if simulator:
        rng = np.random.default_rng(seed)
        starts = E.window_starts(split_of(args, 'validation', wm.cfg.image_size), task, 256, seed) \
            if args.env == 'calvin' else None      # CALVIN's own states, as the evaluation's
        sims = env.make_vec_env(args.env, cfg.n_envs, workers=cfg.sim_workers, seed=seed, image_size=wm.cfg.image_size)
        return (lambda it: P.dppo_iteration(sims, wm, policy_pre, actor, critic, opts, scaler, task, cfg, counters,
                                            rng, gen, device, starts)), sims.close
    pool = P.start_pool(wm, split_of(args, 'training', wm.cfg.image_size), task, device, seed=seed, where=cfg.start_states)
    return (lambda it: P.iteration(wm, policy_pre, actor, critic, clf, opts, scaler, pool, task, cfg, counters,
                                   gen)), (lambda: None)


def stage_finetune(args, device, task: str, seed: int, simulator: bool = False) -> dict:
    """DiWA (Alg. 1): PPO on the diffusion policy inside the frozen world model, reward from the classifier,
    0 simulator steps. With simulator=True: the DPPO baseline, the same update driven by the built-in desk.
    Seed `seed` fine-tunes BC seed `seed`'s policy (bc_file) and writes diwa_s<seed>.pt / dppo_s<seed>.pt."""
    stage = 'dppo' if simulator else 'finetune'
    cfg = build_config('ft', args, stage)
    data.seed_everything(seed)
    wm, wm_ckpt = load_world_model(args, device)
    policy_pre, bc_ckpt = load_bc_policy(args, task, seed, wm.feat_dim, device)     # BC seed `seed`
    actor, critic = P.make_actor(policy_pre), P.make_critic(wm.feat_dim, cfg).to(device)
    opts, scaler, counters = P.make_optimizers(actor, critic, cfg), P.RunningRewardScaler(cfg.gamma), P.new_counters()
    gen = torch.Generator(device=device).manual_seed(seed)
    upstream, clf = [wm_ckpt['key'], bc_ckpt['key']], None
    if not simulator and cfg.reward == 'decoder':     # Fig. 2: the task's test on scene states decoded by a hybrid WM
        try:
            clf = R.DecodedStateReward(wm, task)
        except ValueError as e:
            raise StageError(f"{find(args, 'wm.pt')}: {e}") from None
    elif not simulator:                                 # §III.C: the latent success classifier
        clf, rw_ckpt = R.load(find(args, task, 'reward.pt'), task, wm.feat_dim, device)
        upstream.append(rw_ckpt['key'])
    path = os.path.join(args.run, task, f"{'dppo' if simulator else 'diwa'}_s{seed}.pt")
    ckpt = finished(stage, task, path, dataclasses.asdict(cfg), upstream + [seed], args.force)
    if ckpt is None:                                    # not done yet: start pool or simulators, then train
        step, close = fine_tuning_step(args, wm, policy_pre, actor, critic, clf, opts, scaler, counters, gen,
                                       task, cfg, seed, device, simulator)
        try:
            ckpt = train_loop(stage=stage, task=task, path=path, config=dataclasses.asdict(cfg),
                              upstream=upstream + [seed],
                              objects={'model': actor, 'critic': critic, 'optim_actor': opts['actor'],
                                       'optim_critic': opts['critic'], 'scaler': scaler,
                                       'state': P.StateBox(counters, gen)},
                              step_fn=step, n_steps=cfg.iterations,
                              ckpt_every=args.ckpt_every or max(1, cfg.iterations // 10), force=args.force,
                              extra={'cond_dim': wm.feat_dim, 'bc_config': bc_ckpt['config'],
                                     'alpha_bc': P.alpha_bc_for(task, cfg)},
                              upstream_names={bc_ckpt['key']: f'BC policy ({bc_file(seed)})'},
                              snapshot_every=max(1, cfg.iterations // args.snapshots) if args.snapshots else 0)
        finally:
            close()
    state = ckpt['state']['counters']
    print(f"[{stage}/{task}] seed {seed}: {state.get('iteration')} iterations, {state.get('imagined_steps')} imagined "
          f"steps, {state.get('sim_steps')} simulator steps")
    return ckpt


def evaluate(args, device, task: str, policies=None, snapshots: bool = False) -> list:
    """`--stage eval`: success in the simulator of the run's policies for one task and seed (eval.py, §IV)."""
    cfg = build_config('eval', args)
    wm, _ = load_world_model(args, device)
    policy_pre, bc_ckpt = load_bc_policy(args, task, args.seed, wm.feat_dim, device)
    finetuned = {k: os.path.join(args.run, task, f'{k}_s{args.seed}.pt') for k in ('diwa', 'dppo')}
    candidates = E.candidates(bc_ckpt, policy_pre, task, finetuned, policies, snapshots)
    known = [os.path.join(r, 'results.csv') for r in [args.run] + list(args.inherit or [])]
    starts = E.window_starts(split_of(args, 'validation', wm.cfg.image_size), task, cfg.episodes, args.seed) \
        if args.env == 'calvin' else None          # CALVIN's own states; the desk samples its own (eval.task_starts)
    if starts:
        distinct = len({r.tobytes() + s.tobytes() for r, s in starts})
        print(f'[eval] {task}: {distinct} distinct CALVIN start states for {len(starts)} episodes')
    return E.evaluate(candidates, policy_pre, task, args.seed, cfg, wm, device, known, args.preset, args.env, starts)


def stage_all(args, device, tasks: list) -> None:
    """Everything missing, in Algorithm 1's order: a stage whose checkpoint is done with the same key skips itself.
    The wall-clock of each stage is printed at the end and kept in <run>/stage_times.json (bench.py main)."""
    times = {}                                  # stage -> seconds, over its tasks and seeds
    def timed(name, fn, *fn_args):
        t0 = time.time()
        fn(*fn_args)
        times[name] = times.get(name, 0.0) + time.time() - t0

    if not args.data:           # with --data the user brings the dataset (e.g. real CALVIN)
        timed('collect', stage_collect, args)        # resumable: finished episodes are kept
    timed('wm', stage_wm, args, device)
    for task in tasks:
        for seed in args.seeds:                 # one BC policy per seed (bc_file)
            timed('bc', stage_bc, with_seed(args, seed), device, task)
        timed('reward', stage_reward, args, device, task)        # one classifier per task (--seed)
        for seed in args.seeds:
            timed('finetune', stage_finetune, with_seed(args, seed), device, task, seed)
            timed('eval', evaluate, with_seed(args, seed), device, task)
    times['total'] = sum(times.values())
    print('[all] wall-clock: ' + ', '.join(f'{name} {t / 60:.1f} min' for name, t in times.items()))
    blob = json.dumps({'seconds': times, 'command': args.command}).encode()
    data.atomic_write(os.path.join(args.run, 'stage_times.json'), lambda fh: fh.write(blob))


# ---- Command line

STAGES = ['collect', 'wm', 'bc', 'reward', 'finetune', 'dppo', 'eval', 'all']
TASK_STAGES = ('bc', 'reward', 'finetune', 'dppo', 'eval')


USER_ERRORS = (StageError, data.DataError, OSError)     # the user's to fix: printed as one line, exit code 2


def make_parser(stage: bool = True) -> argparse.ArgumentParser:
    """The flags of every stage; report.py builds on it with stage=False."""
    p = argparse.ArgumentParser(description='DiWA: diffusion policy adaptation with world models (CoRL 2025)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if stage:
        p.add_argument('--stage', choices=STAGES, required=True, help='phase of Algorithm 1 to run')
    p.add_argument('--preset', choices=['paper', 'cpu', 'test'], default='cpu', help='paper (GPU), cpu, test (seconds)')
    p.add_argument('--run', '--run-dir', dest='run', default=None, help='run folder (default runs/<preset>; '
                   'under torchrun write --run-dir: torchrun takes --run for its own --run-path)')
    p.add_argument('--inherit', nargs='+', default=[], metavar='RUN', help='parent run folder(s): checkpoints this '
                   'run lacks are read there; a finished parent checkpoint with the same settings is used as it is')
    p.add_argument('--data', default=None, help='dataset root in CALVIN layout (default <run>/data; or real CALVIN)')
    p.add_argument('--tasks', '--task', dest='tasks', nargs='+', default=None,
                   help="task(s) for bc/reward/finetune/dppo/eval/all ('all' = the 8; --stage all: open_drawer)")
    p.add_argument('--seed', type=int, default=0, help='seeds Python, NumPy, torch and the simulator')
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help='seeds for bc (one policy each), finetune, dppo, eval and all (default: --seed)')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if present), 'cpu' or 'cuda'")
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = torch default)')
    p.add_argument('--force', action='store_true', help='re-run stages even if their outputs are up to date')
    p.add_argument('--wm-init', default=None, metavar='WM_PT', help='--stage wm: start from this world model (wm.pt); '
                   'inputs it lacks (--wm.target_input) start at zero. --wm.steps counts the steps added')
    p.add_argument('--ckpt-every', type=int, default=0, help='checkpoint interval in steps (0 = about 1/20 of the stage)')
    p.add_argument('--demos', type=int, default=50, help='expert demonstrations per task (paper: N = 50, Tab. S.3)')
    p.add_argument('--snapshots', type=int, default=5, help='policy snapshots kept during fine-tuning (Fig. 3)')
    p.add_argument('--post-success-frames', type=int, default=16,
                   help='frames after a demo succeeds that still count as success examples for the classifier')
    p.add_argument('--env', choices=['desk', 'calvin'], default='desk',
                   help='collect / eval / dppo: the built-in desk or the real calvin_env (scene D)')
    p.add_argument('--policies', nargs='+', default=None, help='--stage eval: only these (base, diwa, dppo)')
    p.add_argument('--eval-snapshots', action='store_true', help="--stage eval: also the weights kept along "
                   "fine-tuning and DPPO ('diwa@<step>', 'dppo@<step>' in results.csv: Fig. 3, Fig. S.5)")
    for prefix, (cls, _) in CONFIGS.items():
        add_config_flags(p, prefix, cls)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validate: every invalid flag fails here with argparse's usage message, before any work starts."""
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and args.stage != 'wm':
        p.error(f'--stage {args.stage} runs in one process: only --stage wm runs under torchrun')
    args.tasks = list(env.TASKS) if args.tasks == ['all'] else (args.tasks or ['open_drawer'])
    args.seeds = args.seeds if args.seeds is not None else [args.seed]
    bad = [t for t in args.tasks if t not in env.TASKS]
    if bad:
        p.error(f'--tasks: unknown task(s) {", ".join(bad)}; choose from {", ".join(env.TASKS)} or all')
    for key, value in vars(args).items():      # counts, sizes and rates are never negative
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            p.error(f'--{key if "." in key else key.replace("_", "-")} must be >= 0, got {value}')
    K, ft, sampler = build_config('bc', args).K, build_config('ft', args), build_config('eval', args).sampler
    try:                                       # the settings' own checks (dream_ppo.check_config), before any work
        assert args.demos > 0, '--demos must be > 0'
        assert ft.K_ft <= K, f"--ft.K_ft {ft.K_ft} exceeds the number of denoising steps --bc.K {K} (need K' <= K)"
        assert sampler in D.SAMPLERS, f'--eval.sampler must be one of {D.SAMPLERS}, got {sampler!r}'
        P.check_config(ft)
    except AssertionError as e:
        p.error(str(e))
    args.run = args.run or os.path.join('runs', args.preset)
    try:                                       # the run folder must be writable before hours of work start
        os.makedirs(args.run, exist_ok=True)
        open(probe := os.path.join(args.run, f'.write_test{os.getpid()}'), 'w').close()
        os.remove(probe)
    except OSError as e:
        p.error(f'--run {args.run}: cannot write there ({e.strerror})')
    if args.data and not os.path.isdir(args.data):
        p.error(f'--data {args.data}: no such folder')
    if args.env == 'calvin' and importlib.util.find_spec('calvin_env') is None:
        p.error('--env calvin needs the real CALVIN simulator, calvin_env (README, "The real CALVIN")')
    return args


def run_stage(args, device) -> None:       # --seeds: the bc / finetune / dppo / eval stages once per seed
    if args.stage == 'collect':
        stage_collect(args)
    elif args.stage == 'wm':
        stage_wm(args, device)
    elif args.stage == 'all':
        stage_all(args, device, args.tasks)
    for task in args.tasks if args.stage in TASK_STAGES else []:
        if args.stage == 'reward':
            stage_reward(args, device, task)
            continue
        for seed in args.seeds:
            if args.stage == 'bc':
                stage_bc(with_seed(args, seed), device, task)
            elif args.stage in ('finetune', 'dppo'):
                stage_finetune(with_seed(args, seed), device, task, seed, simulator=args.stage == 'dppo')
            else:
                evaluate(with_seed(args, seed), device, task, args.policies, args.eval_snapshots)


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser()
    args = p.parse_args(argv)
    args.command = ' '.join(sys.argv[1:] if argv is None else argv)        # kept with --stage all's timings
    if args.stage in TASK_STAGES and args.tasks is None:
        p.error(f'--stage {args.stage} needs --task (one or more of {", ".join(env.TASKS)}, or all)')
    return check_args(p, args)


def guarded(fn, *args) -> int:
    """fn(*args) as a command's exit status: 0 done, 130 on Ctrl-C (the same command resumes), 2 with one line
    for the user's errors (a missing file, a bad dataset, a NaN loss)."""
    try:
        fn(*args)
    except KeyboardInterrupt:
        print('interrupted: re-run the same command to continue from the last checkpoint', file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout = open(os.devnull, 'w') if int(os.environ.get('RANK', '0')) > 0 else sys.stdout   # torchrun: rank 0 prints
    if args.threads:
        torch.set_num_threads(args.threads)
    data.seed_everything(args.seed)
    return guarded(run_stage, args, data.pick_device(args.device))


if __name__ == '__main__':
    sys.exit(main())
