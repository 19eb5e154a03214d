r"""Stage 3: multi-teacher on-policy distillation with Manifold Anchor Regularization (docs/method.md M3-M5).

    python stage3_opd.py --teachers geneval=runs/teacher-geneval/adapter,ocr=runs/teacher-ocr/adapter \
        --init runs/coldstart-merge/adapter --anchor runs/teacher-quality/adapter --out runs/opd-merge

Each epoch the student samples SDE trajectories (M1) on prompts of all tasks. The router R(c) names
each prompt's teacher; at every visited state the routed teacher's and the anchor's velocities are
taken without gradient, in one mixed-adapter batch, with the student's guidance. The student then reduces
    L = mean_j mean_i KL_j(student || teacher_R(c_i))  +  lambda mean_j mean_i KL_j(student || anchor)
(M3 per step, M5 for the anchor term) with one of three estimators of the first term (M4):
    pathwise        the KL itself, gradient through the student's velocity at the fixed states
    ppo             the sampled log-ratio log pi_T / pi_old of each step as its advantage (plus a
                    discounted reward-to-go with --gamma > 0) in the clipped surrogate
    paper-detached  the paper's text: -KL (detached) as the per-step advantage; its expected gradient
                    is zero (KL_j does not depend on the action), kept as a documented ablation
KL_j = (|D_j| / 2) (c_j / s_j)^2 ||v_student - v_teacher||^2 weighs a velocity error at the last steps ~1000x
one at the first, where the layout is drawn; --kl-weighting flat drops the (c_j / s_j)^2 (the miniature
pipeline's choice: docs/experiments.md). Teachers, anchor and student are adapters on ONE base model. No
reward model runs during training.
"""
import math
import time

import torch
from tqdm import tqdm

import common
import loading
import eval as evaluation
import rewards
import miniature.world
import training

# ----------------------------------------------------------------------------------------------
# The per-step objectives (M4)


def kl_unit(sigma, sigma_next, dims, weighting, sigma_1, noise_level):
    """kappa_j with KL_weighting = kappa_j KL_paper (M3): 1 for "paper", |D_j| / dims for "code",
    (s_j / c_j)^2 for "flat"."""
    if weighting == "flat":  # the ratio of M3's two forms for one unit error, so c_j stays in one place
        unit = [common.step_kl(torch.ones(1, 1), torch.zeros(1, 1), sigma, sigma_next, sigma_1, noise_level, w)
                for w in ("flat", "paper")]
        return float(unit[0] / unit[1])
    return 1.0 if weighting == "paper" else float(abs(sigma_next - sigma)) / dims


def sampled_log_ratio(x, x_next, v_teacher, old_log_prob, sigmas, j, noise_level):
    """sum_d log pi_T(x_j+1 | x_j) - log pi_old(x_j+1 | x_j) per sample: an unbiased one-sample
    estimate of -KL_j(old || T) in paper units (M4 "ppo"). Log-probs are means over dims (M1), hence * D."""
    _, teacher_log_prob, _, _ = common.sde_step(x, v_teacher, sigmas[j], sigmas[j + 1], sigmas[1], noise_level,
                                                x_next=x_next)
    return (teacher_log_prob - old_log_prob) * x[0].numel()


def reward_to_go(rewards, gamma):
    """A_ij = sum_{k >= j} gamma^(k - j) r_ik over the steps of each trajectory (rewards (B, N)).
    gamma = 0 is the per-step reward alone; gamma = 1 credits an action with every later step's KL."""
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for j in reversed(range(rewards.shape[1])):
        running = rewards[:, j] + gamma * running
        advantages[:, j] = running
    return advantages


