"""report.py: the whole report on top of a finished test run (variants, DPPO, figures, an idempotent re-run), and
its tables from hand-written results rows."""
import json
import os
import re
import shutil
import time

import pytest
import torch

import diagnose
import report as E
from conftest import ROOT, TASK, read_csv, run


def test_report_runs_variants_and_a_rerun_changes_nothing(run_dir, tmp_path):
    """report.py on top of a finished run: the variants inherit what they do not change (no world model,
    BC or classifier is retrained for the alpha_BC variants), the hybrid one trains its own world model, DPPO
    counts its simulator steps; results.md / results.csv / figures appear, and a second run only rewrites them."""
    d, out = str(tmp_path / 'rep'), str(tmp_path / 'results')
    shutil.copytree(run_dir, d)
    args = ['--preset', 'test', '--run', d, '--tasks', TASK, '--report-task', TASK, '--seeds', '0', '--report-dir', out]
    first = run(*args, script='report.py').stdout
    alpha = os.path.join(d, 'variants', 'alpha_bc_0')
    assert sorted(f for f in os.listdir(os.path.join(alpha, TASK)) if not f.startswith('.')) == [
        'diwa_s0.pt', 'diwa_s0_metrics.csv', 'diwa_s0_snapshots']                # (.diwa_s0.pt.lock: its writer lock)
    assert 'wm.pt: inherited' in first and os.path.isfile(os.path.join(d, 'variants', 'hybrid', 'wm.pt'))
    assert torch.load(os.path.join(alpha, TASK, 'diwa_s0.pt'), weights_only=True)['config']['alpha_bc'] == 0.0
    dppo = torch.load(os.path.join(d, TASK, 'dppo_s0.pt'), weights_only=True)['state']['counters']
    assert dppo['sim_steps'] > 0 and dppo['imagined_steps'] == 0
    md = open(os.path.join(out, 'results.md')).read()
    for needle in ['## Table I', '## Fig. 3', 'alpha_BC = 0.5', 'decoded-state reward', 'DPPO on', '## Fig. S.7']:
        assert needle in md, needle
    row = next(line for line in md.splitlines() if line.startswith(f'| {TASK} |')).split('|')
    # Table I's DPPO column: steps to match DiWA, or 0 where DiWA does not beat the base policy
    base_pct, diwa_pct = (float(row[i].split('±')[0]) for i in (2, 3))
    # (first on DPPO's evaluated snapshots, then on its rollouts)
    assert (row[7].strip() == '0 (DiWA ≤ base)') if diwa_pct <= base_pct else \
        re.fullmatch(r'((0|\d+k)-\d+k|> \d+k) \(rollouts (> )?\d+k\)', row[7].strip()), row
    ir = next(line for line in md.split('## Imagined vs. real')[1].splitlines() if line.startswith(f'| {TASK} |'))
    assert all(0 <= float(c) <= 100 for c in ir.split('|')[2:5]), ir   # imagined first / last 10 it., real base
    for fig in ['fig3_finetuning_curves.png', 'figS5_dppo_vs_diwa.png', 'fig2_s6_variants.png', 'figS7_wm_rollout.png']:
        assert os.path.getsize(os.path.join(out, 'figures', fig)) > 5_000, fig
    rows = read_csv(os.path.join(out, 'results.csv'))
    assert {r['variant'] for r in rows} >= {'main', 'alpha_bc_0', 'hybrid_decoder'}
    assert any(r['policy'].startswith('diwa@') for r in rows)          # Fig. 3: the snapshots were evaluated
    # Fig. S.5 / Table I: DPPO's snapshots too, each with the simulator steps DPPO had taken by then
    snaps = sorted((int(r['policy'][5:]), int(r['sim_steps_finetune'])) for r in rows if r['policy'].startswith('dppo@'))
    assert snaps and all(0 < a[1] < b[1] for a, b in zip(snaps, snaps[1:])), snaps
    assert snaps[-1][1] == dppo['sim_steps'], (snaps, dppo)
    ckpts = {os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
             for dp, _, fs in os.walk(d) for f in fs if f.endswith(('.pt', '.csv'))}
    readme = open(os.path.join(ROOT, 'README.md')).read()
    for side in ('wm_sizes/x', 'objectives/x', 'variants/hybrid/other_task'):  # other experiments in the run
        os.makedirs(os.path.join(d, side))                                       # folder: not in the wall-clock
        shutil.copy(os.path.join(d, 'wm.pt'), os.path.join(d, side, 'wm.pt'))
    t0 = time.time()
    second = run(*args, script='report.py').stdout
    assert time.time() - t0 < 120
    assert {f: os.path.getmtime(f) for f in ckpts} == ckpts                # nothing re-ran
    assert open(os.path.join(out, 'results.md')).read() == md                # the same report,
    assert second.count('results.md updated') == 1, second                   # written once, not after every unit
    assert open(os.path.join(ROOT, 'README.md')).read() == readme            # a report outside the repo: not its README


