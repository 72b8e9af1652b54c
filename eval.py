"""Evaluation in the simulator: paper §IV (Table I, Fig. 2, Fig. 3), S.5-S.7.

Every claim of the project is a success rate measured here, in the built-in desk (or the real CALVIN
simulator with --env calvin), never in the world model:

    for each episode (task-specific start state where the task is possible, same states for every policy):
        x_0 = reset(start)                      -> z_0 = posterior(h_0, x_0)        (world_model.obs_step)
        repeat 18 times (72 control steps):     chunk a_t..a_{t+3} = policy(z_t), deterministic denoising
            execute each action (gripper thresholded at 0, S.3.1), update the posterior with every frame,
            stop at the simulator's success test (REFERENCE §2)

    python eval.py --task open_drawer --policy base diwa --episodes 100 --seed 0
    python eval.py --task open_drawer --scripted            # the scripted skills through the same loop
    python eval.py --task open_drawer --env calvin          # the real calvin_env, if installed

Rows are appended to <run>/results.csv: one row per (task, policy, seed) with successes and a 95% interval.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EvalConfig:
    episodes: int = 100        # episodes per task and seed (§IV)
    max_decisions: int = 18    # policy decisions per episode: 18 chunks x Ta=4 = 72 control steps (REFERENCE §2)
    envs: int = 20             # desks stepped in parallel per batch of episodes
    workers: int = 2           # simulator processes (0 = in this process)


PRESETS = {'paper': {}, 'cpu': {}, 'test': {'episodes': 4, 'envs': 4, 'workers': 0}}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate k/n (good also near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def task_starts(task: str, n: int, seed: int) -> list:
    """n start states (robot_obs, scene_obs) where `task` is possible; the same for every policy at a seed,
    so base and fine-tuned policies are compared on identical episodes."""
    import env
    rng = np.random.default_rng([seed, env.TASKS.index(task), 1234])
    return [env.sample_task_start(task, rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# Agents: map (control step, observations, latent features) -> actions (B, 7) for the active desks.
# ----------------------------------------------------------------------------------------------------

class ChunkAgent:
    """Any policy that outputs action chunks from latents (diffusion or Gaussian): one decision every Ta steps."""

    def __init__(self, policy, Ta: int = 4, deterministic: bool = True, generator=None):
        self.policy, self.Ta, self.deterministic, self.generator = policy, Ta, deterministic, generator
        self.chunk = None

    @torch.no_grad()
    def __call__(self, t: int, obs: list, feat: torch.Tensor) -> np.ndarray:
        if t % self.Ta == 0:   # new decision: denoise a fresh chunk from z_t
            chain = self.policy.sample(feat, deterministic=self.deterministic, generator=self.generator)
            self.chunk = chain[:, -1].float().cpu().numpy()            # (B, Tp, 7)
        return self.chunk[:, t % self.Ta]


class ScriptedAgent:
    """The scripted skills (env.ScriptedSkill) driven through the same loop: a check of the loop itself."""

    def __init__(self, task: str, n: int, seed: int):
        import env
        rng = np.random.default_rng(seed)
        self.skills = [env.ScriptedSkill(task, rng) for _ in range(n)]

    def __call__(self, t: int, obs: list, feat) -> np.ndarray:
        return np.stack([s.act(o) if o is not None else np.zeros(7) for s, o in zip(self.skills, obs)])


@torch.no_grad()
def run_episodes(make_agent, task: str, starts: list, cfg: EvalConfig, wm=None, device='cpu',
                 image_size: int = 64, seed: int = 0, env_kind: str = 'desk') -> dict:
    """Run one episode from each start state; returns {'success': (n,) bool, 'steps': (n,) int, 'sim_steps'}.

    make_agent(B) -> agent(t, obs_list, feat (B, F) or None) -> actions (B, 7). With a world model, the
    posterior is filtered from every real frame: s_0 = q(h_0, x_0), s_{t+1} = q(f(s_t, a_t), x_{t+1}).
    """
    import data
    import env
    n, T = len(starts), cfg.max_decisions * 4
    success, steps = np.zeros(n, bool), np.full(n, T)
    sim_steps = 0
    venv = env.make_vec_env(env_kind, min(cfg.envs, n), workers=cfg.workers, seed=seed, image_size=image_size)
    try:
        for lo in range(0, n, venv.n):                  # batches of episodes on the same desks
            batch = starts[lo:lo + venv.n]
            B = len(batch)
            obs = venv.reset(batch, ids=range(B))
            start_info = [{'robot_obs': o['robot_obs'].copy(), 'scene_obs': o['scene_obs'].copy()} for o in obs]
            agent = make_agent(B)
            active = np.zeros(venv.n, bool)
            active[:B] = True
            state, feat = None, None
            prev_action = torch.zeros(B, 7, device=device)
            last_obs = list(obs)
            for t in range(T):
                if wm is not None:   # posterior filter over the newest real frame of every desk
                    x = data.preprocess_obs(last_obs, image_size=wm.cfg.image_size, device=device)
                    state = wm.initial(B) if state is None else state
                    state, _ = wm.obs_step(state, prev_action, x, sample=False)   # mode, as featurize
                    feat = wm.feature(state)
                actions = np.clip(np.asarray(agent(t, [o if a else None for o, a in zip(last_obs, active)], feat),
                                             dtype=np.float64), -1, 1)
                actions[:, 6] = np.where(actions[:, 6] >= 0, 1.0, -1.0)     # S.3.1: gripper thresholded at 0
                padded = np.zeros((venv.n, 7))
                padded[:B] = actions
                obs = venv.step(padded, active)
                sim_steps += int(active.sum())
                for i in np.nonzero(active)[0]:
                    last_obs[i] = obs[i]
                    if env.task_success(task, start_info[i], {'scene_obs': obs[i]['scene_obs'],
                                                              'robot_obs': obs[i]['robot_obs']}):
                        success[lo + i], steps[lo + i], active[i] = True, t + 1, False
                prev_action = torch.as_tensor(actions, dtype=torch.float32, device=device)
                if not active.any():
                    break
    finally:
        venv.close()
    return {'success': success, 'steps': steps, 'sim_steps': sim_steps}


# ----------------------------------------------------------------------------------------------------
# Results: one csv row per (task, policy, seed); results.md and figures are built from these rows.
# ----------------------------------------------------------------------------------------------------

RESULT_FIELDS = ['task', 'policy', 'seed', 'episodes', 'successes', 'success', 'ci_low', 'ci_high',
                 'mean_steps', 'sim_steps_finetune', 'preset', 'env', 'ckpt_key', 'commit', 'wall_s']


def git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def read_results(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as fh:
        return list(csv.DictReader(fh))


def write_result(path: str, row: dict) -> None:
    """Replace the row of the same (task, policy, seed, env) or append it; atomic rewrite of the file, under a
    lock so that evaluations of several tasks running at once do not lose each other's rows."""
    import fcntl
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in read_results(path)
                if (r['task'], r['policy'], str(r['seed']), r.get('env', 'desk')) !=
                (row['task'], row['policy'], str(row['seed']), row.get('env', 'desk'))]
        rows.append({k: row.get(k, '') for k in RESULT_FIELDS})
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w', newline='') as fh:
            w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)


def summarize(task: str, policy: str, seed: int, out: dict, t0: float, **extra) -> dict:
    k, n = int(out['success'].sum()), len(out['success'])
    lo, hi = wilson_interval(k, n)
    row = {'task': task, 'policy': policy, 'seed': seed, 'episodes': n, 'successes': k,
           'success': round(k / max(n, 1), 4), 'ci_low': round(lo, 4), 'ci_high': round(hi, 4),
           'mean_steps': round(float(out['steps'].mean()), 1), 'commit': git_commit(),
           'wall_s': round(time.time() - t0, 1), **extra}
    print(f"[eval] {task:>18s} {policy:>10s} seed {seed}: {k}/{n} = {100 * k / max(n, 1):5.1f}% "
          f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}), {row['wall_s']} s")
    return row


# ----------------------------------------------------------------------------------------------------
# Evaluating the checkpoints of a run
# ----------------------------------------------------------------------------------------------------

def policy_agent_factory(policy_pre, actor=None, K_ft: int = 0, Ta: int = 4, seed: int = 0):
    """make_agent(B) for a pre-trained policy, or for DiWA's pair (frozen first K-K' steps, fine-tuned last K')."""
    import dream_ppo as P
    gen = torch.Generator(device=next(policy_pre.parameters()).device).manual_seed(seed)
    K_ft = min(K_ft, P.policy_K(policy_pre))      # the Gaussian policy (S.5.3) has a single 'denoising' step

    class _Pair(torch.nn.Module):  # sample() of the pair = the fine-tuned policy that DiWA deploys
        def sample(self, feat, deterministic=True, generator=None):
            return policy_pre.sample(feat, deterministic=deterministic, ft_policy=actor, K_ft=K_ft if actor else 0,
                                     generator=generator)
    return lambda B: ChunkAgent(_Pair(), Ta=Ta, deterministic=True, generator=gen)


def already_done(results_paths: list, task: str, policy: str, seed: int, key: str, episodes: int, env_kind: str) -> bool:
    """Whether results.csv of this run (or of a run it inherits from) has this evaluation already."""
    return any(r['task'] == task and r['policy'] == policy and str(r['seed']) == str(seed) and r['ckpt_key'] == key
               and int(r['episodes']) == episodes and r.get('env', 'desk') == env_kind
               for path in results_paths for r in read_results(path))


