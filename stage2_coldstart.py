r"""Stage 2: a cold start for the student near all teachers (docs/method.md M6).

    python stage2_coldstart.py merge --teachers geneval=runs/teacher-geneval/adapter,ocr=runs/teacher-ocr/adapter \
        --rule delta --out runs/coldstart-merge
    python stage2_coldstart.py sft --teachers geneval=runs/teacher-geneval/adapter,ocr=runs/teacher-ocr/adapter \
        --out runs/coldstart-sft

merge: one peft adapter from K teacher LoRAs dW_k = (alpha / r) B_k A_k with weights w_k:
  delta  exact  sum_k w_k dW_k, as a rank-(sum r_k) adapter (peft's "cat" combination)
  svd    that same sum re-factored to rank r by a truncated SVD (peft's "svd" combination)
  ties   TIES-merging of the dW_k (trim to --density, elect signs, weighted disjoint sum), refactored to
         rank sum r_k (peft's "ties_svd"); dare: DARE (random drop to --density, rescale), the same way
  ab     the released rule: A = sum_k w_k A_k, B = sum_k w_k B_k (NOT the average of dW: it adds the
         cross terms B_k A_l and scales matching terms by w_k^2), kept for comparison
sft: each teacher samples its own task's training prompts (deterministic ODE, the model's eval
settings); a fresh student LoRA is then fitted with the rectified-flow loss on the union.
bestofn: the released script's cold start (and, with one --reward, the miniature world's quick
teachers): N base samples per prompt, the best by reward kept, a fresh LoRA fitted to them.
    python stage2_coldstart.py bestofn --reward geneval --out runs/teacher-geneval
search: the merge chosen on a VALIDATION split carved from the training prompts (never a test prompt):
every --candidates rule:weights is scored there, with the base and each teacher, on each task's graded
reward (GenEval's partial credit: a pass rate over a few dozen prompts moves in steps of 1/n), and the one
whose worse task keeps the largest share of its teacher's gain over the base is written.
    python stage2_coldstart.py search --teachers ... --candidates "delta:0.5,0.5;delta:1,1;ties:1,1" --out runs/merge
All write OUT/adapter, a peft folder that stage3_opd.py takes as --init (or as a teacher).
"""
import dataclasses
import json
import os
import random
import shutil
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


def parse_weights(text, k):
    """The K merge weights: '0.5,0.5', or uniform 1/K when empty."""
    if not text:
        return [1.0 / k] * k
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise loading.UserError(f"--weights {text!r} does not parse; expected {k} comma-separated numbers") from None
    if len(weights) != k:
        raise loading.UserError(f"--weights {text!r} has {len(weights)} numbers for {k} teachers; expected {k}")
    return weights


# ----------------------------------------------------------------------------------------------
# merge (M6)


PEFT_COMBINATION = {"delta": "cat", "svd": "svd", "ties": "ties_svd", "dare": "dare_linear_svd"}


def add_merge(model, names, weights, rule, name, svd_rank=None, density=0.5):
    """Adds adapter `name`, the `rule` merge of the loaded adapters `names` with `weights` (M6), to a PeftModel.
    svd, ties and dare are refactored to rank `svd_rank`; by default svd truncates to a teacher's rank, ties
    and dare keep the sum of the teachers' ranks."""
    ranks = [model.peft_config[n].r for n in names]
    default_rank = ranks[0] if rule == "svd" else sum(ranks)
    model.add_weighted_adapter(names, weights, name, combination_type=PEFT_COMBINATION[rule],
                               svd_rank=None if rule == "delta" else (svd_rank or default_rank), density=density)
    # peft creates the new adapter in the base weights' dtype: on a bf16 base its A and B would be rounded to
    # bf16. The merge is kept in fp32 (as the teachers are loaded) and "delta" is rewritten exactly: A = the
    # stacked w_k (alpha_k / r_k) A_k, B = the side-by-side B_k (scaling 1: peft sets alpha = rank = sum r_k)
    for module in model.modules():
        if not (hasattr(module, "lora_A") and name in module.lora_A):
            continue
        module.lora_A[name].float()
        module.lora_B[name].float()
        if rule == "delta":
            present = [(n, w) for n, w in zip(names, weights) if n in module.lora_A]
            a = torch.cat([w * module.scaling[n] * module.lora_A[n].weight.float() for n, w in present])
            b = torch.cat([module.lora_B[n].weight.float() for n, _ in present], dim=1)
            module.lora_A[name].weight.data[:len(a)] = a
            module.lora_B[name].weight.data[:, :b.shape[1]] = b


