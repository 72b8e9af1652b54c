"""Throughput benchmarks: how fast each hot loop runs, and how close it gets to what the machine can do.

    python bench.py [env|wm|bc|dream|ppo|finetune|main|all] [--device auto] [--quick] [--run runs/cpu]
    python bench.py dppo --dppo-src PATH     # our PPO update against DPPO's, from a checkout of irom-lab/dppo

The limits on a CPU (or GPU) are its matrix throughputs, measured first with large square matmuls in fp32 and in
bf16 (bf16 runs on AMX / AVX512-BF16 units or tensor cores, several times the fp32 rate where the hardware has them).
Networks' achieved GFLOP/s are counted from their layer shapes (2 * in * out per sample for every Linear,
the same per output pixel for every convolution; elementwise work ignored), so 'fraction of a limit'
reads as: how much of that matmul engine the loop keeps busy. Each loop runs in its preset's precision (`bf16`).
`main` prints the wall-clock of each stage of `python train.py --stage all --preset cpu --tasks open_drawer`:
measured, from the run folder's stage_times.json, and extrapolated from this benchmark where it can.
Absolute times on shared machines are noisy: compare ratios within one run.

Below half the bf16 limit, a loop says what bounds it (measured with torch's profiler; FINDINGS.md, "Speed on 2
cores"): the world model's small convolutions, and in imagination and the PPO update the sequential chain of small
matmuls (20 denoising steps, 4 world-model steps per decision) and their elementwise work, which no batch size removes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import data
import diffusion_policy as D
import dream_ppo as P
import env
import reward as R
import world_model as W


def timeit(fn, min_time: float = 1.0, warmup: int = 1) -> float:
    """Seconds per call of fn(), averaged over at least `min_time` seconds after `warmup` calls."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / n


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def matmul_limit(device, dtype=torch.float32, n: int = 2048) -> float:
    """Measured GFLOP/s of an n x n @ n x n matmul in dtype: the machine's practical peak for our networks."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: (a @ b, sync(device)), min_time=2.0)
    return 2 * n ** 3 / t / 1e9


# What bounds each loop where it keeps the bf16 matmul engine less than half busy (module docstring).
BOUNDS = {'wm': 'convolutions of 3-64 channels on 5x5-64x64 maps', 'dream': 'sequential small matmuls and '
          'elementwise work: K denoising + Ta world-model steps per decision', 'ppo': 'small matmuls and '
          "elementwise work per minibatch, the Adam step and the BC targets' denoising chains"}


def of_limits(gflops: float, limits: dict, loop: str = '') -> str:
    """'x GFLOP/s (a% of the fp32 limit, b% of the bf16 limit)', and what bounds `loop` below half the bf16 one."""
    out = f'{gflops:.1f} GFLOP/s (' + ', '.join(f'{100 * gflops / v:.0f}% of the {k} limit' for k, v in limits.items())
    bound = loop in BOUNDS and 'bf16' in limits and gflops < 0.5 * limits['bf16']
    return out + (f'; bound by {BOUNDS[loop]})' if bound else ')')


def linear_flops(module: nn.Module) -> int:
    """FLOPs of one forward pass of every nn.Linear in `module`, per input row (2 * in * out)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def count_flops(fn) -> int:
    """FLOPs of one call of fn(), counted by torch from the shapes of its matmuls and convolutions."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


CONFIG_CLASS = {'world_model': 'WMConfig', 'diffusion_policy': 'BCConfig', 'reward': 'RewardConfig',
                'dream_ppo': 'FinetuneConfig', 'data': 'CollectConfig'}


def presets(module) -> dict:
    """{preset name: config} of a stage module (paper defaults shifted by each preset)."""
    cls = getattr(module, CONFIG_CLASS[module.__name__])
    return {name: dataclasses.replace(cls(), **over) for name, over in module.PRESETS.items()}


# ---------------------------------------------------------------------------------------------------- env
def bench_env(quick: bool) -> None:
    """Control steps/s of one desk in this process, with and without both 64x64 cameras, and the frames/s
    of a 2-worker play-data collection (writing CALVIN-layout files)."""
    n = 150 if quick else 600
    for cameras in (True, False):
        desk = env.DeskEnv(image_size=64, cameras=cameras, seed=0)
        rng = np.random.default_rng(0)
        desk.reset()
        actions = np.clip(rng.normal(0, 0.5, (n, 7)), -1, 1)
        t0 = time.perf_counter()
        for i in range(n):
            if i % 100 == 99:
                desk.reset()
            desk.step(actions[i])
        dt = time.perf_counter() - t0
        desk.close()
        print(f'env: {"both 64x64 cameras" if cameras else "no cameras":>20s}: {n / dt:7.0f} control steps/s')
    cfg = presets(data)['cpu']
    cfg = dataclasses.replace(cfg, episodes=2 if quick else 4, episode_len=300 if quick else 600, workers=2)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        data.collect(cfg, d)
        dt = time.perf_counter() - t0
    frames = cfg.episodes * cfg.episode_len
    print(f'env: collection, 2 workers: {frames / dt:7.0f} frames/s ({frames} frames incl. process start-up)')
    TIMED['collect'] = frames / dt


# ---------------------------------------------------------------------------------------------------- wm
def _wm_batch(cfg, device):
    B, T, S = cfg.batch, cfg.seq_len, cfg.image_size
    is_first = torch.zeros(B, T, dtype=torch.bool, device=device)
    is_first[:, 0] = True
    return {'rgb_static': torch.rand(B, T, 3, S, S, device=device) * 2 - 1,
            'rgb_gripper': torch.rand(B, T, 3, S, S, device=device) * 2 - 1,
            'proprio': torch.randn(B, T, 18, device=device), 'scene': torch.randn(B, T, 24, device=device) * 0.1,
            'actions': torch.rand(B, T, 7, device=device) * 2 - 1, 'is_first': is_first}


def bench_wm_one(preset: str, device, quick: bool) -> dict:
    """World-model training frames/s (frames = batch x seq_len per step) at one preset."""
    cfg = presets(W)[preset]
    wm = W.WorldModel(cfg).to(device)
    opt = W.make_optimizer(wm, cfg)
    batch = _wm_batch(cfg, device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    step = lambda: (W.update_wm(wm, opt, batch), sync(device))
    t = timeit(step, min_time=2.0 if quick or preset == 'paper' else 5.0)
    flops = 3 * count_flops(lambda: W.loss_wm(wm, batch))          # forward + ~2x for backward
    out = {'preset': preset, 'frames_s': cfg.batch * cfg.seq_len / t, 'step_s': t, 'gflops': flops / t / 1e9,
           'peak_rss_gib': peak_rss_gib(), 'params_m': sum(p.numel() for p in wm.parameters()) / 1e6}
    if device.type == 'cuda':
        out['peak_gpu_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def bench_wm(device, quick: bool, limit: float) -> None:
    """Each preset in its own process, so that its peak memory is its own."""
    for preset in ('cpu', 'paper'):
        r = _subprocess_json('_wm', preset, device, quick)
        if r is None:
            continue
        TIMED.setdefault(f'wm_{preset}', r['step_s'])
        gpu = f", peak GPU {r['peak_gpu_gib']:.1f} GiB" if 'peak_gpu_gib' in r else ''
        print(f"wm: {preset:>5s} preset ({r['params_m']:.1f}M params): {r['frames_s']:7.0f} training frames/s, "
              f"{of_limits(r['gflops'], limit, 'wm')}, peak RSS {r['peak_rss_gib']:.1f} GiB{gpu}")


# ---------------------------------------------------------------------------------------------------- policy, dream, ppo
def make_agent_models(preset: str, device):
    """World model, pre-trained policy, classifier and critic of a preset, with random weights (speed only)."""
    wm = W.WorldModel(presets(W)[preset]).to(device).requires_grad_(False)
    policy = D.make_policy(wm.feat_dim, presets(D)[preset]).to(device)
    clf = R.RewardClassifier(wm.feat_dim, presets(R)[preset]).to(device).requires_grad_(False)
    ft = presets(P)[preset]
    actor = P.make_actor(policy)
    critic = P.make_critic(wm.feat_dim, ft).to(device)
    return wm, policy, actor, critic, clf, ft


def random_pool(wm, n: int, device) -> dict:
    """Start states: a few prior steps from the initial state under random actions."""
    state = wm.initial(n, device)
    with torch.no_grad():
        for _ in range(3):
            state = wm.img_step(state, torch.rand(n, 7, device=device) * 2 - 1)
    return state


def bench_bc(device, quick: bool, limit: float) -> None:
    """BC training samples/s (one sample = one (latent, chunk) pair, one random denoising step)."""
    for preset in ('cpu', 'paper'):
        cfg, feat_dim = presets(D)[preset], W.WorldModel(presets(W)[preset]).feat_dim
        policy = D.make_policy(feat_dim, cfg).to(device)
        opt, ema = D.make_optimizer(policy, cfg), D.make_ema(policy, cfg)
        batch = {'actions': torch.rand(cfg.batch, cfg.Tp, cfg.action_dim, device=device) * 2 - 1,
                 'cond': torch.randn(cfg.batch, feat_dim, device=device)}
        t = timeit(lambda: (D.update_bc(policy, opt, ema, batch), sync(device)), min_time=1.0 if quick else 3.0)
        flops = 3 * count_flops(lambda: policy.bc_loss(batch['actions'], batch['cond']))
        print(f'bc: {preset:>5s} preset: {cfg.batch / t:8.0f} samples/s, {of_limits(flops / t / 1e9, limit)}')


def bench_dream(device, quick: bool, limit: float) -> None:
    """Imagination (Alg. 1 l. 8-26): imagined world-model steps/s and policy decisions/s for N parallel
    episodes, each decision = K denoising steps + Ta world-model steps + Ta classifier calls."""
    for preset in ('cpu', 'paper'):
        wm, policy, actor, critic, clf, ft = make_agent_models(preset, device)
        for N in (50, 500):
            cfg = dataclasses.replace(ft, n_envs=N, n_steps=2 if quick else 4)
            pool = random_pool(wm, 256, device)
            gen = torch.Generator(device=device).manual_seed(0)
            roll = lambda: (P.imagine_rollout(wm, policy, actor, critic, clf, pool, cfg, gen), sync(device))
            t = timeit(roll, min_time=1.0 if quick else 3.0)
            flops = count_flops(lambda: P.imagine_rollout(wm, policy, actor, critic, clf, pool, cfg, gen))
            dec = N * cfg.n_steps
            print(f'dream: {preset:>5s} preset, N={N:3d}: {dec * 4 / t:8.0f} imagined steps/s, {dec / t:7.0f} decisions/s '
                  f'(K={policy.K}), {of_limits(flops / t / 1e9, limit, "dream")}')


def bench_ppo(device, quick: bool, limit: float) -> None:
    """The PPO update (Alg. 1 l. 27-35): samples/s, sample = one decision x one fine-tuned denoising step."""
    for preset in ('cpu', 'paper'):
        wm, policy, actor, critic, clf, ft = make_agent_models(preset, device)
        cfg = dataclasses.replace(ft, n_envs=min(ft.n_envs, 64), n_steps=4, update_epochs=1)
        gen = torch.Generator(device=device).manual_seed(0)
        buffer = P.imagine_rollout(wm, policy, actor, critic, clf, random_pool(wm, 256, device), cfg, gen)
        opts = P.make_optimizers(actor, critic, cfg)
        upd = lambda: (P.update(actor, critic, policy, buffer, opts, cfg, 0.05, generator=gen), sync(device))
        t = timeit(upd, min_time=1.0 if quick else 3.0)
        flops = count_flops(lambda: P.update(actor, critic, policy, buffer, opts, cfg, 0.05, generator=gen))
        samples = cfg.n_envs * cfg.n_steps * cfg.K_ft
        print(f'ppo: {preset:>5s} preset: {samples / t:8.0f} samples/s (batch {cfg.batch_size}), '
              f'{of_limits(flops / t / 1e9, limit, "ppo")}')


def bench_dppo(device, quick: bool, src: str | None) -> None:
    """Our PPO update (BC term in, the preset's precision) against DPPO's update without its BC term, on the same
    network and shapes, one after the other in one process (best of 3 each). DPPO's code is imported from a
    checkout of irom-lab/dppo (`src`), never copied here. DPPO's update is what its agent does between rollouts
    (agent/finetune/train_ppo_diffusion_agent.py): the critic's values and the old log-probs of every sample,
    then `update_epochs` passes of `PPODiffusion.loss` minibatches with their Adam steps; ours (`dream_ppo.update`)
    draws the frozen policy's chains for the BC targets and the old log-probs, then its epochs, each minibatch
    carrying the BC term's second pass. Samples = decisions x fine-tuned steps x epochs."""
    if not src or not os.path.isdir(os.path.join(src, 'model', 'diffusion')):
        print('dppo: skipped (--dppo-src: a checkout of irom-lab/dppo, for its model/diffusion/diffusion_ppo.py)')
        return
    sys.path.insert(0, os.path.abspath(src))
    try:
        from model.common.critic import CriticObs
        from model.diffusion.diffusion_ppo import PPODiffusion
        from model.diffusion.mlp_diffusion import DiffusionMLP
    except ImportError as e:
        print(f'dppo: skipped: DPPO\'s code does not import from {src}: {e}')
        return
    for preset in ('cpu',) if quick else ('cpu', 'paper'):
        torch.manual_seed(0)
        wm, policy, actor, critic, clf, ft = make_agent_models(preset, device)
        bcfg, F_, T, N, K_ft = presets(D)[preset], wm.feat_dim, ft.n_steps, ft.n_envs, ft.K_ft
        g = torch.Generator(device=device).manual_seed(1)
        buffer = {'feat': torch.randn(T, N, F_, generator=g, device=device),
                  'chain': torch.randn(T, N, K_ft + 1, bcfg.Tp, bcfg.action_dim, generator=g, device=device).clamp(-1, 1),
                  'rewards': torch.rand(T, N, generator=g, device=device), 'values': torch.randn(T + 1, N, device=device),
                  'dones': torch.rand(T, N, generator=g, device=device) < 0.1}
        opts = P.make_optimizers(actor, critic, ft)
        ours = lambda: (P.update(actor, critic, policy, buffer, opts, ft, 0.05, generator=g), sync(device))
        # DPPO at the same widths: a residual MLP of mlp_layers x mlp_dim, the critic's MLP, K and K' as ours
        net = DiffusionMLP(action_dim=bcfg.action_dim, horizon_steps=bcfg.Tp, cond_dim=F_, time_dim=bcfg.time_dim,
                           mlp_dims=[bcfg.mlp_dim] * bcfg.mlp_layers, residual_style=True)
        crit = CriticObs(cond_dim=F_, mlp_dims=[ft.critic_hidden] * ft.critic_layers, residual_style=True)
        model = PPODiffusion(actor=net, critic=crit, ft_denoising_steps=K_ft, gamma_denoising=ft.gamma_denoise,
                             clip_ploss_coef=ft.clip_max, clip_ploss_coef_base=ft.clip_min,
                             clip_ploss_coef_rate=ft.clip_rate,
                             horizon_steps=bcfg.Tp, obs_dim=F_, action_dim=bcfg.action_dim, denoising_steps=bcfg.K,
                             device=str(device)).to(device)
        a_opt = torch.optim.Adam(model.actor_ft.parameters(), lr=ft.actor_lr)
        c_opt = torch.optim.Adam(model.critic.parameters(), lr=ft.critic_lr)
        n_dec, b_dec = T * N, max(1, ft.batch_size // K_ft)         # DPPO's minibatches are of decisions
        obs = {'state': buffer['feat'].reshape(n_dec, 1, F_)}
        chains = buffer['chain'].reshape(n_dec, K_ft + 1, bcfg.Tp, bcfg.action_dim)
        ret, adv = torch.randn(n_dec, device=device), torch.randn(n_dec, device=device)

        def dppo():
            with torch.no_grad():
                values = model.critic(obs).flatten()
                logp_old = model.get_logprobs(obs, chains).view(n_dec, K_ft, bcfg.Tp, bcfg.action_dim)
            for _ in range(ft.update_epochs):
                perm = torch.randperm(n_dec, device=device)
                for s in range(0, n_dec, b_dec):
                    b = perm[s:s + b_dec]
                    pg, _, v, *_ = model.loss({'state': obs['state'][b]}, chains[b], ret[b], values[b], adv[b],
                                              logp_old[b], use_bc_loss=False)
                    a_opt.zero_grad(), c_opt.zero_grad()
                    (pg + 0.5 * v).backward()
                    torch.nn.utils.clip_grad_norm_(model.actor_ft.parameters(), ft.max_grad_norm)
                    a_opt.step(), c_opt.step()
            sync(device)

        ours(), dppo()                                                # warm-up
        t_ours, t_dppo = [], []
        for _ in range(3):
            t0 = time.perf_counter(); ours(); t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); dppo(); t_dppo.append(time.perf_counter() - t0)
        samples = ft.update_epochs * n_dec * K_ft
        so, sd = samples / min(t_ours), samples / min(t_dppo)
        print(f'dppo: {preset:>5s} preset ({ft.update_epochs} epochs x {n_dec} decisions x K\'={K_ft}, minibatch '
              f'{ft.batch_size} samples): ours (BC in, bf16={ft.bf16}) {so:8.0f} samples/s, DPPO (no BC, fp32) '
              f'{sd:8.0f} samples/s: ours / DPPO = {so / sd:.2f}')


def bench_finetune_one(preset: str, device) -> dict:
    """Seconds per DiWA iteration (rollout + update) at one preset, measured on 2 iterations after a warm-up."""
    wm, policy, actor, critic, clf, cfg = make_agent_models(preset, device)
    pool = random_pool(wm, 256, device)
    opts, scaler, counters = P.make_optimizers(actor, critic, cfg), P.RunningRewardScaler(cfg.gamma), P.new_counters()
    gen = torch.Generator(device=device).manual_seed(0)
    it = lambda: (P.iteration(wm, policy, actor, critic, clf, opts, scaler, pool, 'open_drawer', cfg, counters, gen),
                  sync(device))
    t = timeit(it, min_time=0.1, warmup=1)
    out = {'preset': preset, 'iter_s': t, 'iterations': cfg.iterations, 'steps_s': cfg.n_envs * cfg.n_steps * 4 / t,
           'peak_rss_gib': peak_rss_gib()}
    if device.type == 'cuda':
        out['peak_gpu_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def bench_finetune(device, quick: bool) -> None:
    """Wall-clock of `--stage finetune` (s/iteration x the preset's iterations) and its peak memory, each preset
    in its own process (the paper preset: a few iterations only, to check that it fits in memory)."""
    for preset in ('cpu',) if quick else ('cpu', 'paper'):
        r = _subprocess_json('_finetune', preset, device)
        if r is None:
            continue
        TIMED.setdefault(f'finetune_{preset}', r['iter_s'])
        gpu = f", peak GPU {r['peak_gpu_gib']:.1f} GiB" if 'peak_gpu_gib' in r else ''
        print(f"finetune: {preset:>5s} preset: {r['iter_s']:.1f} s/iteration x {r['iterations']} iterations = "
              f"{r['iter_s'] * r['iterations'] / 60:.0f} min per task and seed ({r['steps_s']:.0f} imagined steps/s "
              f"end to end), peak RSS {r['peak_rss_gib']:.1f} GiB{gpu}")


# ---------------------------------------------------------------------------------------------------- main command
TIMED = {}      # what this invocation's sections measured, for bench_main's extrapolation


def bench_main(run: str) -> None:
    """Each stage of `python train.py --stage all --preset cpu --tasks open_drawer`: its wall-clock measured by the
    last such command in `run` (stage_times.json), beside the extrapolation from this invocation's env / wm /
    finetune sections (collection frames/s x frames, s/step x steps, s/iteration x iterations)."""
    path = os.path.join(run, 'stage_times.json')
    last = json.load(open(path)) if os.path.isfile(path) else {'seconds': {}}
    measured = last['seconds']
    collect, wm, ft = presets(data)['cpu'], presets(W)['cpu'], presets(P)['cpu']
    extrapolated = {'collect': collect.episodes * collect.episode_len / TIMED['collect'] if 'collect' in TIMED else None,
                    'wm': wm.steps * TIMED['wm_cpu'] if 'wm_cpu' in TIMED else None,
                    'finetune': ft.iterations * TIMED['finetune_cpu'] if 'finetune_cpu' in TIMED else None}
    print(f'main: stage wall-clock, measured by the last `python train.py {last.get("command", "--stage all ...")}` in {run}' if measured
          else f'main: stage wall-clock (no {path}: nothing measured)')
    print("main: extrapolated: this invocation's speeds x the `cpu` preset's frames, steps and iterations")
    for stage in ('collect', 'wm', 'bc', 'reward', 'finetune', 'eval', 'total'):
        m, e = measured.get(stage), extrapolated.get(stage)
        print(f'main: {stage:>8s}: ' + (f'{m / 60:5.1f} min measured' if m is not None else '    - measured') +
              (f', {e / 60:5.1f} min extrapolated' if e is not None else ''))


def _subprocess_json(section: str, preset: str, device, quick: bool = False) -> dict | None:
    """Run one internal bench section in a fresh process (so that its peak memory is its own) -> its JSON."""
    cmd = [sys.executable, __file__, section, preset, '--device', str(device)] + (['--quick'] if quick else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode
        print(f'{section[1:]}: {preset}: failed: {err}')
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', nargs='*', help='sections: env wm bc dream ppo finetune main dppo all (default all)')
    p.add_argument('--device', default='auto')
    p.add_argument('--quick', action='store_true', help='shorter timings (noisier)')
    p.add_argument('--run', default='runs/cpu', help="main: the run folder of the main command's stage_times.json")
    p.add_argument('--dppo-src', default=None, metavar='PATH',
                   help='dppo: a checkout of irom-lab/dppo, whose update ours is timed against (not in all)')
    args = p.parse_args(argv)
    sections = ['env', 'wm', 'bc', 'dream', 'ppo', 'finetune', 'main']
    internal = args.what[:1] in (['_wm'], ['_finetune'])
    bad = [w for w in args.what if w not in sections + ['dppo', 'all']] if not internal else []
    if bad:
        p.error(f'unknown section(s) {bad}; choose from {sections + ["dppo"]} or all')
    device = data.pick_device(args.device)
    what = sections if not args.what or 'all' in args.what else args.what
    print(f'device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}')
    if internal:                  # one preset of one section in its own process (_subprocess_json)
        one = bench_wm_one(args.what[1], device, args.quick) if args.what[0] == '_wm' else \
            bench_finetune_one(args.what[1], device)
        print(json.dumps(one))
        return
    limit = {'fp32': matmul_limit(device), 'bf16': matmul_limit(device, torch.bfloat16)}
    print('limits: matmul 2048^3: ' + ', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in limit.items()))
    for name in what:
        if name == 'env':
            bench_env(args.quick)
        elif name == 'wm':
            bench_wm(device, args.quick, limit)
        elif name == 'finetune':
            bench_finetune(device, args.quick)
        elif name == 'main':
            bench_main(args.run)
        elif name == 'dppo':
            bench_dppo(device, args.quick, args.dppo_src)
        else:
            {'bc': bench_bc, 'dream': bench_dream, 'ppo': bench_ppo}[name](device, args.quick, limit)


if __name__ == '__main__':
    main()