def test_diwa_beats_base_decides_table_i_dppo(tmp_path):
    """The report runs DPPO on a task only where DiWA's mean real success beats the base policy's, the
    latest row per seed counting; where it does not, Table I's DPPO cell says 0 without any DPPO run."""
    run_ = str(tmp_path)
    row = lambda task, policy, seed, success: {
        'task': task, 'policy': policy, 'seed': seed, 'episodes': 10, 'successes': int(10 * success),
        'success': success, 'ci_low': 0.0, 'ci_high': 1.0, 'mean_steps': 72, 'sim_steps_finetune': 0,
        'preset': 'test', 'env': 'desk', 'ckpt_key': 'k', 'commit': 'c', 'wall_s': 1.0}
    diagnose.write_rows(os.path.join(run_, 'results.csv'), [
        row('open_drawer', 'base', 0, 0.2), row('open_drawer', 'diwa', 0, 0.5), row('open_drawer', 'base', 1, 0.3),
        row('turn_on_led', 'base', 0, 0.6), row('turn_on_led', 'diwa', 0, 0.7), row('turn_on_led', 'diwa', 0, 0.4),
        row('close_drawer', 'base', 0, 0.8)])
    assert E.diwa_beats_base(run_, 'open_drawer', [0, 1])            # 0.5 > mean(0.2, 0.3)
    assert not E.diwa_beats_base(run_, 'turn_on_led', [0])           # the latest DiWA row (0.4) counts
    assert not E.diwa_beats_base(run_, 'close_drawer', [0])          # no DiWA yet
    md = open(E.write_report(run_, str(tmp_path / 'out'), 'test', seeds=[0])).read()
    led = next(line for line in md.splitlines() if line.startswith('| turn_on_led |')).split('|')
    assert led[7].strip() == '0 (DiWA ≤ base)', led
    # rows of calvin_env are another table: the desk's report ignores them, --env calvin's reads only them
    calvin = lambda *a: {**row(*a), 'env': 'calvin'}
    diagnose.write_rows(os.path.join(run_, 'results.csv'), [
        *E.E.read_results(os.path.join(run_, 'results.csv')), calvin('close_drawer', 'diwa', 0, 0.9)])
    assert not E.diwa_beats_base(run_, 'close_drawer', [0]) and E.diwa_beats_base(run_, 'open_drawer', [0, 1])
    assert not E.diwa_beats_base(run_, 'close_drawer', [0], env_kind='calvin')        # no calvin base row
    md = open(E.write_report(run_, str(tmp_path / 'calvin'), 'test', seeds=[0], env_kind='calvin')).read()
    assert md.startswith('# DiWA in calvin_env (scene D)')
    rows = {line.split('|')[1].strip(): line.split('|') for line in md.splitlines() if line.startswith('| ')}
    assert rows['close_drawer'][3].strip().startswith('90.0') and rows['open_drawer'][2].strip() == '–', md