def merge_peft(transformer, teachers, weights, rule, svd_rank=None, density=0.5):
    """The weighted merge of teacher adapters as a PeftModel whose adapter "merged" holds it
    (rule "delta": exact sum of w_k dW_k; "svd": its rank-`svd_rank` truncation; "ties", "dare": add_merge)."""
    model = evaluation.load_adapters(transformer, list(teachers.items()))
    add_merge(model, list(teachers), weights, rule, "merged", svd_rank, density)
    return model


def merge_ab(teachers, weights, out):
    """The released rule: average the A matrices and the B matrices separately, key by key."""
    from safetensors.torch import load_file, save_file
    folders = list(teachers.values())
    states = [load_file(os.path.join(f, "adapter_model.safetensors")) for f in folders]

    def write(tmp):
        merged = {key: sum(w * s[key].float() for w, s in zip(weights, states)) for key in states[0]}
        save_file(merged, os.path.join(tmp, "adapter_model.safetensors"))
        shutil.copy(os.path.join(folders[0], "adapter_config.json"), tmp)
    loading.atomic_write_dir(out, write)


def merge(args):
    teachers = loading.parse_teachers(args.teachers)
    weights = parse_weights(args.weights, len(teachers))
    out = os.path.join(args.out, "adapter")
    if args.rule == "ab":  # the only rule that adds A and B matrices, key by key: one layout needed
        loading.check_same_layout(teachers)
        merge_ab(teachers, weights, out)
    else:
        bundle = training.load_model_from_args(args)
        model = merge_peft(bundle.transformer, teachers, weights, args.rule, args.svd_rank, args.density)
        loading.save_adapter(model, "merged", out)
    print(f"wrote {out} ({args.rule} merge of {', '.join(f'{w:g} x {t}' for t, w in zip(teachers, weights))})")


# ----------------------------------------------------------------------------------------------
# search: the merge rule and weights chosen on a validation split of the training prompts


def validation_split(items_by_task, per_task, seed):
    """{task: [(prompt, metadata)]}: `per_task` of each task's TRAINING prompts, drawn with `seed`. The
    search scores its candidates on these alone: the test prompts stay unseen until the table."""
    rng = random.Random(seed)
    return {task: rng.sample(items, min(per_task, len(items))) for task, items in items_by_task.items()}


def parse_candidates(text, k):
    """'delta:0.5,0.5;ties:1,1' -> [("delta", [0.5, 0.5]), ("ties", [1.0, 1.0])]: the merges to compare."""
    candidates = []
    for part in filter(None, text.split(";")):
        rule, _, weights = part.partition(":")
        if rule not in PEFT_COMBINATION:
            raise loading.UserError(f"candidate {part!r} in --candidates has rule {rule!r}; expected one of "
                                   f"{sorted(PEFT_COMBINATION)} followed by :w1,w2")
        candidates.append((rule, parse_weights(weights, k)))
    if not candidates:
        raise loading.UserError(f"--candidates {text!r} names no merge; expected e.g. 'delta:0.5,0.5;delta:1,1'")
    return candidates


