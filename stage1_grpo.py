r"""Stage 1: single-reward GRPO teachers (Flow-GRPO, docs/method.md M1-M2) and the GRPO-Mix baseline.

    python stage1_grpo.py --reward geneval --out runs/teacher-geneval
    python stage1_grpo.py --reward ocr --out runs/teacher-ocr
    python stage1_grpo.py --reward quality --out runs/teacher-quality          # the MAR anchor
    python stage1_grpo.py --reward geneval=0.5,ocr=0.5 --mix sum --out runs/grpo-mix
    python stage1_grpo.py --reward geneval --objective nft --prompts-per-epoch 32 --train-batch-size 64 \
        --nft-times 2 --lr 3e-3 --ema 0.5 --nft-old-decay 0.5 --nft-old-ramp 20 --steps 6 --epochs 50 \
        --out runs/nft-geneval    # DiffusionNFT, not GRPO: GenEval +0.136, +0.178, +0.136 over 3 seeds

Each epoch: M prompts x G SDE rollouts of the LoRA policy (M1), one reward per image, advantages with a
per-prompt mean and a global std, then a PPO-clip update on every step but the last with a KL to the base
model (the adapter disabled); or, with --objective nft, DiffusionNFT's flow-matching loss on the epoch's
images weighted by the same advantages (docs/experiments.md, Stage 1: why GRPO makes no teacher in the
miniature world, and the NFT recipe above). Defaults train a miniature teacher in minutes on a 2-core CPU;
the paper's SD3.5-M settings are given next to each flag.
"""
import math
import time

import numpy as np
import torch
from tqdm import tqdm

import common
import loading
import eval as evaluation
import rewards
import miniature.world
import training

# ----------------------------------------------------------------------------------------------
# Rewards and advantages (M2)