def evaluate_checkpoints(args, device, task: str, cfg: EvalConfig, env_kind: str = 'desk', policies=None,
                         snapshots: bool = False) -> list:
    """Evaluate, for one task and seed, every finished policy checkpoint of the run (base = the seed's own BC
    policy, bc.pt or bc_s<seed>.pt (train.bc_file), diwa = diwa_s<seed>.pt, dppo = dppo_s<seed>.pt, ...) that has
    no up-to-date row in results.csv yet (policies: only these names); a fine-tuned one made from another BC
    policy (e.g. from bc.pt, before each seed had its own) is left out until it is fine-tuned again.
    snapshots=True adds the weights kept during fine-tuning (diwa_s<seed>_snapshots/step<N>.pt)
    as policies 'diwa@<N>', real success along fine-tuning (Fig. 3), and those kept along DPPO as 'dppo@<N>',
    with the simulator steps DPPO had taken by then (Table I: steps to match DiWA, evaluated alike)."""
    import train as TR
    wm, wm_ckpt = TR.load_world_model(args, device)
    results_path = os.path.join(args.run, 'results.csv')
    known = [results_path] + [os.path.join(r, 'results.csv') for r in getattr(args, 'inherit', None) or []]
    policy_pre, bc_ckpt = TR.load_bc_policy(args, task, args.seed, wm.feat_dim, device)
    candidates = {'base': (bc_ckpt, None, 0)}
    for name, ckpt_path in TR.finetuned_checkpoints(args, task, args.seed).items():
        ck = TR.load_checkpoint(ckpt_path, ckpt_path_stage(name), task)
        if ck.get('done') and not TR.fine_tuned_from(ck, bc_ckpt):
            print(f'[eval] {ckpt_path}: fine-tuned from another BC policy than {TR.bc_file(args.seed)}: not '
                  f'evaluated (run --stage {ckpt_path_stage(name)} --seed {args.seed} again)')
        elif ck.get('done'):
            actor = TR.load_finetuned_actor(ck, policy_pre, device)
            candidates[name] = (ck, actor, ck['config']['K_ft'])
    for kind in ('diwa', 'dppo'):          # the weights kept along fine-tuning / along DPPO, when asked for
        folder = os.path.join(args.run, task, f'{kind}_s{args.seed}_snapshots')
        if not snapshots or kind not in candidates or (policies and kind not in policies) or not os.path.isdir(folder):
            continue
        final = candidates[kind][0]
        for f in sorted(os.listdir(folder), key=lambda f: int(''.join(filter(str.isdigit, f)) or 0)):
            ck = TR.load_checkpoint(os.path.join(folder, f), ckpt_path_stage(kind), task)
            if ck['key'] != final['key']:
                continue                                      # left by an earlier run with other settings
            ck['key'] = f"{ck['key']}@{ck['step']}"          # one row per snapshot in results.csv
            # a snapshot keeps only weights: its simulator steps (DPPO) are read from the run's metrics
            sim = metric_at(os.path.join(args.run, task, f'{kind}_s{args.seed}_metrics.csv'), ck['step'],
                            'charts/sim_steps')
            ck['state'] = {'counters': {'sim_steps': int(sim) if sim is not None else 0}}
            candidates[f"{kind}@{ck['step']}"] = (ck, TR.load_finetuned_actor(ck, policy_pre, device),
                                                  ck['config']['K_ft'])
    rows = []
    starts = task_starts(task, cfg.episodes, args.seed)
    for name, (ck, actor, K_ft) in candidates.items():
        if policies and name.split('@')[0] not in policies:     # 'dppo' also names its snapshots 'dppo@<N>'
            continue
        if already_done(known, task, name, args.seed, ck['key'], cfg.episodes, env_kind):
            print(f'[eval] {task} {name} seed {args.seed}: up to date in {results_path}: skipped')
            continue
        t0 = time.time()
        out = run_episodes(policy_agent_factory(policy_pre, actor, K_ft, seed=args.seed), task, starts, cfg, wm=wm,
                           device=device, seed=args.seed, env_kind=env_kind)
        row = summarize(task, name, args.seed, out, t0, preset=args.preset, env=env_kind, ckpt_key=ck['key'],
                        sim_steps_finetune=ck.get('state', {}).get('counters', {}).get('sim_steps', 0))
        write_result(results_path, row)
        rows.append(row)
    return rows


def ckpt_path_stage(name: str) -> str:
    """Policy name in results.csv -> the stage that wrote its checkpoint."""
    return 'dppo' if name.startswith('dppo') else 'finetune'


def evaluate_stage(args, device, task: str) -> list:
    """`train.py --stage eval`: evaluate the run's policies for one task and seed."""
    import train as TR
    cfg = TR.build_config(EvalConfig, PRESETS, args.preset, args, 'eval')
    return evaluate_checkpoints(args, device, task, cfg, env_kind=getattr(args, 'env', 'desk'))


# ----------------------------------------------------------------------------------------------------
# World-model quality (paper S.5.4, Fig. S.7): open-loop prediction of the desk's mechanisms on held-out play
#
#   frames  x_0 x_1 | x_2 ............................ x_51
#           context |  imagined with the recorded actions (prior only, no observation)
#   error at horizon h = |part(pred_{1+h}) - part(true_{1+h})|   vs.   'nothing moves': |part(true_1) - part(true_{1+h})|
# The part state is read from the latent by a linear probe fitted on training latents (vision model) or
# decoded by the hybrid model's scene head.
# ----------------------------------------------------------------------------------------------------

PARTS = {'door': 0, 'drawer': 1, 'led': 5, 'bulb': 4}            # scene_obs index of each mechanism's state
BUTTON = 2                                                     # scene_obs index of the button's depth (m)
MOVED = {'door': 0.05, 'drawer': 0.05, 'led': 0.5, 'bulb': 0.5}  # change within the horizon that counts as moving
HORIZONS = (1, 10, 25, 50)


@torch.no_grad()
def part_reader(wm, train: dict, device, n_seq: int = 256, seed: int = 0):
    """feat (..., F) -> mechanism states (..., 4). Hybrid: the scene decoder; vision: a ridge probe fitted on
    posterior features of random training sequences."""
    import data
    import world_model as W
    idx = torch.tensor(list(PARTS.values()))
    if wm.cfg.hybrid:
        return lambda feat: wm.decode_scene(feat)[..., idx]
    batch = data.sample_sequences(train, n_seq, 32, np.random.default_rng(seed))
    feats = torch.cat([wm.featurize(data.to_torch({k: v[i:i + 32] for k, v in batch.items()}, device))
                       for i in range(0, n_seq, 32)])                                  # (n, 32, F)
    target = torch.as_tensor(batch['scene_obs'][..., list(PARTS.values())], dtype=torch.float32)
    Wp, b = W.fit_linear_probe(feats[:, 4:].reshape(-1, feats.shape[-1]).cpu(), target[:, 4:].reshape(-1, len(PARTS)))
    return lambda feat: feat.cpu() @ Wp + b


@torch.no_grad()
def wm_open_loop_errors(wm, train: dict, val: dict, device, n_seq: int = 256, seed: int = 0) -> list:
    """Rows {part, horizon, windows, model_mae, still_mae}: mean absolute error of the open-loop prediction of
    each mechanism on held-out sequences where it moves, next to the 'nothing moves' baseline."""
    import data
    import world_model as W
    read = part_reader(wm, train, device, seed=seed)
    batch = data.sample_sequences(val, n_seq, 2 + max(HORIZONS), np.random.default_rng(seed + 1))
    preds = torch.cat([read(W.open_loop_features(wm, data.to_torch({k: v[i:i + 32] for k, v in batch.items()}, device),
                                                 context=2, horizon=max(HORIZONS)))
                       for i in range(0, n_seq, 32)])                                  # (n, 52, 4)
    true = torch.as_tensor(batch['scene_obs'][..., list(PARTS.values())], dtype=torch.float32)
    rows = []
    for j, part in enumerate(PARTS):
        moving = (true[:, 2:, j] - true[:, 1:2, j]).abs().amax(1) > MOVED[part]     # (n,)
        for h in HORIZONS:
            err = (preds[moving, 1 + h, j] - true[moving, 1 + h, j]).abs()
            still = (true[moving, 1, j] - true[moving, 1 + h, j]).abs()
            rows.append({'part': part, 'horizon': h, 'windows': int(moving.sum()),
                         'model_mae': round(float(err.mean()), 4) if len(err) else float('nan'),
                         'still_mae': round(float(still.mean()), 4) if len(still) else float('nan')})
    return rows


def press_runs(split: dict, min_depth: float = 0.003) -> np.ndarray:
    """(P, 3) rows (the frame before, the deepest frame, the frame after) of every button press in a split: a
    run of frames with the button deeper than min_depth (m), inside one episode. The LED at the frame after vs.
    the frame before says whether that press switched it."""
    depth, out = split['scene_obs'][:, BUTTON], []
    for a, b in split['episodes']:
        pressed = np.concatenate([[False], depth[a:b + 1] > min_depth, [False]]).astype(int)
        edges = np.flatnonzero(np.diff(pressed))                       # run starts and ends, alternating
        for s, e in zip(edges[::2] + a, edges[1::2] + a):
            if a < s and e <= b:                                       # a frame before and after, in the episode
                out.append((s - 1, s + int(np.argmax(depth[s:e])), e))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def button_presses(split: dict, before: int = 24, after: int = 12, min_depth: float = 0.003) -> np.ndarray:
    """(P, 3) rows (start, deepest, end) of every button press in a split (press_runs), windowed from `before`
    frames ahead of its deepest frame to `after` frames past it, inside one episode (presses too close to an
    episode's start are skipped)."""
    runs = press_runs(split, min_depth)
    starts = np.searchsorted(split['episodes'][:, 0], runs[:, 1], side='right') - 1
    a, b = split['episodes'][starts, 0], split['episodes'][starts, 1]
    keep = runs[:, 1] - before >= a
    return np.stack([runs[:, 1] - before, runs[:, 1], np.minimum(runs[:, 1] + after, b)], 1)[keep].reshape(-1, 3)