def search(args):
    teachers = loading.parse_teachers(args.teachers)
    candidates = parse_candidates(args.candidates, len(teachers))
    miniature.world.ensure_prompt_files(args.dataset)
    split = validation_split(loading.prompts_by_task(args.train_prompts, teachers, args.dataset, "train"),
                             args.val_per_task, args.seed)
    items = [item for task in teachers for item in split[task]]
    bundle = training.load_model_from_args(args)
    score, names = rewards.from_args(args, bundle)
    steps, guidance = bundle.defaults["eval_steps"], bundle.defaults["guidance_scale"]
    model = evaluation.load_adapters(bundle.transformer, list(teachers.items()))

    def scores(adapter):
        with evaluation.adapter_for_sampling(model, adapter):
            result, _ = evaluation.evaluate(dataclasses.replace(bundle, transformer=model), items, steps, guidance,
                                            args.seed, score, names, args.eval_bf16)
        return result
    base = scores(None)
    reference = {task: scores(task) for task in tqdm(teachers, desc="teachers on the validation split")}
    rows = []
    for i, (rule, weights) in enumerate(tqdm(candidates, desc="merge candidates")):
        add_merge(model, list(teachers), weights, rule, f"candidate{i}", density=args.density)
        result = scores(f"candidate{i}")
        model.delete_adapter(f"candidate{i}")
        kept = {task: evaluation.gain_kept(result[task], base[task], reference[task][task]) for task in teachers}
        rows.append({"rule": rule, "weights": weights, **{f"kept_{t}": k for t, k in kept.items()},
                     "worst_kept": min(kept.values()), **result})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()
                          if k in ("rule", "weights", "worst_kept") or k.startswith("kept_")}))
    best = max(rows, key=lambda r: r["worst_kept"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "search.json"), "w") as f:
        json.dump({"validation_prompts": [p for p, _ in items], "base": base, "teachers": reference,
                   "candidates": rows, "chosen": {"rule": best["rule"], "weights": best["weights"]}}, f, indent=1)
    add_merge(model, list(teachers), best["weights"], best["rule"], "merged", density=args.density)
    loading.save_adapter(model, "merged", os.path.join(args.out, "adapter"))
    print(f"wrote {args.out}/adapter: {best['rule']} merge, weights {best['weights']} (worst task keeps "
          f"{best['worst_kept']:.0%} of its teacher's gain on {len(items)} validation prompts)")


# ----------------------------------------------------------------------------------------------
# sft (M6)


@torch.no_grad()
def teacher_samples(bundle, model, teachers, items_by_task, per_task, steps, guidance, seed, args, batch_size=32,
                    bf16=False):
    """For each task: `per_task` training prompts sampled with its teacher's deterministic ODE (prompt i
    with seed seed + i; under torchrun each process samples its shard and all get every sample).
    Returns (final latents (K * per_task, C, h, w), their prompts)."""
    latents, prompts = [], []
    negative = bundle.encode([""])
    sigmas = common.sampling_sigmas(bundle.scheduler, steps)
    shape = bundle.latent_shape(bundle.resolution)
    for task in teachers:
        items = items_by_task[task]
        picked = [items[i][0] for i in random.Random(seed).sample(range(len(items)), min(per_task, len(items)))]
        training.check_divisible(args, samples_per_task=len(picked))
        mine, task_latents = training.shard(list(enumerate(picked)), args), []
        with evaluation.adapter_for_sampling(model, task):
            for start in tqdm(range(0, len(mine), batch_size), desc=f"sampling {task} teacher", disable=args.rank > 0):
                part = mine[start:start + batch_size]
                embeds, pooled = bundle.encode([p for _, p in part])
                with common.autocast(embeds.device, bf16):
                    run = common.rollout(model, embeds, pooled, shape, sigmas, [seed + i for i, _ in part], 0.0,
                                         guidance, negative)
                task_latents.append(run["states"][:, -1])
        latents.append(training.gather(torch.cat(task_latents), args))
        prompts += picked
    return torch.cat(latents), prompts


