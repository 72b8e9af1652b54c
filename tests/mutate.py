"""Mutation testing of the method's maths and control flow, with no external tool.

Each mutant is a one-line wrong version of the method (a sign flip, k off by one, a reversed order, >= for >, a
hard-coded threshold, the wrong discount power, max vs last, prior / posterior swapped in the KL balance ...).
For each mutant the repository's top-level *.py files and tests/ are copied to a temporary folder, the edit is
applied there (the original snippet must occur exactly once, else the script stops with an error before running
anything), and pytest runs the unit test files that cover the mutant (-x: the first failure kills it). A mutant
that survives its own files is re-run on every unit test file (tests/test_*.py except tests/test_cli*.py) before
it is reported as surviving. Mutants known to be equivalent say why; they are run too (a killed 'equivalent'
mutant is reported, as it means the reason is wrong).

    python tests/mutate.py --list            # the mutants, numbered
    python tests/mutate.py                   # run all of them (a few minutes on 2 cores)
    python tests/mutate.py --only 3 7        # run some
    python tests/mutate.py --all-tests       # every mutant against every unit test file (slower)

Snippets are code, never comments (comments are reworded more often than code). Exit status: 0 when every mutant is killed or
marked equivalent, 1 when a mutant survives unexplained, 2 on a snippet that is not found exactly once.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PPO = ['tests/test_dream_ppo.py', 'tests/test_method_ppo_k.py']
MDP = ['tests/test_dream_ppo.py', 'tests/test_method_dream_mdp.py']
WM = ['tests/test_world_model.py', 'tests/test_method_kl_balance.py']
ENV = ['tests/test_env.py', 'tests/test_method_labels.py']
EVAL = ['tests/test_method_eval.py']
DP = ['tests/test_diffusion_policy.py', 'tests/test_method_ppo_k.py']
LABELS = ['tests/test_method_labels.py', 'tests/test_reward.py']
CKPT = ['tests/test_checkpoints.py']


@dataclass
class Mutant:
    file: str
    old: str
    new: str
    desc: str
    tests: list = field(default_factory=list)   # test files that cover it (empty: every unit test file)
    equivalent: str = ''                        # why the mutant cannot be told apart, if it cannot


MUTANTS = [
    # ---- dream_ppo: the denoising step index k, the (x^k, x^{k-1}) pairs, clip order, discount
    Mutant('dream_ppo.py', 'return chain[row, i], chain[row, i + 1], K_ft - i, i, row',
           'return chain[row, i], chain[row, i + 1], i + 1, i, row',
           'chain_transitions: k labels reversed (k = i+1 instead of K_ft-i)', PPO),
    Mutant('dream_ppo.py', 'return chain[row, i], chain[row, i + 1], K_ft - i, i, row',
           'return chain[row, i], chain[row, i + 1], K_ft - i + 1, i, row',
           'chain_transitions: k shifted by one (x^k scored as step k+1)', PPO),
    Mutant('dream_ppo.py', 'return chain[row, i], chain[row, i + 1], K_ft - i, i, row',
           'return chain[row, i + 1], chain[row, i], K_ft - i, i, row',
           'chain_transitions: x^k and x^{k-1} swapped', PPO),
    Mutant('dream_ppo.py', 'b_bc_x_k, b_bc_x_prev = pre[b_row, b_i], pre[b_row, b_i + 1]',
           'b_bc_x_k, b_bc_x_prev = pre[b_row, b_i + 1], pre[b_row, b_i]',
           'BC targets: x^k and x^{k-1} of the frozen chain swapped', PPO),
    Mutant('dream_ppo.py', 'generator=generator)[:, K - K_ft:] for s in range(0, T * N, Bm)])',
           'generator=generator)[:, K - K_ft - 1:] for s in range(0, T * N, Bm)])',
           'BC targets: frozen chain shifted one step towards the noise (x^{k+1}, x^k) at step k', PPO),
    Mutant('dream_ppo.py', 'b_bc_x_k, b_bc_x_prev = pre[b_row, b_i], pre[b_row, b_i + 1]',
           'b_bc_x_k, b_bc_x_prev = pre[b_row.flip(0), b_i], pre[b_row.flip(0), b_i + 1]',
           'BC targets: frozen chain of another decision (latent / chain rows mismatched)', PPO),
    Mutant('dream_ppo.py', 'cfg.clip_rate).to(feat.device)[b_i]',
           'cfg.clip_rate).to(feat.device)[K_ft - 1 - b_i]',
           'clip epsilons in reversed order (k=1 gets clip_min)', PPO),
    Mutant('dream_ppo.py', 'x = torch.arange(K_ft, dtype=torch.float64) / (K_ft - 1)',
           'x = 1 - torch.arange(K_ft, dtype=torch.float64) / (K_ft - 1)',
           'clip_schedule itself reversed', PPO),
    Mutant('dream_ppo.py', 'b_disc = denoising_discount(b_k, cfg.gamma_denoise) if K > 1',
           'b_disc = denoising_discount(b_k - 1, cfg.gamma_denoise) if K > 1',
           'denoising discount gamma^(k-1) (DPPO) instead of gamma^k (Eq. 8)', PPO),
    Mutant('dream_ppo.py', 'b_disc = denoising_discount(b_k, cfg.gamma_denoise) if K > 1',
           'b_disc = denoising_discount(b_i, cfg.gamma_denoise) if K > 1',
           'denoising discount indexed by chain position (gamma^(K_ft-k): reversed)', PPO),
    Mutant('dream_ppo.py', 'mb_adv = mb_adv * b_disc[mb]', 'mb_adv = mb_adv * 1.0',
           'denoising discount not applied', PPO),
    Mutant('dream_ppo.py', 'return gamma_denoise ** k.to(torch.float32)',
           'return gamma_denoise ** (k.to(torch.float32) - 1)',
           'denoising_discount helper: power k-1', PPO),
    # ---- dream_ppo: PPO and BC losses
    Mutant('dream_ppo.py', 'loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()',
           'loss = torch.min(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()',
           'PPO: optimistic instead of pessimistic bound', PPO),
    Mutant('dream_ppo.py', 'loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()',
           'loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.0, 1 + clip)).mean()',
           'PPO: no clipping at 1-eps from below', PPO),
    Mutant('dream_ppo.py', 'logratio = logp_new - logp_old', 'logratio = logp_old - logp_new',
           'PPO: ratio inverted (pi_old / pi_new)', PPO),
    Mutant('dream_ppo.py', 'loss = pg_loss + alpha_bc * bc', 'loss = pg_loss - alpha_bc * bc',
           'BC regulariser with the wrong sign in Eq. 16', PPO),
    Mutant('dream_ppo.py', 'return -logp_actor_on_pre.mean()', 'return logp_actor_on_pre.mean()',
           'bc_loss maximises the negative log-likelihood', PPO),
    Mutant('dream_ppo.py', 'logp_new, logp_bc = logp.chunk(2)', 'logp_bc, logp_new = logp.chunk(2)',
           'the single actor pass split the wrong way: PPO on the BC pairs, BC on the rollout', PPO),
    Mutant('diffusion_policy.py', 'F.linear(cond, W[:, n:])[rows]', 'F.linear(cond, W[:, n:])[rows.flip(0)]',
           "the per-decision latent path gives a sample another decision's latent", DP),
    Mutant('diffusion_policy.py', 'mean = (mean if rows is None else mean[rows]).view_as(x_k)',
           'mean = (mean if rows is None else mean[rows.sort().values]).view_as(x_k)',
           "the Gaussian policy's per-decision path reorders the decisions", DP),
    Mutant('dream_ppo.py', 'delta = rewards[t] + gamma * values[t + 1] * notdone[t] - values[t]',
           'delta = rewards[t] + gamma * values[t + 1] - values[t]',
           'GAE bootstraps through episode ends', PPO),
    # ---- dream_ppo: the Dream MDP's termination, reward, restarts
    Mutant('dream_ppo.py', 'success = p > cfg.success_threshold', 'success = p >= cfg.success_threshold',
           'success at p == threshold (>= instead of >)', MDP),
    Mutant('dream_ppo.py', 'success = p > cfg.success_threshold', 'success = p > 0.5',
           'hard-coded threshold 0.5', MDP),
    Mutant('dream_ppo.py', 'success = p > cfg.success_threshold', 'success = p > 0.8',
           'hard-coded threshold 0.8 (the cpu preset value)', MDP),
    Mutant('dream_ppo.py', "return state, (probs.max(1).values if cfg.reward_over_chunk == 'max' else probs[:, -1])",
           "return state, (probs[:, -1] if cfg.reward_over_chunk == 'max' else probs[:, -1])",
           "'max' over the chunk read as its last latent", MDP),
    Mutant('dream_ppo.py', "return state, (probs.max(1).values if cfg.reward_over_chunk == 'max' else probs[:, -1])",
           "return state, (probs.max(1).values if cfg.reward_over_chunk == 'max' else probs[:, 0])",
           "'last' reads the chunk's first latent", MDP),
    Mutant('dream_ppo.py', "ends_at_success = success if cfg.objective != 'probability' else torch.zeros_like(success)",
           'ends_at_success = success', "the paper's probability objective ends the episode at a success", MDP),
    Mutant('dream_ppo.py', 'ends.append(torch.where(done & ~terminal, critic(wm.feature(state)), 0.0))',
           'ends.append(torch.where(done & ~terminal, critic(feat), 0.0))',
           'a truncated episode bootstraps with V of the decision before, not of where it stopped', MDP),
    Mutant('dream_ppo.py', 'next_value = values[t + 1] * notdone[t] + (0.0 if end_values is None',
           'next_value = values[t + 1] * notdone[t] + (0.0 if True', 'GAE drops the end values of truncations', MDP),
    Mutant('dream_ppo.py', "reward = success.float() if cfg.objective == 'binary' else p",
           "reward = p if cfg.objective == 'binary' else success.float()",
           'binary / probability reward modes swapped', MDP),
    Mutant('dream_ppo.py', 'state = _where_state(done, fresh, state)', 'state = _where_state(~done, fresh, state)',
           'the running episodes restart instead of the ended ones', MDP),
    Mutant('dream_ppo.py', 'done = success | (ep_len >= cfg.max_episode_steps)\n'
                           '        feats.append(feat), chains.append(chain), rewards.append(reward)',
           'done = success | (ep_len > cfg.max_episode_steps)\n'
           '        feats.append(feat), chains.append(chain), rewards.append(reward)',
           'timeout one decision late (> instead of >=)', MDP),
    Mutant('dream_ppo.py', 'start_feat = torch.where(done[:, None], wm.feature(fresh), start_feat)\n'
                           '        ep_len = ep_len * (~done)',
           'start_feat = torch.where(done[:, None], wm.feature(fresh), start_feat)\n'
           '        ep_len = ep_len * 1',
           'episode length not reset on restart', MDP),
    Mutant('dream_ppo.py', 'state, p = imagine_chunk(wm, state, actions, reward_clf, cfg, start_feat)',
           'state, p = imagine_chunk(wm, state, execute_chunk(chain[:, -2, :action_horizon(policy_pre)]), '
           'reward_clf, cfg, start_feat)',
           'imagination executes x^1 instead of x^0', MDP),
    Mutant('dream_ppo.py', "probs.append(reward_clf.success_prob(f_next) if start_feat is None",
           "probs.append(reward_clf.success_prob(f_next.roll(1, 0)) if start_feat is None",
           'reward of env slot n read from slot n-1 (latents and episodes mismatched)', MDP),
    # ---- diffusion policy: which steps are fine-tuned
    Mutant('diffusion_policy.py', 'pi = ft_policy if k <= K_ft else self', 'pi = ft_policy if k < K_ft else self',
           'fine-tuned policy used for K_ft-1 steps only', DP),
    # ---- world model: KL balancing (Eq. 11 vs DreamerV2)
    Mutant('world_model.py', "m['kl'] = kl_balance(post['logits'], prior['logits'], 1 - cfg.kl_balance).mean()",
           "m['kl'] = kl_balance(post['logits'], prior['logits'], cfg.kl_balance).mean()",
           'KL balance: 0.8 on the posterior term (the printed Eq. 11) instead of the prior', WM),
    Mutant('world_model.py', 'return delta * post_term + (1 - delta) * prior_term',
           'return delta * prior_term + (1 - delta) * post_term',
           'kl_balance: prior / posterior terms swapped', WM),
    Mutant('world_model.py', 'post_term = kl_categorical(post_logits, prior_logits.detach())',
           'post_term = kl_categorical(prior_logits.detach(), post_logits)',
           'kl_balance: reverse KL(p || q) in the posterior term', WM),
    Mutant('world_model.py', "loss = sum(v for k, v in m.items() if k != 'kl') + cfg.kl_scale * m['kl']",
           "loss = sum(v for k, v in m.items() if k != 'kl') + m['kl']",
           'KL weight beta ignored', WM),
    # ---- env: the success tests
    Mutant('env.py', "'open_drawer': lambda: d(1) > 0.12", "'open_drawer': lambda: d(1) >= 0.12",
           'open_drawer succeeds at exactly 0.12 (>= instead of >)', ENV),
    Mutant('env.py', 'd = lambda i: s1[..., i] - s0[..., i]', 'd = lambda i: s1[..., i]',
           'drawer / slider tests absolute, not relative to the start', ENV),
    Mutant('env.py', 'off_on = lambda i: (s0[..., i] < 0.5) & (s1[..., i] > 0.5)',
           'off_on = lambda i: (s1[..., i] > 0.5)',
           'turn_on tests ignore the start state', ENV),
    Mutant('env.py', "'move_slider_left': lambda: d(0) > 0.15", "'move_slider_left': lambda: d(0) > 0.12",
           'slider threshold copied from the drawer (0.12)', ENV),
    # ---- the classifier's labels (diffusion_policy.demo_latents, reward.reward_dataset)
    Mutant('diffusion_policy.py', "start_scene = split['scene_obs'][win[:, 0]]",
           "start_scene = split['scene_obs'][win[:, 0] - 1]",
           'demo labels against the frame before the window start', LABELS),
    Mutant('diffusion_policy.py', 'for r in rows[w]] for w in range(len(win))]) & mask',
           'for r in rows[w]] for w in range(len(win))])',
           'demo labels of padded rows (past the episode) not masked', LABELS),
    Mutant('reward.py', "valid = demos['valid'] & ~((offset < 0) & (offset >= -margin) & done)",
           "valid = demos['valid'] & ~((offset < 0) & (offset > -margin) & done)",
           'neg_margin leaves out one frame too few', LABELS),
    Mutant('reward.py', 'valid &= ~((offset > 0) & ~success & done)', 'valid &= ~((offset >= 0) & ~success & done)',
           'drop_relapses from the first success frame on (>= 0)', LABELS,
           equivalent='at offset 0 (the first success frame, found by argmax of success) success is True, so '
                      '~success is False there either way'),
    Mutant('reward.py', 'return f[:, :1].expand_as(f)[valid]', 'return f[:, -1:].expand_as(f)[valid]',
           "classifier's z_0 taken from the window's last frame", LABELS),
    Mutant('reward.py', "[z0_of(demos['feat'])], [demos['success'][valid].long()]",
           "[z0_of(demos['feat'])], [(~demos['success'][valid]).long()]",
           'classifier labels inverted', LABELS),
    # ---- eval: the evaluation loop
    Mutant('eval.py', "if env.task_success(task, start_info[i], {'scene_obs': obs[i]['scene_obs'],",
           "if not env.task_success(task, start_info[i], {'scene_obs': obs[i]['scene_obs'],",
           'success test negated', EVAL),
    Mutant('eval.py', 'success[lo + i], steps[lo + i], active[i] = True, t + 1, False',
           'success[lo + i], steps[lo + i], active[i] = True, t, False',
           'steps to success off by one', EVAL),
    Mutant('eval.py', 'success[lo + i], steps[lo + i], active[i] = True, t + 1, False',
           'success[i], steps[lo + i], active[i] = True, t + 1, False',
           'successes of later batches written to the first batch', EVAL),
    Mutant('eval.py', 'success[lo + i], steps[lo + i], active[i] = True, t + 1, False',
           'success[lo + i], steps[lo + i], active[i] = True, t + 1, True',
           'episodes continue after their first success', EVAL),
    Mutant('eval.py', 'actions[:, 6] = np.where(actions[:, 6] >= 0, 1.0, -1.0)',
           'actions[:, 6] = np.where(actions[:, 6] > 0, 1.0, -1.0)',
           'gripper 0 closes (> instead of >= 0)', EVAL),
    Mutant('eval.py', 'n, T = len(starts), cfg.max_decisions * 4', 'n, T = len(starts), cfg.max_decisions * 4 + 4',
           'one decision too many per episode', EVAL),
    Mutant('eval.py', 'sim_steps += int(active.sum())', 'sim_steps += B',
           'finished episodes still counted as simulator steps', EVAL),
    Mutant('eval.py', 'rng = np.random.default_rng([seed, env.TASKS.index(task), 1234])',
           'rng = np.random.default_rng()',
           'task_starts not seeded: policies see different starts', EVAL),
    Mutant('eval.py', 'centre = (p + z * z / (2 * n)) / (1 + z * z / n)',
           'centre = (p + z * z / n) / (1 + z * z / n)',
           'Wilson centre with z^2/n', EVAL),
    Mutant('eval.py', 'half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)',
           'half = z * math.sqrt(p * (1 - p) / n) / (1 + z * z / n)',
           'Wilson half-width without the z^2/4n^2 term', EVAL),
    Mutant('eval.py', 'ft_policy=actor, K_ft=K_ft if actor else 0,', 'ft_policy=actor, K_ft=0,',
           'the evaluated DiWA policy ignores the fine-tuned actor', EVAL),
    Mutant('eval.py', "return lambda B: ChunkAgent(_Pair(), Ta=Ta, sampler=sampler, generator=gen)",
           "return lambda B: ChunkAgent(_Pair(), Ta=Ta, sampler='explore', generator=gen)",
           'evaluation samples with the exploration noise instead of the evaluation sampler', EVAL),
    Mutant('diffusion_policy.py', "if sampler == 'mean' or (sampler == 'ddpm' and k == 1):",
           "if sampler == 'mean':", "the ddpm evaluation sampler adds noise on the last step too", DP),
    Mutant('dream_ppo.py', "ends.append(torch.where(done & ~success, critic(wm.feature(state)), 0.0))",
           "ends.append(torch.zeros_like(done, dtype=torch.float))", 'DPPO: a timeout is terminal', PPO),
    # ---- the training loop's resume and the checkpoint checks (train.py, data.py, the loaders)
    Mutant('train.py', "torch.set_rng_state(ckpt['rng']['torch'])", "torch.get_rng_state()",
           "resume: torch's random state not restored", CKPT),
    Mutant('train.py', "rng.bit_generator.state = ckpt['rng']['numpy']", "rng.bit_generator.state = rng.bit_generator.state",
           "resume: the stage's numpy Generator not restored", CKPT),
    Mutant('train.py', "generator.set_state(ckpt['rng']['generator'])", "generator.get_state()",
           "resume: the stage's torch Generator (minibatch draws) not restored", CKPT),
    Mutant('train.py', "obj.load_state_dict(ckpt[name])", "pass",
           'resume: model and optimiser start afresh from the resumed step', CKPT),
    Mutant('data.py', "if stage is not None and ckpt['stage'] != stage:", "if False:",
           "a checkpoint of another stage is accepted", CKPT),
    Mutant('data.py', "if task is not None and ckpt.get('task') != task:", "if False:",
           "a checkpoint of another task is accepted", CKPT),
    Mutant('data.py', "if missing or unknown:", "if False:",
           "settings of another version reach the dataclass (TypeError traceback)", CKPT),
    Mutant('world_model.py', "if not ckpt.get('done'):", "if False:",
           "an unfinished world model is used", CKPT),
    Mutant('reward.py', "if ckpt['extra'].get('feat_dim') != feat_dim:", "if False:",
           "a classifier of another latent size is used", CKPT),
    Mutant('diffusion_policy.py', "if cond_dim != feat_dim:", "if False:",
           "a policy of another latent size is used", CKPT),
    Mutant('eval.py', "if ck.get('done') and bc_ckpt['key'] not in ck.get('upstream', []):", "if False:",
           "a fine-tuned policy is evaluated with a BC policy it was not fine-tuned from", CKPT),
    Mutant('eval.py', "K_ft = ck['config']['K_ft'] if actor is not None else 0", "K_ft = 0",
           "the DiWA row runs the base policy (K' = 0)", CKPT),
    Mutant('eval.py', "out[name] = (ck, P.load_actor(ck, policy_pre))", "out[name] = (ck, policy_pre)",
           "the DiWA row runs the pre-trained weights as its actor", CKPT),
]


PIPELINE_FIXTURES = ('(run_dir', '(data_dir', ' run_dir,', ' data_dir,')


def unit_test_files() -> list:
    """tests/test_*.py except tests/test_cli*.py and files whose tests use conftest's pipeline run folder
    (conftest's run_dir / data_dir: the whole train.py pipeline, minutes per mutant)."""
    out = []
    for p in sorted(glob.glob(os.path.join(ROOT, 'tests', 'test_*.py'))):
        if os.path.basename(p).startswith('test_cli'):
            continue
        defs = [ln for ln in open(p).read().splitlines() if ln.lstrip().startswith('def test')]
        if any(f in ln for ln in defs for f in PIPELINE_FIXTURES):
            continue
        out.append(os.path.relpath(p, ROOT))
    return out


def check_snippets(mutants: list) -> list:
    """-> list of problems (snippet count != 1, missing file / test file)."""
    problems = []
    for n, m in mutants:
        path = os.path.join(ROOT, m.file)
        if not os.path.isfile(path):
            problems.append(f'#{n} {m.file}: no such file')
            continue
        count = open(path).read().count(m.old)
        if count != 1:
            problems.append(f'#{n} {m.file}: snippet found {count} times (must be exactly once): {m.old!r}')
        for t in m.tests:
            if not os.path.isfile(os.path.join(ROOT, t)):
                problems.append(f'#{n}: test file {t} does not exist')
    return problems


def copy_repo(dst: str) -> None:
    for p in glob.glob(os.path.join(ROOT, '*.py')):
        shutil.copy2(p, dst)
    shutil.copytree(os.path.join(ROOT, 'tests'), os.path.join(dst, 'tests'),
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))


