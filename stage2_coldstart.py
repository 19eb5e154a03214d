"""Stage 2: a cold start for the student near all teachers (METHOD.md M6).

    python stage2_coldstart.py merge --teachers geneval=runs/teacher-geneval/adapter,ocr=runs/teacher-ocr/adapter \
        --rule delta --out runs/coldstart-merge
    python stage2_coldstart.py sft --teachers geneval=runs/teacher-geneval/adapter,ocr=runs/teacher-ocr/adapter \
        --out runs/coldstart-sft

merge: one peft adapter from K teacher LoRAs dW_k = (alpha / r) B_k A_k with weights w_k:
  delta  exact  sum_k w_k dW_k, as a rank-(sum r_k) adapter (peft's "cat" combination)
  svd    that same sum re-factored to rank r by a truncated SVD (peft's "svd" combination)
  ab     the released rule: A = sum_k w_k A_k, B = sum_k w_k B_k (NOT the average of dW: it adds the
         cross terms B_k A_l and scales matching terms by w_k^2), kept for comparison
sft: each teacher samples its own task's training prompts (deterministic ODE, the model's eval
settings); a fresh student LoRA is then fitted with the rectified-flow loss on the union.
Both write OUT/adapter, a peft folder that stage3_opd.py takes as --init.
"""
import argparse
import json
import os
import random
import shutil
import time

import torch
from tqdm import tqdm

import common
import toy


def parse_weights(text, k):
    """The K merge weights: '0.5,0.5', or uniform 1/K when empty."""
    if not text:
        return [1.0 / k] * k
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r} does not parse; expected {k} comma-separated numbers") from None
    if len(weights) != k:
        raise ValueError(f"--weights {text!r} has {len(weights)} numbers for {k} teachers; expected {k}")
    return weights


# ----------------------------------------------------------------------------------------------
# merge (M6)


def merge_peft(transformer, teachers, weights, rule, svd_rank=None):
    """The weighted merge of teacher adapters as a PeftModel whose adapter "merged" holds it
    (rule "delta": exact sum of w_k dW_k; "svd": its rank-`svd_rank` truncation)."""
    from peft import PeftModel
    names = list(teachers)
    common.check_adapter_fits(transformer, teachers[names[0]])
    model = PeftModel.from_pretrained(transformer, teachers[names[0]], adapter_name=names[0])
    for name in names[1:]:
        common.load_adapter(model, teachers[name], name)
    combination = {"delta": "cat", "svd": "svd"}[rule]
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination,
                               svd_rank=svd_rank if rule == "svd" else None)
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
    common.atomic_write_dir(out, write)


def merge(args):
    teachers = common.parse_teachers(args.teachers)
    weights = parse_weights(args.weights, len(teachers))
    common.check_same_layout(teachers)
    out = os.path.join(args.out, "adapter")
    if args.rule == "ab":
        merge_ab(teachers, weights, out)
    else:
        bundle = common.load_model(args.model)
        model = merge_peft(bundle.transformer, teachers, weights, args.rule,
                           args.svd_rank or common.adapter_layout(next(iter(teachers.values())))[0])
        common.save_adapter(model, "merged", out)
    print(f"wrote {out} ({args.rule} merge of {', '.join(f'{w:g} x {t}' for t, w in zip(teachers, weights))})")


# ----------------------------------------------------------------------------------------------
# sft (M6)


@torch.no_grad()
def teacher_samples(bundle, model, teachers, prompt_files, per_task, steps, guidance, seed, batch_size=32):
    """For each task: `per_task` training prompts sampled with its teacher's deterministic ODE.
    Returns (final latents (K * per_task, C, h, w), their prompts)."""
    latents, prompts = [], []
    negative = bundle.encode([""]) if guidance != 1 else None
    sigmas = common.sampling_sigmas(bundle.scheduler, steps)
    shape = bundle.latent_shape(bundle.resolution)
    for task, path in teachers.items():
        items = common.load_prompts(prompt_files[task])
        picked = [items[i][0] for i in random.Random(seed).sample(range(len(items)), min(per_task, len(items)))]
        with common.use_adapter(model, task):
            for start in tqdm(range(0, len(picked), batch_size), desc=f"sampling {task} teacher"):
                part = picked[start:start + batch_size]
                embeds, pooled = bundle.encode(part)
                with torch.autocast("cpu", torch.bfloat16):
                    run = common.rollout(model, embeds, pooled, shape, sigmas, [seed + start + i for i in range(len(part))],
                                         0.0, guidance, negative)
                latents.append(run["states"][:, -1])
                prompts += part
    return torch.cat(latents), prompts