@torch.no_grad()
def best_of_n_samples(bundle, model, items, reward, n, steps, guidance, seed, score, args, batch_size=64, bf16=False):
    """For each (prompt, metadata): n deterministic-ODE samples of the model (seeds differ), scored
    by `reward` ("task": the reward of the prompt's own task), and the best kept (under torchrun each
    process samples and scores its shard of the candidates). Returns (final latents (P, C, h, w),
    prompts, best rewards, mean rewards)."""
    negative = bundle.encode([""])
    sigmas = common.sampling_sigmas(bundle.scheduler, steps)
    shape = bundle.latent_shape(bundle.resolution)
    names = ("geneval", "ocr") if reward == "task" else (reward,)
    candidates = [(p, m, seed + 1000 * i + k) for i, (p, m) in enumerate(items) for k in range(n)]
    training.check_divisible(args, n=n)
    candidates, latents, scores = training.shard(candidates, args), [], []
    for start in tqdm(range(0, len(candidates), batch_size), desc=f"best of {n}", disable=args.rank > 0):
        part = candidates[start:start + batch_size]
        prompts, metas = [p for p, _, _ in part], [m for _, m, _ in part]
        embeds, pooled = bundle.encode(prompts)
        with common.autocast(embeds.device, bf16):
            run = common.rollout(model, embeds, pooled, shape, sigmas, [s for _, _, s in part], 0.0, guidance,
                                 negative, bundle.decode)
        scored = score(run["images"], prompts, metas, names=names)
        scores += np.nanmax(np.stack([scored[k] for k in names]), 0).tolist()  # task: the one that applies
        latents.append(run["states"][:, -1])
    latents = training.gather(torch.cat(latents), args).unflatten(0, (len(items), n))
    scores = training.gather(torch.tensor(scores, dtype=torch.float64), args).view(len(items), n)
    best = scores.argmax(1)
    return latents[torch.arange(len(items)), best], [p for p, _ in items], scores.max(1).values, scores.mean(1)


def fit_adapter(bundle, model, latents, prompts, layout, args, guidance):
    """Adds a fresh LoRA "student" (rank, alpha, targets = layout) to the PeftModel and fits it to
    the (final latent, prompt) pairs with the rectified-flow loss (M6) on the velocity guided as the
    samples were (so the fitted model reproduces them when sampled with that guidance). Returns the loss log."""
    args.fit_guidance = guidance if args.fit_guidance is None else args.fit_guidance
    from peft import LoraConfig
    rank, alpha, targets = layout
    model.add_adapter("student", LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    model.set_adapter("student")
    loading.freeze_all_but(model, "student")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    embeds, pooled = bundle.encode(prompts)
    negative = bundle.encode([""])
    generator = random.Random(args.seed)
    shift = bundle.scheduler.config.get("shift", 3.0)
    log, start = [], time.time()
    for step in tqdm(range(1, args.train_steps + 1), desc="fit", disable=args.rank > 0):
        idx = torch.tensor([generator.randrange(len(prompts)) for _ in range(args.batch_size)])
        # the global batch's time and noise draws, the same on every process; each keeps its shard
        sigma = common.training_sigmas(args.batch_size, shift).to(latents.device)
        noise = torch.randn(args.batch_size, *latents.shape[1:]).to(latents.device)
        mine = training.shard(torch.arange(args.batch_size), args)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        # gradients accumulated over micro-batches: memory of --micro-batch-size samples (x2 with guidance),
        # the update of the whole batch
        for part in torch.split(mine, args.micro_batch_size or len(mine)):
            loss = common.flow_matching_loss(model, latents[idx[part]], embeds[idx[part]], pooled[idx[part]], shift,
                                             args.train_bf16, args.fit_guidance, negative, sigma[part], noise[part])
            (loss * len(part) / args.batch_size).backward()
            total = total + loss.detach() * len(part) / args.batch_size
        training.optimizer_step(params, optimizer, args, max_grad_norm=1.0)
        loss = training.all_reduce(total, args)
        log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})
    return log