def parse_rewards(text):
    """'geneval' -> {'geneval': 1.0}; 'geneval=0.5,ocr=0.5' -> {'geneval': 0.5, 'ocr': 0.5}."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        rewards.check_names([name], f"--reward {text!r}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise loading.UserError(f"reward weight {weight!r} of {name!r} in --reward {text!r} is not a number; "
                             f"expected e.g. 'geneval=0.5,ocr=0.5'") from None
        if not math.isfinite(weights[name]):
            raise loading.UserError(f"reward weight of {name!r} in --reward {text!r} is not finite")
    return weights


def group_advantages(rewards, groups, eps=1e-4):
    """A_i = (R_i - mean of R over i's prompt group) / (std of all rewards + eps)   (M2).
    Returns (advantages, mask of groups with non-zero reward variance)."""
    rewards, groups = np.asarray(rewards, np.float64), np.asarray(groups)
    advantages, informative = np.zeros_like(rewards), np.zeros(len(rewards), bool)
    std = rewards.std() + eps
    for g in np.unique(groups):
        member = groups == g
        advantages[member] = (rewards[member] - rewards[member].mean()) / std
        informative[member] = rewards[member].std() > 0
    return advantages, informative


def combine_rewards(scores, weights):
    """The released GRPO-Mix rule: a weighted sum of rewards per image (a reward that does not apply
    to a prompt, NaN, counts 0)."""
    total = np.zeros(len(next(iter(scores.values()))))
    for name, weight in weights.items():
        total += weight * np.nan_to_num(scores[name], nan=0.0)
    return total


def mixed_advantages(scores, weights, groups):
    """MixGRPO: each reward's group advantages computed on the samples it applies to, then summed."""
    total, informative = np.zeros(len(groups)), np.zeros(len(groups), bool)
    for name, weight in weights.items():
        applies = ~np.isnan(scores[name])
        if applies.any():
            adv, info = group_advantages(scores[name][applies], np.asarray(groups)[applies])
            total[applies] += weight * adv
            informative[applies] |= info
    return total, informative


def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range):
    """mean_i max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps)), rho = exp(log pi - log pi_old)   (M2).
    Returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped).mean(), ratio


def optimality(advantages):
    """DiffusionNFT's optimality probability r = 1/2 + 1/2 clip(A, -1, 1) of a group advantage A (M2's)."""
    return 0.5 + 0.5 * np.clip(advantages, -1.0, 1.0)


def nft_loss(v, v_old, target, r, beta):
    """DiffusionNFT's negative-aware flow-matching loss (Zheng et al. 2025, arXiv 2509.16117), per sample:
      r ||v+ - u||^2 + (1 - r) ||v- - u||^2   (mean over dimensions),   u = eps - x0,
      v+ = (1 - beta) v_old + beta v   (the implicit positive policy),  v- = (1 + beta) v_old - beta v.
    At v = v_old its gradient in v is 2 beta (2r - 1)(v_old - u): towards the sample's flow when r > 1/2,
    away from it below, nothing at r = 1/2; the minimum is v = v_old + (2r - 1)(u - v_old) / beta."""
    v, v_old, target = v.float(), v_old.float(), target.float()
    r = r.reshape(-1, *([1] * (v.dim() - 1)))
    positive = (1 - beta) * v_old + beta * v
    negative = (1 + beta) * v_old - beta * v
    per_dim = r * (positive - target) ** 2 + (1 - r) * (negative - target) ** 2
    return per_dim.flatten(1).mean(1)


def nft_kl(v, v_base):
    """DiffusionNFT's KL to the base, per sample: mean_d (v - v_base)^2 (no M3 time weighting: NFT's times are not
    sampler steps). kappa nft_kl added to nft_loss moves its minimum to (beta^2 v_old + beta (2r - 1)(u - v_old)
    + kappa v_base) / (beta^2 + kappa): plain NFT at kappa = 0, the base as kappa -> inf."""
    return ((v.float() - v_base.float()) ** 2).flatten(1).mean(1)


def old_decay(epoch, eta, ramp_epochs):
    """eta of DiffusionNFT's soft update old <- eta old + (1 - eta) student before this epoch: 0 at epoch 1,
    linearly up to eta at epoch ramp_epochs + 1 (on-policy early, steadier later), then held; ramp 0: eta."""
    return eta if ramp_epochs <= 0 else eta * min(1.0, (epoch - 1) / ramp_epochs)


# ----------------------------------------------------------------------------------------------
# Sampling, scoring and the policy-gradient update


def sde_window(args, rng):
    """The steps that are stochastic and trained this epoch: all but the last (Flow-GRPO), or, with
    --sde-window K, K consecutive steps starting at a random step of the first half (Flow-GRPO-Fast:
    the other steps are ODE steps, so a group's reward differences come from these K steps' noise)."""
    if args.sde_window <= 0:
        return list(range(args.steps - 1))
    start = rng.randrange(max(1, args.steps // 2 - args.sde_window + 1))
    return list(range(start, start + args.sde_window))


def sample_epoch(policy, bundle, items, rewards, args, rng, seed):
    """G on-policy rollouts (M1) for each of M prompts, scored by `rewards`. With an SDE window, a
    group shares its initial noise and differs only in the window's noise. Every process draws the
    same global batch and rolls out its shard; the scores are gathered, so advantages use the global
    batch (its per-prompt means and global std)."""
    picked = [items[rng.randrange(len(items))] for _ in range(args.prompts_per_epoch)]
    prompts = [p for p, _ in picked for _ in range(args.group_size)]
    metas = [m for _, m in picked for _ in range(args.group_size)]
    trained_steps = sde_window(args, rng)
    shared_starts = args.sde_window > 0 and args.objective == "grpo"
    if args.objective == "nft":  # any sampler will do for NFT: the deterministic ODE, each sample its own start
        levels, trained_steps = 0.0, []
    elif args.sde_window > 0:  # the window's steps are SDE steps, the others ODE steps
        levels = [args.noise_level if j in trained_steps else 0.0 for j in range(args.steps)]
    else:  # every step an SDE step (the last one is not trained)
        levels = args.noise_level
    sigmas = common.sampling_sigmas(bundle.scheduler, args.steps)
    shape = bundle.latent_shape(bundle.resolution)
    groups = np.repeat(np.arange(len(picked)), args.group_size)
    seeds, init_seeds = [seed + i for i in range(len(prompts))], [seed + 7919 * (g + 1) for g in groups]
    my_prompts, my_metas = training.shard(prompts, args), training.shard(metas, args)
    embeds, pooled = bundle.encode(my_prompts)
    batch = common.rollout_chunks(policy, embeds, pooled, shape, sigmas, training.shard(seeds, args),
                                  args.local_batch_size, levels,
                                  args.guidance, args.negative, bundle.decode,
                                  args.sample_bf16 if args.objective == "nft" else args.train_bf16,
                                  training.shard(init_seeds, args) if shared_starts else None)
    my_scores = args.score(batch["images"], my_prompts, my_metas, names=tuple(rewards))
    scores = {name: training.gather(torch.as_tensor(np.asarray(v, np.float64)), args).numpy() for name, v in my_scores.items()}
    batch.update(prompts=my_prompts, metas=my_metas, embeds=embeds, pooled=pooled, groups=groups,
                 trained_steps=trained_steps, scores=scores)
    return batch


def advantages_of(batch, rewards, mix):
    """(per-trajectory reward, advantage, informative mask) under the reward mixing rule (M2)."""
    reward = combine_rewards(batch["scores"], rewards)
    if mix == "advantage":
        return (reward, *mixed_advantages(batch["scores"], rewards, batch["groups"]))
    return (reward, *group_advantages(reward, batch["groups"]))


def policy_step_loss(policy, batch, idx, j, advantages, args):
    """PPO-clip + beta KL(policy || base) at step j for trajectories idx (M2): (loss, kl, ratio)."""
    sigmas, x, x_next = batch["sigmas"], batch["states"][idx, j], batch["states"][idx, j + 1]
    embeds, pooled = batch["embeds"][idx], batch["pooled"][idx]
    with common.autocast(x.device, args.train_bf16):  # the rollouts' precision: the first ratio is exactly 1
        v = common.velocity(policy, x, sigmas[j], embeds, pooled, args.guidance, args.negative)
        if args.beta > 0:  # beta = 0 saves the base forward
            with torch.no_grad(), loading.use_adapter(policy, None):  # base = adapter disabled, no second model
                v_base = common.velocity(policy, x, sigmas[j], embeds, pooled, args.guidance, args.negative)
    _, log_prob, _, _ = common.sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], args.noise_level, x_next=x_next)
    policy_loss, ratio = ppo_clip_loss(log_prob, batch["log_probs"][idx, j], advantages, args.clip_range)
    kl = common.step_kl(v, v_base, sigmas[j], sigmas[j + 1], sigmas[1], args.noise_level, args.kl_weighting).mean() \
        if args.beta > 0 else torch.zeros(())
    return policy_loss + args.beta * kl, kl, ratio


def train_on_epoch(policy, batch, advantages, informative, optimizer, args):
    """One optimizer step per chunk of trajectories, gradients accumulated over its trained (SDE)
    steps. Zero-variance groups are skipped. `advantages`/`informative` are the global batch's; each
    process trains on its shard of every chunk, its loss weighted by its share of the chunk, and the
    gradients are summed over processes. Returns the epoch's statistics."""
    trained_steps, device = batch["trained_steps"], batch["states"].device
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_min": math.inf, "ratio_max": -math.inf, "updates": 0}
    params = [p for p in policy.parameters() if p.requires_grad]
    for idx, adv, count in chunks(advantages, informative, args):
        adv = adv.to(device).clamp(-args.adv_clip, args.adv_clip)
        share = len(idx) / count / len(trained_steps)  # of the chunk's mean over trajectories and steps
        sums = torch.zeros(3, device=device)  # loss, KL, clipped fraction: no host sync per step
        ratio_min, ratio_max = torch.full((), math.inf, device=device), torch.full((), -math.inf, device=device)
        optimizer.zero_grad(set_to_none=True)
        for j in trained_steps if len(idx) else []:
            loss, kl, ratio = policy_step_loss(policy, batch, idx, j, adv, args)
            (loss * share).backward()
            clipped = ((ratio - 1).abs() > args.clip_range).float().mean()
            sums += torch.stack([loss.detach(), kl.detach(), clipped]) * share
            ratio_min, ratio_max = torch.minimum(ratio_min, ratio.detach().min()), torch.maximum(ratio_max, ratio.detach().max())
        for key, value in zip(("loss", "kl", "clip_frac"), training.all_reduce(sums, args).tolist()):
            stats[key] += value
        stats["ratio_min"] = min(stats["ratio_min"], training.all_reduce(ratio_min, args, "min").item())
        stats["ratio_max"] = max(stats["ratio_max"], training.all_reduce(ratio_max, args, "max").item())
        if not math.isfinite(stats["loss"]):
            optimizer.zero_grad(set_to_none=True)
            return stats
        training.optimizer_step(params, optimizer, args, policy=policy)
        stats["updates"] += 1
    for key in ("loss", "kl", "clip_frac"):
        stats[key] /= max(1, stats["updates"])
    return stats


