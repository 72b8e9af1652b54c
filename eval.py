"""Evaluation in the simulator: paper §IV (Table I, Fig. 2, Fig. 3), S.5-S.7.

Every claim of the project is a success rate measured here, in the built-in desk (or the real CALVIN
simulator with --env calvin), never in the world model:

    for each episode (task-specific start state where the task is possible, same states for every policy):
        x_0 = reset(start)                      -> z_0 = posterior(h_0, x_0)        (world_model.obs_step)
        repeat 18 times (72 control steps):     chunk a_t..a_{t+3} = policy(z_t), denoised by --eval.sampler
            execute each action (gripper thresholded at 0, S.3.1), update the posterior with every frame,
            stop at the task's success test (env.task_success: CALVIN's task definitions on scene_obs)

    python train.py --stage eval --task open_drawer --seeds 0 1 2        # every policy of the run, each seed
    python train.py --stage eval --task open_drawer --env calvin          # the real calvin_env, if installed

Rows go to <run>/results.csv: one row per (task, policy, seed, simulator, sampler) with successes and a 95% interval.
"""
from __future__ import annotations

import csv
import fcntl
import math
import os
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
import dream_ppo as P
import env


@dataclass
class EvalConfig:
    episodes: int = 100        # episodes per task and seed: not in the paper (Fig. 3 uses 20); 100 for a +-10-point CI
    max_decisions: int = 18    # decisions per episode: 18 chunks x Ta=4 = 72 control steps, the reference code's limit
    envs: int = 20             # desks stepped in parallel per batch of episodes
    workers: int = 2           # simulator processes (0 = in this process)
    sampler: str = 'mean'      # denoising: 'mean' (noise-free chain) or 'ddpm' (DPPO's evaluation: noise on steps k > 1)