def write_result(model, log, args, what):
    if args.rank > 0:  # only the first process writes
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    loading.save_adapter(model, "student", os.path.join(args.out, "adapter"))
    losses = [r["loss"] for r in log if "loss" in r][-20:]
    print(f"wrote {args.out}/adapter ({what}; mean loss of the last 20 steps {sum(losses) / max(1, len(losses)):.4f})")


def sft(args):
    teachers = loading.parse_teachers(args.teachers)
    miniature.world.ensure_prompt_files(args.dataset)
    train_items = loading.prompts_by_task(args.train_prompts, teachers, args.dataset, "train")
    torch.manual_seed(args.seed)
    bundle = training.load_model_from_args(args)
    guidance = args.guidance if args.guidance is not None else bundle.defaults["guidance_scale"]
    steps = args.sample_steps or bundle.defaults["eval_steps"]
    model = evaluation.load_adapters(bundle.transformer, list(teachers.items()))
    latents, prompts = teacher_samples(bundle, model, teachers, train_items, args.samples_per_task, steps, guidance, args.seed,
                                       args, bf16=args.sample_bf16)
    # the student takes the first teacher's LoRA layout (rank, alpha, targets)
    log = fit_adapter(bundle, model, latents, prompts, loading.adapter_layout(next(iter(teachers.values()))), args, guidance)
    write_result(model, log, args, f"SFT on {len(prompts)} teacher samples")


def best_of_n(args):
    """The released cold start (best-of-N base samples by each prompt's own reward, --reward task),
    and the miniature world's quick teachers (one reward): rejection sampling, then SFT (M6)."""
    if args.reward != "task":
        rewards.check_names([args.reward], f"--reward {args.reward!r} (or 'task')")
    tasks = [args.reward] if args.reward in loading.DEFAULT_PROMPT_FILES else list(loading.DEFAULT_PROMPT_FILES)
    miniature.world.ensure_prompt_files(args.dataset)
    by_task = loading.prompts_by_task(args.train_prompts, tasks, args.dataset, "train")
    rng = random.Random(args.seed)
    items = [item for task in tasks for item in rng.sample(by_task[task], min(args.samples_per_task, len(by_task[task])))]
    torch.manual_seed(args.seed)
    bundle = training.load_model_from_args(args)
    guidance = args.guidance if args.guidance is not None else bundle.defaults["guidance_scale"]
    model = loading.add_lora(bundle.transformer, args.lora_rank, args.lora_alpha, args.lora_targets, name="unused")
    cache = os.path.join(args.out, "samples.pt")  # the expensive part: kept, so a rerun only refits
    if os.path.isfile(cache):
        latents, prompts, best, mean = torch.load(cache).values()
    else:
        with loading.use_adapter(model, None):  # the base model samples
            latents, prompts, best, mean = best_of_n_samples(bundle, model, items, args.reward, args.n, args.sample_steps
                                                             or bundle.defaults["eval_steps"], guidance, args.seed,
                                                             rewards.make_scorer(args, bundle), args, bf16=args.sample_bf16)
        if args.rank == 0:
            loading.atomic_torch_save({"latents": latents, "prompts": prompts, "best": best, "mean": mean}, cache)
    print(f"best-of-{args.n} {args.reward} reward: {best.mean():.3f} (a random sample: {mean.mean():.3f})")
    log = [{"prompts": len(items), "n": args.n, "best_reward": best.mean().item(), "mean_reward": mean.mean().item()}]
    layout = (args.lora_rank, args.lora_alpha, list(args.lora_targets))
    log += fit_adapter(bundle, model, latents, prompts, layout, args, guidance)
    model.delete_adapter("unused")
    write_result(model, log, args, f"SFT on the best of {args.n} base samples of {len(items)} prompts")