def test_dppo_steps_to_match_read_on_its_evaluated_snapshots():
    """Table I: the interval of simulator steps in which DPPO's evaluated policy (snapshots and final, by steps,
    the latest row of each) first reaches DiWA's success; hi None when none does; (0, None, 0) unevaluated."""
    row = lambda policy, success, sim, seed=0: {'task': 'close_drawer', 'policy': policy, 'seed': str(seed),
                                                'success': str(success), 'sim_steps_finetune': str(sim)}  # as read
    rows = [row('dppo', 1.0, 144000), row('dppo@16', 0.95, 57600), row('dppo@8', 0.5, 28800),
            row('dppo@16', 0.9, 57600),                                   # a later row of the same snapshot counts
            row('dppo@8', 0.99, 28800, seed=1), row('diwa@8', 1.0, 0)]    # another seed, another policy: ignored
    assert E.dppo_evaluated_steps_to_match(rows, 'close_drawer', 0, 0.85) == (28800, 57600, 144000)
    assert E.dppo_evaluated_steps_to_match(rows, 'close_drawer', 0, 0.92) == (57600, 144000, 144000)
    assert E.dppo_evaluated_steps_to_match(rows, 'close_drawer', 0, 0.5) == (0, 28800, 144000)
    assert E.dppo_evaluated_steps_to_match(rows[:4], 'close_drawer', 0, 1.01) == (144000, None, 144000)
    assert E.dppo_evaluated_steps_to_match(rows, 'open_drawer', 0, 0.5) == (0, None, 0)


def test_paired_gain_is_the_t_interval_over_seeds():
    """Table I's Δ: mean of the paired gains and its 95% t-interval, checked against a naive computation with the
    tabulated quantile (t_{0.975, 2} = 4.303); one seed has no interval, none gives '–'."""
    gains = [0.25, 0.05, 0.15]                                         # percent points 25, 5, 15
    mean = sum(gains) / 3 * 100
    sd = (sum((100 * g - mean) ** 2 for g in gains) / 2) ** 0.5        # sample std, n - 1 = 2
    half = 4.303 * sd / 3 ** 0.5
    assert E._paired_gain(gains) == f'{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]' == '+15.0 [-9.8, +39.8]'
    assert E._paired_gain([0.3]) == '+30.0' and E._paired_gain([]) == '–'
    assert E._paired_gain([0.1, 0.1]) == '+10.0 [+10.0, +10.0]'       # no spread over seeds: no width


def test_report_drops_figures_whose_data_are_gone(tmp_path):
    """A figure left in results/figures by an earlier report is removed when the run no longer has its data,
    so the committed figures are always the ones results.md links."""
    out, run_ = tmp_path / 'results', tmp_path / 'run'
    (out / 'figures').mkdir(parents=True), run_.mkdir()
    stale = out / 'figures' / 'fig2_s6_variants.png'
    stale.write_bytes(b'old figure')
    md = open(E.write_report(str(run_), str(out), 'test', seeds=[0])).read()
    assert not stale.exists() and 'fig2_s6_variants.png' not in md and '## Table I' in md


