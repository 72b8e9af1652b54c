"""The paper's experiments on the built-in desk, as a report: analysis beside the method (the core never imports it).

    python report.py --preset cpu          # run everything the report needs that is missing, then write it
    python report.py --write-only          # seconds: rewrite results/ from what the run folder holds so far

Table I (base vs. DiWA, 8 tasks x seeds, simulator steps in fine-tuning, DPPO's steps to match DiWA), Fig. 3
(real success of the fine-tuning snapshots), Fig. S.5 (DPPO vs. DiWA), the variants of Fig. 2 / Fig. S.6 /
Table S.6, Fig. S.7 (world-model rollouts) and the classifier table, written to results/{results.md,
results.csv,figures/} from the files of a run folder alone; the README's report block is rewritten from them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

import data
import diagnose as D
import dream_ppo as P
import env
import eval as E
import train as TR

# The report: the paper's evidence re-made on the built-in desk, from the files of a run folder alone.
#   Table I    base vs DiWA, 8 tasks x seeds; simulator steps during fine-tuning; DPPO's steps to match
#   Fig. 2     world-model / reward variants          Fig. 3   real success of the fine-tuning snapshots
#   Fig. S.6   alpha_BC: imagined vs real success     Table S.6  the unimodal Gaussian policy
#   Fig. S.7   world-model rollouts (diagnose.wm_report)
# stage_report runs whatever is missing and calls write_report after each piece of work; --write-only only
# rewrites results.md / results.csv / figures from what is there (seconds).

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


def _tasks(n: int) -> str:            # '1 task', '8 tasks'
    return f'{n} task' + ('' if n == 1 else 's')


def _mean_std(values) -> str:
    v = 100 * np.asarray(values, float)
    return '–' if v.size == 0 else f'{v.mean():.1f} ± {v.std():.1f}' + (f' (n={v.size})' if v.size < 3 else '')


# Student's t, two-sided 95%: the quantile t_{0.975, df} for df = n - 1 seeds (scipy.stats.t.ppf(0.975, df))
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _paired_gain(paired) -> str:
    """Table I's Δ: the mean over seeds of each seed's DiWA minus its own base, with the 95% t-interval over the
    seeds (each seed's rate already carries its episodes' binomial noise); '–' before any seed has both."""
    v = 100 * np.asarray(paired, float)
    if v.size == 0:
        return '–'
    if v.size == 1 or v.size - 1 not in T95:
        return f'{v.mean():+.1f}'
    half = T95[v.size - 1] * v.std(ddof=1) / np.sqrt(v.size)
    return f'{v.mean():+.1f} [{v.mean() - half:+.1f}, {v.mean() + half:+.1f}]'


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
    rows = [r for r in E.read_results(csv_path) if r.get(name) not in (None, '')]
    rows = rows[:last] if first else rows[-last:]
    return float(np.mean([float(r[name]) for r in rows])) if rows else float('nan')


def dppo_points(rows: list, task: str, seed) -> list:
    """DPPO's policies evaluated as DiWA's is (same sampler; the latest results.csv row of each of its snapshots
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
    rows = E.read_results(csv_path)
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


def results_of(run: str, sampler: str, env_kind: str = 'desk') -> list:
    """The results.csv rows of `run` evaluated with the denoising sampler `sampler` (rows without one: 'mean') in the
    simulator `env_kind` ('desk' or 'calvin')."""
    return [r for r in E.read_results(os.path.join(run, 'results.csv'))
            if (r.get('sampler') or 'mean') == sampler and (r.get('env') or 'desk') == env_kind]


def diwa_beats_base(run: str, task: str, seeds, sampler: str = 'mean', env_kind: str = 'desk') -> bool:
    """Whether DiWA's mean real success on `task` exceeds the base policy's (False until both are measured):
    only then is there anything for DPPO to match (stage_report, Table I)."""
    b, d = base_and_diwa(results_of(run, sampler, env_kind), task, [str(s) for s in seeds])
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
    """Table I: DPPO's final policy evaluated as DiWA's is (`row`: its latest results.csv row; same sampler,
    100 episodes) and the simulator steps it had used; '–' before both exist."""
    if not dppo or not row:
        return '–'
    return f"{100 * float(row['success']):.0f} ({int(dppo['counters'].get('sim_steps', 0)) / 1e3:.0f}k)"


def write_report(run: str, out_dir: str, preset: str, seeds=(0, 1, 2), report_task: str = 'open_drawer',
                 readme: str | None = None, sampler: str = 'mean', env_kind: str = 'desk') -> str:
    """results.md, results.csv and figures/*.png in out_dir from the files of `run` (and its variants), from the
    evaluations in simulator `env_kind` with `sampler`; always figures/headline.png, and with `readme` also the
    README's headline block (write_headline)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(os.path.join(out_dir, 'figures'), exist_ok=True)
    for f in REPORT_FIGURES:          # each is drawn again below if its data exist; none outlives its data
        if os.path.isfile(os.path.join(out_dir, 'figures', f)):
            os.remove(os.path.join(out_dir, 'figures', f))
    runs = {'main': run, **{n: variant_run(run, n) for n in VARIANTS}}
    rows = [{'variant': n, **r} for n, d in runs.items() for r in results_of(d, sampler, env_kind)]
    seeds = [str(s) for s in seeds]
    s0 = seeds[0]                     # the seed of the variants, DPPO and Fig. 3's base point
    episodes = '/'.join(sorted({r['episodes'] for r in rows}, key=int)) or '–'
    main = [r for r in rows if r['variant'] == 'main']
    where, flag = ('in calvin_env (scene D)', ' --env calvin') if env_kind == 'calvin' else ('on the built-in desk', '')
    md = [f'# DiWA {where}: results of `python report.py --preset {preset}{flag}`', '',
          f'Written by `report.py` from `{run}` (preset `{preset}`; commits: '
          f'{", ".join(sorted({r["commit"] for r in rows})) or "–"}). '
          f'Success rates in % over {episodes} simulator episodes per task and seed (mean ± std over seeds, '
          f'seeds {", ".join(seeds)}; denoising sampler `{sampler}`, `--eval.sampler`); "n=" marks cells with fewer seeds so far. Each seed clones its own base '
          'policy (BC seed S) and fine-tunes DiWA from it: the base column is the mean over seeds of each seed\'s '
          'own BC policy, and Δ pairs each seed\'s DiWA with its own base (in brackets: its 95% t-interval over the '
          'seeds). "–": not computed yet. Paper numbers: CALVIN D.', '']

    # ---- Table I
    md += ['## Table I: base vs. DiWA', '',
           '| task | base (each seed\'s BC) | DiWA | Δ [95% interval] | sim. steps in fine-tuning | fine-tuning wall-clock | '
           'DPPO sim. steps to match DiWA: evaluated (its rollouts) | DPPO at its end, evaluated (sim. steps) | paper base | paper DiWA | paper DPPO steps |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
    deltas = {}
    for task in env.TASKS:
        base, diwa = base_and_diwa(main, task, seeds)
        b, d = list(base.values()), list(diwa.values())
        paired = [diwa[s] - base[s] for s in seeds if s in base and s in diwa]
        deltas[task] = (b, d, paired)
        facts = [_ckpt_facts(os.path.join(run, task, f'diwa_s{s}.pt')) for s in seeds]
        walls = [f['wall_s'] / 60 for f in facts if f]
        sim = sum(int(f['counters'].get('sim_steps', 0)) for f in facts if f)
        dppo = _ckpt_facts(os.path.join(run, task, f'dppo_s{s0}.pt'))
        md.append(f'| {task} | {_mean_std(b)} | {_mean_std(d)} | '
                  f'{_paired_gain(paired)} | {sim if walls else "–"} | '
                  f'{f"{np.mean(walls):.0f} min" if walls else "–"} | '
                  f'{_dppo_cell(dppo, d, b, dppo_evaluated_steps_to_match(main, task, s0, np.mean(d)) if d else (0, None, 0))} | '
                  f'{_dppo_end_cell(dppo, _latest(main, task=task, policy="dppo").get(s0))} | '
                  f'{" | ".join(PAPER_TABLE_I[task])} |')
    all_b = [np.mean(v[0]) for v in deltas.values() if v[0]]
    all_d = [np.mean(v[1]) for v in deltas.values() if v[1]]
    done = [t for t, v in deltas.items() if v[2]]
    summary = f'Average base over {_tasks(len(all_b))}: {100 * np.mean(all_b):.1f}; ' if all_b else ''
    if done:
        base_done = [np.mean(deltas[t][0]) for t in done if deltas[t][0]]
        summary += (f'over the {_tasks(len(done))} with DiWA: base {100 * np.mean(base_done):.1f}, '
                    f'DiWA {100 * np.mean(all_d):.1f}. Tasks where DiWA does not gain 15 points '
                    'on average: ' + (', '.join(t for t in done if np.mean(deltas[t][2]) < 0.15) or 'none') + '.')
    else:
        summary += 'no DiWA result yet.'
    md += ['', summary, '',
           f'DPPO (seed {s0}): between how many simulator steps its policy, evaluated like DiWA\'s (same sampler, '
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
    curves = {t: dppo_points(main, t, s0) for t in env.TASKS}
    tasks = [t for t in env.TASKS if curves[t]]
    if tasks:
        cols, rows_ = min(4, len(tasks)), (len(tasks) + 3) // 4
        fig, axes = plt.subplots(rows_, cols, figsize=(max(3 * cols, 4.5), 2.6 * rows_), squeeze=False)
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
        fig.suptitle('Fig. S.5 analogue: DPPO in the simulator vs. DiWA', fontsize=9)
        plt.tight_layout(), plt.savefig(os.path.join(out_dir, 'figures', 'figS5_dppo_vs_diwa.png'), dpi=120)
        plt.close()
        md += [f'## Fig. S.5: DPPO in the simulator vs. DiWA (seed {s0})', '',
               'DPPO\'s policy at its 5 snapshots and at its end, evaluated like DiWA\'s, against the simulator steps it '
               'had taken (0: the base policy); DiWA\'s mean ± std over seeds as a band, at 0 simulator steps.', '',
               '![Fig. S.5](figures/figS5_dppo_vs_diwa.png)', '']
    # ---- imagined vs. real, per task: where the dream already calls the base policy a success, PPO has no signal
    rows_ir, pct = [], lambda x: '–' if x is None or np.isnan(x) else f'{100 * x:.0f}'
    for task in [t for t in env.TASKS if any(r['task'] == t for r in main)]:
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
        md += ['## Fig. S.7: world-model open-loop prediction (held-out play, 2 context frames)', '',
               'Mean absolute error of each part\'s state read from the imagined latents, vs. "nothing moves", on '
               'windows where the part moves.', '', '| part | h=1 | h=10 | h=25 | h=50 |', '|---|---|---|---|---|']
        wm_rows = E.read_results(wm_csv)
        for part in D.PARTS:
            cells = {int(r['horizon']): f"{float(r['model_mae']):.3f} / {float(r['still_mae']):.3f}"
                     for r in wm_rows if r['part'] == part}
            md.append(f'| {part} | ' + ' | '.join(cells.get(h, '–') for h in D.HORIZONS) + ' |')
        md.append('')
        fig = os.path.join(run, 'figures', 'wm_rollout.png')
        if os.path.isfile(fig):
            shutil.copyfile(fig, os.path.join(out_dir, 'figures', 'figS7_wm_rollout.png'))
            md += ['![Fig. S.7](figures/figS7_wm_rollout.png)', '']
    rw = [json.load(open(p)) for p in (os.path.join(run, t, 'reward_report.json') for t in env.TASKS) if os.path.isfile(p)]
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
    md += ['## Wall-clock (this machine, as run)', '', '| stage | runs | total |', '|---|---|---|']
    totals = {}
    for root in runs.values():
        for dirpath, dirs, files in os.walk(root):
            if dirpath == run:      # variants are walked as runs of their own; --objectives, --wm-sizes: not the report
                dirs[:] = [d for d in dirs if d not in ('variants', 'objectives', 'wm_sizes')]
            elif dirpath == root:   # a variant: its world model and --report-task (other tasks there: not the report)
                dirs[:] = [d for d in dirs if d == report_task]
            for f in files:
                if f.endswith('.pt') and not f.startswith('latents') and 'snapshots' not in dirpath:
                    ck = torch.load(os.path.join(dirpath, f), weights_only=True, map_location='cpu')
                    if isinstance(ck, dict) and 'wall_s' in ck:
                        n, s = totals.get(ck['stage'], (0, 0.0))
                        totals[ck['stage']] = (n + 1, s + float(ck['wall_s']))
    collect_s = _collect_wall(run)
    if collect_s:
        totals['collect'] = (1, collect_s)        # per-episode times / worker processes
    own = [r for r in rows if r['variant'] == 'main' or r['task'] == report_task]     # as the checkpoints above
    totals['eval'] = (len(own), sum(float(r.get('wall_s') or 0) for r in own))
    for stage, (n, s) in totals.items():
        md.append(f'| {stage} | {n} | {s / 3600:.2f} h |')
    md += [f'| **all** | | **{sum(s for _, s in totals.values()) / 3600:.2f} h** |', '']
    D.write_rows(os.path.join(out_dir, 'results.csv'), rows or [{'variant': ''}])
    path = os.path.join(out_dir, 'results.md')
    data.atomic_write(path, lambda fh: fh.write('\n'.join(md).encode()))
    write_headline(out_dir, seeds, sampler, env_kind, readme or None)
    return path


# The README's generated blocks: the desk's headline and calvin_env's
README_MARKERS = {'desk': ('<!-- report:begin -->', '<!-- report:end -->'),
                  'calvin': ('<!-- report-calvin:begin -->', '<!-- report-calvin:end -->')}
README_BEGIN, README_END = README_MARKERS['desk']
# A task whose mean paired gain is below this is marked short in the headline: about the paper's smallest gain in
# Table I (open_drawer, 57.8 -> 74.4, +16.6 points); FINDINGS.md says what limits each such task.
SHORT_GAIN = 0.15


def headline(rows: list, seeds: list, sampler: str = 'mean', env_kind: str = 'desk') -> list:
    """The headline (markdown lines): per task, base vs DiWA (mean ± std over `seeds`, each seed's DiWA paired
    with its own BC policy), DPPO's simulator steps to match DiWA (its evaluated snapshots) and the paper's
    numbers beside; then the means over the tasks measured. From results.csv rows alone (the main run's)."""
    rows = [r for r in rows if r.get('variant', 'main') in ('', 'main') and (r.get('sampler') or 'mean') == sampler
            and (r.get('env') or 'desk') == env_kind]
    seeds = [str(s) for s in seeds]
    md = ['| task | base | DiWA | Δ | DPPO sim. steps to match | paper: base | paper: DiWA |', '|---|---|---|---|---|---|---|']
    means = []
    for task in env.TASKS:
        base, diwa = base_and_diwa(rows, task, seeds)
        paired = [diwa[s] - base[s] for s in seeds if s in base and s in diwa]
        lo, hi, last = dppo_evaluated_steps_to_match(rows, task, seeds[0], np.mean(list(diwa.values()))) \
            if diwa else (0, None, 0)
        k = lambda steps: f'{steps / 1e3:.0f}k' if steps else '0'
        dppo = ('0 (DiWA ≤ base)' if paired and np.mean(paired) <= 0 else f'{k(lo)}-{k(hi)}' if hi is not None
                else f'> {k(last)}' if last else '–')
        gain = f'{100 * np.mean(paired):+.1f}' + (' *' if np.mean(paired) < SHORT_GAIN else '') if paired else '–'
        md.append(f'| {task} | {_mean_std(list(base.values()))} | {_mean_std(list(diwa.values()))} | '
                  f'{gain} | {dppo} | {" | ".join(PAPER_TABLE_I[task][:2])} |')
        if paired:
            means.append((np.mean([base[s] for s in seeds if s in diwa and s in base]),
                          np.mean([diwa[s] for s in seeds if s in diwa and s in base]),
                          *(float(PAPER_TABLE_I[task][i].split()[0]) / 100 for i in (0, 1))))
    if means:
        b, d, pb, pd = 100 * np.mean(means, axis=0)
        md.append(f'| **mean over {_tasks(len(means))}** | {b:.1f} | {d:.1f} | {d - b:+.1f} | | {pb:.1f} | {pd:.1f} |')
    return md


def write_headline(out_dir: str, seeds, sampler: str = 'mean', env_kind: str = 'desk', readme: str | None = None):
    """figures/headline.png (base vs DiWA per task, the paper's beside) and the headline table from
    <out_dir>/results.csv alone; with `readme`, both go into its report block (update_readme)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(os.path.join(out_dir, 'figures'), exist_ok=True)
    rows = E.read_results(os.path.join(out_dir, 'results.csv'))
    table = headline(rows, seeds, sampler, env_kind)
    fig = os.path.join(out_dir, 'figures', 'headline.png')
    cells = [[c.strip() for c in line.split('|')[1:-1]] for line in table[2:] if not line.startswith('| **')]
    pct = lambda c: (float(c.split('±')[0]), float(c.split('±')[1].split()[0])) if '±' in c else (np.nan, 0.0)
    if os.path.isfile(fig):
        os.remove(fig)
    if any(not np.isnan(pct(c[2])[0]) for c in cells):
        x = np.arange(len(cells))
        plt.figure(figsize=(8, 3.2))
        for i, (col, label, color) in enumerate([(1, 'base', 'C7'), (2, 'DiWA (0 simulator steps)', 'C0')]):
            m, sd = np.array([pct(c[col]) for c in cells]).T
            plt.bar(x + (i - 0.5) * 0.38, m, 0.38, yerr=sd, color=color, label=label, capsize=2)
            plt.plot(x + (i - 0.5) * 0.38, [pct(c[col + 4])[0] for c in cells], 'D', color='C1', ms=5,
                     label='the paper, CALVIN D (base, DiWA)' if i else None)
        plt.xticks(x, [c[0].replace('_', '\n', 1) for c in cells], fontsize=7), plt.ylabel('success (%)')
        plt.ylim(0, 105), plt.grid(axis='y', alpha=0.3)
        plt.legend(fontsize=7, ncol=3, loc='lower center', bbox_to_anchor=(0.5, 1.0), frameon=False)
        plt.tight_layout(), plt.savefig(fig, dpi=110), plt.close()
    commits = ', '.join(sorted({r['commit'] for r in rows if r.get('commit')})) or '–'
    episodes = '/'.join(sorted({r['episodes'] for r in rows if r.get('episodes')}, key=int)) or '–'
    where = os.path.relpath(out_dir)
    where = os.path.basename(os.path.normpath(out_dir)) if where.startswith('..') else where.replace(os.sep, '/')
    sim = 'calvin_env (scene D) episodes, judged by CALVIN\'s task oracle,' if env_kind == 'calvin' else 'simulator episodes'
    lines = [f'Success in % over {episodes} {sim} per task and seed, mean ± std over seeds '
             f'{", ".join(map(str, seeds))} ("n=": fewer seeds so far); DiWA fine-tuned with 0 simulator steps; '
             f'Δ pairs each seed\'s DiWA with its own BC policy; DPPO: its simulator steps to match DiWA (seed '
             f'{seeds[0]}; "–": not measured yet); the mean row pairs the seeds that have both; evaluation sampler '
             f'`{sampler}`. From `{where}/results.csv` (commits {commits}); '
             f'the whole report: `{where}/results.md`.', ''] + table
    if any(line.split('|')[4].strip().endswith('*') for line in table[2:]):
        why = 'Table I in calvin_env (scene D)' if env_kind == 'calvin' else 'What limits DiWA on a task'
        lines += ['', f'\\* DiWA gains less than {100 * SHORT_GAIN:.0f} points (about the paper\'s smallest gain, '
                      f'open_drawer\'s +16.6): FINDINGS.md, "{why}", says why.']
    if os.path.isfile(fig):
        lines += ['', '![base vs DiWA](figures/headline.png)']
    if readme:
        update_readme(readme, out_dir, lines, env_kind)
    return lines


def update_readme(readme: str, out_dir: str, lines: list, env_kind: str = 'desk') -> bool:
    """Replace what lies between the markers of `env_kind`'s block in `readme` with `lines` (markdown: write_headline's,
    headings one level down, links made relative to the README), so that the README shows the report's numbers
    without anyone copying them by hand. A README without both markers, or outside which out_dir lies (a report
    written elsewhere, e.g. by the tests, is not this README's), is left alone (-> False)."""
    if not os.path.isfile(readme):
        return False
    rel = os.path.relpath(os.path.abspath(out_dir), os.path.dirname(os.path.abspath(readme))).replace(os.sep, '/')
    if rel == '..' or rel.startswith('../'):
        return False
    text = open(readme, encoding='utf-8').read()
    begin, end = README_MARKERS[env_kind]
    if begin not in text or end not in text.split(begin, 1)[1]:
        return False
    fix = lambda line: ('#' + line if line.startswith('#') else
                        line.replace('](figures/', f']({rel}/figures/'))
    body = '\n'.join([begin, f'<!-- written by report.py from {rel}/results.csv: do not edit by hand -->',
                      *map(fix, lines), end])
    before, rest = text.split(begin, 1)
    new = before + body + rest.split(end, 1)[1]
    if new != text:
        data.atomic_write(readme, lambda fh: fh.write(new.encode('utf-8')))
    return True


def _collect_wall(run: str) -> float:
    p, c = os.path.join(run, 'data', 'collect_progress.json'), os.path.join(run, 'data', 'collect_config.json')
    if not os.path.isfile(p):
        return 0.0
    workers = json.load(open(c)).get('workers', 1) if os.path.isfile(c) else 1
    return float(sum(v.get('wall_s', 0.0) for v in json.load(open(p)).values() if isinstance(v, dict))) / workers


def variant_args(args, name: str) -> argparse.Namespace:
    """The arguments of a report variant (eval.VARIANTS): its own run folder under <run>/variants/, its setting
    overrides, and the parent runs it inherits every unchanged checkpoint from."""
    v = VARIANTS[name]
    out = argparse.Namespace(**vars(args))
    out.run = variant_run(args.run, name)
    out.inherit = [variant_run(args.run, p) for p in v['inherit']] + [args.run]
    out.data = TR.data_root(args)
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
    t0 = time.time()

    last_inputs = None

    def report():       # rewritten when a file it reads has changed (~7 s of checkpoint loading), so a re-run
        nonlocal last_inputs                    # with everything done takes seconds
        inputs = _report_inputs(args.run)
        if inputs == last_inputs:
            return
        path = write_report(args.run, args.report_dir, args.preset, args.seeds, args.report_task, args.readme,
                            TR.build_config('eval', args).sampler, args.env)
        last_inputs = inputs
        print(f'[report] {path} updated ({(time.time() - t0) / 60:.1f} min into this run)', flush=True)

    def pretrain(a, task: str, seed: int, reward: bool = True):
        sa = TR.with_seed(a, seed)
        TR.stage_bc(sa, device, task)                  # BC seed `seed`; the classifier below: --seed's, one per task
        if reward:
            TR.stage_reward(a, device, task)
            rr = os.path.join(a.run, task, 'reward_report.json')
            rw = TR.find(a, task, 'reward.pt')
            if rw.startswith(a.run) and (not os.path.isfile(rr) or os.path.getmtime(rr) < os.path.getmtime(rw)):
                D.reward_report(a, device, task)
        TR.evaluate(sa, device, task, policies=['base'])

    def task_unit(a, task: str, seed: int, snapshots: bool = False, reward: bool = True):
        pretrain(a, task, seed, reward)
        sa = TR.with_seed(a, seed)
        TR.stage_finetune(sa, device, task, seed)
        TR.evaluate(sa, device, task, snapshots=snapshots)
        report()

    if not args.data:
        TR.stage_collect(args)
    TR.stage_wm(args, device)
    wm_csv = os.path.join(args.run, 'wm_open_loop.csv')
    if not os.path.isfile(wm_csv) or os.path.getmtime(wm_csv) < os.path.getmtime(os.path.join(args.run, 'wm.pt')):
        D.wm_report(args, device)
    first, rest = args.seeds[0], args.seeds[1:]
    for task in args.tasks:
        pretrain(args, task, first)
        report()
    for task in args.tasks:
        task_unit(args, task, first, snapshots=True)
    for name in VARIANTS:
        va = variant_args(args, name)
        TR.stage_wm(va, device)
        task_unit(va, args.report_task, first, reward=va.__dict__.get('ft.reward') != 'decoder')
    sa = TR.with_seed(args, first)
    TR.stage_finetune(sa, device, args.report_task, first, simulator=True)
    TR.evaluate(sa, device, args.report_task, policies=['dppo'], snapshots=True)
    report()
    for seed in rest:
        for task in args.tasks:
            task_unit(args, task, seed)
    if args.dppo_cap:
        ca = argparse.Namespace(**{**vars(args), 'seed': first, 'ft.iterations': args.dppo_cap})
        for task in args.tasks:
            if task == args.report_task:
                continue
            if not diwa_beats_base(args.run, task, args.seeds, TR.build_config('eval', args).sampler, args.env):
                print(f'[report] DPPO on {task}: skipped, DiWA does not beat the base policy (nothing to match)')
                continue
            TR.stage_finetune(ca, device, task, first, simulator=True)
            TR.evaluate(ca, device, task, policies=['dppo'], snapshots=True)  # and its snapshots
            report()
    return os.path.join(args.report_dir, 'results.md')


# ---- The imagined objective x the evaluation sampler (FINDINGS.md, "The imagined objective"): DiWA fine-tuned under
# each --ft.objective in <run>/objectives/<name> (inheriting the world model, BC and classifier from <run>), base and
# DiWA evaluated with each --eval.sampler from the same start states; results/objectives.md.

def objective_args(args, objective: str, sampler: str | None = None) -> argparse.Namespace:
    """The arguments of a fine-tuning under `objective` (a run folder of its own), evaluated with `sampler`."""
    out = argparse.Namespace(**{**vars(args), 'ft.objective': objective, 'eval.sampler': sampler,
                                'run': os.path.join(args.run, 'objectives', objective), 'inherit': [args.run],
                                'data': TR.data_root(args)})
    os.makedirs(out.run, exist_ok=True)
    return out


def objectives_table(run: str, tasks: list, seeds: list) -> str:
    """Markdown: per task and seed, real success of the base policy and of DiWA under each objective with each
    sampler, and DiWA's imagined success (the last 10 iterations); then each (objective, sampler)'s mean real gain
    over the task-seed pairs measured, +- 1.96 standard errors of that mean."""
    objectives, samplers = P.OBJECTIVES, TR.D.SAMPLERS
    res = {s: results_of(run, s) for s in samplers}        # a DiWA row may sit in <run>'s results.csv: the same
    res.update({(o, s): results_of(os.path.join(run, 'objectives', o), s) + res[s]   # checkpoint (key) as the run's
                for o in objectives for s in samplers})
    real = lambda rows, task, seed, policy, **key: (lambda r: float(r['success']) if r else None)(
        _latest(rows, task=task, policy=policy, **key).get(str(seed)))
    pct = lambda x: '–' if x is None or np.isnan(x) else f'{100 * x:.0f}'
    md = ['| task | seed | base: ' + ' / '.join(samplers) + ' | '
          + ' | '.join(f'{o}: imagined, real ' + ' / '.join(samplers) for o in objectives) + ' |',
          '|---|---|---|' + '---|' * len(objectives)]
    gains = {(o, s): [] for o in objectives for s in samplers}
    for task in tasks:
        for seed in seeds:
            base = {s: real(res[s], task, seed, 'base') for s in samplers}
            cells = []
            for o in objectives:
                facts = _ckpt_facts(os.path.join(run, 'objectives', o, task, f'diwa_s{seed}.pt'))
                imag = _final_metric(facts['metrics_csv'], 'charts/success_rate') if facts else None
                diwa = {s: real(res[(o, s)], task, seed, 'diwa', ckpt_key=facts['key']) if facts else None
                        for s in samplers}
                for s in samplers:
                    if diwa[s] is not None and base[s] is not None:
                        gains[(o, s)].append(diwa[s] - base[s])
                cells.append(f"{pct(imag)}, {' / '.join(pct(diwa[s]) for s in samplers)}")
            md.append(f"| {task} | {seed} | {' / '.join(pct(base[s]) for s in samplers)} | " + ' | '.join(cells) + ' |')
    md += ['', '| objective | sampler | pairs | mean real gain (points) | 95% interval |', '|---|---|---|---|---|']
    for (o, s), g in gains.items():
        half = 1.96 * np.std(g, ddof=1) / np.sqrt(len(g)) if len(g) > 1 else float('nan')
        md.append(f'| {o} | {s} | {len(g)} | {f"{100 * np.mean(g):+.1f}" if g else "–"} | '
                  f'{"–" if np.isnan(half) else f"{100 * (np.mean(g) - half):+.1f} to {100 * (np.mean(g) + half):+.1f}"} |')
    return '\n'.join(md) + '\n'


def stage_objectives(args, device) -> str:
    """Everything objectives_table needs that is missing, seed by seed and task by task (resumable; the table is
    rewritten after each fine-tuning): BC, classifier, the base policy with each sampler, then DiWA under each
    objective, each evaluated with each sampler."""
    out = os.path.join(args.report_dir, 'objectives.md')
    os.makedirs(args.report_dir, exist_ok=True)

    def write():
        head = (f'# The imagined objective and the evaluation sampler: `python report.py --objectives --preset '
                f'{args.preset} --tasks {" ".join(args.tasks)} --seeds {" ".join(map(str, args.seeds))}`\n\n'
                f'From `{args.run}`; success in % over {TR.build_config("eval", args).episodes} simulator episodes '
                'per cell (the same start states for every policy of a task and seed). Imagined: DiWA\'s imagined '
                'success over its last 10 fine-tuning iterations. Cells are "imagined, real with each sampler".\n\n')
        with open(out + '.tmp', 'w') as fh:
            fh.write(head + objectives_table(args.run, args.tasks, args.seeds))
        os.replace(out + '.tmp', out)

    if not args.data:
        TR.stage_collect(args)
    TR.stage_wm(args, device)
    for seed in args.seeds:
        for task in args.tasks:
            sa = TR.with_seed(args, seed)
            TR.stage_bc(sa, device, task)
            TR.stage_reward(args, device, task)
            for s in TR.D.SAMPLERS:
                TR.evaluate(argparse.Namespace(**{**vars(sa), 'eval.sampler': s}), device, task, policies=['base'])
            for o in P.OBJECTIVES:
                oa = TR.with_seed(objective_args(args, o), seed)
                TR.stage_finetune(oa, device, task, seed)
                for s in TR.D.SAMPLERS:
                    TR.evaluate(TR.with_seed(objective_args(args, o, s), seed), device, task, policies=['diwa'])
                write()
    write()
    return out


# World-model sizes between the cpu preset's model and Tab. S.2's, each trained on the run's play data in
# <run>/wm_sizes/<name>/ (FINDINGS.md, "World-model size and training"): name -> (flag overrides, what it is).
WM_SIZES = {
    'preset': ({}, "the preset's (cpu: CNN depth 16, GRU 256, 16x16 latents, batch 8 x 32, 10,000 steps)"),
    '20k': ({'wm.steps': 20000}, "the preset's, 20,000 steps (continued from it: a constant learning rate)"),
    'd24': ({'wm.cnn_depth': 24, 'wm.deter': 512, 'wm.hidden': 512, 'wm.mlp_hidden': 256, 'wm.stoch': 32,
             'wm.classes': 32, 'wm.bf16': True}, 'CNN depth 24, GRU 512, 32x32 latents, bf16, 10,000 steps'),
    'd48': ({'wm.cnn_depth': 48, 'wm.deter': 1024, 'wm.hidden': 1024, 'wm.mlp_hidden': 400, 'wm.stoch': 32,
             'wm.classes': 32, 'wm.bf16': True, 'wm.steps': 5000},
            "Tab. S.2's model (depth 48, GRU 1024, 32x32 latents) at batch 8 x 32, bf16, 5,000 steps"),
    'hybrid': ({'wm.hybrid': True}, "the preset's, also decoding the scene state (Fig. 2's hybrid world model; "
               'its parts are read by that decoder, not by a probe)'),
}


def wm_size_args(args, name: str) -> argparse.Namespace:
    """The arguments of world-model size `name`: its own folder under <run>/wm_sizes/, inheriting <run> (the play
    data, and every checkpoint its settings leave unchanged)."""
    out = argparse.Namespace(**{**vars(args), **WM_SIZES[name][0], 'run': os.path.join(args.run, 'wm_sizes', name),
                                'inherit': [args.run], 'data': TR.data_root(args)})
    os.makedirs(out.run, exist_ok=True)
    return out


def wm_sizes_table(report_dir: str, names: list, tasks: list) -> str:
    """Markdown from <report_dir>/wm_sizes/<name>.json: cost, open-loop error against "nothing moves" for each
    part at horizons 10 / 25 / 50, the press report and the base policy's imagination gap per task."""
    rep = {n: json.load(open(p)) for n in names
           if os.path.isfile(p := os.path.join(report_dir, 'wm_sizes', f'{n}.json'))}
    md = ['| model | what | parameters | steps | s/step | training minutes |', '|---|---|---|---|---|---|']
    md += [f"| {n} | {WM_SIZES[n][1]} | {r['params'] / 1e6:.1f}M | {r['steps']:,} | "
           + (f"{r['step_s']:.2f} | {r['steps'] * r['step_s'] / 60:.0f} |" if r.get('step_s') else '– | – |')
           for n, r in rep.items()]
    md += ['', "s/step: the 10th percentile of the training's logged intervals (wm_metrics.csv), which pauses and "
           'other jobs on the machine do not inflate; training minutes: steps x s/step.']
    md += [f"\n{n}: {r['source']}; its changes are computed from those." for n, r in rep.items() if r.get('source')]
    parts = list(D.PARTS)
    md += ['', 'Open loop (`python diagnose.py wm`): mean absolute error of each part over held-out windows where it '
           'moves, "world model / nothing moves" (change: below 0 is better than nothing moves).', '',
           '| model | horizon | ' + ' | '.join(parts) + ' |', '|---|---|' + '---|' * len(parts)]
    for n, r in rep.items():
        for h in (10, 25, 50):
            cells = {row['part']: row for row in r.get('open_loop', []) if int(row['horizon']) == h}
            md.append(f'| {n} | {h} | ' + ' | '.join(
                f"{c['model_mae']:.3f} / {c['still_mae']:.3f} ({100 * (c['model_mae'] / c['still_mae'] - 1):+.0f}%)"
                if (c := cells.get(p)) and c['windows'] != 0 and c['still_mae'] > 0 else '–' for p in parts) + ' |')
    md += ['', 'The LED press (`python diagnose.py press`): of the held-out presses that switched the LED / that did '
           'not, how many the world model switches in open-loop imagination from the first frame. Base policy, BC '
           'seed (`python diagnose.py gap`): imagined success as fine-tuning imagines it / simulator success, '
           'from the same starts (the evaluation\'s episodes).', '',
           '| model | press: switched / light | ' + ' | '.join(tasks) + ' | mean abs. gap |',
           '|---|---|' + '---|' * (len(tasks) + 1)]
    for n, r in rep.items():
        press, gap = r.get('press') or {}, r.get('gap', {})
        pct = lambda x: '–' if x is None else f'{100 * x:.0f}'
        cells = [f"{pct(g['imagined_success'])} / {pct(g['real_success'])}" if (g := gap.get(t)) else '–' for t in tasks]
        diffs = [abs(g['imagined_success'] - g['real_success']) for g in gap.values()]
        md.append(f"| {n} | {pct(press.get('imagined_switch_on_switched'))} / {pct(press.get('imagined_switch_on_light'))}"
                  f" | {' | '.join(cells)} | {f'{100 * np.mean(diffs):.0f}' if diffs else '–'} |")
    return '\n'.join(md) + '\n'


def wm_step_seconds(csv_path: str) -> float | None:
    """Seconds per world-model step from its wm_metrics.csv: the 10th percentile over the logged intervals (the
    'time' column restarts with each resumed segment), so that a pause or another job does not count."""
    if not os.path.isfile(csv_path):
        return None
    with open(csv_path, newline='') as fh:
        rows = [(float(r['step']), float(r['time'])) for r in csv.DictReader(fh)]
    if len(rows) < 2:
        return None
    d = np.diff(np.array(rows), axis=0)                                     # (n-1, 2): steps, seconds
    ok = (d[:, 0] > 0) & (d[:, 1] > 0)
    return float(np.percentile(d[ok, 1] / d[ok, 0], 10)) if ok.any() else None


def stage_wm_sizes(args, device) -> str:
    """Each world-model size of --wm-sizes, one after the other (resumable): train it, then its open-loop and press
    reports and, per task, BC seed 0, the classifier and the base policy's imagination gap; the table
    (wm_sizes_table) is rewritten after each piece. Each model's figures go to <report_dir>/wm_sizes/<name>.json
    (small: the per-start results stay in the run folder), so that the table outlives the run folder."""
    out = os.path.join(args.report_dir, 'wm_sizes.md')
    os.makedirs(os.path.join(args.report_dir, 'wm_sizes'), exist_ok=True)
    names = args.wm_sizes

    def write():                                        # every model measured so far, in WM_SIZES's order
        done = [n for n in WM_SIZES
                if n in names or os.path.isfile(os.path.join(args.report_dir, 'wm_sizes', f'{n}.json'))]
        head = (f'# World-model size and fidelity: `python report.py --wm-sizes {" ".join(done)} --preset '
                f'{args.preset} --tasks {" ".join(args.tasks)}`\n\nFrom `{args.run}`\'s play data; each model in '
                f'`{args.run}/wm_sizes/<model>/`.\n\n')
        data.atomic_write(out, lambda fh: fh.write((head + wm_sizes_table(args.report_dir, done, args.tasks)).encode()))

    if not args.data:
        TR.stage_collect(args)
    for name in names:
        sa = wm_size_args(args, name)
        if set(WM_SIZES[name][0]) <= {'wm.steps'} and not os.path.isfile(os.path.join(sa.run, 'wm.pt')):
            # the preset's model is the run's own <run>/wm.pt ('preset' inherits it): trained once, shared
            TR.stage_wm(argparse.Namespace(**{**vars(sa), 'wm.steps': None, 'run': args.run, 'inherit': []}), device)
            for f in ('wm_metrics.csv', 'wm.pt') if WM_SIZES[name][0] else ():
                # more steps: go on from a copy of it (constant lr: 10,000 + 10,000 steps = 20,000 steps); the
                # checkpoint last, through a temp file: never half a copy
                shutil.copy(os.path.join(args.run, f), os.path.join(sa.run, f + '.tmp'))
                os.replace(os.path.join(sa.run, f + '.tmp'), os.path.join(sa.run, f))
        ck = TR.stage_wm(sa, device)
        path = os.path.join(args.report_dir, 'wm_sizes', f'{name}.json')
        rep = json.load(open(path)) if os.path.isfile(path) else {}
        if rep.get('wm_key') != ck['key']:
            rep = {'wm_key': ck['key']}
        own = os.path.isfile(os.path.join(sa.run, 'wm.pt'))                 # else the run's own, inherited
        rep.update(params=sum(v.numel() for v in ck['model'].values()), steps=ck['step'], wall_s=ck['wall_s'],
                   step_s=wm_step_seconds(os.path.join(sa.run if own else args.run, 'wm_metrics.csv')))
        save = lambda: data.atomic_write(path, lambda fh: fh.write(json.dumps(rep, indent=1).encode()))
        if 'open_loop' not in rep:
            rep['open_loop'] = D.wm_report(sa, device)
            save()
        if 'press' not in rep:
            try:
                rep['press'] = D.press_report(sa, device)
            except TR.StageError as e:                 # e.g. no button press in the held-out play
                rep['press'] = {'error': str(e)}
            save()
        for task in args.tasks:
            if task not in rep.setdefault('gap', {}):
                TR.stage_bc(sa, device, task)
                TR.stage_reward(sa, device, task)
                os.makedirs(os.path.join(sa.run, task), exist_ok=True)     # BC and classifier may be inherited
                gap = D.imagination_gap(sa, device, task, TR.build_config('eval', sa))
                rep['gap'][task] = {k: v for k, v in gap.items() if k != 'per_episode'}
                save()
            write()
        write()
    return out


def main(argv=None) -> int:
    p = TR.make_parser(stage=False)
    p.description = "DiWA's report on the built-in desk: Table I, Fig. 2, 3, S.5-S.7 (results/)"
    p.add_argument('--objectives', action='store_true', help='instead of the report: DiWA under each --ft.objective, '
                   'base and DiWA evaluated with each --eval.sampler, on --tasks x --seeds (results/objectives.md)')
    p.add_argument('--wm-sizes', nargs='*', choices=list(WM_SIZES), default=None, metavar='MODEL',
                   help='instead of the report: world models of these sizes (' + ', '.join(WM_SIZES) + '; none named: '
                   'all) on the run\'s play data, each judged by the open-loop, press and gap reports on --tasks '
                   '(results/wm_sizes.md)')
    p.add_argument('--write-only', action='store_true',
                   help='only rewrite results.md / results.csv / figures from the run folder (seconds)')
    p.add_argument('--report-dir', default='results', help='where results.md, results.csv and figures/ go')
    p.add_argument('--readme-only', action='store_true', help="only rewrite --readme's block and figures/headline.png "
                   "from --report-dir's results.csv (no run folder needed; seconds)")
    p.add_argument('--readme', default='README.md',
                   help="also rewrite this README's headline block of --env (<!-- report:begin/end --> for the desk, "
                        "<!-- report-calvin:begin/end --> for calvin_env: base vs DiWA per task and "
                        "figures/headline.png); '' for none")
    p.add_argument('--report-task', choices=env.TASKS, default='open_drawer',
                   help='the task of the ablations / variants and of the DPPO baseline')
    p.add_argument('--dppo-cap', type=int, default=40,
                   help="DPPO iterations on each task other than --report-task, for Table I's DPPO column (an "
                        'iteration is n_envs x n_steps x 4 simulator steps: 3,600 at the cpu preset); 0 skips them')
    args = p.parse_args(argv)
    args.tasks, args.seeds = args.tasks or ['all'], args.seeds if args.seeds is not None else [0, 1, 2]
    args = TR.check_args(p, args)
    if args.wm_sizes is not None:
        args.wm_sizes = args.wm_sizes or list(WM_SIZES)
        if args.write_only:
            print(wm_sizes_table(args.report_dir, args.wm_sizes, args.tasks))
            return 0
    if args.write_only and args.objectives:
        print(objectives_table(args.run, args.tasks, args.seeds))
        return 0
    if args.readme_only:
        write_headline(args.report_dir, args.seeds, TR.build_config('eval', args).sampler, args.env, args.readme)
        print(f'{args.readme or "(no README)"}: headline from {args.report_dir}/results.csv')
        return 0
    if args.write_only:
        print(write_report(args.run, args.report_dir, args.preset, args.seeds, args.report_task, args.readme,
                           TR.build_config('eval', args).sampler, args.env))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    data.seed_everything(args.seed)
    stage = stage_wm_sizes if args.wm_sizes else stage_objectives if args.objectives else stage_report
    return TR.guarded(stage, args, data.pick_device(args.device))


if __name__ == '__main__':
    sys.exit(main())