def press_features(split: dict, presses: np.ndarray) -> dict:
    """What might tell a press that switches the LED from a light one, each taken at the press's deepest frame:
    the button's depth itself, the hand's height alone, the measured hand pose (TCP xyz, the Euler angles as
    sin/cos since roll wraps at +-pi, the gripper width), and the commanded TCP target that CALVIN's relative
    controller has integrated from the actions (the `actions` key: the target after the previous frame's action,
    with sin/cos Euler).
    -> name -> (P, D) features."""
    pk = presses[:, 1]
    pose = lambda xyz, euler, *extra: np.concatenate([xyz, np.sin(euler), np.cos(euler), *extra], axis=1)
    ro, target = split['robot_obs'], split['actions'][pk - 1]
    return {'button depth': split['scene_obs'][pk, BUTTON][:, None],
            'hand height (TCP z)': ro[pk, 2:3],
            'hand pose': pose(ro[pk, 0:3], ro[pk, 3:6], ro[pk, 6:7]),
            'commanded TCP target': pose(target[:, 0:3], target[:, 3:6])}


def knn_loo_accuracy(x: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote (features standardised over all rows): a
    model-free answer to 'does x decide y, given this much data?'. Ties (k even) count as False."""
    z = (x - x.mean(0)) / (x.std(0) + 1e-9)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)                                             # a row never votes for itself
    near = np.argsort(d, axis=1, kind='stable')[:, :k]                      # (n, k)
    return float(((y[near].mean(1) > 0.5) == y).mean())


def press_predictability(splits: list, k: int = 5) -> dict:
    """Could any model tell, from the hand, whether a press switches the LED? For each of press_features, the
    k-NN leave-one-out accuracy over the presses of all splits, next to always guessing the common outcome.
    The button's depth is the check that the probe works (a press switches the LED exactly when the button
    passes LED_PRESS_THRESHOLD); the hand pose and the commanded target are what a world model could at best
    know in imagination."""
    ys, feats = [], []
    for split in splits:
        pr = press_runs(split)                          # switched: the LED after the press vs. before it
        lit = split['scene_obs'][:, PARTS['led']]
        ys.append(lit[pr[:, 2]] != lit[pr[:, 0]])
        feats.append(press_features(split, pr))
    y = np.concatenate(ys)
    out = {'presses': len(y), 'k': k, 'majority': round(float(max(y.mean(), 1 - y.mean())), 3) if len(y) else None}
    for name in feats[0]:
        x = np.concatenate([f[name] for f in feats])
        out[name] = round(knn_loo_accuracy(x, y, k), 3) if len(y) > k else None
    return out


@torch.no_grad()
def press_report(args, device, samples: int = 3, late_starts=(6, 0, -2)) -> dict:
    """Does the world model know whether a button press switched the LED (the LED tasks, FINDINGS.md)? Every press
    of the held-out play (button_presses) is filtered from its first frame alone, as imagined episodes start, and
    imagined open loop along its recorded actions (sampled latents, `samples` times); the LED is read at the
    window's end (part_reader: the scene decoder, or a ridge probe on the vision latents) and compared with the
    start. A world model that knows switches the LED on the presses that did and keeps it on the light ones;
    the same read on the latents filtered from every real frame is the check that the reader itself works.
    late_starts: the same, with the filter seeing real frames up to d frames before the deepest one (negative:
    after it, when the real LED has already switched), so that the rates show where imagination goes wrong.
    -> dict (also <run>/press_report.json)."""
    import data
    import train as TR
    import world_model as W
    wm, _ = TR.load_world_model(args, device)
    root = TR.data_root(args)
    train = data.load_split(os.path.join(root, 'training'), wm.cfg.image_size)
    val = data.load_split(os.path.join(root, 'validation'), wm.cfg.image_size)
    read = part_reader(wm, train, device, seed=args.seed)
    led = list(PARTS).index('led')                                 # column of part_reader's output
    presses = button_presses(val)
    if not len(presses):
        raise TR.StageError(f'press report: no button press in {root}/validation')
    lit = val['scene_obs'][:, PARTS['led']]
    switched = lit[presses[:, 2]] != lit[presses[:, 0]]
    torch.manual_seed(args.seed)
    windows = [(s, k, e, data.to_torch({key: val[key][np.arange(s, e + 1)[None]] for key in data.SEQ_KEYS}, device))
               for s, k, e in presses]
    flip = lambda feat, s: bool(abs(float(read(feat)[0, -1, led]) - lit[s]) > 0.5)   # LED at the end vs start
    imagine = lambda batch, s, e, context: np.mean([
        flip(W.open_loop_features(wm, batch, context, e - s, sample=True), s) for _ in range(samples)])
    imagined = np.array([imagine(batch, s, e, 1) for s, _, e, batch in windows])
    filtered = np.array([flip(wm.featurize(batch), s) for s, _, _, batch in windows])
    # filter frames s..k-d, imagine the rest (nan where that leaves nothing to imagine)
    late = {d: np.array([imagine(batch, s, e, k - d - s + 1) if k - d < e else np.nan for s, k, e, batch in windows])
            for d in late_starts}
    rate = lambda x, m: round(float(np.nanmean(x[m])), 3) if m.any() and not np.isnan(x[m]).all() else None
    depth = val['scene_obs'][presses[:, 1], BUTTON]
    out = {'presses': len(presses), 'switched': int(switched.sum()),
           'depth_mm_switched': round(1000 * float(np.median(depth[switched])), 1) if switched.any() else None,
           'depth_mm_light': round(1000 * float(np.median(depth[~switched])), 1) if (~switched).any() else None,
           'imagined_switch_on_switched': rate(imagined, switched), 'imagined_switch_on_light': rate(imagined, ~switched),
           'filtered_switch_on_switched': rate(filtered, switched), 'filtered_switch_on_light': rate(filtered, ~switched),
           'imagined_from_frames_before_deepest': {str(d): [rate(v, switched), rate(v, ~switched)]
                                                   for d, v in late.items()}}
    out['knn_accuracy'] = press_predictability([train, val])
    print(f"[press] {out['presses']} held-out presses, {out['switched']} switched the LED (median depth "
          f"{out['depth_mm_switched']} mm; the others {out['depth_mm_light']} mm). LED switched at the window's end, "
          f"imagined open loop: {out['imagined_switch_on_switched']} of the switching presses, "
          f"{out['imagined_switch_on_light']} of the light ones; read from the real frames: "
          f"{out['filtered_switch_on_switched']} / {out['filtered_switch_on_light']}")
    print('[press] the same, imagined from d frames before the deepest one (switching / light presses): '
          + ', '.join(f'd={d}: {a} / {b}' for d, (a, b) in out['imagined_from_frames_before_deepest'].items()))
    acc = out['knn_accuracy']
    print(f"[press] switched or not, {acc['k']}-NN leave-one-out over the {acc['presses']} presses of both splits: "
          + ', '.join(f'{k} {v}' for k, v in acc.items() if k not in ('presses', 'k'))
          + ' (majority = always guess the common outcome)')
    data.atomic_write(os.path.join(args.run, 'press_report.json'), lambda fh: fh.write(json.dumps(out, indent=1).encode()))
    return out


@torch.no_grad()
def wm_rollout_figure(wm, val: dict, path: str, device, seed: int = 0, horizons=(50, 80)) -> None:
    """Fig. S.7: ground truth vs. imagined frames of both cameras from a held-out trajectory, 2 context frames,
    then open loop with the recorded actions."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import data
    import world_model as W
    L = 2 + max(horizons)
    batch = data.to_torch(data.sample_sequences(val, 1, L, np.random.default_rng(seed)), device)
    dec = W.open_loop(wm, batch, context=2, horizon=L - 2)
    cols = [0, 1] + [t for t in range(2, L) if (t - 1) % 10 == 0] + [1 + h for h in horizons]
    cols = sorted(set(c for c in cols if c < L))
    img = lambda x: ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    fig, axes = plt.subplots(4, len(cols), figsize=(1.1 * len(cols), 4.8))
    for c, t in enumerate(cols):
        for r, (name, src) in enumerate([('static', batch), ('static', dec), ('gripper', batch), ('gripper', dec)]):
            axes[r, c].imshow(img(src[f'rgb_{name}'][0, t]))
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[0, c].set_title(f't={t}' + (' ctx' if t < 2 else ''), fontsize=7)
    for r, label in enumerate(['true static', 'imagined', 'true gripper', 'imagined']):
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle('World-model open loop on held-out play: 2 context frames, then recorded actions only', fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wm_report(args, device) -> list:
    """Open-loop errors (csv + printed table) and the Fig. S.7 figure for the run's world model."""
    import data
    import train as TR
    wm, _ = TR.load_world_model(args, device)
    root = TR.data_root(args)
    train = data.load_split(os.path.join(root, 'training'), wm.cfg.image_size)
    val = data.load_split(os.path.join(root, 'validation'), wm.cfg.image_size)
    rows = wm_open_loop_errors(wm, train, val, device, seed=args.seed)
    write_rows(os.path.join(args.run, 'wm_open_loop.csv'), rows)
    print(f"{'part':>7s} {'horizon':>7s} {'windows':>7s} {'world model':>11s} {'nothing moves':>13s}")
    for r in rows:
        print(f"{r['part']:>7s} {r['horizon']:7d} {r['windows']:7d} {r['model_mae']:11.4f} {r['still_mae']:13.4f}")
    wm_rollout_figure(wm, val, os.path.join(args.run, 'figures', 'wm_rollout.png'), device, seed=args.seed)
    return rows


def write_rows(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w', newline='') as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------------------------------
# Reward classifier (§III.C): on held-out recorded latents, and on imagined ones, where DiWA uses it
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def imagined_window_scores(wm, clf, split: dict, windows: np.ndarray, device, seed: int = 0) -> list:
    """For each window (s, e): filter frame s alone, imagine along the recorded actions a_s..a_{e-1} with
    sampled prior latents, exactly as the Dream Diffusion MDP does (dream_ppo.imagine_rollout);
    -> list of (T,) success probabilities C(z_t) of the imagined latents, t = s..e."""
    torch.manual_seed(seed)
    import data
    import world_model as W
    out = []
    for s, e in windows:
        rows = np.arange(s, e + 1)[None]
        batch = data.to_torch({k: split[k][rows] for k in data.SEQ_KEYS}, device)
        if rows.shape[1] < 2:
            continue
        feat = W.open_loop_features(wm, batch, context=1, horizon=rows.shape[1] - 1, sample=True)[0]  # (T, F)
        out.append(clf.success_prob(feat, feat[:1].expand_as(feat)).cpu().numpy())   # z_0: the filtered frame s
    return out


def demo_end_rates(scores: list, success_idx: np.ndarray, thr: float) -> tuple[float, float, float]:
    """Imagined held-out demos scored by C_psi: scores[i] (T_i,) success probabilities of demo i's imagined
    frames (window + post-success frames), success_idx[i] the index of the frame where the recorded demo first
    succeeds (its window's last). -> the fraction of demos scored a success (p > thr) at their last imagined frame,
    at their own success frame (the imagined drawer / door / light may still lag the real one there), and at some
    frame (where the Dream MDP would end the episode as a success)."""
    final = np.mean([p[-1] > thr for p in scores])
    at_success = np.mean([p[i] > thr for p, i in zip(scores, success_idx)])
    reached = np.mean([(p > thr).any() for p in scores])
    return float(final), float(at_success), float(reached)


def reward_report(args, device, task: str, samples: int = 4) -> dict:
    """Precision/recall of C_psi on held-out recorded latents; on imagined latents, how often the final frame
    of a held-out demo (window + the post-success frames, imagined `samples` times) is scored a success, how
    often any of its frames is (where the Dream MDP would end it as a success), and how many frames of
    held-out play windows that do not complete the task are (false alarms)."""
    import data
    import dream_ppo as P
    import env
    import reward as R
    import train as TR
    # scored at the probability above which fine-tuning ends an imagined episode as a success (FinetuneConfig)
    thr = TR.build_config(P.FinetuneConfig, P.PRESETS, args.preset, args, 'ft').success_threshold
    wm, wm_ckpt = TR.load_world_model(args, device)
    clf, _ = TR.load_reward(args, task, wm.feat_dim, device)
    feat, start, label = TR.reward_dataset(args, wm, wm_ckpt, task, device, 'validation', margin=clf.cfg.neg_margin,
                                           drop_relapses=clf.cfg.drop_relapses, relative=clf.relative)
    pr = R.precision_recall(clf, feat.to(device), label.to(device), start=start.to(device))
    val = data.load_split(os.path.join(TR.data_root(args), 'validation'), wm.cfg.image_size)
    # held-out demos, each followed for the same post-success frames as the classifier's positives
    win = val['windows'][val['window_tasks'] == task]
    rows, _ = TR.window_rows(val['episodes'], win, args.post_success_frames)
    demos = np.stack([win[:, 0], rows[:, -1]], 1)
    # each demo imagined `samples` times (the prior's latents are sampled): 6-11 held-out demos per task alone
    # would make this rate move in steps of 9-17 points
    demo_scores = [p for r in range(samples) for p in imagined_window_scores(wm, clf, val, demos, device, seed=r)]
    final, at_success, reached = demo_end_rates(demo_scores, np.tile(win[:, 1] - win[:, 0], samples), thr)
    others = [w for w, t in zip(val['windows'], val['window_tasks']) if t != task and not env.task_success(
        task, {'scene_obs': val['scene_obs'][w[0]]}, {'scene_obs': val['scene_obs'][w[1]]})]
    scores = imagined_window_scores(wm, clf, val, np.array(others[:200]), device)
    false = np.concatenate(scores) > thr
    # an imagined episode ends at its first success (dream_ppo): one false frame ends it, so count windows too
    false_windows = np.array([(p > thr).any() for p in scores])
    out = {'task': task, 'threshold': thr, 'precision': round(float(pr['precision']), 4), 'recall': round(float(pr['recall']), 4),
           'heldout_frames': len(label), 'imagined_final_success': round(float(final), 4),
           'imagined_success_frame': round(float(at_success), 4),
           'imagined_demos': len(demos), 'imagined_samples': samples,
           'imagined_demo_reached': round(float(reached), 4), 'imagined_false_alarm': round(float(false.mean()), 4),
           'imagined_play_frames': int(false.size),
           'imagined_false_window': round(float(false_windows.mean()), 4), 'imagined_play_windows': len(scores)}
    print(f"[reward/{task}] held-out recorded: precision {out['precision']:.3f} recall {out['recall']:.3f} "
          f"({len(label)} frames); imagined, success above {thr}: demo final frame success {out['imagined_final_success']:.2f} "
          f"({len(demos)} demos x {samples} samples; at the demo's own success frame {out['imagined_success_frame']:.2f}, "
          f"reached at some frame {out['imagined_demo_reached']:.2f}), play frames false alarm {out['imagined_false_alarm']:.3f} ({false.size} frames), "
          f"play windows with a false alarm {out['imagined_false_window']:.2f} ({len(scores)} windows)")
    data.atomic_write(os.path.join(args.run, task, 'reward_report.json'),
                      lambda fh: fh.write(json.dumps(out, indent=1).encode()))
    return out


@torch.no_grad()
def imagination_gap(args, device, task: str, cfg: EvalConfig, policy: str = 'base', repeats: int = 4) -> dict:
    """Does imagination predict the simulator? The same start states are run (1) in the simulator, as the
    evaluation does, (2) in imagination as fine-tuning runs them (dream_ppo.imagine_rollout: stochastic policy,
    the preset's latent sampling, success threshold and episode length), from each start's first frame encoded
    as the evaluation encodes it, `repeats` times, (3) open loop: each simulator episode's own actions
    replayed in imagination, and (4) the classifier on the latents filtered from the episode's real frames
    (success if any step exceeds the threshold). (4) tests the classifier alone, (3) adds the world model's
    open-loop dynamics, (2) vs (1) tests the whole Dream MDP.
    -> dict with real / imagined success and their agreement, written to <run>/<task>/gap_<policy>_s<seed>.json."""
    import data
    import dream_ppo as P
    import train as TR
    fcfg = TR.build_config(P.FinetuneConfig, P.PRESETS, args.preset, args, 'ft')
    wm, _ = TR.load_world_model(args, device)
    clf, _ = TR.load_reward(args, task, wm.feat_dim, device)
    policy_pre, bc_ckpt = TR.load_bc_policy(args, task, args.seed, wm.feat_dim, device)   # the seed's BC policy
    actor = policy_pre                                  # the base policy: its own copy in both roles
    if policy != 'base':
        path = TR.finetuned_checkpoints(args, task, args.seed).get(policy)
        if path is None:
            raise TR.StageError(f'gap report: no {policy} checkpoint of {task}, seed {args.seed}, in {args.run}')
        ck = TR.load_checkpoint(path, ckpt_path_stage(policy), task)
        if not TR.fine_tuned_from(ck, bc_ckpt):
            raise TR.StageError(f'{path}: fine-tuned from another BC policy than {TR.bc_file(args.seed)}; run '
                                f'--stage {ckpt_path_stage(policy)} --seed {args.seed} again')
        actor = TR.load_finetuned_actor(ck, policy_pre, device)
        fcfg = dataclasses.replace(fcfg, **{k: v for k, v in ck['config'].items() if hasattr(fcfg, k)})  # as it was trained
    factory = policy_agent_factory(policy_pre, actor if policy != 'base' else None, fcfg.K_ft, seed=args.seed)
    # the decoded-state reward and a start-conditioned classifier compare with the episode's first latent
    relative = getattr(clf, 'relative', False)
    starts, acts, post_p = {k: [] for k in wm.state_keys}, [], []

    def make_agent(B):                                  # the evaluation's agent, recording start states and actions
        agent, steps, first = factory(B), [], {}
        acts.append(steps)
        post_p.append(torch.zeros(B))

        def act(t, obs, feat):
            if t == 0:                                  # s_0 = q(h_0, x_0), as run_episodes filters its first frame
                x = data.preprocess_obs(obs[:B], image_size=wm.cfg.image_size, device=device)
                s0, _ = wm.obs_step(wm.initial(B), torch.zeros(B, 7, device=device), x, sample=False)
                for k in starts:
                    starts[k].append(s0[k])
                first['feat'] = feat[:B]
            with torch.no_grad():                       # (4) the classifier on the posterior of the real frames
                p = clf.success_prob(feat[:B], first['feat']) if relative else clf.success_prob(feat[:B])
                post_p[-1].copy_(torch.maximum(post_p[-1], p.float().cpu()))
            a = agent(t, obs, feat)
            steps.append(np.asarray(a, dtype=np.float32))
            return a
        return act
    t0 = time.time()
    real = run_episodes(make_agent, task, task_starts(task, cfg.episodes, args.seed), cfg, wm=wm, device=device,
                        seed=args.seed)['success']
    start_state = {k: torch.cat(v) for k, v in starts.items()}
    h0 = start_state['h']
    posterior = (torch.cat(post_p) > fcfg.success_threshold).numpy()
    torch.manual_seed(args.seed)                       # the world model's latent samples: the same figures on a re-run
    n, gen = len(real), torch.Generator(device=h0.device).manual_seed(args.seed)
    Ta, T = P.action_horizon(policy_pre), fcfg.max_episode_steps * P.action_horizon(policy_pre)
    recorded = torch.zeros(T, n, 7, device=device)     # the simulator's actions, (T, episode, 7); zero after its end
    for b, steps in enumerate(acts):
        A = torch.as_tensor(np.clip(np.stack(steps)[:T], -1, 1), device=device)   # (T_b, B, 7)
        recorded[:len(A), b * cfg.envs:b * cfg.envs + A.shape[1]] = A

    def imagine(closed_loop: bool) -> np.ndarray:      # (repeats, n) success within max_episode_steps decisions
        out = np.zeros((repeats, n), bool)
        for r in range(repeats):
            state = {k: v.clone() for k, v in start_state.items()}
            alive = torch.ones(n, dtype=torch.bool, device=h0.device)
            start_feat = wm.feature(state) if relative else None
            for t in range(fcfg.max_episode_steps):
                if closed_loop:                         # as fine-tuning: dream_ppo.imagine_rollout
                    chunk = P._sample_chain(policy_pre, actor, wm.feature(state), fcfg, gen)[:, -1, :Ta]
                else:
                    chunk = recorded[Ta * t:Ta * (t + 1)].transpose(0, 1)
                state, p = P.imagine_chunk(wm, state, P.execute_chunk(chunk), clf, fcfg, start_feat)
                hit = (p > fcfg.success_threshold) & alive
                out[r] |= hit.cpu().numpy()
                alive &= ~hit
        return out
    closed, replayed = imagine(True).mean(0), imagine(False).mean(0)
    f = lambda v: round(float(v), 4) if np.isfinite(v) else None
    res = {'task': task, 'policy': policy, 'seed': args.seed, 'episodes': n, 'repeats': repeats,
           'threshold': fcfg.success_threshold, 'latent_sample': fcfg.latent_sample,
           'real_success': f(real.mean()), 'imagined_success': f(closed.mean()),
           'imagined_on_real_success': f(closed[real].mean() if real.any() else np.nan),
           'imagined_on_real_failure': f(closed[~real].mean() if (~real).any() else np.nan),
           'replay_on_real_success': f(replayed[real].mean() if real.any() else np.nan),
           'replay_on_real_failure': f(replayed[~real].mean() if (~real).any() else np.nan),
           'posterior_on_real_success': f(posterior[real].mean() if real.any() else np.nan),
           'posterior_on_real_failure': f(posterior[~real].mean() if (~real).any() else np.nan),
           'wall_s': round(time.time() - t0, 1)}
    print(f"[gap/{task}] {policy} seed {args.seed}: simulator {res['real_success']:.2f}, imagined (as fine-tuning, "
          f"{repeats}x) {res['imagined_success']:.2f} (on starts that succeed / fail in the simulator: "
          f"{res['imagined_on_real_success']} / {res['imagined_on_real_failure']}); the simulator's actions replayed "
          f"in imagination succeed on {res['replay_on_real_success']} / {res['replay_on_real_failure']} of them; the "
          f"classifier on latents filtered from the real frames flags {res['posterior_on_real_success']} / "
          f"{res['posterior_on_real_failure']}")
    data.atomic_write(os.path.join(args.run, task, f'gap_{policy}_s{args.seed}.json'),
                      lambda fh: fh.write(json.dumps(res, indent=1).encode()))
    return res


# ----------------------------------------------------------------------------------------------------
# The report: the paper's evidence re-made on the built-in desk, from the files of a run folder alone.
#   Table I    base vs DiWA, 8 tasks x seeds; simulator steps during fine-tuning; DPPO's steps to match
#   Fig. 2     world-model / reward variants          Fig. 3   real success of the fine-tuning snapshots
#   Fig. S.6   alpha_BC: imagined vs real success     Table S.6  the unimodal Gaussian policy
#   Fig. S.7   world-model rollouts (wm_report)
# `train.py --stage report` runs whatever is missing and calls write_report after each piece of work;
# `eval.py --report` only rewrites results.md / results.csv / figures from what is there (seconds).
# ----------------------------------------------------------------------------------------------------

# Variants: run folders <run>/variants/<name> that inherit every checkpoint they do not change (train.py --inherit).
VARIANTS = {
    'alpha_bc_0': dict(overrides={'ft.alpha_bc': 0.0}, inherit=[], what='alpha_BC = 0 (no BC regulariser)'),
    'alpha_bc_0.5': dict(overrides={'ft.alpha_bc': 0.5}, inherit=[], what='alpha_BC = 0.5'),
    'gaussian': dict(overrides={'bc.policy': 'gaussian'}, inherit=[], what='unimodal Gaussian policy (S.5.3)'),
    'hybrid': dict(overrides={'wm.hybrid': True}, inherit=[], what='hybrid world model + latent classifier'),
    'hybrid_decoder': dict(overrides={'wm.hybrid': True, 'ft.reward': 'decoder'}, inherit=['hybrid'],
                           what='hybrid world model + decoded-state reward'),
}
PAPER_TABLE_I = {  # task: (base %, DiWA %, DPPO env steps to match DiWA), Table I of the paper (CALVIN D, 3 seeds)
    'open_drawer': ('57.8 ± 3.9', '74.4 ± 1.9', '134k'), 'close_drawer': ('59.1 ± 5.1', '92.0 ± 2.0', '346k'),
    'move_slider_left': ('62.2 ± 0.6', '83.3 ± 1.8', '271k'), 'move_slider_right': ('62.6 ± 3.6', '82.8 ± 3.5', '250k'),
    'turn_on_lightbulb': ('60.6 ± 3.0', '91.9 ± 1.8', '303k'), 'turn_off_lightbulb': ('35.6 ± 2.0', '77.0 ± 2.0', '327k'),
    'turn_on_led': ('48.4 ± 3.7', '86.2 ± 3.5', '495k'), 'turn_off_led': ('55.3 ± 4.8', '82.3 ± 6.5', '277k')}


def variant_run(run: str, name: str) -> str:
    return os.path.join(run, 'variants', name)


def _num(value, fmt: str = '.2f') -> str:
    return '–' if value is None else format(value, fmt)


def _mean_std(values) -> str:
    v = 100 * np.asarray(values, float)
    return '–' if v.size == 0 else f'{v.mean():.1f} ± {v.std():.1f}' + (f' (n={v.size})' if v.size < 3 else '')


def _latest(rows: list, **match) -> dict:
    """The last row (results.csv is append-only) per seed among rows matching all `match` fields."""
    out = {}
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in match.items()):
            out[r['seed']] = r
    return out


def _ckpt_facts(path: str) -> dict:
    """Wall-clock and counters of a finished checkpoint, or {} when it is missing / unfinished."""
    if not os.path.isfile(path):
        return {}
    ck = torch.load(path, weights_only=True, map_location='cpu')
    if not ck.get('done'):
        return {}
    return {'wall_s': float(ck.get('wall_s', 0.0)), 'counters': ck.get('state', {}).get('counters', {}),
            'metrics_csv': os.path.splitext(path)[0] + '_metrics.csv', 'key': ck.get('key')}


def _final_metric(csv_path: str, name: str, last: int = 10, first: bool = False) -> float:
    """Mean of a metric over the last `last` logged iterations (e.g. imagined success during fine-tuning), or
    over the first ones with first=True."""
    rows = [r for r in read_results(csv_path) if r.get(name) not in (None, '')]
    rows = rows[:last] if first else rows[-last:]
    return float(np.mean([float(r[name]) for r in rows])) if rows else float('nan')


def metric_at(csv_path: str, step: int, name: str):
    """The value of metric `name` logged at iteration `step` of a metrics csv, or None."""
    row = next((r for r in read_results(csv_path) if r.get('step') == str(step)), None)
    return float(row[name]) if row and row.get(name) not in (None, '') else None


def dppo_points(rows: list, task: str, seed) -> list:
    """DPPO's policies evaluated as DiWA's is (deterministic; the latest results.csv row of each of its snapshots
    'dppo@<N>' and of its final 'dppo') on `task`, `seed`: [(simulator steps it had taken, success)], by steps."""
    return sorted((int(r['sim_steps_finetune'] or 0), float(r['success'])) for r in
                  (_latest(rows, task=task, policy=p).get(str(seed)) for p in {r['policy'] for r in rows}
                   if p.split('@')[0] == 'dppo') if r)


def dppo_evaluated_steps_to_match(rows: list, task: str, seed, target: float):
    """When DPPO's evaluated policy (dppo_points) first reaches `target` (DiWA's success). The snapshots are a
    grid (5 along the run by default), so the answer is an interval: -> (lo, hi, last), DPPO got there after
    more than lo and at most hi simulator steps (lo: the evaluated policy before, 0 for the first), hi None when
    no evaluated policy reaches it; last: the steps of the last one evaluated (0 when none is)."""
    pts = dppo_points(rows, task, seed)
    if not pts:
        return 0, None, 0
    hit = next((i for i, (_, success) in enumerate(pts) if success >= target), None)
    if hit is None:
        return pts[-1][0], None, pts[-1][0]
    return (pts[hit - 1][0] if hit else 0), pts[hit][0], pts[-1][0]


def dppo_steps_to_match(csv_path: str, target: float, window: int = 5):
    """Simulator steps after which DPPO's success in its own (exploring) rollouts, averaged over `window`
    iterations, first reaches `target` (DiWA's success in the simulator). -> (steps or None, steps run)."""
    rows = read_results(csv_path)
    if not rows:
        return None, 0
    window = min(window, len(rows))
    succ = np.array([float(r['charts/success_rate']) for r in rows])
    steps = np.array([float(r['charts/sim_steps']) for r in rows])
    smooth = np.convolve(succ, np.ones(window) / window, mode='valid')
    hit = np.flatnonzero(smooth >= target)
    return (int(steps[hit[0] + window - 1]) if hit.size else None), int(steps[-1])


REPORT_FIGURES = ('fig3_finetuning_curves.png', 'figS5_dppo_vs_diwa.png', 'fig2_s6_variants.png', 'figS7_wm_rollout.png')


def base_and_diwa(rows: list, task: str, seeds: list) -> tuple:
    """Real success of the base policy and of DiWA on `task`, for each seed of `seeds` (strings) that has a
    results.csv row (the latest). -> (base {seed: success}, DiWA {seed: success})."""
    return tuple({s: float(r[s]['success']) for s in seeds if s in r}
                 for r in (_latest(rows, task=task, policy=p) for p in ('base', 'diwa')))


def diwa_beats_base(run: str, task: str, seeds) -> bool:
    """Whether DiWA's mean real success on `task` exceeds the base policy's (False until both are measured):
    only then is there anything for DPPO to match (train.py --stage report, Table I)."""
    b, d = base_and_diwa(read_results(os.path.join(run, 'results.csv')), task, [str(s) for s in seeds])
    return bool(b and d and np.mean(list(d.values())) > np.mean(list(b.values())))


def _dppo_cell(dppo: dict, diwa: list, base: list, evaluated: tuple = (0, None, 0)) -> str:
    """Table I's DPPO column: simulator steps DPPO needs to match DiWA's mean real success, read from its
    policies evaluated as DiWA's is (`evaluated`: dppo_evaluated_steps_to_match, an interval 'lo-hi') and, in
    brackets, from its own exploring training rollouts (`dppo`: _ckpt_facts of its checkpoint); '> N' when it
    never got there within the N steps it ran, '0' when DiWA does not beat the base policy (it is matched
    before DPPO starts), '–' when DPPO was not run on the task."""
    if base and diwa and np.mean(diwa) <= np.mean(base):
        return '0 (DiWA ≤ base)'
    if not dppo or not diwa:
        return '–'
    k = lambda steps: f'{steps / 1e3:.0f}k' if steps else '0'
    steps, ran = dppo_steps_to_match(dppo['metrics_csv'], float(np.mean(diwa)))
    lo, hi, last = evaluated
    ev = f'{k(lo)}-{k(hi)}' if hi is not None else (f'> {k(last)}' if last else '–')
    return f"{ev} (rollouts {k(steps) if steps is not None else f'> {k(ran)}'})"


def _dppo_end_cell(dppo: dict, row: dict | None) -> str:
    """Table I: DPPO's final policy evaluated as DiWA's is (`row`: its latest results.csv row; deterministic,
    100 episodes) and the simulator steps it had used; '–' before both exist."""
    if not dppo or not row:
        return '–'
    return f"{100 * float(row['success']):.0f} ({int(dppo['counters'].get('sim_steps', 0)) / 1e3:.0f}k)"


def write_report(run: str, out_dir: str, preset: str, seeds=(0, 1, 2), report_task: str = 'open_drawer',
                 readme: str | None = None) -> str:
    """results.md, results.csv and figures/*.png in out_dir from the files of `run` (and its variants); with
    `readme`, also its generated block (update_readme): Table I, the figures and the wall-clock."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import data
    from env import TASKS
    os.makedirs(os.path.join(out_dir, 'figures'), exist_ok=True)
    for f in REPORT_FIGURES:          # each is drawn again below if its data exist; none outlives its data
        if os.path.isfile(os.path.join(out_dir, 'figures', f)):
            os.remove(os.path.join(out_dir, 'figures', f))
    runs = {'main': run, **{n: variant_run(run, n) for n in VARIANTS}}
    rows = [{'variant': n, **r} for n, d in runs.items() for r in read_results(os.path.join(d, 'results.csv'))]
    seeds = [str(s) for s in seeds]
    s0 = seeds[0]                     # the seed of the variants, DPPO and Fig. 3's base point
    episodes = '/'.join(sorted({r['episodes'] for r in rows}, key=int)) or '–'
    main = [r for r in rows if r['variant'] == 'main']
    # a run made when one BC policy served every seed: the base rows of all its seeds have one checkpoint key
    bases = {t: _latest(main, task=t, policy='base') for t in TASKS}
    shared = [t for t, b in bases.items() if len(b) > 1 and len({r['ckpt_key'] for r in b.values()}) == 1]
    md = [f'# DiWA on the built-in desk: results of `python train.py --stage report --preset {preset}`', '',
          f'Written by `eval.py` from `{run}` (preset `{preset}`; commits: '
          f'{", ".join(sorted({r["commit"] for r in rows})) or "–"}). '
          f'Success rates in % over {episodes} simulator episodes per task and seed (mean ± std over seeds, '
          f'seeds {", ".join(seeds)}); "n=" marks cells with fewer seeds so far. Each seed clones its own base '
          'policy (BC seed S) and fine-tunes DiWA from it: the base column is the mean over seeds of each seed\'s '
          'own BC policy, and Δ pairs each seed\'s DiWA with its own base. '
          + (f'Not so for {", ".join(shared)}, from a run made before: one BC policy served all seeds (their base '
             'rows are that policy on each seed\'s episodes). ' if shared else '') + 'Paper numbers: CALVIN D.', '']

    # ---- Table I
    head = md[2:4]                    # what produced it (not the title): the README's block starts with it
    table_i = len(md)
    md += ['## Table I: base vs. DiWA', '',
           '| task | base (each seed\'s BC) | DiWA | Δ | sim. steps in fine-tuning | fine-tuning wall-clock | '
           'DPPO sim. steps to match DiWA: evaluated (its rollouts) | DPPO at its end, evaluated (sim. steps) | paper base | paper DiWA | paper DPPO steps |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
    deltas = {}
    for task in TASKS:
        base, diwa = base_and_diwa(main, task, seeds)
        b, d = list(base.values()), list(diwa.values())
        paired = [diwa[s] - base[s] for s in seeds if s in base and s in diwa]
        deltas[task] = (b, d, paired)
        facts = [_ckpt_facts(os.path.join(run, task, f'diwa_s{s}.pt')) for s in seeds]
        walls = [f['wall_s'] / 60 for f in facts if f]
        sim = sum(int(f['counters'].get('sim_steps', 0)) for f in facts if f)
        dppo = _ckpt_facts(os.path.join(run, task, f'dppo_s{s0}.pt'))
        md.append(f'| {task} | {_mean_std(b)} | {_mean_std(d)} | '
                  f'{"–" if not paired else f"{100 * np.mean(paired):+.1f}"} | {sim if walls else "–"} | '
                  f'{f"{np.mean(walls):.0f} min" if walls else "–"} | '
                  f'{_dppo_cell(dppo, d, b, dppo_evaluated_steps_to_match(main, task, s0, np.mean(d)) if d else (0, None, 0))} | '
                  f'{_dppo_end_cell(dppo, _latest(main, task=task, policy="dppo").get(s0))} | '
                  f'{" | ".join(PAPER_TABLE_I[task])} |')
    all_b = [np.mean(v[0]) for v in deltas.values() if v[0]]
    all_d = [np.mean(v[1]) for v in deltas.values() if v[1]]
    done = [t for t, v in deltas.items() if v[2]]
    summary = f'Average base over {len(all_b)} tasks: {100 * np.mean(all_b):.1f}; ' if all_b else ''
    if done:
        base_done = [np.mean(deltas[t][0]) for t in done if deltas[t][0]]
        summary += (f'over the {len(done)} tasks with DiWA: base {100 * np.mean(base_done):.1f}, '
                    f'DiWA {100 * np.mean(all_d):.1f}. Tasks where DiWA does not gain 15 points '
                    'on average: ' + (', '.join(t for t in done if np.mean(deltas[t][2]) < 0.15) or 'none') + '.')
    else:
        summary += 'no DiWA result yet.'
    md += ['', summary, '',
           f'DPPO (seed {s0}): between how many simulator steps its policy, evaluated like DiWA\'s (deterministic, '
           'the same episodes), first reaches DiWA\'s mean success. Its policy is kept at 5 points along the run, '
           'hence an interval (from 0: within its first stretch). In brackets, the same read on its own training '
           'rollouts (mean of 5 iterations), which sample with noise (the std is clipped from below, '
           '`--ft.min_std`): that helps where noise breaks a hesitation and hurts where it spoils a precise '
           'motion, so the two can differ either way. "> N": not within the N steps it ran.', '']
    # DPPO
    dppo = _ckpt_facts(os.path.join(run, report_task, f'dppo_s{s0}.pt'))
    diwa_real = np.mean(deltas[report_task][1]) if deltas[report_task][1] else None
    if dppo and diwa_real is not None:
        steps, ran = dppo_steps_to_match(dppo['metrics_csv'], diwa_real)
        lo, hi, last = dppo_evaluated_steps_to_match(main, report_task, s0, diwa_real)
        dppo_eval = _latest(main, task=report_task, policy='dppo').get(s0)
        md += [f'DPPO on {report_task} (seed {s0}, the same PPO in the simulator, reward = the simulator\'s success test): '
               + (f'evaluated like DiWA, its policy reaches DiWA\'s {100 * diwa_real:.1f}% after **more than {lo:,} and '
                  f'at most {hi:,} simulator steps**' if hi is not None else
                  f'evaluated like DiWA, its policy has not reached DiWA\'s {100 * diwa_real:.1f}% after {last:,} '
                  'simulator steps' if last else 'its snapshots are not evaluated yet')
               + ('; its exploring rollouts reach it after ' + (f'{steps:,} steps' if steps is not None else
                                                                 f'more than the {ran:,} steps it ran'))
               + f' (paper: {PAPER_TABLE_I[report_task][2]}); final DPPO policy in the evaluation: '
               + (f"{100 * float(dppo_eval['success']):.0f}%" if dppo_eval else '–')
               + f'; wall-clock {dppo["wall_s"] / 60:.0f} min. DiWA: 0 simulator steps.', '']
    block = head + md[table_i:]
    # ---- Fig. 3
    fig3 = {}
    for r in main:
        if r['policy'].startswith('diwa@'):
            fig3.setdefault(r['task'], {}).setdefault(int(r['policy'][5:]), []).append(float(r['success']))
    if fig3:
        plt.figure(figsize=(6, 4))
        for task, pts in sorted(fig3.items()):
            base = _latest(main, task=task, policy='base').get(s0)
            xs = ([0] if base else []) + sorted(pts)
            ys = ([float(base['success'])] if base else []) + [np.mean(pts[x]) for x in sorted(pts)]
            plt.plot(xs, 100 * np.array(ys), marker='o', label=task)
        plt.xlabel('fine-tuning iteration (in imagination)'), plt.ylabel('success in the simulator (%)')
        plt.title('Fig. 3 analogue: real success during fine-tuning'), plt.legend(fontsize=7), plt.grid(alpha=0.3)
        plt.tight_layout(), plt.savefig(os.path.join(out_dir, 'figures', 'fig3_finetuning_curves.png'), dpi=120)
        plt.close()
        md += ['## Fig. 3: success in the simulator during fine-tuning', '',
               '![Fig. 3](figures/fig3_finetuning_curves.png)', '']
    # ---- Fig. S.5: DPPO's evaluated success against its simulator steps; DiWA (0 steps) as a band
    curves = {t: dppo_points(main, t, s0) for t in TASKS}
    tasks = [t for t in TASKS if curves[t]]
    if tasks:
        cols, rows_ = min(4, len(tasks)), (len(tasks) + 3) // 4
        fig, axes = plt.subplots(rows_, cols, figsize=(3 * cols, 2.6 * rows_), squeeze=False)
        for ax in axes.flat[len(tasks):]:
            ax.axis('off')
        for ax, task in zip(axes.flat, tasks):
            d = deltas[task][1]
            base = _latest(main, task=task, policy='base').get(s0)
            pts = ([(0, float(base['success']))] if base else []) + curves[task]
            xs, ys = np.array(pts).T
            ax.plot(xs / 1e3, 100 * ys, marker='o', color='C2', label='DPPO (evaluated)')
            if d:
                m, sd = 100 * np.mean(d), 100 * np.std(d)
                ax.axhspan(m - sd, m + sd, color='C0', alpha=0.25), ax.axhline(m, color='C0', label='DiWA (0 steps)')
            ax.set_title(task, fontsize=8), ax.set_ylim(-3, 103), ax.grid(alpha=0.3), ax.tick_params(labelsize=7)
            ax.set_xlabel('simulator steps (k)', fontsize=7), ax.set_ylabel('success (%)', fontsize=7)
        axes.flat[0].legend(fontsize=6)
        fig.suptitle('Fig. S.5 analogue: DPPO on world-model latents vs. DiWA', fontsize=9)
        plt.tight_layout(), plt.savefig(os.path.join(out_dir, 'figures', 'figS5_dppo_vs_diwa.png'), dpi=120)
        plt.close()
        md += [f'## Fig. S.5: DPPO in the simulator vs. DiWA (seed {s0})', '',
               'DPPO\'s policy at its 5 snapshots and at its end, evaluated like DiWA\'s, against the simulator steps it '
               'had taken (0: the base policy); DiWA\'s mean ± std over seeds as a band, at 0 simulator steps.', '',
               '![Fig. S.5](figures/figS5_dppo_vs_diwa.png)', '']
    # ---- imagined vs. real, per task: where the dream already calls the base policy a success, PPO has no signal
    rows_ir, pct = [], lambda x: '–' if x is None or np.isnan(x) else f'{100 * x:.0f}'
    for task in [t for t in TASKS if any(r['task'] == t for r in main)]:
        f = _ckpt_facts(os.path.join(run, task, f'diwa_s{s0}.pt'))
        if not f:
            continue
        real = {p: float(r['success']) for p in {r['policy'] for r in main if r['task'] == task}
                for r in [_latest(main, task=task, policy=p).get(s0)] if r}
        snaps = sorted((int(p[5:]), v) for p, v in real.items() if p.startswith('diwa@'))
        rows_ir.append(f"| {task} | {pct(_final_metric(f['metrics_csv'], 'charts/success_rate', first=True))} | "
                       f"{pct(_final_metric(f['metrics_csv'], 'charts/success_rate'))} | {pct(real.get('base'))} | "
                       f"{' / '.join(pct(v) for _, v in snaps) or '–'} | {pct(real.get('diwa'))} |")
    if rows_ir:
        md += [f'## Imagined vs. real success during fine-tuning (seed {s0})', '',
               'Imagined: the success rate of the imagined episodes (classifier above the threshold), mean of the first '
               'and of the last 10 iterations. Real: simulator success of the base policy, of the snapshots (Fig. 3) '
               'and of the final policy.', '',
               '| task | imagined, first 10 it. | imagined, last 10 it. | real: base | real: snapshots | real: DiWA |',
               '|---|---|---|---|---|---|', *rows_ir, '']
    # ---- Fig. 2, Fig. S.6, Table S.6 (variants, seed 0, on report_task)
    md += [f'## Variants on {report_task} (Fig. 2, Fig. S.6, Table S.6), seed {s0}', '',
           '| variant | base | DiWA | imagined success at the end of fine-tuning |', '|---|---|---|---|']
    main_d = _latest(main, task=report_task, policy='diwa').get(s0)
    main_b = _latest(main, task=report_task, policy='base').get(s0)
    main_f = _ckpt_facts(os.path.join(run, report_task, f'diwa_s{s0}.pt'))
    table = {'default (vision WM + classifier, alpha_BC of S.2.4)': (main_b, main_d, main_f)}
    for name, v in VARIANTS.items():
        vr = [r for r in rows if r['variant'] == name]
        # the base policy's row lives in the first run of the variant's chain that evaluated it
        own_base = any(k.startswith(('bc.', 'wm.')) for k in v['overrides'])   # a policy of its own
        chain = [[r for r in rows if r['variant'] == p] for p in v['inherit']] + ([] if own_base else [main])
        b = next((x for x in [_latest(r, task=report_task, policy='base').get(s0) for r in [vr] + chain] if x), None)
        table[v['what']] = (b, _latest(vr, task=report_task, policy='diwa').get(s0),
                            _ckpt_facts(os.path.join(runs[name], report_task, f'diwa_s{s0}.pt')))
    bars = []
    for what, (b, d, f) in table.items():
        imag = _final_metric(f['metrics_csv'], 'charts/success_rate') if f else float('nan')
        pct = lambda r: f"{100 * float(r['success']):.0f}" if r else '–'
        md.append(f'| {what} | {pct(b)} | {pct(d)} | {"–" if np.isnan(imag) else f"{100 * imag:.0f}"} |')
        bars.append((what, float(b['success']) if b else np.nan, float(d['success']) if d else np.nan, imag))
    md.append('')
    if any(not np.isnan(x[2]) for x in bars):
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(len(bars))
        for i, (lab, col) in enumerate([('base (real)', '0.6'), ('DiWA (real)', 'C0'), ('DiWA (imagined)', 'C1')]):
            ax.bar(x + (i - 1) * 0.27, [100 * b[i + 1] for b in bars], 0.27, label=lab, color=col)
        ax.set_xticks(x, [b[0].replace(' + ', '\n+ ').replace(' (', '\n(') for b in bars], fontsize=6)
        ax.set_ylabel('success (%)'), ax.set_title(f'Fig. 2 / Fig. S.6 / Table S.6 analogues ({report_task}, seed {s0})')
        ax.legend(fontsize=7), plt.tight_layout()
        plt.savefig(os.path.join(out_dir, 'figures', 'fig2_s6_variants.png'), dpi=120), plt.close()
        md += ['![variants](figures/fig2_s6_variants.png)', '']
    # ---- Fig. S.7 and the world-model / reward checks
    wm_csv = os.path.join(run, 'wm_open_loop.csv')
    if os.path.isfile(wm_csv):
        import shutil
        md += ['## Fig. S.7: world-model open-loop prediction (held-out play, 2 context frames)', '',
               'Mean absolute error of each part\'s state read from the imagined latents, vs. "nothing moves", on '
               'windows where the part moves.', '', '| part | h=1 | h=10 | h=25 | h=50 |', '|---|---|---|---|---|']
        wm_rows = read_results(wm_csv)
        for part in PARTS:
            cells = {int(r['horizon']): f"{float(r['model_mae']):.3f} / {float(r['still_mae']):.3f}"
                     for r in wm_rows if r['part'] == part}
            md.append(f'| {part} | ' + ' | '.join(cells.get(h, '–') for h in HORIZONS) + ' |')
        md.append('')
        fig = os.path.join(run, 'figures', 'wm_rollout.png')
        if os.path.isfile(fig):
            shutil.copyfile(fig, os.path.join(out_dir, 'figures', 'figS7_wm_rollout.png'))
            md += ['![Fig. S.7](figures/figS7_wm_rollout.png)', '']
    rw = [json.load(open(p)) for p in (os.path.join(run, t, 'reward_report.json') for t in TASKS) if os.path.isfile(p)]
    if rw:
        md += ['## Reward classifier (§III.C)', '', '| task | precision | recall | success threshold (imagined) '
               '| imagined demo end scored success | ... at its own success frame | ... at some frame '
               '| imagined play false alarm, frames | ... windows |', '|---|---|---|---|---|---|---|---|---|']
        md += [f"| {r['task']} | {r['precision']:.2f} | {r['recall']:.2f} | {_num(r.get('threshold', 0.5), '.1f')} "
               f"| {r['imagined_final_success']:.2f} | {_num(r.get('imagined_success_frame'))} "
               f"| {_num(r.get('imagined_demo_reached'))} "
               f"| {r['imagined_false_alarm']:.3f} | {_num(r.get('imagined_false_window'))} |"
               for r in rw] + ['']
    # ---- wall-clock
    wall = len(md)
    md += ['## Wall-clock (this machine, as run)', '', '| stage | runs | total |', '|---|---|---|']
    totals = {}
    for root in runs.values():
        for dirpath, dirs, files in os.walk(root):
            if root == run and 'variants' in dirs:
                dirs.remove('variants')                 # walked as runs of their own
            for f in files:
                if f.endswith('.pt') and not f.startswith('latents') and 'snapshots' not in dirpath:
                    ck = torch.load(os.path.join(dirpath, f), weights_only=True, map_location='cpu')
                    if isinstance(ck, dict) and 'wall_s' in ck:
                        n, s = totals.get(ck['stage'], (0, 0.0))
                        totals[ck['stage']] = (n + 1, s + float(ck['wall_s']))
    collect_s = _collect_wall(run)
    if collect_s:
        totals['collect'] = (1, collect_s)        # per-episode times / worker processes
    totals['eval'] = (len(rows), sum(float(r.get('wall_s') or 0) for r in rows))
    for stage, (n, s) in totals.items():
        md.append(f'| {stage} | {n} | {s / 3600:.2f} h |')
    md += [f'| **all** | | **{sum(s for _, s in totals.values()) / 3600:.2f} h** |', '']
    write_rows(os.path.join(out_dir, 'results.csv'), rows or [{'variant': ''}])
    path = os.path.join(out_dir, 'results.md')
    data.atomic_write(path, lambda fh: fh.write('\n'.join(md).encode()))
    if readme:
        figures = [line for line in md if line.startswith('![')]
        update_readme(readme, out_dir, block + ['## Figures', ''] + [x for f in figures for x in (f, '')] + md[wall:])
    return path


README_BEGIN, README_END = '<!-- report:begin -->', '<!-- report:end -->'


def update_readme(readme: str, out_dir: str, lines: list) -> bool:
    """Replace what lies between README_BEGIN and README_END in `readme` with `lines` (markdown of results.md,
    headings one level down, links made relative to the README), so that the README shows the report's numbers
    without anyone copying them by hand. A README without both markers, or outside which out_dir lies (a report
    written elsewhere, e.g. by the tests, is not this README's), is left alone (-> False)."""
    import data
    if not os.path.isfile(readme):
        return False
    rel = os.path.relpath(os.path.abspath(out_dir), os.path.dirname(os.path.abspath(readme))).replace(os.sep, '/')
    if rel == '..' or rel.startswith('../'):
        return False
    text = open(readme, encoding='utf-8').read()
    if README_BEGIN not in text or README_END not in text.split(README_BEGIN, 1)[1]:
        return False
    fix = lambda line: ('#' + line if line.startswith('#') else
                        line.replace('](figures/', f']({rel}/figures/'))
    body = '\n'.join([README_BEGIN, f'<!-- written by eval.py --report from {rel}/results.md: do not edit by hand -->',
                      *map(fix, lines), README_END])
    before, rest = text.split(README_BEGIN, 1)
    new = before + body + rest.split(README_END, 1)[1]
    if new != text:
        data.atomic_write(readme, lambda fh: fh.write(new.encode('utf-8')))
    return True


def _collect_wall(run: str) -> float:
    p, c = os.path.join(run, 'data', 'collect_progress.json'), os.path.join(run, 'data', 'collect_config.json')
    if not os.path.isfile(p):
        return 0.0
    workers = json.load(open(c)).get('workers', 1) if os.path.isfile(c) else 1
    return float(sum(v.get('wall_s', 0.0) for v in json.load(open(p)).values() if isinstance(v, dict))) / workers


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import train as TR
    from env import TASKS
    p = argparse.ArgumentParser(description='DiWA evaluation in the simulator, world-model and reward reports.')
    p.add_argument('--run', default=None, help='run folder (default runs/<preset>)')
    p.add_argument('--preset', choices=['paper', 'cpu', 'test'], default='cpu')
    p.add_argument('--data', default=None, help='dataset root (default <run>/data)')
    p.add_argument('--task', nargs='+', default=['open_drawer'], help="task(s), or 'all'")
    p.add_argument('--policy', nargs='+', default=None, help='policies to evaluate (base, diwa, dppo); default all found')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--episodes', type=int, default=None, help='episodes per task and seed (default: the preset)')
    p.add_argument('--workers', type=int, default=None, help='simulator processes')
    p.add_argument('--env', choices=['desk', 'calvin'], default='desk')
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
    p.add_argument('--scripted', action='store_true', help='run the scripted skills through the evaluation loop')
    p.add_argument('--snapshots', action='store_true', help='also evaluate the weights kept along fine-tuning and '
                   "along DPPO ('diwa@<step>', 'dppo@<step>' in results.csv: Fig. 3, Fig. S.5)")
    p.add_argument('--wm-report', action='store_true', help='world-model open-loop errors and Fig. S.7')
    p.add_argument('--reward-report', action='store_true', help='reward classifier on held-out and imagined latents')
    p.add_argument('--press-report', action='store_true',
                   help="does the world model's imagination know whether a button press switched the LED")
    p.add_argument('--gap-report', action='store_true',
                   help='imagination vs simulator on identical start states (--policy base/diwa/...; default base)')
    p.add_argument('--report', action='store_true',
                   help='only rewrite results.md / results.csv / figures from the run folder (train.py --stage '
                        'report runs the missing experiments first)')
    p.add_argument('--report-dir', default='results', help='where --report writes')
    p.add_argument('--readme', default='README.md',
                   help="README whose <!-- report:begin/end --> block gets Table I, the figures and the wall-clock "
                        "('' for none)")
    p.add_argument('--report-task', choices=TASKS, default='open_drawer', help='the task of the variants / DPPO')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds the report averages over')
    p.add_argument('--inherit', nargs='+', default=[], metavar='RUN', help='parent run folder(s) (train.py --inherit)')
    args = p.parse_args(argv)
    if args.report:
        args.run = args.run or os.path.join('runs', args.preset)
        print(write_report(args.run, args.report_dir, args.preset, args.seeds, args.report_task, args.readme))
        return 0
    tasks = list(TASKS) if args.task == ['all'] else args.task
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        p.error(f'--task: unknown task(s) {bad}; choose from {TASKS} or all')
    args.run = args.run or os.path.join('runs', args.preset)
    args.demos, args.post_success_frames = 50, 16           # the defaults of train.py (cache keys match)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = TR.pick_device(args.device)
    cfg = EvalConfig(**{**EvalConfig().__dict__, **PRESETS[args.preset]})
    if args.episodes is not None:
        cfg.episodes = args.episodes
    if args.workers is not None:
        cfg.workers = args.workers
    try:
        if args.wm_report:
            wm_report(args, device)
        if args.press_report:
            press_report(args, device)
        for task in tasks:
            if args.reward_report:
                reward_report(args, device, task)
            if args.scripted:
                t0 = time.time()
                out = run_episodes(lambda B: ScriptedAgent(task, B, args.seed), task,
                                   task_starts(task, cfg.episodes, args.seed), cfg, seed=args.seed, env_kind=args.env)
                summarize(task, 'scripted', args.seed, out, t0)
            if args.gap_report:
                for name in args.policy or ['base']:
                    imagination_gap(args, device, task, cfg, name)
            if not (args.scripted or args.wm_report or args.reward_report or args.gap_report or args.press_report):
                evaluate_checkpoints(args, device, task, cfg, env_kind=args.env, policies=args.policy,
                                     snapshots=args.snapshots)
    except TR.user_errors() as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
