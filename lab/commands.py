"""The miniature world's commands: its prompt files, the pretraining of its base model, quick
specialist teachers, and a scored sample grid of any model.

    python -m lab prompts   --out dataset                  # write flow_grpo-format prompt files
    python -m lab pretrain  --out miniature/base           # train the shipped base model (see its README)
    python -m lab specialist --task ocr --out runs/teacher-ocr   # a LoRA fitted to renders (the OCR teacher)
    python -m lab sample    --model miniature/base --out results/base   # grid + scores of a model
    python -m lab publish   --row teacher-geneval --adapter ... --eval ... --out miniature/teachers/geneval

The world itself (prompts, renderer, scorers) is miniature/world.py; the tiny SD3 model is miniature/model.py.
"""
import json
import os
import random
import time

import numpy as np
from PIL import Image

import common
import lab.publish
import loading
import training
import miniature.model
import miniature.world
from eval import evaluate
from miniature.model import build_model, fit_pca_codec, pca_encode, pretraining_batch, rectified_flow_loss, save_model
from training import image_grid, load_model
from miniature.world import SIZE, held_out_prompts, render, score, test_items, write_prompt_files


def pretrain(args):
    """Rectified-flow pretraining of the miniature model on renders (shifted logit-normal timesteps,
    caption dropout for CFG, bf16 autocast, EMA weights, atomic resumable checkpoints)."""
    import copy
    import torch
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    codec = fit_pca_codec(seed=args.seed) if args.space == "pca" else None
    if codec is None:
        transformer, text_encoder, tokenizer, scheduler = build_model(args.width, args.depth, seed=args.seed)
    else:
        transformer, text_encoder, tokenizer, scheduler = build_model(
            args.width, args.depth, seed=args.seed, patch=2, channels=len(codec["basis"]), side=SIZE // int(codec["factor"]))
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    run = {"transformer": transformer, "text_encoder": text_encoder,
           "optimizer": torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99)),
           "ema_transformer": copy.deepcopy(transformer).requires_grad_(False),
           "ema_text_encoder": copy.deepcopy(text_encoder).requires_grad_(False)}
    work = args.out + ".work"
    step, elapsed, log = load_pretraining_checkpoint(work, run, rng, args.steps)
    held_out, items = held_out_prompts(args.dataset_seed), test_items(args.dataset_seed)
    bar = tqdm(total=args.steps, initial=step, desc="pretrain", dynamic_ncols=True)
    while step < args.steps:
        start = time.time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in run["optimizer"].param_groups:
            group["lr"] = lr
        prompts, images = pretraining_batch(rng, args.batch_size, held_out)
        prompts = [("" if rng.random() < args.caption_dropout else p) for p in prompts]
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        x0 = x0 if codec is None else pca_encode(x0, codec)
        loss = rectified_flow_loss(transformer, text_encoder, tokenizer, x0, prompts, scheduler.config.shift, args.bf16)
        run["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run["optimizer"].step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name in ("transformer", "text_encoder"):
                for ema_param, param in zip(run["ema_" + name].parameters(), run[name].parameters()):
                    ema_param.lerp_(param, 1 - decay)
        step += 1
        elapsed += time.time() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % args.eval_every == 0 or step == args.steps:
            save_model(work + "/ema", run["ema_transformer"], run["ema_text_encoder"], tokenizer, scheduler, codec=codec)
            result, samples = evaluate(load_model(work + "/ema"), items, args.eval_steps, args.guidance)
            log.append({"step": step, "loss": loss.item(), "minutes": elapsed / 60, **result})
            bar.write(json.dumps(log[-1]))
            save_pretraining_checkpoint(work, run, rng, step, elapsed, log, samples)
    bar.close()
    save_model(args.out, run["ema_transformer"], run["ema_text_encoder"], tokenizer, scheduler, dtype=torch.bfloat16,
               codec=codec, eval_steps=args.eval_steps, guidance_scale=args.guidance)
    result, _ = evaluate(load_model(args.out), items, args.eval_steps, args.guidance)  # the weights as shipped
    card = model_card(args, log, result)
    with open(os.path.join(args.out, "README.md.tmp"), "w") as f:
        f.write(card)
    os.replace(os.path.join(args.out, "README.md.tmp"), os.path.join(args.out, "README.md"))
    print(card)


def save_pretraining_checkpoint(work, run, rng, step, elapsed, log, samples):
    """An atomic resumable checkpoint, the EMA snapshot of this step, the log and a sample grid."""
    import torch
    os.makedirs(os.path.join(work, "samples"), exist_ok=True)
    pick = list(range(0, 96, 6)) + list(range(96, 112))
    image_grid(samples[pick], 8).resize((8 * 66 * 2, 4 * 66 * 2), Image.NEAREST).save(
        os.path.join(work, "samples", f"step{step:06d}.png"))
    torch.save({k: run[k].state_dict() for k in ("ema_transformer", "ema_text_encoder")},
               os.path.join(work, f"ema_step{step:06d}.pt"))
    loading.atomic_torch_save({**{k: module.state_dict() for k, module in run.items()}, "step": step, "elapsed": elapsed,
                       "log": log, "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state()},
                      os.path.join(work, "checkpoint.pt"))
    with open(os.path.join(work, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)


def load_pretraining_checkpoint(work, run, rng, steps):
    """Restores `run` (modules, optimizer, EMA) and the RNG states from work/checkpoint.pt if it exists:
    (step, elapsed seconds, log). With a checkpoint past `steps` (constant LR after warm-up), the EMA
    snapshot saved at `steps` is exactly what a run of `steps` steps ends with."""
    import torch
    path = os.path.join(work, "checkpoint.pt")
    if not os.path.exists(path):
        os.makedirs(work, exist_ok=True)
        return 0, 0.0, []
    ckpt = torch.load(path, weights_only=False)
    for key, module in run.items():
        module.load_state_dict(ckpt[key])
    rng.setstate(ckpt["python_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"resumed from {path} at step {ckpt['step']}")
    if ckpt["step"] <= steps:
        return ckpt["step"], ckpt["elapsed"], ckpt["log"]
    snapshot = os.path.join(work, f"ema_step{steps:06d}.pt")
    if not os.path.exists(snapshot):
        raise loading.UserError(f"--steps {steps} is below the checkpoint's step {ckpt['step']} and there is no EMA "
                         f"snapshot {snapshot}; expected --steps to be a multiple of --eval-every")
    for key, state in torch.load(snapshot).items():
        run[key].load_state_dict(state)
    log = [r for r in ckpt["log"] if r["step"] <= steps]
    return steps, log[-1]["minutes"] * 60, log


def model_card(args, log, result):
    """The shipped base model's card: how it was made and what it scores."""
    rows = "\n".join(f"| {name} | {value:.3f} |" for name, value in result.items())
    curve = "\n".join(f"| {r['step']} | {r['minutes']:.1f} | {r['loss']:.4f} | {r['geneval_acc']:.3f} | "
                      f"{r['ocr']:.3f} | {r['quality']:.3f} |" for r in log)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
                     if k not in ("command", "func", "bf16")) + ("" if args.bf16 else " --no-bf16")
    space = ("a 16x16x12 PCA latent of 4x4 pixel patches (`latent.safetensors`; linear, near-exact decoding), "
             "patch 2" if args.space == "pca" else "pixel space (64x64x3), patch 8")
    return f"""# The miniature base model

A {sum(p.numel() for p in load_model(args.out).transformer.parameters()) / 1e6:.2f}M-parameter
diffusers `SD3Transformer2DModel` (width {args.width}, depth {args.depth}) working in {space}: 64 image
tokens, with a tiny CLIP text encoder (16 tokens, local word-level tokenizer). Pretrained from scratch
with the rectified-flow loss (shifted logit-normal timesteps, caption dropout {args.caption_dropout},
bf16 autocast, EMA {args.ema}) on renders of the miniature world. Weights stored in bf16.

Reproduce (2-core CPU, {log[-1]['minutes']:.1f} min of training steps, evaluations excluded):

    python -m lab pretrain {flags}

## Scores of the shipped weights on the test split
Deterministic ODE, {args.eval_steps} steps, CFG {args.guidance}, seeds 0..159 (`python -m lab sample` recomputes them).

| metric | value |
|---|---|
{rows}

## Training curve (EMA weights, same evaluation)

| step | train minutes | loss | GenEval | OCR | quality |
|---|---|---|---|---|---|
{curve}
"""


def specialist(args):
    """A task specialist of the miniature world: a LoRA fitted with the rectified-flow loss to fresh
    renders of one task's training prompts ("all": both tasks, the multi-task baseline). It stands in
    for a GRPO teacher where GRPO needs far more samples than minutes give (docs/experiments.md, Stage 1)."""
    import torch
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tasks = list(loading.DEFAULT_PROMPT_FILES) if args.task == "all" else [args.task]
    if args.task not in (*loading.DEFAULT_PROMPT_FILES, "all"):
        raise loading.UserError(f"unknown task {args.task!r}; expected one of {[*loading.DEFAULT_PROMPT_FILES, 'all']}")
    miniature.world.ensure_prompt_files(args.dataset)
    items = [item for task in tasks for item in loading.prompts_by_task("", [task], args.dataset, "train")[task]]
    bundle = training.load_model(args.model)
    from safetensors.torch import load_file
    codec = load_file(os.path.join(args.model, "latent.safetensors"))
    policy = training.make_policy(bundle.transformer, args.lora_rank, args.lora_alpha, targets=bundle.defaults["lora_targets"])
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    empty = bundle.encode([""])
    log, start = [], time.time()
    for step in tqdm(range(1, args.steps + 1), desc=f"specialist {args.task}"):
        picked = [items[rng.randrange(len(items))] for _ in range(args.batch_size)]
        images = np.stack([np.asarray(render(p, m, rng)) for p, m in picked])
        x0 = miniature.model.pca_encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, codec)
        embeds, pooled = bundle.encode([p for p, _ in picked])
        keep = torch.rand(len(picked)) >= args.caption_dropout  # keeps CFG's empty-prompt branch in tune
        embeds = torch.where(keep[:, None, None], embeds, empty[0].expand_as(embeds))
        pooled = torch.where(keep[:, None], pooled, empty[1].expand_as(pooled))
        loss = common.flow_matching_loss(policy, x0, embeds, pooled, bundle.scheduler.config.shift, args.bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    loading.save_adapter(policy, "student", os.path.join(args.out, "adapter"))
    print(f"wrote {args.out}/adapter ({args.task} specialist, {args.steps} steps, {(time.time() - start) / 60:.1f} min)")


def sample(args):
    """Samples a grid from a model and scores it on the test split."""
    bundle = load_model(args.model)
    with open(os.path.join(args.model, "miniature.json")) as f:
        defaults = json.load(f)
    steps, guidance = args.steps or defaults["eval_steps"], args.guidance or defaults["guidance_scale"]
    result, images = evaluate(bundle, test_items(args.dataset_seed), steps, guidance, args.seed)
    os.makedirs(args.out, exist_ok=True)
    pick = list(range(0, 96, 3)) + list(range(96, 160, 2))
    image_grid(images[pick], 8).resize((8 * 66 * 2, 8 * 66 * 2), Image.NEAREST).save(os.path.join(args.out, "grid.png"))
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump({"model": args.model, "steps": steps, "guidance_scale": guidance, "seed": args.seed, **result}, f, indent=1)
    print(json.dumps(result, indent=1))
    print(f"wrote {args.out}/grid.png and {args.out}/scores.json")


def latent_study(args):
    """Measures the small-latent alternative to pixel space: a PCA of f x f pixel patches (a linear,
    near-exact encoder/decoder) at the same 64-token sequence, scored on decoded test renders."""
    rng = random.Random(0)
    _, train = pretraining_batch(rng, 512, held_out_prompts())
    items = test_items()
    test = np.stack([np.asarray(render(p, m, rng)) for p, m in items]).astype(np.float32) / 127.5 - 1

    def to_patches(images, f):
        n = len(images)
        return images.reshape(n, SIZE // f, f, SIZE // f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, f * f * 3)

    def from_patches(patches, n, f):
        return patches.reshape(n, SIZE // f, SIZE // f, f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, SIZE, SIZE, 3)
    exact = score(((test + 1) * 127.5).round().astype(np.uint8), [p for p, _ in items], [m for _, m in items])
    print(f"pixels 64x64x3: exact, geneval_acc {np.nanmean(exact['geneval_acc']):.3f}, "
          f"ocr {np.nanmean(exact['ocr']):.3f}, quality {exact['quality'].mean():.3f}")
    for f, k in [(4, 12), (4, 24), (8, 48)]:
        data = to_patches(train.astype(np.float32) / 127.5 - 1, f)
        mean = data.mean(0)
        basis = np.linalg.svd(data - mean, full_matrices=False)[2][:k]
        decoded = from_patches((to_patches(test, f) - mean) @ basis.T @ basis + mean, len(test), f)
        psnr = 10 * np.log10(4 / ((decoded - test) ** 2).mean())
        scores = score(((np.clip(decoded, -1, 1) + 1) * 127.5).round().astype(np.uint8),
                       [p for p, _ in items], [m for _, m in items])
        print(f"latent {SIZE // f}x{SIZE // f}x{k}: PSNR {psnr:.1f} dB, geneval_acc "
              f"{np.nanmean(scores['geneval_acc']):.3f}, ocr {np.nanmean(scores['ocr']):.3f}, "
              f"quality {scores['quality'].mean():.3f}")


def main(argv=None):
    parser = training.parser(__doc__, prog="python -m lab")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, text):  # a subcommand's parser: its flags' defaults in --help, a bad value in one line
        p = sub.add_parser(name, help=text, description=text, formatter_class=training.HelpFormatter)
        p.error = training.fail
        return p
    p = command("prompts", "write the prompt files")
    p.add_argument("--out", default="dataset", help="folder for geneval/*.jsonl and ocr/*.txt")
    p.add_argument("--dataset-seed", type=int, default=0, help="seed of the train/test split")
    p.set_defaults(func=lambda a: print(json.dumps(write_prompt_files(a.out, a.dataset_seed), indent=1)))
    p = command("pretrain", "pretrain the miniature base model")
    p.add_argument("--out", default="miniature/base", help="model folder; checkpoints go to OUT.work/")
    p.add_argument("--steps", type=training.positive_int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=training.positive_int, default=64, help="renders per step")
    p.add_argument("--lr", type=training.positive_float, default=5e-4, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=training.nonnegative_int, default=100, help="linear warm-up steps")
    p.add_argument("--ema", type=training.probability, default=0.998, help="EMA decay of the saved weights")
    p.add_argument("--caption-dropout", type=training.probability, default=0.1, help="empty-prompt rate, so CFG works")
    p.add_argument("--space", choices=["pixels", "pca"], default="pca",
                   help="pixels, or the PCA latent (4x4 patch -> 12)")
    p.add_argument("--width", type=training.positive_int, default=192, help="transformer width")
    p.add_argument("--depth", type=training.positive_int, default=6, help="transformer blocks")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    p.add_argument("--eval-every", type=training.positive_int, default=400,
                   help="steps between test evaluations + grids")
    p.add_argument("--eval-steps", type=training.positive_int, default=20, help="ODE steps of those evaluations")
    p.add_argument("--guidance", type=training.nonnegative_float, default=4.5, help="CFG scale of those evaluations")
    p.add_argument("--seed", type=int, default=0, help="init, data and noise seed")
    p.add_argument("--dataset-seed", type=int, default=0, help="which test split is held out")
    p.set_defaults(func=pretrain)
    p = command("sample", "sample a grid and score a model on the test split")
    p.add_argument("--model", default="miniature/base", help="model folder")
    p.add_argument("--out", default="results/base", help="where grid.png and scores.json go")
    p.add_argument("--steps", type=training.positive_int, default=None,
                   help="ODE steps (default: the model's eval_steps)")
    p.add_argument("--guidance", type=training.nonnegative_float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seeds are seed + prompt index")
    p.add_argument("--dataset-seed", type=int, default=0, help="which test split")
    p.set_defaults(func=sample)
    p = command("specialist", "fit a task-specialist LoRA to renders (the quick teachers)")
    p.add_argument("--task", required=True, help="geneval, ocr, or all (both: the multi-task baseline)")
    p.add_argument("--model", default="miniature/base", help="base model folder")
    p.add_argument("--dataset", default="dataset", help="folder of the prompt files (train split used)")
    p.add_argument("--out", required=True, help="run folder; the result is OUT/adapter")
    p.add_argument("--steps", type=training.positive_int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=training.positive_int, default=32, help="renders per step")
    p.add_argument("--lr", type=training.positive_float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--lora-rank", type=training.positive_int, default=32, help="LoRA rank (the teachers' layout)")
    p.add_argument("--lora-alpha", type=training.positive_int, default=64, help="LoRA alpha")
    p.add_argument("--caption-dropout", type=training.probability, default=0.1,
                   help="empty-prompt rate, as in pretraining")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32: 1.5x faster training on this CPU)")
    p.add_argument("--seed", type=int, default=0, help="renders, noise")
    p.set_defaults(func=specialist)
    lab.publish.add_command(command)
    p = command("latent-study", "measure a small PCA latent space against pixel space")
    p.set_defaults(func=latent_study)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    training.run_cli(main)
