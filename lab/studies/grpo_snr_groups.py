"""Signal to noise of Stage 1 GRPO gradients, one gradient per prompt group
(docs/experiments.md, "Stage 1 in the miniature world").

At the LoRA's start, M groups of G=8 rollouts (beta 0, fp32); per group g_k, the unbiased estimate of
|E g|^2 is (|sum g_k|^2 - sum |g_k|^2) / (M (M-1)); the noise is E|g|^2 minus it. Their ratio is the
signal to noise of ONE group's gradient (about sqrt(2 / M^2) resolution), so 1/ratio groups make a
gradient with signal to noise 1. The SDE window is pinned (START, WINDOW) so that every group trains
the same steps. Usage: python lab/studies/grpo_snr_groups.py REWARD START WINDOW NOISE M
(WINDOW 0: all 9 steps, Flow-GRPO). Measured output: grpo_snr_groups.txt.
"""
import os, random, sys, time
import numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import training, stage1_grpo as s1
import loading
reward, start, window, noise, M = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
bf16 = len(sys.argv) > 6 and sys.argv[6] == "bf16"
args = s1.parse_args(["--reward", reward, "--out", "/tmp/snr", "--sde-window", str(window), "--prompts-per-epoch", str(M),
                      "--train-batch-size", "8", "--beta", "0", "--noise-level", str(noise)])
args.rewards = s1.parse_rewards(args.reward)
args.world, args.rank = 1, 0
torch.manual_seed(0)
bundle = training.load_model(args.model)
args.score, args.eval_rewards = s1.rewards.from_args(args, bundle)
training.sampling_defaults(args, bundle)
args.train_bf16 = bf16
args.local_batch_size = 8
if window > 0:
    s1.sde_window = lambda a, r: list(range(start, start + window))
policy = training.make_policy(bundle.transformer, 32, 64)
train, test = s1.default_prompt_files(args.rewards, "dataset")
items = [it for f in train for it in loading.load_prompts(f)]
params = [p for p in policy.parameters() if p.requires_grad]
t = time.time()
batch = s1.sample_epoch(policy, bundle, items, args.rewards, args, random.Random(1), seed=12345)
reward_v, adv, info = s1.advantages_of(batch, args.rewards, "sum")
t_roll = time.time() - t
G = []
for g in range(M):
    idx = torch.arange(g * 8, g * 8 + 8)
    for p in params: p.grad = None
    if not info[g * 8]:
        continue
    a = torch.as_tensor(adv[idx.numpy()], dtype=torch.float32)
    for j in batch["trained_steps"]:
        loss, kl, ratio = s1.policy_step_loss(policy, batch, idx, j, a, args)
        loss.backward()
    G.append(torch.cat([p.grad.flatten() for p in params]).double())
G = torch.stack(G); n = len(G)
S = G.sum(0)
signal = (S.dot(S) - (G * G).sum()) / (n * (n - 1))   # unbiased |E g|^2
total = (G * G).sum(1).mean()                           # E |g|^2
noise_var = total - signal
rs = np.asarray(reward_v).reshape(M, 8)
print(f"{reward} start {start} window {window} a {noise} bf16 {bf16}: groups {n}/{M} reward {rs.mean():.3f} "
      f"within-group std {rs.std(1).mean():.3f} | signal/noise per group {float(signal/noise_var):.4f} "
      f"-> groups for SNR 1: {float(noise_var/max(signal,1e-30)):.0f} | rollout {t_roll:.0f}s total {time.time()-t:.0f}s", flush=True)
