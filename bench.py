"""Throughput benchmarks: how fast each hot loop runs, and how close it gets to what the machine can do.

    python bench.py [env|wm|bc|dream|ppo|finetune|all] [--device auto] [--quick]

The limit on a CPU (or GPU) is its matrix throughput, measured first with large square fp32 matmuls.
Networks' achieved GFLOP/s are counted from their layer shapes (2 * in * out per sample for every Linear,
the same per output pixel for every convolution; elementwise work ignored), so 'fraction of the limit'
reads as: how much of the matmul engine the loop keeps busy.
Absolute times on shared machines are noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn as nn


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


def matmul_limit(device, n: int = 2048) -> float:
    """Measured fp32 GFLOP/s of an n x n @ n x n matmul: the machine's practical peak for our networks."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = timeit(lambda: (a @ b, sync(device)), min_time=2.0)
    return 2 * n ** 3 / t / 1e9


def linear_flops(module: nn.Module) -> int:
    """FLOPs of one forward pass of every nn.Linear in `module`, per input row (2 * in * out)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', nargs='*', help='sections: env wm bc dream ppo finetune all (default all)')
    p.add_argument('--device', default='auto')
    p.add_argument('--quick', action='store_true', help='shorter timings (noisier)')
    args = p.parse_args(argv)
    sections = ['env', 'wm', 'bc', 'dream', 'ppo', 'finetune']
    bad = [w for w in args.what if w not in sections + ['all']]
    if bad:
        p.error(f'unknown section(s) {bad}; choose from {sections} or all')
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          ('cpu' if args.device == 'auto' else args.device))
    what = sections if not args.what or 'all' in args.what else args.what
    print(f'device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}')
    limit = matmul_limit(device)
    print(f'limit: fp32 matmul 2048^3: {limit:.1f} GFLOP/s')


if __name__ == '__main__':
    main()
