"""Gradient signal-to-noise of Stage 1 GRPO in the miniature world
(docs/experiments.md, "Stage 1 in the miniature world").

Cosine similarity between the policy gradients of independent epochs (M=16 prompts x G=8, SDE window 2,
beta 0) at the start of training. Usage: python lab/studies/grpo_snr.py REWARD WINDOW M
Measured 2026-11-22 on the 2-core CPU: see grpo_snr.txt.
"""
import os, random, sys
import numpy as np
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import training, stage1_grpo as s1
import loading
reward = sys.argv[1]; window = int(sys.argv[2]); M = int(sys.argv[3])
args = s1.parse_args(["--reward", reward, "--out", "/tmp/snr", "--sde-window", str(window), "--prompts-per-epoch", str(M), "--train-batch-size", "64", "--beta", "0"])
args.rewards = s1.parse_rewards(args.reward)
bundle = training.load_model(args.model)
args.guidance = 4.5; args.negative = bundle.encode([""])
policy = training.make_policy(bundle.transformer, 32, 64)
train, test = s1.default_prompt_files(args.rewards, "dataset")
items = [it for f in train for it in loading.load_prompts(f)]
params = [p for p in policy.parameters() if p.requires_grad]
grads = []
for rep in range(3):
    batch = s1.sample_epoch(policy, bundle, items, args.rewards, args, random.Random(rep), seed=rep * 1000)
    reward, adv, info = s1.advantages_of(batch, args.rewards, "sum")
    for p in params: p.grad = None
    idx_all = np.arange(len(adv))[info]
    for start in range(0, len(idx_all), 64):
        idx = torch.as_tensor(idx_all[start:start+64])
        a = torch.as_tensor(adv[idx.numpy()], dtype=torch.float32)
        for j in batch["trained_steps"]:
            loss, kl, ratio = s1.policy_step_loss(policy, batch, idx, j, a, args)
            (loss * len(idx) / len(idx_all)).backward()
    g = torch.cat([p.grad.flatten() for p in params]).clone()
    grads.append(g)
    print(rep, "reward", float(np.mean(reward)), "norm", g.norm().item(), flush=True)
for i in range(3):
    for k in range(i+1, 3):
        print(i, k, "cos", torch.nn.functional.cosine_similarity(grads[i], grads[k], 0).item())