DESELECT: list = []     # tests failing without any mutation (see the baseline): left out of every mutant's run


def run_pytest(cwd: str, files: list, timeout: int, stop_first: bool = True) -> tuple[str, float, str, list]:
    """-> ('pass' | 'fail' | 'timeout', seconds, last output line, ids of the failed tests)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'pytest', '-q', '-rf', '-p', 'no:cacheprovider', *(['-x'] if stop_first else []),
           *[a for d in DESELECT for a in ('--deselect', d)], *files]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'timeout', time.time() - t0, '', []
    lines = [ln for ln in (r.stdout + r.stderr).strip().splitlines() if ln.strip()]
    if r.returncode == 5:
        raise SystemExit(f'no tests collected in {files}')
    failed = [ln.split()[1] for ln in lines if ln.startswith('FAILED ') or ln.startswith('ERROR ')]
    return ('pass' if r.returncode == 0 else 'fail'), time.time() - t0, (lines[-1] if lines else ''), failed


def run_mutant(n: int, m: Mutant, all_tests: bool, timeout: int, confirm: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix=f'mutant{n}_') as tmp:
        copy_repo(tmp)
        path = os.path.join(tmp, m.file)
        text = open(path).read()
        if text.count(m.old) != 1:      # the file changed after the start-up check: say so, count as an error
            print(f'ERROR #{n} {m.file}: snippet no longer found exactly once: {m.old!r}', flush=True)
            return {'n': n, 'killed': False, 'status': 'error', 'secs': 0.0, 'last': ''}
        open(path, 'w').write(text.replace(m.old, m.new))
        files = unit_test_files() if (all_tests or not m.tests) else m.tests
        status, secs, last, _ = run_pytest(tmp, files, timeout)
        if status == 'pass' and confirm and not all_tests and m.tests:   # confirm a survivor on every unit test file
            status, secs2, last, _ = run_pytest(tmp, unit_test_files(), timeout)
            secs += secs2
    killed = status in ('fail', 'timeout')
    return {'n': n, 'killed': killed, 'status': status, 'secs': secs, 'last': last}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--list', action='store_true', help='list the mutants and exit')
    ap.add_argument('--only', type=int, nargs='+', metavar='N', help='run only these mutants (numbers of --list)')
    ap.add_argument('--all-tests', action='store_true', help='run every unit test file for every mutant')
    ap.add_argument('--files', nargs='+', metavar='TEST_FILE',
                    help='run these test files for every mutant instead of its own (no re-run of survivors), '
                         'e.g. to see what tests/test_method_*.py kill on their own')
    ap.add_argument('--timeout', type=int, default=600, help='seconds per pytest run (a timeout counts as killed)')
    ap.add_argument('--no-baseline', action='store_true', help='skip the check that the unmutated tests pass')
    args = ap.parse_args(argv)
    numbered = list(enumerate(MUTANTS, 1))
    if args.only:
        bad = [n for n in args.only if not 1 <= n <= len(MUTANTS)]
        if bad:
            ap.error(f'--only: no mutant {bad} (1..{len(MUTANTS)})')
        numbered = [(n, m) for n, m in numbered if n in args.only]
    if args.list:
        for n, m in numbered:
            eq = f'  [equivalent: {m.equivalent}]' if m.equivalent else ''
            print(f'{n:3d} {m.file:20s} {m.desc}{eq}\n      tests: {", ".join(m.tests) or "all unit tests"}')
        return 0
    problems = check_snippets(numbered)
    if problems:
        print('mutate.py: cannot apply these mutants (the code changed?):', *problems, sep='\n  ', file=sys.stderr)
        return 2
    if not args.no_baseline:     # every file a mutant may run (survivors are confirmed on all unit test files)
        files = list(args.files) if args.files else unit_test_files()
        with tempfile.TemporaryDirectory(prefix='mutant0_') as tmp:
            copy_repo(tmp)
            status, secs, last, failed = run_pytest(tmp, files, args.timeout, stop_first=False)
        print(f'baseline (no mutation): {status} in {secs:.0f} s: {last}', flush=True)
        if status == 'timeout' or (status == 'fail' and not failed):
            print('mutate.py: the unmutated tests do not run; fix that first', file=sys.stderr)
            return 2
        if failed:
            DESELECT.extend(failed)
            print('WARNING: these tests fail WITHOUT any mutation and are left out of every mutant run:',
                  *failed, sep='\n  ', flush=True)
    results, t0 = [], time.time()
    if args.files:
        numbered = [(n, Mutant(m.file, m.old, m.new, m.desc, list(args.files), m.equivalent)) for n, m in numbered]
    for n, m in numbered:
        r = run_mutant(n, m, args.all_tests, args.timeout, confirm=not args.files)
        results.append(r)
        word = 'killed' if r['killed'] else ('ERROR (not applied)' if r['status'] == 'error' else
                                              'survived (equivalent)' if m.equivalent else 'SURVIVED')
        print(f'#{n:<3d} {word:22s} {r["secs"]:5.0f} s  {m.file}: {m.desc}', flush=True)
        if m.equivalent and r['killed']:
            print(f'      marked equivalent but killed: the reason "{m.equivalent}" is wrong', flush=True)
    killed = sum(r['killed'] for r in results)
    errors = [n for (n, m), r in zip(numbered, results) if r['status'] == 'error']
    survivors = [(n, m) for (n, m), r in zip(numbered, results) if not r['killed'] and r['status'] != 'error']
    unexplained = [(n, m) for n, m in survivors if not m.equivalent]
    print(f'\nmutants {len(results)}, killed {killed}, survived {len(survivors)} '
          f'({len(survivors) - len(unexplained)} marked equivalent), {time.time() - t0:.0f} s')
    for n, m in survivors:
        print(f'  survivor #{n} {m.file}: {m.desc}' + (f' -- equivalent: {m.equivalent}' if m.equivalent else ' -- UNEXPLAINED'))
    if errors:
        print(f'  ERROR: mutants {errors} could not be applied (their file changed during the run)')
        return 2
    return 1 if unexplained else 0


if __name__ == '__main__':
    sys.exit(main())