def test_report_rewrites_only_the_readme_block_and_is_idempotent(tmp_path):
    """The README's <!-- report:begin/end --> block gets the headline (base vs DiWA per task with the paper's
    numbers, figures/headline.png linked relative to the README); the text around it is kept byte for byte, a
    second report with nothing new leaves the file unchanged, `--readme-only` writes the same block from
    results.csv alone, and a README without the markers is not touched."""
    run_, out = tmp_path / 'run', tmp_path / 'results'
    run_.mkdir()
    diagnose.write_rows(str(run_ / 'results.csv'), [{
        'task': 'open_drawer', 'policy': p, 'seed': 0, 'episodes': 10, 'successes': int(10 * s), 'success': s,
        'ci_low': 0.0, 'ci_high': 1.0, 'mean_steps': 72, 'sim_steps_finetune': 0, 'preset': 'test', 'env': 'desk',
        'ckpt_key': 'k', 'commit': 'c', 'wall_s': 1.0} for p, s in [('base', 0.2), ('diwa', 0.5)]])
    readme = tmp_path / 'README.md'
    before, after = '# Project\n\n## Results\nhand-written intro\n', '\nhand-written analysis\n## License\n'
    readme.write_text(before + E.README_BEGIN + '\nold numbers\n' + E.README_END + after)
    E.write_report(str(run_), str(out), 'test', seeds=[0], readme=str(readme))
    text = readme.read_text()
    assert text.startswith(before + E.README_BEGIN) and text.endswith(E.README_END + after)
    block = text[len(before):-len(after)]
    assert 'old numbers' not in block and '| open_drawer | 20.0 ± 0.0 (n=1) | 50.0 ± 0.0 (n=1) | +30.0 | – |' in block
    assert '| **mean over 1 task** | 20.0 | 50.0 | +30.0 | | 57.8 | 74.4 |' in block      # the paper's, same tasks
    assert '| close_drawer | – | – | – | – | 59.1 ± 5.1 | 92.0 ± 2.0 |' in block            # not measured: says so
    assert '](results/figures/headline.png)' in block and (out / 'figures' / 'headline.png').stat().st_size > 5_000
    assert '## ' not in block and 'Wall-clock' not in block          # the headline only; the rest is in results.md
    E.write_report(str(run_), str(out), 'test', seeds=[0], readme=str(readme))
    assert readme.read_text() == text
    # calvin_env's rows go into their own block; the desk's is left as it was
    rows = E.E.read_results(str(run_ / 'results.csv'))
    diagnose.write_rows(str(run_ / 'results.csv'), rows + [{**r, 'env': 'calvin', 'success': 0.1} for r in rows])
    begin, end = E.README_MARKERS['calvin']
    readme.write_text(text + begin + 'old calvin numbers' + end + '\n')
    E.write_report(str(run_), str(tmp_path / 'calvin'), 'test', seeds=[0], readme=str(readme), env_kind='calvin')
    both = readme.read_text()
    assert both.startswith(text) and '| open_drawer | 10.0 ± 0.0 (n=1) | 10.0 ± 0.0 (n=1) | +0.0 * |' in both
    assert 'less than 15 points' in both.split(begin)[1] and 'less than' not in both.split(begin)[0]
    assert "CALVIN's task oracle" in both.split(begin)[1] and 'old calvin numbers' not in both
    diagnose.write_rows(str(run_ / 'results.csv'), rows)
    # --readme-only: the same block from results.csv alone, with no run folder at all
    shutil.rmtree(run_)
    readme.write_text(before + E.README_BEGIN + E.README_END + after)
    assert E.main(['--readme-only', '--report-dir', str(out), '--readme', str(readme), '--seeds', '0']) == 0
    assert readme.read_text() == text
    plain = tmp_path / 'PLAIN.md'
    plain.write_text('no markers\n')
    assert not E.update_readme(str(plain), str(out), ['x']) and plain.read_text() == 'no markers\n'
    inner = tmp_path / 'docs' / 'README.md'             # results/ lies outside docs/: not this README's report
    inner.parent.mkdir()
    inner.write_text(E.README_BEGIN + E.README_END)
    assert not E.update_readme(str(inner), str(out), ['x']) and inner.read_text() == E.README_BEGIN + E.README_END


def test_objectives_runs_each_objective_with_each_sampler_and_tabulates_the_gains(run_dir, tmp_path):
    """report.py --objectives: DiWA fine-tuned under each --ft.objective in a folder of its own (inheriting the
    world model, BC and classifier), base and DiWA evaluated with each --eval.sampler; the table's gains are
    DiWA's real success minus the base's, per sampler, read from those rows."""
    import dream_ppo
    d, out = str(tmp_path / 'obj'), str(tmp_path / 'results')
    shutil.copytree(run_dir, d)
    args = ['--preset', 'test', '--run', d, '--tasks', TASK, '--seeds', '0', '--report-dir', out, '--objectives']
    run(*args, script='report.py')
    base = {r['sampler']: float(r['success']) for r in read_csv(os.path.join(d, 'results.csv')) if r['policy'] == 'base'}
    assert sorted(base) == ['ddpm', 'mean']
    md = open(os.path.join(out, 'objectives.md')).read()
    for o in dream_ppo.OBJECTIVES:
        ck = torch.load(os.path.join(d, 'objectives', o, TASK, 'diwa_s0.pt'), weights_only=True)
        assert ck['config']['objective'] == o and not os.path.exists(os.path.join(d, 'objectives', o, 'wm.pt'))
        rows = {r['sampler']: float(r['success']) for f in [os.path.join(d, 'objectives', o), d]   # the run's own
                for r in read_csv(os.path.join(f, 'results.csv'))[::-1] if r['ckpt_key'] == ck['key']}  # objective: its rows
        for s in ('mean', 'ddpm'):
            gain = 100 * (rows[s] - base[s])
            assert f'| {o} | {s} | 1 | {gain:+.1f} |' in md, (o, s, gain, md)
    assert 'up to date' in run(*args, script='report.py').stdout