def sft(args):
    from peft import PeftModel
    teachers = common.parse_teachers(args.teachers)
    common.check_same_layout(teachers)
    files = {"geneval": os.path.join(args.dataset, "geneval/train_metadata.jsonl"),
             "ocr": os.path.join(args.dataset, "ocr/train.txt")}
    if args.dataset == "dataset" and not os.path.isdir(args.dataset):
        toy.write_prompt_files(args.dataset)
    files.update(dict(part.split("=", 1) for part in filter(None, args.train_prompts.split(","))))
    missing = [t for t in teachers if t not in files]
    if missing:
        raise ValueError(f"no training prompt file for task(s) {missing}; pass --train-prompts task=FILE")
    torch.manual_seed(args.seed)
    bundle = common.load_model(args.model)
    guidance = args.guidance if args.guidance is not None else bundle.defaults["guidance_scale"]
    steps = args.sample_steps or bundle.defaults["eval_steps"]
    names = list(teachers)
    common.check_adapter_fits(bundle.transformer, teachers[names[0]])
    model = PeftModel.from_pretrained(bundle.transformer, teachers[names[0]], adapter_name=names[0])
    for name in names[1:]:
        common.load_adapter(model, teachers[name], name)
    latents, prompts = teacher_samples(bundle, model, teachers, files, args.samples_per_task, steps, guidance, args.seed)
    rank, alpha, targets = common.adapter_layout(teachers[names[0]])
    from peft import LoraConfig
    model.add_adapter("student", LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    model.set_adapter("student")
    common.freeze_all_but(model, "student")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    embeds, pooled = bundle.encode(prompts)
    generator = random.Random(args.seed)
    shift = bundle.scheduler.config.get("shift", 3.0)
    log, start = [], time.time()
    for step in tqdm(range(1, args.train_steps + 1), desc="sft"):
        idx = torch.tensor([generator.randrange(len(prompts)) for _ in range(args.batch_size)])
        keep = torch.rand(len(idx)) >= args.caption_dropout  # keep the empty-prompt branch of CFG in tune
        negative = bundle.encode([""])
        batch_embeds = torch.where(keep[:, None, None], embeds[idx], negative[0].expand(len(idx), -1, -1))
        batch_pooled = torch.where(keep[:, None], pooled[idx], negative[1].expand(len(idx), -1))
        loss = common.flow_matching_loss(model, latents[idx], batch_embeds, batch_pooled, shift, args.bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    common.save_adapter(model, "student", os.path.join(args.out, "adapter"))
    print(f"wrote {args.out}/adapter (SFT on {len(prompts)} teacher samples, final loss "
          f"{sum(r['loss'] for r in log[-20:]) / len(log[-20:]):.4f} over the last 20 steps)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["merge", "sft"])  # the cold start
    p.add_argument("--model", default="miniature/base")  # base model folder or hub id (paper: SD3.5-M)
    p.add_argument("--teachers", required=True)  # task=peft_folder,... (Stage 1 adapters or published LoRAs)
    p.add_argument("--out", required=True)  # run folder; the result is OUT/adapter
    p.add_argument("--rule", choices=["delta", "svd", "ab"], default="delta")  # merge rule (M6)
    p.add_argument("--weights", default="")  # merge weights in --teachers order (default: uniform)
    p.add_argument("--svd-rank", type=int, default=None)  # rank of the svd merge (default: the teachers')
    p.add_argument("--dataset", default="dataset")  # folder of the default training prompt files
    p.add_argument("--train-prompts", default="")  # task=FILE,... overriding the dataset's files
    p.add_argument("--samples-per-task", type=int, default=256)  # teacher samples per task for SFT
    p.add_argument("--sample-steps", type=int, default=None)  # teacher ODE steps (default: the model's eval steps)
    p.add_argument("--guidance", type=float, default=None)  # CFG of the teacher samples (default: the model's)
    p.add_argument("--train-steps", type=int, default=200)  # SFT optimizer steps
    p.add_argument("--batch-size", type=int, default=32)  # SFT batch size
    p.add_argument("--lr", type=float, default=3e-4)  # SFT learning rate
    p.add_argument("--caption-dropout", type=float, default=0.1)  # fraction of SFT samples trained unconditioned
    p.add_argument("--no-bf16", dest="bf16", action="store_false")  # fp32 instead of bf16 autocast
    p.add_argument("--seed", type=int, default=0)  # prompt choice, noise
    args = p.parse_args(argv)
    merge(args) if args.method == "merge" else sft(args)


if __name__ == "__main__":
    main()