def main(argv=None):
    p = training.parser(__doc__)
    p.add_argument("method", choices=["merge", "search", "sft", "bestofn"], help="the cold start")
    training.add_model_arguments(p)  # --model, --device, --model-dtype, --gradient-checkpointing, --resolution, --lora-targets
    rewards.add_arguments(p)  # bestofn: --pickscore-model, --geneval-url, --deqa-url, ... (the real world's scorers)
    p.add_argument("--teachers", default="", help="task=peft_folder,... (Stage 1 adapters or published LoRAs)")
    p.add_argument("--reward", default="task", help='bestofn: the ranking reward ("task": each prompt\'s own)')
    p.add_argument("--n", type=training.positive_int, default=8, help="bestofn: base samples per prompt")
    p.add_argument("--lora-rank", type=training.positive_int, default=32, help="bestofn: LoRA rank (paper: 32)")
    p.add_argument("--lora-alpha", type=training.positive_int, default=64, help="bestofn: LoRA alpha (paper: 64)")
    p.add_argument("--out", required=True, help="run folder; the result is OUT/adapter")
    p.add_argument("--rule", choices=["delta", "svd", "ties", "dare", "ab"], default="delta", help="merge rule (M6)")
    p.add_argument("--density", type=training.probability, default=0.5,
                   help="ties/dare: the share of each teacher's dW entries kept")
    p.add_argument("--candidates", default="delta:0.5,0.5;delta:0.75,0.75;delta:1,1;delta:0.25,0.75;delta:0.5,1;"
                                           "delta:0.4,0.6;delta:0.25,1;svd:1,1;ties:1,1;dare:1,1",
                   help="search: the merges compared, rule:weights;rule:weights (weights in --teachers order)")
    p.add_argument("--val-per-task", type=training.positive_int, default=64,
                   help="search: validation prompts per task, drawn from the training prompts")
    p.add_argument("--weights", default="", help="merge weights in --teachers order (default: uniform)")
    p.add_argument("--svd-rank", type=training.positive_int, default=None,
                   help="rank of the svd merge (default: the teachers')")
    p.add_argument("--dataset", default="dataset", help="folder of the default training prompt files")
    p.add_argument("--train-prompts", default="",
                   help="comma-separated prompt files, each path or task=path (a plain file of another task, e.g. "
                        "pickscore=dataset/pickscore/train.txt) (default: the teachers' tasks')")
    p.add_argument("--samples-per-task", type=training.positive_int, default=256,
                   help="sft: teacher samples per task; bestofn: prompts per task")
    p.add_argument("--sample-steps", type=training.positive_int, default=None,
                   help="teacher ODE steps (default: the model's eval steps)")
    p.add_argument("--guidance", type=training.nonnegative_float, default=None,
                   help="CFG of the teacher samples (default: the model's)")
    p.add_argument("--train-steps", type=training.positive_int, default=200, help="SFT optimizer steps")
    p.add_argument("--batch-size", type=training.positive_int, default=32, help="SFT batch size")
    p.add_argument("--micro-batch-size", type=training.positive_int, default=None,
                   help="SFT samples per forward/backward, gradients accumulated to --batch-size (default: the whole "
                        "batch; SD3.5-M, 512 px, guided: 2 on 24 GB with checkpointing, 8 on 80 GB)")
    p.add_argument("--lr", type=training.positive_float, default=3e-4, help="SFT learning rate")
    p.add_argument("--fit-guidance", type=training.nonnegative_float, default=None,
                   help="CFG of the fitted velocity (default: the samples')")
    p.add_argument("--seed", type=int, default=0, help="prompt choice, noise")
    args = p.parse_args(argv)
    if args.method != "bestofn" and not args.teachers:
        p.error(f"{args.method} needs --teachers task=peft_folder,...")
    training.init_distributed(args)  # torchrun: sft/bestofn sample and fit on shards; merge runs once
    training.check_divisible(args, batch_size=args.batch_size)
    if args.method not in ("merge", "search") or args.rank == 0:  # a merge runs once
        {"merge": merge, "search": search, "sft": sft, "bestofn": best_of_n}[args.method](args)
    training.end_distributed(args)


if __name__ == "__main__":
    training.run_cli(main)