def test_wm_step_seconds_ignores_pauses_and_resumed_segments(tmp_path):
    """The s/step of the world-model sizes table: a pause (a stopped process) and a resumed segment, whose 'time'
    restarts, do not change it; no log gives None."""
    p = str(tmp_path / 'wm_metrics.csv')
    times = [0.5 * s for s in range(20, 220, 20)]                           # 0.5 s per step, logged every 20
    times[5:] = [t + 3000 for t in times[5:]]                                # paused 50 minutes after step 100
    rows = [(s, t) for s, t in zip(range(20, 220, 20), times)] + [(220 + 20 * i, 10.0 * (i + 1)) for i in range(10)]
    with open(p, 'w') as fh:
        fh.write('step,loss,time\n' + ''.join(f'{s},1.0,{t}\n' for s, t in rows))
    assert E.wm_step_seconds(p) == pytest.approx(0.5)
    assert E.wm_step_seconds(str(tmp_path / 'missing.csv')) is None


def test_wm_sizes_trains_each_model_once_and_tabulates_its_fidelity(run_dir, tmp_path, monkeypatch):
    """report.py --wm-sizes: the preset's model is the run's own (trained there once, then inherited); a model with
    more steps only goes on from it; another size trains from scratch with its own BC and classifier; each gets the
    open-loop, press and gap reports in the table, and a second run trains nothing."""
    d, out = str(tmp_path / 'sizes'), str(tmp_path / 'results')
    shutil.copytree(run_dir, d)
    for f in ('wm.pt', 'wm_metrics.csv'):                    # the run's own model is trained here, once
        os.remove(os.path.join(d, f))
    monkeypatch.setattr(E, 'WM_SIZES', {'preset': ({}, 'the run\'s'), 'longer': ({'wm.steps': 8}, '8 steps'),
                                        'wider': ({'wm.deter': 48}, 'GRU 48')})
    args = ['--wm-sizes', '--preset', 'test', '--run', d, '--tasks', TASK, '--report-dir', out, '--threads', '1']
    assert E.main(args) == 0
    sizes = os.path.join(d, 'wm_sizes')
    assert not os.path.exists(os.path.join(sizes, 'preset', 'wm.pt'))                       # inherited
    longer = torch.load(os.path.join(sizes, 'longer', 'wm.pt'), weights_only=True)
    parent = torch.load(os.path.join(d, 'wm.pt'), weights_only=True)
    rows = read_csv(os.path.join(sizes, 'longer', 'wm_metrics.csv'))
    assert longer['step'] == 8 and [int(r['step']) for r in rows] == list(range(1, 9))       # 5 of the parent's, then 3
    assert rows[:5] == read_csv(os.path.join(d, 'wm_metrics.csv'))
    assert parent['step'] == 5 and longer['config']['steps'] == 8
    wider = torch.load(os.path.join(sizes, 'wider', 'wm.pt'), weights_only=True)
    assert wider['config']['deter'] == 48 and os.path.isfile(os.path.join(sizes, 'wider', TASK, 'reward.pt'))
    md = open(os.path.join(out, 'wm_sizes.md')).read()
    for name in ('preset', 'longer', 'wider'):
        rep = json.load(open(os.path.join(out, 'wm_sizes', f'{name}.json')))
        assert 'per_episode' not in rep['gap'][TASK]
        assert rep['gap'][TASK]['episodes'] > 0 and {r['horizon'] for r in rep['open_loop']} >= {10, 25, 50}
        assert re.search(rf'\| {name} \| [^|]+ \| [0-9.]+M \| {rep["steps"]:,} \|', md), (name, md)
        g = rep['gap'][TASK]
        assert f"| {name} | " in md and f"{100 * g['imagined_success']:.0f} / {100 * g['real_success']:.0f}" in md
    mtimes = {os.path.join(p, f): os.path.getmtime(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs
              if f.endswith('.pt')}
    assert E.main(args) == 0
    assert {f: os.path.getmtime(f) for f in mtimes} == mtimes and open(os.path.join(out, 'wm_sizes.md')).read() == md
    shutil.rmtree(os.path.join(d, 'wm_sizes', 'preset'))     # the run folder's part gone: the table keeps its row
    assert E.main(['--wm-sizes', 'wider'] + args[1:]) == 0
    assert open(os.path.join(out, 'wm_sizes.md')).read() == md
