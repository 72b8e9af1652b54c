"""Diagnostics of a DiWA run: analysis beside the method, which the core files never import.

    python diagnose.py wm                      # world model: open-loop errors of the desk's parts, Fig. S.7 rollouts
    python diagnose.py press                   # does imagination know whether a button press switched the LED
    python diagnose.py reward --task T         # the success classifier on held-out recorded and imagined latents
    python diagnose.py gap --task T [--policy diwa]   # imagination vs. simulator from the same start states
                                                      # (--env calvin [--arm neutral]: in calvin_env)
    python diagnose.py scripted --task T       # the scripted skills through the evaluation loop (checks the loop)
    python diagnose.py skills [--operator] [--env calvin]   # success table of the scripted skills (desk / calvin_env)
    python diagnose.py render DIR              # PNGs of both cameras for a few desk states
    python diagnose.py dataset FOLDER          # frames, segments and windows per task of a CALVIN-layout split
    python diagnose.py calvin-starts --data D --task T   # CALVIN's start states in calvin_env: blocks, gripper

Each report prints a table and writes a json / csv into the run folder (FINDINGS.md reads them).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import data
import diffusion_policy as D
import dream_ppo as P
import env
import eval as E
import reward as R
import train as TR
import world_model as W

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
    # scored at the probability above which fine-tuning ends an imagined episode as a success (FinetuneConfig)
    thr = TR.build_config('ft', args).success_threshold
    wm, wm_ckpt = TR.load_world_model(args, device)
    clf, _ = R.load(TR.find(args, task, 'reward.pt'), task, wm.feat_dim, device)
    val = TR.split_of(args, 'validation', wm.cfg.image_size)
    demos = TR.demo_latents(args, wm, wm_ckpt, task, device, 'validation')
    # the held-out set keeps RewardConfig's default play_frac and no imagined copies: figures compare across settings
    feat, start, label = R.reward_dataset(wm, demos, val, task, device, args.post_success_frames, seed=args.seed + 1,
                                          margin=clf.cfg.neg_margin, drop_relapses=clf.cfg.drop_relapses,
                                          relative=clf.relative)
    pr = R.precision_recall(clf, feat.to(device), label.to(device), start=start.to(device))
    # held-out demos, each followed for the same post-success frames as the classifier's positives
    win = val['windows'][val['window_tasks'] == task]
    rows, _ = data.window_rows(val['episodes'], win, args.post_success_frames)
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
def imagination_gap(args, device, task: str, cfg: E.EvalConfig, policy: str = 'base', repeats: int = 4) -> dict:
    """Does imagination predict the simulator? The same start states (the evaluation's: the desk's sampler, or in
    calvin_env the validation windows' first frames, with the arm as recorded or at CALVIN's neutral pose, --arm)
    are run (1) in the simulator, as the evaluation does, (2) in imagination as fine-tuning runs them
    (dream_ppo.imagine_rollout: stochastic policy, the preset's latent sampling, success threshold and episode
    length), from each start's first frame encoded as the evaluation encodes it, `repeats` times, (3) open loop:
    each simulator episode's own actions replayed in imagination, and (4) the classifier on the latents filtered
    from the episode's real frames (success if any step exceeds the threshold). (4) tests the classifier alone,
    (3) adds the world model's open-loop dynamics, (2) vs (1) tests the whole Dream MDP.
    -> dict with real / imagined success, their agreement and each start's results ('per_episode'), written to
    <run>/<task>/gap_<policy>_s<seed>.json
    (in calvin_env gap_<policy>_s<seed>_calvin_<arm>_<sampler>.json)."""
    fcfg = TR.build_config('ft', args)
    wm, _ = TR.load_world_model(args, device)
    clf, _ = R.load(TR.find(args, task, 'reward.pt'), task, wm.feat_dim, device)
    policy_pre, bc_ckpt = TR.load_bc_policy(args, task, args.seed, wm.feat_dim, device)   # the seed's BC policy
    actor = policy_pre                                  # the base policy: its own copy in both roles
    if policy != 'base':
        path = os.path.join(args.run, task, f'{policy}_s{args.seed}.pt')
        if not os.path.isfile(path):
            raise TR.StageError(f'gap report: no {policy} checkpoint of {task}, seed {args.seed}, in {args.run}')
        ck = data.load_checkpoint(path, E.stage_of(policy), task)
        if bc_ckpt['key'] not in ck.get('upstream', []):
            raise TR.StageError(f'{path}: fine-tuned from another BC policy than {TR.bc_file(args.seed)}; run '
                                f'--stage {E.stage_of(policy)} --seed {args.seed} again')
        actor = P.load_actor(ck, policy_pre)
        fcfg = dataclasses.replace(fcfg, **{k: v for k, v in ck['config'].items() if hasattr(fcfg, k)})  # as it was trained
    factory = E.policy_agent_factory(policy_pre, actor if policy != 'base' else None, fcfg.K_ft, seed=args.seed,
                                     sampler=cfg.sampler)
    # the decoded-state reward and a start-conditioned classifier compare with the episode's first latent
    relative = getattr(clf, 'relative', False)
    starts, acts, post_p, flags = {k: [] for k in wm.state_keys}, [], [], []

    def make_agent(B):                                  # the evaluation's agent, recording start states and actions
        agent, steps, first = factory(B), [], {}
        acts.append(steps)
        post_p.append(torch.zeros(B))
        flags.append([None] * B)                        # the real state where the classifier first flags success

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
            for i in np.flatnonzero(post_p[-1].numpy() > fcfg.success_threshold):
                if flags[-1][i] is None:                # obs[i] None: the frame that ended the episode, unseen here
                    flags[-1][i] = {'step': t, **{k: None if obs[i] is None else np.round(obs[i][k], 4).tolist()
                                                  for k in ('scene_obs', 'robot_obs')}}
            a = agent(t, obs, feat)
            steps.append(np.asarray(a, dtype=np.float32))
            return a
        return act
    t0 = time.time()
    if args.env == 'calvin':                            # the evaluation's CALVIN starts, or the same scenes, arm neutral
        real_starts = E.window_starts(TR.split_of(args, 'validation', wm.cfg.image_size), task, cfg.episodes,
                                      args.seed, arm=args.arm)
    else:
        real_starts = E.task_starts(task, cfg.episodes, args.seed)
    real = E.run_episodes(make_agent, task, real_starts, cfg, wm=wm, device=device, seed=args.seed,
                          env_kind=args.env)['success']
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
    where = 'desk' if args.env == 'desk' else f'calvin, arm {args.arm}'
    res = {'task': task, 'policy': policy, 'seed': args.seed, 'starts': where, 'sampler': cfg.sampler,
           'episodes': n, 'repeats': repeats, 'threshold': fcfg.success_threshold, 'latent_sample': fcfg.latent_sample,
           'real_success': f(real.mean()), 'imagined_success': f(closed.mean()),
           'imagined_on_real_success': f(closed[real].mean() if real.any() else np.nan),
           'imagined_on_real_failure': f(closed[~real].mean() if (~real).any() else np.nan),
           'replay_on_real_success': f(replayed[real].mean() if real.any() else np.nan),
           'replay_on_real_failure': f(replayed[~real].mean() if (~real).any() else np.nan),
           'posterior_on_real_success': f(posterior[real].mean() if real.any() else np.nan),
           'posterior_on_real_failure': f(posterior[~real].mean() if (~real).any() else np.nan),
           'wall_s': round(time.time() - t0, 1),
           # per start, in the order of real_starts: for breaking the figures above down by start state
           'per_episode': {'real': real.astype(int).tolist(), 'imagined': closed.round(4).tolist(),
                           'replayed': replayed.round(4).tolist(), 'posterior': posterior.astype(int).tolist(),
                           'scene_obs': [np.round(s, 4).tolist() for _, s in real_starts],
                           'robot_obs': [np.round(r, 4).tolist() for r, _ in real_starts],
                           # the control step and the real scene_obs / robot_obs where (4) first flagged success
                           # (states None where that was the episode's last frame)
                           'flagged': [f for batch in flags for f in batch]}}
    print(f"[gap/{task}] {policy} seed {args.seed} ({where} starts, sampler {cfg.sampler}): simulator "
          f"{res['real_success']:.2f}, imagined (as fine-tuning, {repeats}x) {res['imagined_success']:.2f} (on "
          f"starts that succeed / fail in the simulator: {res['imagined_on_real_success']} / "
          f"{res['imagined_on_real_failure']}); the simulator's actions replayed in imagination succeed on "
          f"{res['replay_on_real_success']} / {res['replay_on_real_failure']} of them; the classifier"
          f" on latents filtered from the real frames flags {res['posterior_on_real_success']} / "
          f"{res['posterior_on_real_failure']}")
    name = f'gap_{policy}_s{args.seed}' + ('' if args.env == 'desk' else f'_calvin_{args.arm}_{cfg.sampler}')
    data.atomic_write(os.path.join(args.run, task, f'{name}.json'),
                      lambda fh: fh.write(json.dumps(res, indent=1).encode()))
    return res


# ----------------------------------------------------------------------------------------------------
# The desk itself: its scripted skills and its cameras
# ----------------------------------------------------------------------------------------------------

def check_skills(episodes=100, max_steps=150, seed=0, tasks=env.TASKS, verbose=True, speed_range=None,
                 gain_range=None, env_kind='desk', **style):
    """Success rate of each scripted skill from random possible start states (no cameras). -> {task: rate}
    `style`: extra env.ScriptedSkill arguments (noise, noise_corr, p_via, ...; --operator uses the play data's);
    speed_range / gain_range: draw each episode's speed and gain from these (low, high), as the play data does.
    env_kind 'calvin': in the real calvin_env (scene D) with the geometry read from its scene (unless `style` names
    one), its robot and block placement (env.sample_task_start), scored by CALVIN's own task oracle.
    Besides the success within max_steps it prints the share that succeeds within a CALVIN annotation window
    (64 frames: a play-data demo that takes longer is clipped to its last 64 frames, data.run_episode) and within
    an evaluation episode (72 steps, eval.EvalConfig): a demonstrator slower than these shows the cloned policy
    demos that start mid-task, and the evaluation asks the policy to be faster than the operator it copies."""
    if env_kind == 'calvin':
        sim = env.CalvinEnvAdapter(seed=seed, cameras=False)
        style, success = {'geometry': sim.geometry(), **style}, sim.task_success
    else:
        sim, success = env.DeskEnv(cameras=False, seed=seed), env.task_success
    rng, rates = np.random.default_rng(seed), {}
    for task in tasks:
        steps = []                                 # steps to the first success (max_steps + 1 = none)
        for _ in range(episodes):
            robot_obs, scene_obs = env.sample_task_start(task, rng, calvin=sim if env_kind == 'calvin' else None)
            obs = sim.reset(robot_obs, scene_obs)
            drawn = {k: rng.uniform(*r) for k, r in (('speed', speed_range), ('gain', gain_range)) if r is not None}
            start, skill = sim.get_info(), env.ScriptedSkill(task, rng, **style, **drawn)
            steps.append(max_steps + 1)
            for t in range(max_steps):
                obs, _, _, info = sim.step(skill.act(obs))
                if success(task, start, info):               # CALVIN's evaluation stops at the first success
                    steps[-1] = t + 1
                    break
        steps = np.array(steps)
        won = steps <= max_steps
        rates[task] = float(won.mean())
        if verbose:
            print(f'{task:20s} {won.sum():4d}/{episodes}  success {100 * won.mean():5.1f}%  '
                  f'mean steps {steps[won].mean() if won.any() else float("nan"):5.1f}  '
                  f'within 64: {100 * (steps <= 64).mean():5.1f}%  within 72: {100 * (steps <= 72).mean():5.1f}%',
                  flush=True)
    sim.close()
    return rates


def render_examples(folder, image_size=200, gripper_size=84, seed=0):
    """Write PNGs of both cameras for a few desk states (drawer closed/open, door left/right, LED, bulb)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    desk = env.DeskEnv(image_size=image_size, gripper_size=gripper_size, seed=seed)
    base = env.random_scene(np.random.default_rng(seed), door=0.0, drawer=0.0, switch_on=False, led_on=False)
    states = {'closed': {}, 'drawer_open': {1: env.DRAWER_MAX}, 'door_left': {0: env.DOOR_MAX},
              'led_on': {5: 1.0}, 'bulb_on': {3: env.SWITCH_MAX, 4: 1.0}}
    for name, changes in states.items():
        scene = base.copy()
        for k, v in changes.items():
            scene[k] = v
        obs = desk.reset(scene_obs=scene)
        for cam in ('rgb_static', 'rgb_gripper'):
            plt.imsave(os.path.join(folder, f'{name}_{cam}.png'), obs['rgb_obs'][cam])
    desk.close()
    print(f'wrote {2 * len(states)} PNGs to {folder}')


def calvin_start_report(args, task: str, n: int = 100, settle: int = 15) -> dict:
    """The start states of an evaluation in the real CALVIN (eval.window_starts: the validation windows' first
    frames): calvin_env reset to each, then `settle` steps holding still; how many blocks then lie more than 1 cm
    from their stored place (fallen or stuck), and how far the gripper starts from the stored robot_obs (max over
    x, y, z)."""
    split = TR.split_of(args, 'validation', 64)
    adapter, moved, err = env.CalvinEnvAdapter(seed=args.seed), [], []
    try:
        for robot_obs, scene_obs in E.window_starts(split, task, n, args.seed):
            obs = adapter.reset(robot_obs=robot_obs, scene_obs=scene_obs)
            err.append(float(np.abs(obs['robot_obs'][:3] - robot_obs[:3]).max()))
            for _ in range(settle):
                obs = adapter.step(np.append(np.zeros(6), 1.0 if robot_obs[14] >= 0 else -1.0))[0]
            blocks, stored = obs['scene_obs'][6:].reshape(3, 6)[:, :3], scene_obs[6:].reshape(3, 6)[:, :3]
            moved.append(int((np.linalg.norm(blocks - stored, axis=1) > 0.01).sum()))
    finally:
        adapter.close()
    out = {'task': task, 'starts': len(err), 'blocks_moved': int(sum(moved)), 'starts_with_a_moved_block':
           int(np.count_nonzero(moved)), 'gripper_error_mm_max': round(1000 * max(err), 2),
           'gripper_error_mm_mean': round(1000 * float(np.mean(err)), 2)}
    print(f"[calvin/{task}] {out['starts']} starts: {out['blocks_moved']} of {3 * out['starts']} blocks more than 1 cm "
          f"from their stored place after {settle} still steps; gripper {out['gripper_error_mm_mean']} mm from the "
          f"stored robot_obs on average, {out['gripper_error_mm_max']} mm at most")
    return out


class ScriptedAgent:
    """The scripted skills (env.ScriptedSkill) as an agent of eval.run_episodes: a check of the loop itself."""

    def __init__(self, task: str, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.skills = [env.ScriptedSkill(task, rng) for _ in range(n)]

    def __call__(self, t: int, obs: list, feat) -> np.ndarray:
        return np.stack([s.act(o) if o is not None else np.zeros(7) for s, o in zip(self.skills, obs)])


def dataset_summary(folder: str, image_size: int = 64) -> dict:
    """Frames, segments and annotated windows per task of a split in CALVIN's layout (builds the frame cache)."""
    d = data.load_split(folder, image_size)
    lengths = d['episodes'][:, 1] - d['episodes'][:, 0] + 1
    print(f"{folder}: {len(d['frame_ids'])} frames in {len(lengths)} segments "
          f"(length {lengths.min()}..{lengths.max()}), {len(d['windows'])} annotated windows")
    out = {}
    for task in sorted(set(d['window_tasks'].tolist())):
        w = d['windows'][d['window_tasks'] == task]
        out[task] = len(w)
        print(f'  {task:28s} {len(w):6d} windows, mean length {np.mean(w[:, 1] - w[:, 0] + 1):5.1f} frames')
    return out


def operator_skill_style(ap, settings: list) -> dict:
    """check_skills' arguments for the play data's operator (data.CollectConfig), with KEY=VALUE changes."""
    defaults, changes = dataclasses.asdict(data.CollectConfig()), {}
    for item in settings:
        key, _, value = item.partition('=')
        kind = type(defaults.get(key))
        try:
            changes[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
        except (TypeError, ValueError):
            ap.error(f'--set {item!r}: expected KEY=VALUE with KEY a CollectConfig field ({", ".join(defaults)}) '
                     f'and VALUE of its type')
    c = data.CollectConfig(**changes)
    return dict(data.operator_style(c), speed_range=(c.speed_min, c.speed_max), gain_range=(c.gain_min, c.gain_max))


REPORTS = ('wm', 'press', 'reward', 'gap', 'scripted', 'skills', 'render', 'dataset', 'calvin-starts')


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Diagnostics of a DiWA run and of the built-in desk.')
    p.add_argument('report', choices=REPORTS, help='which diagnostic (see the module docstring)')
    p.add_argument('path', nargs='?', default=None, help='render: output folder; dataset: a split folder')
    p.add_argument('--run', default=None, help='run folder (default runs/<preset>)')
    p.add_argument('--preset', choices=['paper', 'cpu', 'test'], default='cpu')
    p.add_argument('--data', default=None, help='dataset root (default <run>/data)')
    p.add_argument('--inherit', nargs='+', default=[], metavar='RUN', help='parent run folder(s) (train.py --inherit)')
    p.add_argument('--task', nargs='+', default=None, help="task(s), or 'all' (default: open_drawer; skills: all)")
    p.add_argument('--policy', nargs='+', default=['base'], help='gap: the policies to compare (base, diwa, dppo)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--episodes', type=int, default=None, help='episodes per task (default: the preset / 100)')
    p.add_argument('--workers', type=int, default=None, help='simulator processes')
    p.add_argument('--sampler', choices=D.SAMPLERS, default=None, help='gap: evaluation sampler (default: the preset)')
    p.add_argument('--env', choices=['desk', 'calvin'], default='desk')
    p.add_argument('--arm', choices=['recorded', 'neutral'], default='recorded',
                   help="gap --env calvin: the arm at the starts: as recorded (the evaluation's) or CALVIN's neutral pose")
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
    p.add_argument('--operator', action='store_true', help="skills: driven by the play data's operator "
                   '(data.CollectConfig: noise, drift, detours, hesitations, misses, retries)')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                   help='skills --operator with these CollectConfig fields changed, e.g. --set action_noise=0.15')
    p.add_argument('--size', type=int, default=64, help='render / dataset: image size')
    return p


def main(argv=None) -> int:
    p = make_parser()
    args = p.parse_args(argv)
    args.task = args.task or (['all'] if args.report == 'skills' else ['open_drawer'])
    tasks = list(env.TASKS) if args.task == ['all'] else args.task
    bad = [t for t in tasks if t not in env.TASKS]
    if bad:
        p.error(f'--task: unknown task(s) {bad}; choose from {env.TASKS} or all')
    if args.arm != 'recorded' and args.env != 'calvin':
        p.error('--arm: the arm at CALVIN\'s starts, for --env calvin only')
    if args.report in ('render', 'dataset') and not args.path:
        p.error(f'{args.report} needs a folder')
    args.run = args.run or os.path.join('runs', args.preset)
    args.demos, args.post_success_frames = 50, 16           # train.py's defaults (cache keys match)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = data.pick_device(args.device)
    cfg = dataclasses.replace(E.EvalConfig(), **E.PRESETS[args.preset])
    cfg.episodes = args.episodes or cfg.episodes
    cfg.workers = cfg.workers if args.workers is None else args.workers
    cfg.sampler = args.sampler or cfg.sampler
    return TR.guarded(run_report, args, p, tasks, cfg, device)


def run_report(args, p, tasks: list, cfg, device) -> None:
    """The diagnostic `args.report` (see the module docstring), once or for each task."""
    if args.report == 'wm':
        wm_report(args, device)
    elif args.report == 'press':
        press_report(args, device)
    elif args.report == 'skills':
        style = operator_skill_style(p, args.set) if args.operator or args.set else {}
        check_skills(args.episodes or 100, seed=args.seed, tasks=tasks, env_kind=args.env, **style)
    elif args.report == 'render':
        render_examples(args.path, image_size=args.size, gripper_size=args.size, seed=args.seed)
    elif args.report == 'dataset':
        dataset_summary(args.path, args.size)
    for task in tasks if args.report in ('reward', 'gap', 'scripted', 'calvin-starts') else []:
        if args.report == 'reward':
            reward_report(args, device, task)
        elif args.report == 'calvin-starts':
            calvin_start_report(args, task, args.episodes or 100)
        elif args.report == 'gap':
            for name in args.policy:
                imagination_gap(args, device, task, cfg, name)
        else:
            t0 = time.time()
            starts = E.window_starts(TR.split_of(args, 'validation', 64), task, cfg.episodes, args.seed) \
                if args.env == 'calvin' else E.task_starts(task, cfg.episodes, args.seed)
            out = E.run_episodes(lambda B: ScriptedAgent(task, B, args.seed), task, starts, cfg, seed=args.seed,
                                 env_kind=args.env)
            E.summarize(task, 'scripted', args.seed, out, t0)


if __name__ == '__main__':
    sys.exit(main())