PRESETS = {'paper': {}, 'cpu': {}, 'test': {'episodes': 4, 'envs': 4, 'workers': 0}}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate k/n (good also near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def window_starts(split: dict, task: str, n: int, seed: int, arm: str = 'recorded') -> list:
    """n start states (robot_obs, scene_obs) in the real CALVIN: the first frames of the annotated windows in
    `split`, of any task, in which `task` is possible (CALVIN's own states; every window rather than the task's
    own gives several times more distinct starts), in an order drawn with `seed`, cycled when there are fewer
    than n. The built-in desk's sampler would put blocks inside CALVIN's cabinet and solve the arm for another
    gripper. arm 'recorded': the arm and gripper as recorded at that frame; 'neutral': the same scenes with the
    robot at CALVIN's neutral pose, gripper open, as CALVIN's own evaluation resets it (diagnose.py gap)."""
    if arm not in ('recorded', 'neutral'):
        raise ValueError(f"arm must be 'recorded' or 'neutral', got {arm!r}")
    rows = [r for r in np.unique(split['windows'][:, 0]) if env.task_possible(task, split['scene_obs'][r])]
    if not rows:
        raise data.DataError(f'no annotated window starts where {task} is possible: no CALVIN start states')
    order = np.random.default_rng([seed, env.TASKS.index(task), 4321]).permutation(len(rows))
    pick = [rows[order[i % len(rows)]] for i in range(n)]
    robot = [env.CALVIN_NEUTRAL_ROBOT_OBS if arm == 'neutral' else split['robot_obs'][r] for r in pick]
    return [(q.astype(np.float64), split['scene_obs'][r].astype(np.float64)) for q, r in zip(robot, pick)]


def task_starts(task: str, n: int, seed: int) -> list:
    """n start states (robot_obs, scene_obs) where `task` is possible; the same for every policy at a seed,
    so base and fine-tuned policies are compared on identical episodes."""
    rng = np.random.default_rng([seed, env.TASKS.index(task), 1234])
    return [env.sample_task_start(task, rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# Agents: map (control step, observations, latent features) -> actions (B, 7) for the active desks.
# ----------------------------------------------------------------------------------------------------

class ChunkAgent:
    """Any policy that outputs action chunks from latents (diffusion or Gaussian): one decision every Ta steps."""

    def __init__(self, policy, Ta: int = 4, sampler: str = 'mean', generator=None):
        self.policy, self.Ta, self.sampler, self.generator = policy, Ta, sampler, generator
        self.chunk = None

    @torch.no_grad()
    def __call__(self, t: int, obs: list, feat: torch.Tensor) -> np.ndarray:
        if t % self.Ta == 0:   # new decision: denoise a fresh chunk from z_t
            chain = self.policy.sample(feat, sampler=self.sampler, generator=self.generator)
            self.chunk = chain[:, -1].float().cpu().numpy()            # (B, Tp, 7)
        return self.chunk[:, t % self.Ta]


@torch.no_grad()
def run_episodes(make_agent, task: str, starts: list, cfg: EvalConfig, wm=None, device='cpu',
                 image_size: int = 64, seed: int = 0, env_kind: str = 'desk') -> dict:
    """Run one episode from each start state; returns {'success': (n,) bool, 'steps': (n,) int, 'sim_steps'}.

    make_agent(B) -> agent(t, obs_list, feat (B, F) or None) -> actions (B, 7). With a world model, the
    posterior is filtered from every real frame: s_0 = q(h_0, x_0), s_{t+1} = q(f(s_t, a_t), x_{t+1}).
    """
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
                    if task in obs[i]['completed'] if 'completed' in obs[i] else \
                            env.task_success(task, start_info[i], obs[i]):    # calvin_env: CALVIN's own oracle
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
                 'mean_steps', 'sim_steps_finetune', 'preset', 'env', 'sampler', 'ckpt_key', 'commit', 'wall_s']


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
    """Replace the row of the same (task, policy, seed, env, sampler) or append it; atomic rewrite of the file,
    under a lock so that evaluations of several tasks running at once do not lose each other's rows."""
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        same = lambda r: (r['task'], r['policy'], str(r['seed']), r.get('env') or 'desk', r.get('sampler') or 'mean')
        rows = [r for r in read_results(path) if same(r) != same(row)]
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

def policy_agent_factory(policy_pre, actor=None, K_ft: int = 0, Ta: int = 4, seed: int = 0, sampler: str = 'mean'):
    """make_agent(B) for a pre-trained policy, or for DiWA's pair (frozen first K-K' steps, fine-tuned last K'),
    denoising with the evaluation sampler `sampler` (diffusion_policy.SAMPLERS)."""
    gen = torch.Generator(device=next(policy_pre.parameters()).device).manual_seed(seed)
    K_ft = min(K_ft, P.policy_K(policy_pre))      # the Gaussian policy (S.5.3) has a single 'denoising' step

    class _Pair(torch.nn.Module):  # sample() of the pair = the fine-tuned policy that DiWA deploys
        def sample(self, feat, sampler, generator=None):
            return policy_pre.sample(feat, sampler=sampler, ft_policy=actor, K_ft=K_ft if actor else 0,
                                     generator=generator)
    return lambda B: ChunkAgent(_Pair(), Ta=Ta, sampler=sampler, generator=gen)


def stage_of(name: str) -> str:
    """Policy name in results.csv -> the stage that wrote its checkpoint."""
    return 'dppo' if name.startswith('dppo') else 'finetune'


def metric_at(csv_path: str, step: int, name: str):
    """The value of metric `name` logged at iteration `step` of a metrics csv, or None."""
    row = next((r for r in read_results(csv_path) if r.get('step') == str(step)), None)
    return float(row[name]) if row and row.get(name) not in (None, '') else None


def candidates(bc_ckpt: dict, policy_pre, task: str, finetuned: dict, policies=None, snapshots: bool = False) -> dict:
    """{policy name: (checkpoint, fine-tuned actor or None)} to evaluate for one task and seed: 'base' (the seed's
    BC policy), each finished checkpoint of `finetuned` ({'diwa': path, 'dppo': path}) fine-tuned from that BC
    policy, and with snapshots the weights kept along their training as 'diwa@<N>' / 'dppo@<N>' (Fig. 3, S.5).
    policies: only these names ('dppo' also selects 'dppo@<N>')."""
    out = {'base': (bc_ckpt, None)}
    for name, path in finetuned.items():
        if not os.path.isfile(path):
            continue
        ck = data.load_checkpoint(path, stage_of(name), task)
        if ck.get('done') and bc_ckpt['key'] not in ck.get('upstream', []):
            print(f'[eval] {path}: fine-tuned from another BC policy than this seed\'s: not evaluated '
                  f'(run --stage {stage_of(name)} again)')
        elif ck.get('done'):
            out[name] = (ck, P.load_actor(ck, policy_pre))
    for name, path in finetuned.items():
        folder = os.path.splitext(path)[0] + '_snapshots'
        if not (snapshots and name in out and os.path.isdir(folder)):
            continue
        for f in sorted(os.listdir(folder), key=lambda f: int(''.join(filter(str.isdigit, f)) or 0)):
            snap = data.load_checkpoint(os.path.join(folder, f), stage_of(name), task)
            if snap['key'] != out[name][0]['key']:
                continue                                      # left by an earlier run with other settings
            # a snapshot keeps only weights: its simulator steps (DPPO) are read from the run's metrics
            sim = metric_at(os.path.splitext(path)[0] + '_metrics.csv', snap['step'], 'charts/sim_steps')
            snap.update(key=f"{snap['key']}@{snap['step']}", state={'counters': {'sim_steps': int(sim or 0)}})
            out[f"{name}@{snap['step']}"] = (snap, P.load_actor(snap, policy_pre))
    return {k: v for k, v in out.items() if not policies or k.split('@')[0] in policies}


def already_done(results_paths: list, task: str, policy: str, seed: int, key: str, cfg: EvalConfig, env_kind: str) -> bool:
    """Whether results.csv of this run (or of a run it inherits from) has this evaluation already."""
    return any(r['task'] == task and r['policy'] == policy and str(r['seed']) == str(seed) and r['ckpt_key'] == key
               and int(r['episodes']) == cfg.episodes and (r.get('env') or 'desk') == env_kind
               and (r.get('sampler') or 'mean') == cfg.sampler for path in results_paths for r in read_results(path))


def evaluate(policies: dict, policy_pre, task: str, seed: int, cfg: EvalConfig, wm, device, results_paths: list,
             preset: str, env_kind: str = 'desk', starts: list | None = None) -> list:
    """Run every policy of `policies` (candidates) from the same start states (default task_starts) and write one
    row each into results_paths[0]; a policy whose row is up to date in any of results_paths is skipped."""
    rows, starts = [], starts or task_starts(task, cfg.episodes, seed)
    for name, (ck, actor) in policies.items():
        if already_done(results_paths, task, name, seed, ck['key'], cfg, env_kind):
            print(f'[eval] {task} {name} seed {seed}: up to date in {results_paths[0]}: skipped')
            continue
        t0 = time.time()
        K_ft = ck['config']['K_ft'] if actor is not None else 0
        out = run_episodes(policy_agent_factory(policy_pre, actor, K_ft, seed=seed, sampler=cfg.sampler), task,
                           starts, cfg, wm=wm, device=device, seed=seed, env_kind=env_kind)
        row = summarize(task, name, seed, out, t0, preset=preset, env=env_kind, sampler=cfg.sampler,
                        ckpt_key=ck['key'], sim_steps_finetune=ck.get('state', {}).get('counters', {}).get('sim_steps', 0))
        write_result(results_paths[0], row)
        rows.append(row)
    return rows