def opd_step_loss(objective, v_student, v_teacher, x, x_next, old_log_prob, advantage, sigma, sigma_next, sigma_1,
                  noise_level, weighting, clip_range):
    """The student's loss at the steps sigma -> sigma_next (floats, or one per sample) from states x (M4), batch
    mean. Returns (loss, KL_j per sample, policy ratio or None). E[grad loss] = grad KL_j for "pathwise" and "ppo"
    (with gamma = 0), and 0 for "paper-detached". The surrogate is scaled by D because log-probs are means over dims."""
    kl = common.step_kl(v_student, v_teacher, sigma, sigma_next, sigma_1, noise_level, weighting)
    if objective == "pathwise":
        return kl.mean(), kl, None
    if objective == "paper-detached":
        advantage = -kl.detach()
    _, log_prob, _, _ = common.sde_step(x, v_student, sigma, sigma_next, sigma_1, noise_level, x_next=x_next)
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.maximum(-advantage * ratio, -advantage * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    return surrogate.mean() * x[0].numel(), kl, ratio


# ----------------------------------------------------------------------------------------------
# Teachers and anchor on the student's base; routing; rollouts


def load_guides(policy, teachers, anchor):
    """Loads each teacher as adapter "teacher_<task>" and the anchor ("base": adapters disabled, or a
    peft folder loaded as "anchor") onto the policy's base. Returns ({task: adapter}, anchor adapter)."""
    guides = {f"teacher_{task}": path for task, path in teachers.items()}
    if anchor != "base":
        guides["anchor"] = loading.resolve_adapter(anchor)
    # ranks and targets may differ (a rank-64 merge, another anchor): peft runs each adapter's own LoRA on
    # its rows of a mixed batch; load_adapter still checks that each one fits this base
    for name, path in guides.items():
        loading.load_adapter(policy, path, name)
    return {task: f"teacher_{task}" for task in teachers}, ("anchor" if anchor != "base" else "__base__")


def draw_prompts(items_by_task, count, rng, task=None, shares=None):
    """`count` training prompts: each from a uniformly drawn task (mixed batches, per-sample routing),
    all from `task` (the released per-epoch schedule), or, with `shares` ({task: weight}), exactly
    count * weight / sum(weights) from each task (largest remainders round), in shuffled order: a
    stratified draw, so an epoch's task mix does not vary from epoch to epoch."""
    tasks = sorted(items_by_task)
    pick = lambda t: items_by_task[t][rng.randrange(len(items_by_task[t]))]
    if shares is None or task:
        return [pick(task or tasks[rng.randrange(len(tasks))]) for _ in range(count)]
    exact = {t: count * shares[t] / sum(shares.values()) for t in tasks}
    counts = {t: int(exact[t]) for t in tasks}
    for t in sorted(tasks, key=lambda t: counts[t] - exact[t])[:count - sum(counts.values())]:
        counts[t] += 1
    routes = [t for t in tasks for _ in range(counts[t])]
    rng.shuffle(routes)
    return [pick(t) for t in routes]


def parse_task_numbers(text, tasks, flag, example):
    """'geneval=2,ocr=1' -> {'geneval': 2.0, 'ocr': 1.0}: one number >= 0 for each training task; a
    plain number is that number for every task."""
    parts = [part.rpartition("=") for part in filter(None, text.split(","))]
    if len(parts) == 1 and not parts[0][0]:  # a plain number
        parts = [(task, "=", parts[0][2]) for task in tasks]
    numbers = {}
    for task, _, value in parts:
        try:
            numbers[task] = float(value)
        except ValueError:
            raise loading.UserError(f"{value!r} of {task!r} in {flag} {text!r} is not a number; expected "
                                   f"task=number,... e.g. {example!r}") from None
        if not math.isfinite(numbers[task]) or numbers[task] < 0:
            raise loading.UserError(f"{task!r} in {flag} {text!r} is {numbers[task]}; expected a number >= 0")
    if sorted(numbers) != sorted(tasks):
        raise loading.UserError(f"{flag} {text!r} names {sorted(numbers)}; expected one number for each training task "
                               f"{sorted(tasks)}, e.g. {example!r}")
    return numbers


def parse_task_shares(text, tasks):
    """--task-shares: {task: weight >= 0}, not all zero."""
    shares = parse_task_numbers(text, tasks, "--task-shares", "geneval=2,ocr=1")
    if not sum(shares.values()) > 0:
        raise loading.UserError(f"--task-shares {text!r} are all zero; expected at least one task with a weight > 0")
    return shares


def step_passes(batch, idx, steps_per_pass):
    """Passes over trajectories idx, each one batch of their (trajectory, step) pairs for up to --steps-per-pass steps
    js (one pass per step gives the same loss). Yields (js, pairs, inputs): pairs(t) = t[idx][:, js], flattened."""
    for first in range(0, len(batch["sigmas"]) - 1, steps_per_pass):
        js = torch.arange(first, min(first + steps_per_pass, len(batch["sigmas"]) - 1))
        pairs = lambda tensor, js=js: tensor[idx][:, js].flatten(0, 1)  # noqa: E731
        each = {k: batch[k][idx].repeat_interleave(len(js), 0) for k in ("embeds", "pooled", "guidance")}
        yield js, pairs, dict(x=pairs(batch["states"]), sigma=batch["sigmas"][js].repeat(len(idx)),
                              embeds=each["embeds"], pooled=each["pooled"], guidance_scale=each["guidance"])


@torch.no_grad()
def guide_velocities(policy, batch, teacher_names, anchor_name, args):
    """Routed-teacher and anchor velocities at every state of the student's trajectories: one mixed-adapter call
    per step_passes pass (the first half of its batch routed per sample, the second half the anchor), in the
    student's training precision: bf16 guides against an fp32 student add a rounding floor to the KL (measured:
    epoch-1 KL to the GenEval teacher 26.4 instead of 19.1, docs/speed.md). Returns (v_teacher, v_anchor or None), each
    shaped like the states minus x_N."""
    states, n, with_anchor, copies = batch["states"], len(batch["states"]), args.mar_lambda > 0, 1 + (args.mar_lambda > 0)
    v_teacher, v_anchor = torch.zeros_like(states[:, :-1]), torch.zeros_like(states[:, :-1]) if with_anchor else None
    for start in range(0, n, args.local_batch_size):
        idx = torch.arange(start, min(start + args.local_batch_size, n))
        for js, _, inputs in step_passes(batch, idx, args.steps_per_pass):
            names = [teacher_names[i] for i in idx.tolist() for _ in js]
            names += [anchor_name] * len(names) if with_anchor else []
            inputs = {k: t.repeat(copies, *[1] * (t.dim() - 1)) for k, t in inputs.items()}
            with common.autocast(states.device, args.train_bf16):
                v = common.velocity(policy, **inputs, negative=args.negative, adapter_names=names).float()
            v = v.unflatten(0, (copies, len(idx), len(js)))
            v_teacher[idx[:, None], js] = v[0]
            if with_anchor:
                v_anchor[idx[:, None], js] = v[1]
    return v_teacher, v_anchor


def sample_epoch(policy, bundle, picked, teachers, args, seed):
    """On-policy student SDE rollouts (M1) of the picked (prompt, metadata) pairs, with their routes.
    Every process gets the same global `picked` and rolls out its shard (item i has seed seed + i). Each
    trajectory is sampled, and later trained, at the CFG scale of its task (`args.guidance`: {task: w} or one w)."""
    prompts = training.shard([p for p, _ in picked], args)
    all_routes = [common.route(p, m, set(teachers)) for p, m in picked]
    routes = training.shard(all_routes, args)
    embeds, pooled = bundle.encode(prompts)
    guidance = torch.tensor([args.guidance[r] if isinstance(args.guidance, dict) else args.guidance for r in routes])
    sigmas = common.sampling_sigmas(bundle.scheduler, args.steps)
    batch = common.rollout_chunks(policy, embeds, pooled, bundle.latent_shape(bundle.resolution),
                                  sigmas, training.shard([seed + i for i in range(len(picked))], args),
                                  args.local_batch_size * args.steps_per_pass,  # a training pass's memory
                                  args.noise_level, guidance, args.negative, None,
                                  args.train_bf16 if args.objective == "ppo" else args.sample_bf16,
                                  keep_velocities=True)  # the sampler's, for kl_to_sampler
    batch.update(prompts=prompts, routes=routes, embeds=embeds, pooled=pooled, guidance=guidance,
                 task_counts={t: all_routes.count(t) for t in sorted(set(all_routes))})  # of the global batch
    return batch


# ----------------------------------------------------------------------------------------------
# The update


def update_plan(total, per_update, chunk):
    """[[(start, end) of each backward chunk] of each optimizer update] over an epoch's `total` trajectories:
    updates of `per_update` trajectories (the last may be smaller), each one's gradient accumulated over chunks
    of at most `chunk` trajectories (--train-batch-size: what fits in memory). The update is the same as
    one backward pass over all of its trajectories (a test)."""
    return [[(s, min(s + chunk, u + per_update, total)) for s in range(u, min(u + per_update, total), chunk)]
            for u in range(0, total, per_update)]


def train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args):
    """--inner-epochs passes over the epoch's trajectories, each in --updates-per-epoch optimizer updates of
    the mean loss over their trajectories and all N steps (M4 + M5), gradients accumulated over chunks of
    --train-batch-size. Under torchrun each process trains on its shard of every chunk, its loss weighted by
    its share of the update, and the gradients are summed over processes. Returns the epoch's statistics: the
    loss and the KL to each task's teacher and to the anchor of the first, on-policy pass (--kl-weighting
    units), and per pass the mean KL of the student, as it was updated, to the policy that sampled the
    trajectories ("kl_to_sampler": how far reusing them has drifted off-policy)."""
    states, sigmas, steps = batch["states"], batch["sigmas"], len(batch["sigmas"]) - 1
    tasks, device = sorted(batch["task_counts"]), states.device
    task_of = torch.tensor([[r == t for t in tasks] for r in batch["routes"]], dtype=torch.float32, device=device)
    total = len(states) * args.world  # trajectories in the global batch
    stats = {"loss": 0.0, "kl_anchor": 0.0, "ratio_min": math.inf, "ratio_max": -math.inf, "updates": 0,
             **{f"kl_teacher_{t}": 0.0 for t in tasks}, "kl_to_sampler": []}
    advantages = None
    if args.objective == "ppo":
        rewards = torch.stack([sampled_log_ratio(states[:, j], states[:, j + 1], v_teacher[:, j], batch["log_probs"][:, j],
                                                 sigmas, j, args.noise_level) * kl_unit(sigmas[j], sigmas[j + 1],
                                                 states[0, 0].numel(), args.kl_weighting, sigmas[1],
                                                 args.noise_level) for j in range(steps)], 1)
        advantages = reward_to_go(rewards, args.gamma)
    params = [p for p in policy.parameters() if p.requires_grad]
    per_update = total // args.updates_per_epoch if args.updates_per_epoch else args.train_batch_size
    for inner in range(args.inner_epochs):
        drift = torch.zeros((), device=device)  # sum over trajectories of the mean-over-steps KL to the sampler
        for update in update_plan(total, per_update, args.train_batch_size):
            size = update[-1][1] - update[0][0]  # trajectories in this update (global batch)
            sums = torch.zeros(2 + len(tasks), device=device)  # loss, KL to anchor, KL to each task's teacher (sums)
            ratio_min, ratio_max = torch.full((), math.inf, device=device), torch.full((), -math.inf, device=device)
            optimizer.zero_grad(set_to_none=True)
            for start, end in update:
                idx = torch.arange(start // args.world, end // args.world)
                for js, pairs, inputs in step_passes(batch, idx, args.steps_per_pass):
                    x, sigma, sigma_next = inputs["x"], inputs["sigma"], sigmas[js + 1].repeat(len(idx))
                    with common.autocast(x.device, args.train_bf16):
                        v = common.velocity(policy, **inputs, negative=args.negative)
                    loss, kl, ratio = opd_step_loss(args.objective, v, pairs(v_teacher), x, pairs(states[:, 1:]),
                                                    pairs(batch["log_probs"]), None if advantages is None else
                                                    pairs(advantages), sigma, sigma_next, sigmas[1], args.noise_level,
                                                    args.kl_weighting, args.clip_range)
                    kl_anchor = torch.zeros(len(x), device=device)
                    if v_anchor is not None:
                        kl_anchor = common.step_kl(v, pairs(v_anchor), sigma, sigma_next, sigmas[1],
                                                   args.noise_level, args.mar_kl_weighting or args.kl_weighting)
                        loss = loss + args.mar_lambda * kl_anchor.mean()
                    (loss * len(x) / size / steps).backward()  # the pairs' share of the update's mean
                    sums += torch.cat([torch.stack([loss.detach() * len(x), kl_anchor.detach().sum()]),
                                       task_of[idx].repeat_interleave(len(js), 0).T @ kl.detach()]) / steps
                    drift += common.step_kl(v.detach(), pairs(batch["velocities"]), sigma, sigma_next,
                                            sigmas[1], args.noise_level, args.kl_weighting).sum() / steps
                    if ratio is not None:
                        ratio_min = torch.minimum(ratio_min, ratio.detach().min())
                        ratio_max = torch.maximum(ratio_max, ratio.detach().max())
            sums = training.all_reduce(sums, args)
            if inner == 0:  # the on-policy pass
                stats["loss"] += sums[0].item() / total
                stats["kl_anchor"] += sums[1].item() / total
                for t, kl_sum in zip(tasks, sums[2:].tolist()):
                    stats[f"kl_teacher_{t}"] += kl_sum / batch["task_counts"][t]
            stats["ratio_min"] = min(stats["ratio_min"], training.all_reduce(ratio_min, args, "min").item())
            stats["ratio_max"] = max(stats["ratio_max"], training.all_reduce(ratio_max, args, "max").item())
            if not math.isfinite(sums[0].item()):
                optimizer.zero_grad(set_to_none=True)
                stats["loss"] = math.nan
                return stats
            training.optimizer_step(params, optimizer, args, policy=policy)
            stats["updates"] += 1
        stats["kl_to_sampler"].append(training.all_reduce(drift, args).item() / total)
    if args.objective == "pathwise":  # no policy ratio; and JSON has no infinity
        del stats["ratio_min"], stats["ratio_max"]
    return stats


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = training.parser(__doc__)
    training.add_model_arguments(p)  # --model, --device, --model-dtype, --gradient-checkpointing, --resolution, --lora-targets
    rewards.add_arguments(p)  # evaluation only: --pickscore-model, --geneval-url, --deqa-url, --eval-rewards
    p.add_argument("--teachers", required=True,
                   help="task=peft_folder,... one frozen teacher per task (router targets)")
    p.add_argument("--anchor", default="base",
                   help='MAR anchor: "base" (adapters off) or a peft folder (quality teacher)')
    p.add_argument("--init", default=None, help="cold-start peft folder (stage2_coldstart.py); default a fresh LoRA")
    p.add_argument("--objective", choices=["pathwise", "ppo", "paper-detached"], default="pathwise",
                   help="M4 estimator")
    p.add_argument("--gamma", type=training.nonnegative_float, default=0.0,
                   help="ppo: reward-to-go discount (0 = per-step advantage)")
    p.add_argument("--kl-weighting", choices=["paper", "code", "flat"], default="paper",
                   help="M3 units (paper = the true KL; flat = the velocity L2 integrated over time, not the paper's)")
    p.add_argument("--mar-lambda", type=training.nonnegative_float, default=0.04,
                   help="lambda of M5 (released: 0.04); 0 turns MAR off")
    p.add_argument("--mar-kl-weighting", choices=["paper", "code", "flat"], default=None,
                   help="M3 units of the MAR term (default: --kl-weighting's); paper weighs the last, detail-drawing "
                        "steps most, so the anchor governs detail and the teacher the layout")
    p.add_argument("--schedule", choices=["sample", "epoch"], default="sample",
                   help="per-sample routing or one task per epoch")
    p.add_argument("--task-shares", default=None,
                   help="task=weight,... each epoch's rollouts split exactly in these proportions (default: each "
                        "prompt's task drawn uniformly)")
    p.add_argument("--train-prompts", default="",
                   help="comma-separated prompt files, each path or task=path (a plain file of another task, e.g. "
                        "pickscore=dataset/pickscore/train.txt) (default: the teachers' tasks')")
    p.add_argument("--test-prompts", default="",
                   help="comma-separated prompt files, each path or task=path (default: the teachers' tasks')")
    p.add_argument("--rollouts-per-epoch", type=training.positive_int, default=32,
                   help="on-policy trajectories per epoch (one prompt each)")
    p.add_argument("--train-batch-size", type=training.positive_int, default=16,
                   help="trajectories per backward chunk: what fits in memory (gradients of an update accumulate over chunks)")
    p.add_argument("--updates-per-epoch", type=training.positive_int, default=None,
                   help="optimizer updates per pass over an epoch's trajectories, each the mean over an equal share of "
                        "them (default: one per --train-batch-size chunk)")
    p.add_argument("--steps-per-pass", type=training.positive_int, default=1,
                   help="denoising steps of each trajectory in one forward pass (memory x this; the same loss): 1 as "
                        "flow_grpo; the miniature pipeline runs all 10 in one: 1.4x faster there, docs/speed.md")
    p.add_argument("--inner-epochs", type=training.positive_int, default=1,
                   help="passes over each epoch's trajectories: the states are fixed and the guides' velocities cached, "
                        "so later passes cost only the student's passes; the log's kl_to_sampler shows the drift")
    p.add_argument("--guidance", default=None,
                   help="CFG of student, teachers and anchor in training: one scale (paper: 4.5), or task=scale,... one "
                        "per routed task, e.g. geneval=1,ocr=4.5 (the miniature pipeline's: README)")
    p.add_argument("--clip-range", type=training.positive_float, default=1e-3,
                   help="ppo surrogate epsilon (mean-over-dims ratio)")
    p.add_argument("--lr", type=training.positive_float, default=3e-4, help="AdamW learning rate (paper: 3e-4)")
    p.add_argument("--extra-rank", type=training.nonnegative_int, default=0,
                   help="widen the --init adapter by this many LoRA components (B = 0: the same start, more capacity)")
    p.add_argument("--extra-targets", default="",
                   help="comma-separated layers (name suffixes, e.g. attn.add_k_proj) the --init adapter is widened to "
                        "(B = 0: the same start)")
    p.add_argument("--lora-rank", type=training.positive_int, default=32,
                   help="student LoRA rank without --init (paper: 32)")
    p.add_argument("--lora-alpha", type=training.positive_int, default=64,
                   help="student LoRA alpha without --init (paper: 64)")
    training.add_run_arguments(p)  # --out, --epochs, --steps, --noise-level, --ema, --seed, --eval-every, --resume, ...
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    teachers = loading.parse_teachers(args.teachers)
    miniature.world.ensure_prompt_files(args.dataset)
    train_items = loading.prompts_by_task(args.train_prompts, teachers, args.dataset, "train")
    shares = parse_task_shares(args.task_shares, train_items) if args.task_shares is not None else None
    if args.guidance is not None:  # else the model's one scale (training.sampling_defaults)
        args.guidance = parse_task_numbers(args.guidance, teachers, "--guidance", "geneval=1,ocr=4.5")
    test_items = [item for items in loading.prompts_by_task(args.test_prompts, teachers, args.dataset, "test").values()
                  for item in items]
    if args.updates_per_epoch and args.rollouts_per_epoch % args.updates_per_epoch:
        raise loading.UserError(f"--updates-per-epoch {args.updates_per_epoch} does not divide --rollouts-per-epoch "
                               f"{args.rollouts_per_epoch}; expected equal updates, e.g. a divisor of it")
    rng = training.start_processes(args, rollouts_per_epoch=args.rollouts_per_epoch,
                                   train_batch_size=args.train_batch_size,
                                   trajectories_per_update=args.rollouts_per_epoch // (args.updates_per_epoch or 1))
    bundle = training.load_model_from_args(args)
    score, eval_rewards = rewards.from_args(args, bundle)  # scorers run only at evaluation, never in training
    training.sampling_defaults(args, bundle)

    policy = training.make_policy(bundle.transformer, args.lora_rank, args.lora_alpha, args.init, args.lora_targets,
                                  args.extra_rank, tuple(filter(None, args.extra_targets.split(","))))
    teacher_of, anchor_name = load_guides(policy, teachers, args.anchor)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-4)
    def evaluate(png):
        return evaluation.evaluate_policy(bundle, policy, "ema", test_items, args.eval_steps, args.eval_guidance, png,
                                          score, eval_rewards, args.eval_bf16)
    epoch, log = training.start_run(args, policy, optimizer, rng, evaluate)
    bad_epochs = 0
    for epoch in tqdm(range(epoch + 1, args.epochs + 1), initial=epoch, total=args.epochs, desc="stage3",
                      disable=args.rank > 0):
        start = time.time()
        lr = training.set_epoch_lr(optimizer, args, epoch)
        task = sorted(teachers)[(epoch - 1) % len(teachers)] if args.schedule == "epoch" else None
        picked = draw_prompts(train_items, args.rollouts_per_epoch, rng, task, shares)
        batch = sample_epoch(policy, bundle, picked, teachers, args, seed=args.seed * 100003 + epoch * 1009)
        v_teacher, v_anchor = guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]], anchor_name, args)
        stats = train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args)
        finite = math.isfinite(stats["loss"])
        bad_epochs = 0 if finite else bad_epochs + 1
        record = {"epoch": epoch, "trajectories": epoch * args.rollouts_per_epoch, "task": task or "mixed",
                  "seconds": time.time() - start, "lr": lr, **stats, "skipped_update": not finite}
        training.end_epoch(args, record, log, policy, optimizer, rng, finite, bad_epochs, evaluate)
    training.finish_run(args, policy, "the EMA student")


if __name__ == "__main__":
    training.run_cli(main)