def chunks(advantages, informative, args):
    """The update chunks of an epoch's global batch (--train-batch-size trajectories each, zero-variance
    groups left out) as this process sees them: (its rows of the chunk, their advantages, the chunk's
    count of trained trajectories). Each process holds every world-th trajectory (training.shard)."""
    for start in range(0, len(advantages), args.train_batch_size):
        count = int(informative[start:start + args.train_batch_size].sum())
        if count == 0:
            continue
        local = torch.arange(start // args.world, min(start + args.train_batch_size, len(advantages)) // args.world)
        global_index = local.numpy() * args.world + args.rank
        mine = informative[global_index]
        yield local[torch.as_tensor(mine)], torch.as_tensor(advantages[global_index[mine]], dtype=torch.float32), count


def train_nft_epoch(policy, batch, advantages, informative, optimizer, args):
    """DiffusionNFT (--objective nft): the epoch's final images, noised at shifted logit-normal times, fitted with
    nft_loss: the policy's conditional velocity (with --nft-guidance w, the CFG one) against that of the epoch's
    fixed sampling policy, adapter "old"; zero-variance groups skipped. No likelihoods: a regression per trajectory.
    With --nft-kl kappa > 0, plus kappa nft_kl towards the base (adapter disabled), logged as "kl"."""
    x0, device = batch["states"][:, -1], batch["states"].device
    stats = {"loss": 0.0, "kl": 0.0, "updates": 0}
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(args.nft_times):
        for idx, adv, count in chunks(advantages, informative, args):
            r = torch.as_tensor(optimality(adv.numpy()), dtype=torch.float32, device=device)
            sigma = common.training_sigmas(len(idx), args.shift, device)
            noise = torch.randn_like(x0[idx])
            x_sigma = common.forward_noise(x0[idx], sigma, noise)
            embeds, pooled = batch["embeds"][idx], batch["pooled"][idx]
            optimizer.zero_grad(set_to_none=True)
            with common.autocast(device, args.train_bf16):
                v = common.velocity(policy, x_sigma, sigma, embeds, pooled, args.nft_guidance, args.negative)
                with torch.no_grad(), loading.use_adapter(policy, "old"):
                    v_old = common.velocity(policy, x_sigma, sigma, embeds, pooled, args.nft_guidance, args.negative)
                with torch.no_grad(), loading.use_adapter(policy, None):  # kappa = 0 saves the base forward
                    v_base = common.velocity(policy, x_sigma, sigma, embeds, pooled, args.nft_guidance, args.negative) if args.nft_kl > 0 else None
            kl = nft_kl(v, v_base).sum() / count if args.nft_kl > 0 else torch.zeros(())
            loss = nft_loss(v, v_old, noise - x0[idx], r, args.nft_beta).sum() / count + args.nft_kl * kl
            loss.backward()
            stats["loss"] += training.all_reduce(loss.detach().reshape(1), args).item()
            stats["kl"] += training.all_reduce(kl.detach().reshape(1), args).item()
            if not math.isfinite(stats["loss"]):
                optimizer.zero_grad(set_to_none=True)
                return stats
            training.optimizer_step(params, optimizer, args, policy=policy)
            stats["updates"] += 1
    stats["loss"], stats["kl"] = stats["loss"] / max(1, stats["updates"]), stats["kl"] / max(1, stats["updates"])
    return stats


def prompt_files(args):
    """The train and test prompt specs: --train-prompts / --test-prompts, else the files of the tasks the
    rewards judge (e.g. --reward pickscore: DATASET/pickscore/*.txt; quality judges every prompt)."""
    tasks = [t for t in loading.TASK_PROMPT_FILES if t in args.rewards] or list(loading.DEFAULT_PROMPT_FILES)
    miniature.world.ensure_prompt_files(args.dataset)
    return [given or loading.default_prompt_files(tasks, args.dataset, split)
            for given, split in ((args.train_prompts, "train"), (args.test_prompts, "test"))]


def parse_args(argv=None):
    p = training.parser(__doc__)
    training.add_model_arguments(p)  # --model, --device, --model-dtype, --gradient-checkpointing, --resolution, --lora-targets
    rewards.add_arguments(p)  # --pickscore-model, --geneval-url, --deqa-url, ... (the real world's scorers)
    p.add_argument("--reward", default="geneval", help="one reward = a teacher; name=w,name=w = GRPO-Mix")
    p.add_argument("--mix", choices=["sum", "advantage", "alternate"], default="sum", help="GRPO-Mix rule")
    p.add_argument("--objective", choices=["grpo", "nft"], default="grpo",
                   help="Flow-GRPO (paper), or DiffusionNFT on the same rewards and advantages")
    p.add_argument("--nft-beta", type=training.positive_float,
                   help="NFT: step of the implicit positive/negative policies (default 1)")
    p.add_argument("--nft-times", type=training.positive_int,
                   help="NFT: noise levels per image per epoch, one update chunk each (default 1)")
    p.add_argument("--nft-shift", type=training.positive_float,
                   help="NFT: time shift of its logit-normal training times (default: the sampler's; 1 = centred, "
                        "more low-noise detail)")
    p.add_argument("--nft-guidance", type=training.nonnegative_float,
                   help="NFT: CFG of the fitted velocity (default 1: the conditional one, DiffusionNFT's; = "
                        "--guidance: the sampled policy's)")
    p.add_argument("--nft-old-decay", type=training.probability,
                   help="NFT: eta of the sampling policy's soft update old <- eta old + (1 - eta) student (default 0: "
                        "the student; DiffusionNFT ramps to 0.5)")
    p.add_argument("--nft-old-ramp", type=training.nonnegative_int,
                   help="NFT: epochs over which that eta rises from 0 (default 0: no ramp)")
    p.add_argument("--nft-kl", type=training.nonnegative_float,
                   help="NFT: kappa of the KL-to-base term nft_kl (default 0: none, DiffusionNFT's default)")
    p.add_argument("--train-prompts", default=None,
                   help="comma-separated prompt files, each path or task=path (default: by reward)")
    p.add_argument("--test-prompts", default=None,
                   help="comma-separated prompt files, each path or task=path (default: by reward)")
    p.add_argument("--prompts-per-epoch", type=training.positive_int, default=8,
                   help="M (paper: 48 per GPU x 8 GPUs / G)")
    p.add_argument("--group-size", type=training.positive_int, default=8, help="G rollouts per prompt (paper: 24)")
    p.add_argument("--sde-window", type=training.nonnegative_int, default=0,
                   help="K > 0: only K SDE (trained) steps, Flow-GRPO-Fast (paper: 0)")
    p.add_argument("--guidance", type=training.nonnegative_float, default=None,
                   help="CFG of rollouts and training (paper: 4.5)")
    p.add_argument("--clip-range", type=training.positive_float, default=1e-4,
                   help="PPO epsilon, mean-over-dims units (paper: 1e-4)")
    p.add_argument("--adv-clip", type=training.positive_float, default=5.0, help="advantage clamp (paper: 5)")
    p.add_argument("--beta", type=training.nonnegative_float, default=0.04, help="KL-to-base weight (paper: 0.04)")
    p.add_argument("--kl-weighting", choices=["paper", "code"], default="code", help="M3 units of beta")
    p.add_argument("--lr", type=training.positive_float, default=3e-4, help="AdamW learning rate (paper: 3e-4)")
    p.add_argument("--lora-rank", type=training.positive_int, default=32, help="LoRA rank (paper: 32)")
    p.add_argument("--lora-alpha", type=training.positive_int, default=64, help="LoRA alpha (paper: 64)")
    p.add_argument("--train-batch-size", type=training.positive_int, default=32, help="trajectories per backward chunk")
    training.add_run_arguments(p)  # --out, --epochs, --steps, --noise-level, --ema, --seed, --eval-every, --resume, ...
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.rewards = parse_rewards(args.reward)
    nft_defaults = {"nft_beta": 1.0, "nft_times": 1, "nft_shift": None, "nft_guidance": 1.0, "nft_old_decay": 0.0, "nft_old_ramp": 0, "nft_kl": 0.0}
    nft_flags = [f"--{name.replace('_', '-')}" for name in nft_defaults if getattr(args, name) is not None]
    if args.objective != "nft" and nft_flags:  # given with GRPO, even at their defaults, they would be ignored silently
        raise loading.UserError(f"{', '.join(nft_flags)} only apply to --objective nft; expected --objective nft with them, or none of them with --objective {args.objective}")
    vars(args).update({name: default for name, default in nft_defaults.items() if getattr(args, name) is None})
    if args.nft_old_ramp > 0 and args.nft_old_decay == 0:  # a ramp to 0 would silently do nothing
        raise loading.UserError(f"--nft-old-ramp {args.nft_old_ramp} ramps --nft-old-decay, which is 0; expected --nft-old-decay > 0 with it")
    rng = training.start_processes(args, group_size=args.group_size, train_batch_size=args.train_batch_size)
    bundle = training.load_model_from_args(args)
    args.score, args.eval_rewards = rewards.from_args(args, bundle)
    training.sampling_defaults(args, bundle)
    train_files, test_files = prompt_files(args)
    train_items, test_items = loading.load_prompt_files(train_files), loading.load_prompt_files(test_files)

    policy = training.make_policy(bundle.transformer, args.lora_rank, args.lora_alpha, targets=args.lora_targets)
    if args.objective == "nft":  # the epoch's sampling policy, v_old of nft_loss
        policy.add_adapter("old", policy.peft_config["student"])
        training.update_ema(policy, 0.0, "old")  # starts as the student
        loading.freeze_all_but(policy, "student")
        args.shift = args.nft_shift if args.nft_shift is not None else bundle.scheduler.config.get("shift", 3.0)  # by default shifted like the sampler's times
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-4)
    def evaluate(png):
        return evaluation.evaluate_policy(bundle, policy, "ema", test_items, args.eval_steps, args.eval_guidance, png,
                                          args.score, args.eval_rewards, args.eval_bf16)
    epoch, log = training.start_run(args, policy, optimizer, rng, evaluate)
    bad_epochs = 0
    for epoch in tqdm(range(epoch + 1, args.epochs + 1), initial=epoch, total=args.epochs, desc="stage1",
                      disable=args.rank > 0):
        start = time.time()
        lr = training.set_epoch_lr(optimizer, args, epoch)
        epoch_rewards, items = args.rewards, train_items
        if args.mix == "alternate" and len(args.rewards) > 1:  # the released per-epoch task schedule
            task = list(args.rewards)[(epoch - 1) % len(args.rewards)]
            epoch_rewards = {task: 1.0}
            items = [it for it in train_items if common.route(it[0], it[1], {"geneval", "ocr"}) == task] or train_items
        if args.objective == "nft":  # DiffusionNFT samples with "old", held fixed through the epoch's updates
            training.update_ema(policy, old_decay(epoch, args.nft_old_decay, args.nft_old_ramp), "old")
        with loading.use_adapter(policy, "old" if args.objective == "nft" else "student"):
            batch = sample_epoch(policy, bundle, items, epoch_rewards, args, rng, seed=args.seed * 100003 + epoch * 1009)
        reward, advantages, informative = advantages_of(batch, epoch_rewards, args.mix)
        train = train_nft_epoch if args.objective == "nft" else train_on_epoch
        stats = train(policy, batch, advantages, informative, optimizer, args) if np.isfinite(advantages).all() else None
        finite = stats is not None and math.isfinite(stats["loss"])
        bad_epochs = 0 if finite else bad_epochs + 1
        groups = batch["groups"]
        record = {"epoch": epoch, "trajectories": epoch * args.prompts_per_epoch * args.group_size,
                  "reward_mean": float(np.nanmean(reward)), "reward_std": float(np.nanstd(reward)),
                  **{f"reward_{n}": float(np.nanmean(v)) for n, v in batch["scores"].items()
                     if np.isfinite(v).any()},  # a reward none of the batch's prompts has is left out, not NaN
                  "skipped_groups": int(len(set(groups)) - len(set(groups[informative]))),
                  "seconds": time.time() - start, "lr": lr, **(stats or {}), "skipped_update": not finite}
        training.end_epoch(args, record, log, policy, optimizer, rng, finite, bad_epochs, evaluate)
    training.finish_run(args, policy, "the EMA teacher")


if __name__ == "__main__":
    training.run_cli(main)
