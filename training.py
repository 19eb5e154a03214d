"""Training plumbing shared by the stages, eval.py and lab/commands.py: the model flags and loader for both
worlds, command-line checks, the student and its EMA, checkpoints and the epoch bookkeeping, several
processes (torchrun), and image grids. The method itself is in common.py.
"""
import argparse
import atexit
import dataclasses
import json
import math
import os
import platform
import random
import re
import sys

import numpy as np
import torch
from PIL import Image

import common
import loading
import miniature.model


# ----------------------------------------------------------------------------------------------
# One base model from the flags: the real SD3 pipeline or the miniature model


def add_model_arguments(p):
    """The flags every stage and eval.py share to choose and place the base model."""
    p.add_argument("--model", default="miniature/base",
                   help="miniature folder, SD3 pipeline folder or hub id (paper: "
                        "stabilityai/stable-diffusion-3.5-medium)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where everything runs")
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"], default=None,
                   help="frozen base weights (default: bf16 on GPU, fp32 on CPU); LoRA stays fp32")
    p.add_argument("--no-t5", action="store_true",
                   help="SD3: leave T5-XXL out (9 GiB less; only the CLIP encoders read prompts, 128 zero rows stand for "
                        "T5's, as in diffusers). The published teachers were trained WITH T5 (128 tokens): without it "
                        "they and the base leave their training conditioning")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute transformer blocks in backward: less memory, ~1.3x time")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image side in pixels (default: the model's; paper: 512)")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated LoRA modules of a new adapter (default: the model's; SD3: Flow-GRPO's 8)")
    p.add_argument("--train-precision", choices=["bf16", "fp32"], default=None,
                   help='passes with gradients: bf16 autocast or fp32 (default: bf16 with bf16 weights; fp32 with '
                        'fp32 weights: bf16 autocast was 1.5x slower on one CPU, 1.07x faster on another, '
                        'docs/speed.md)')
    p.add_argument("--sample-precision", choices=["bf16", "fp32"], default=None,
                   help="no-grad passes: rollouts, SFT samples (Stage 3's teacher/anchor velocities follow "
                        "--train-precision); default bf16 on bf16 weights or where it is fast (common.bf16_is_fast), "
                        "else fp32")
    p.add_argument("--eval-precision", choices=["bf16", "fp32"], default=None,
                   help="test evaluations (eval.py, in-training); default fp32 with fp32 weights: the same adapter "
                        "scores the same on every CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (worth it on GPU; on a 2-core CPU its compile time exceeds its "
                        "gain at miniature budgets, BENCHMARKS.md)")


def load_model(path_or_id, device="cpu", dtype=torch.float32, text_encoder_3=True):
    """A ModelBundle from a diffusers StableDiffusion3Pipeline folder or hub id (T5 may be absent),
    or from a miniature model folder (made by `python -m lab pretrain`)."""
    path = str(path_or_id)
    if os.path.isfile(os.path.join(path, "miniature.json")):
        return miniature.model.load_miniature(path, device, dtype)
    if os.path.isfile(os.path.join(path, "model_index.json")) or (not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
        return loading.load_sd3(path, device, dtype, text_encoder_3)
    raise loading.UserError(f"cannot load model {path!r}: expected a miniature model folder (with miniature.json), "
                     f"a diffusers StableDiffusion3Pipeline folder (with model_index.json) or a hub id like "
                     f"'stabilityai/stable-diffusion-3.5-medium'")


def load_model_from_args(args):
    """load_model with the flags of add_model_arguments; fills args.resolution and args.lora_targets."""
    dtype = args.model_dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    bundle = load_model(args.model, args.device, getattr(torch, dtype), text_encoder_3=not args.no_t5)
    if args.gradient_checkpointing:
        bundle.transformer.enable_gradient_checkpointing()
    if args.resolution is not None:
        factor = bundle.resolution // bundle.latent_shape(bundle.resolution)[-1]
        patch = bundle.transformer.config.patch_size * factor
        if args.resolution <= 0 or args.resolution % patch:
            raise loading.UserError(f"--resolution {args.resolution} is not a positive multiple of {patch} (VAE factor "
                             f"{factor} x patch size); expected e.g. {bundle.resolution}")
        bundle = dataclasses.replace(bundle, resolution=args.resolution)
    args.resolution = bundle.resolution
    args.lora_targets = tuple(args.lora_targets.split(",")) if args.lora_targets else bundle.defaults["lora_targets"]
    for flag in ("train_precision", "sample_precision", "eval_precision"):  # autocast off on bf16 weights = a dtype clash
        if getattr(args, flag) == "fp32" and dtype == "bfloat16":
            raise loading.UserError(f"--{flag.replace('_', '-')} fp32 needs fp32 base weights (the weights are bf16, the "
                             f"default on {args.device}); expected --model-dtype float32 with it")
    args.train_bf16 = (args.train_precision or ("bf16" if dtype == "bfloat16" else "fp32")) == "bf16"
    args.sample_bf16 = (args.sample_precision or ("bf16" if dtype == "bfloat16" or common.bf16_is_fast(args.device) else "fp32")) == "bf16"
    args.eval_bf16 = (args.eval_precision or ("bf16" if dtype == "bfloat16" else "fp32")) == "bf16"
    if args.compile:
        bundle.transformer.compile()  # in place: LoRA layers added later are traced too; one graph per adapter state
    return bundle


def sampling_defaults(args, bundle):
    """Fills the guidance and eval settings left unset with the model's, and the negative prompt."""
    args.guidance = args.guidance if args.guidance is not None else bundle.defaults["guidance_scale"]
    args.eval_guidance = args.eval_guidance if args.eval_guidance is not None else bundle.defaults["guidance_scale"]
    args.eval_steps = args.eval_steps or bundle.defaults["eval_steps"]
    args.negative = bundle.encode([""])  # CFG's empty prompt, also for --nft-guidance when sampling is unguided


# ----------------------------------------------------------------------------------------------
# Command lines: every flag explains itself; a user error is one line and exit status 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written and each flag's default after its help (unless the
    help already says what an unset flag does)."""

    def _get_help_string(self, action):
        unset = any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.default == "" \
            or "default" in (action.help or "")
        return action.help if unset or not action.option_strings else f"{action.help} (default: %(default)s)"


def parser(description, prog=None):
    """The ArgumentParser of every entry point: HelpFormatter, and a bad flag value reported like any
    other user error (fail), in one line with exit status 2. `prog`: the usage's program name when it is
    not the script's file name (a package run with `python -m`)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.error = fail
    return p


def fail(message):
    """A user error: `error: <message>` as one line on stderr, exit status 2 (argparse's for a bad flag)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(2)


def run_cli(main):
    """Runs an entry point: a UserError (a bad value, file, prompt, task or server) or a missing file
    prints one line and exits 2; any other exception is a bug and keeps its traceback."""
    try:
        main()
    except (loading.UserError, FileNotFoundError) as err:
        fail(err)


def _number(text, kind, ok, expected):
    """`text` parsed by `kind` if ok(value), else argparse's error naming the value and what was expected."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
    return value


def positive_int(text):
    """A count that must be >= 1 (epochs, steps, batch sizes, ranks)."""
    return _number(text, int, lambda v: v >= 1, "a positive integer; expected 1 or more")


def nonnegative_int(text):
    """A count that may be 0 (0 usually turns a feature off)."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    """A finite number > 0 (learning rates, clip ranges, timeouts)."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def nonnegative_float(text):
    """A finite number >= 0 (loss weights, noise levels, CFG scales)."""
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def probability(text):
    """A number in [0, 1): EMA decays, dropout rates."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


# ----------------------------------------------------------------------------------------------
# The student and its moving average


def make_policy(transformer, rank=32, alpha=64, init=None, targets=loading.FLOW_GRPO_LORA_TARGETS, extra_rank=0, extra_targets=()):
    """A PeftModel with the trainable adapter "student" (a fresh LoRA, or the peft folder `init`, e.g. a Stage 2
    cold start, widened: widen_student) and "ema", its moving average (what is evaluated and published)."""
    if init:
        from peft import PeftModel
        init = loading.resolve_adapter(init)
        if not os.path.isfile(os.path.join(str(init), "adapter_config.json")):
            raise FileNotFoundError(f"initial adapter folder {str(init)!r} has no adapter_config.json; expected a "
                                    f"peft folder (e.g. a stage2_coldstart.py output)")
        loading.check_adapter_fits(transformer, init)
        widen = bool(extra_rank or extra_targets)
        policy = PeftModel.from_pretrained(transformer, str(init), adapter_name="cold" if widen else "student", is_trainable=True)
        if widen:  # more capacity, the same start
            widen_student(policy, "cold", extra_rank, extra_targets)
    elif extra_rank or extra_targets:
        raise loading.UserError(f"extra rank {extra_rank} / extra targets {list(extra_targets)} widen an initial adapter; expected --init")
    else:
        policy = loading.add_lora(transformer, rank, alpha, targets)
    policy.add_adapter("ema", policy.peft_config["student"])
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in lora_state(policy, "student").items():
            params[name.replace(".student.", ".ema.")].copy_(value)
    loading.freeze_all_but(policy, "student")
    return policy.eval()  # no dropout anywhere; and peft's mixed-adapter batches run in eval mode only


def widen_student(policy, source, extra_rank=0, extra_targets=()):
    """Makes the trainable "student" the LoRA `source` (rank r) grown to rank r + extra_rank and to the layers
    `extra_targets`, the same function: its A and B fill the first r components, new components and layers
    have B = 0 (A as a fresh LoRA's), alpha grows with r (alpha / r kept); `source` is deleted."""
    config, names = policy.peft_config[source], [n for n, _ in policy.get_base_model().named_modules()]
    if config.use_rslora or config.rank_pattern or config.alpha_pattern:  # their scale is not alpha / r
        raise loading.UserError(f"--extra-rank / --extra-targets need a plain LoRA; the initial one has use_rslora="
                               f"{config.use_rslora}, rank_pattern={config.rank_pattern}, alpha_pattern={config.alpha_pattern}")
    unknown = [t for t in extra_targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise loading.UserError(f"extra LoRA targets {unknown} name no layer of this model; expected e.g. attn.add_k_proj")
    policy.add_adapter("student", dataclasses.replace(
        config, r=config.r + extra_rank, lora_alpha=config.lora_alpha * (config.r + extra_rank) / config.r,
        init_lora_weights="gaussian", target_modules=sorted(set(config.target_modules) | set(extra_targets)),
        inference_mode=False))
    with torch.no_grad():
        for name, value in lora_state(policy, source).items():
            wide = policy.get_parameter(name.replace(f".{source}.", ".student."))
            if ".lora_B." in name:
                wide.zero_()  # the new components start silent
            wide[tuple(slice(0, n) for n in value.shape)].copy_(value)  # A: rows 0..r-1; B: columns 0..r-1
    policy.set_adapter("student")
    policy.delete_adapter(source)


def lora_state(policy, adapter):
    """{parameter name: detached copy} of one adapter's LoRA weights."""
    return {n: p.detach().clone() for n, p in policy.named_parameters() if f".{adapter}." in n}


def update_ema(policy, decay, target="ema"):
    """target <- decay * target + (1 - decay) * student, over the LoRA weights (decay 0: a copy)."""
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{target}." in name:
                param.lerp_(params[name.replace(f".{target}.", ".student.")], 1 - decay)


def ema_decay(decay, updates):
    """The published EMA's decay at its `updates`-th update (1, 2, ...), bias-corrected like Adam's moments:
    d_t = decay (1 - decay^(t-1)) / (1 - decay^t). After N updates the "ema" adapter is then
        ema_N = sum_k w_k student_k,   w_k = (1 - decay) decay^(N-k) / (1 - decay^N),   k = 1..N,
    the students after each update: the starting adapter (a cold start or a fresh LoRA) has weight 0 from
    the first update on, so a short run cannot publish its start. decay 0 publishes the student itself."""
    return 0.0 if decay == 0 else decay * (1 - decay ** (updates - 1)) / (1 - decay ** updates)


def epoch_lr(lr, schedule, epoch, epochs):
    """The learning rate of every update in `epoch` (1..epochs): `lr` when "constant"; when "cosine"
        lr_e = lr (1 + cos(pi (e - 1) / E)) / 2,
    lr in the first epoch, lr / 2 halfway (e = E/2 + 1), lr (1 - cos(pi / E)) / 2 ~ 0 in the last. Set per epoch
    from the epoch number alone, so a resumed run follows the same schedule."""
    if schedule == "constant":
        return lr
    return lr * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


def set_epoch_lr(optimizer, args, epoch):
    """Every parameter group's lr for `epoch` (epoch_lr with --lr, --lr-schedule, --epochs). Returns it."""
    lr = epoch_lr(args.lr, args.lr_schedule, epoch, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def update_published_ema(policy, optimizer, decay):
    """After an optimizer step: "ema" <- the bias-corrected EMA of the student (ema_decay). The updates are
    counted in the optimizer's first parameter group, which its state_dict carries into checkpoints, so a
    resumed run continues the same average."""
    group = optimizer.param_groups[0]
    group["ema_updates"] = group.get("ema_updates", 0) + 1
    update_ema(policy, ema_decay(decay, group["ema_updates"]))


# ----------------------------------------------------------------------------------------------
# Checkpoints and the epoch bookkeeping of every stage


RUN_ADAPTERS = ("student", "ema", "old")  # the adapters a run changes; teachers and anchors stay in their folders


def save_checkpoint(folder, policy, optimizer, epoch, rng, log):
    """Atomic OUT/checkpoint: the run's adapters (student, EMA and NFT's sampling policy "old" where there is
    one; peft folders), optimizer, RNG states, epoch, log."""
    names = [name for name in RUN_ADAPTERS if name in policy.peft_config]
    def write(tmp):
        policy.save_pretrained(tmp, selected_adapters=names)
        torch.save({"adapters": {name: lora_state(policy, name) for name in names},
                    "optimizer": optimizer.state_dict(), "epoch": epoch, "log": log, "python_rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()},
                   os.path.join(tmp, "state.pt"))
    loading.atomic_write_dir(os.path.join(folder, "checkpoint"), write)


def load_checkpoint(folder, policy, optimizer, rng):
    """Restores what save_checkpoint wrote; returns (epoch, log). A clear error if it was written for
    another model or LoRA shape."""
    state = torch.load(os.path.join(folder, "checkpoint", "state.pt"), weights_only=False)
    params = dict(policy.named_parameters())
    saved = {name: value for adapter in state["adapters"].values() for name, value in adapter.items()}
    for name, value in saved.items():
        if name not in params or params[name].shape != value.shape:
            raise loading.UserError(f"checkpoint {folder}/checkpoint does not fit this model and LoRA: {name} "
                             f"{tuple(value.shape)} vs {tuple(params[name].shape) if name in params else 'absent'}; "
                             f"expected the same --model, LoRA rank and targets (and --objective) as the run that wrote it")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    return state["epoch"], state["log"]


def epoch_list(text):
    """'4,8' -> [4, 8]: the --eval-at argument (epochs >= 0; '' = none)."""
    try:
        epochs = [int(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of epochs; expected e.g. '4,8'") from None
    if any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"{text!r} has a negative epoch; expected epochs >= 0 (0 = the untrained start)")
    return epochs


def add_run_arguments(p):
    """The flags stages 1 and 3 share: the run folder and length, the SDE sampler (M1), the update's
    clipping and EMA, evaluation, checkpoints and resume."""
    p.add_argument("--dataset", default="dataset", help="folder of the default prompt files")
    p.add_argument("--out", required=True, help="run folder: log, grids, checkpoint, final adapter")
    p.add_argument("--epochs", type=positive_int, default=20, help="sampling/training epochs")
    p.add_argument("--steps", type=positive_int, default=10, help="SDE steps per rollout (paper: 10)")
    p.add_argument("--noise-level", type=positive_float, default=0.7, help="a of M1 (paper: 0.7)")
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping (paper: 1.0)")
    p.add_argument("--ema", type=probability, default=0.9,
                   help="decay of the published adapter's EMA of the student, per optimizer update and bias-corrected "
                        "(training.ema_decay: the start weighs 0 after the first update); 0 publishes the student")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="the learning rate over the epochs (training.epoch_lr): constant, or a cosine decay to ~0 in the "
                        "last epoch, so that the published student is not one noisy step of a high-lr run")
    p.add_argument("--seed", type=int, default=0, help="prompts, noise")
    p.add_argument("--eval-every", type=nonnegative_int, default=5,
                   help="epochs between test evaluations, and after the last (0: no evaluation)")
    p.add_argument("--eval-at", type=epoch_list, default=None,
                   help="e.g. 4,8: evaluate only after these epochs (0 = the start), instead of --eval-every")
    p.add_argument("--eval-steps", type=positive_int, default=None,
                   help="ODE steps at eval (default: the model's; paper: 40)")
    p.add_argument("--eval-guidance", type=nonnegative_float, default=None,
                   help="CFG at eval (default: the model's; paper: 4.5)")
    p.add_argument("--save-every", type=nonnegative_int, default=1,
                   help="epochs between atomic checkpoints (OUT/checkpoint), whatever the evaluation schedule: a "
                        "killed run resumed with --resume redoes at most this many epochs (0: no checkpoints)")
    p.add_argument("--max-bad-epochs", type=positive_int, default=3,
                   help="consecutive non-finite epochs before stopping")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint; the result equals an uninterrupted run's")


def evaluation_due(args, epoch):
    """Whether the test scores are taken after `epoch` (0 = the untrained start): at the --eval-at epochs
    when given (pipeline.py: only the curve's inner points, as eval.py scores the ends), else every
    --eval-every epochs and at the last one (--eval-every 0: never)."""
    if args.eval_at is not None:
        return epoch in args.eval_at
    return args.eval_every > 0 and (epoch % args.eval_every == 0 or epoch == args.epochs)


def checkpoint_due(args, epoch):
    """Whether OUT/checkpoint is written after `epoch`: every --save-every epochs and after the last one
    (--save-every 0: never), independent of the evaluations, so that a killed run loses little."""
    return args.save_every > 0 and (epoch % args.save_every == 0 or epoch == args.epochs)


def start_run(args, policy, optimizer, rng, evaluate):
    """Resumes from OUT/checkpoint with --resume, else starts OUT/log.jsonl with the untrained
    policy's test scores (`evaluate(None)`, where evaluation_due at epoch 0). Returns (last finished epoch, log)."""
    os.makedirs(args.out, exist_ok=True)
    if args.resume and os.path.isdir(os.path.join(args.out, "checkpoint")):
        epoch, log = load_checkpoint(args.out, policy, optimizer, rng)
        print(f"resumed from {args.out}/checkpoint at epoch {epoch}")
    else:
        epoch = 0
        log = [{"epoch": 0, "trajectories": 0, **({"eval": evaluate(None)} if evaluation_due(args, 0) and args.rank == 0 else {})}]
    if args.rank == 0:  # only the first process evaluates and writes; records after the checkpoint are redone
        with open(os.path.join(args.out, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in log)
    return epoch, log


def end_epoch(args, record, log, policy, optimizer, rng, finite, bad_epochs, evaluate):
    """The stages' shared end of an epoch: the test scores (`evaluate(png_path)`) where evaluation_due;
    the record appended to the log and OUT/log.jsonl; an atomic checkpoint where checkpoint_due; a clear
    stop after --max-bad-epochs non-finite epochs in a row, the last good checkpoint kept."""
    epoch = record["epoch"]
    evaluating = evaluation_due(args, epoch)
    first = args.rank == 0  # only the first process evaluates and writes
    if evaluating and first:
        record["eval"] = evaluate(os.path.join(args.out, f"samples_epoch{epoch:04d}.png"))
    log.append(record)
    if first:
        from tqdm import tqdm
        tqdm.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}))
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    if bad_epochs >= args.max_bad_epochs:
        raise SystemExit(f"stopping: {bad_epochs} epochs in a row had a non-finite loss or reward; the last "
                         f"good checkpoint is {args.out}/checkpoint")
    if finite and checkpoint_due(args, epoch) and first:
        save_checkpoint(args.out, policy, optimizer, epoch, rng, log)


def finish_run(args, policy, what):
    """A stage's last step: the EMA adapter published as OUT/adapter (peft format) by the first process."""
    if args.rank == 0:
        loading.save_adapter(policy, "ema", os.path.join(args.out, "adapter"))
        print(f"wrote {args.out}/adapter ({what}, peft format)")
    end_distributed(args)


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun): every process draws the same global batch and keeps its shard;
# rewards are gathered, gradients and statistics summed, so the run equals the single-process one


def init_distributed(args):
    """Under `torchrun --nproc_per_node N`: joins the process group (nccl on GPU, gloo on CPU) and puts
    this process on its own GPU. Sets args.rank and args.world (0 and 1 without torchrun)."""
    args.rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world > 1 and not torch.distributed.is_initialized():
        cuda = str(args.device).startswith("cuda")
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:
                raise loading.UserError(f"process {local_rank} of {os.environ.get('LOCAL_WORLD_SIZE')} on this machine has no GPU "
                                 f"({gpus} visible); expected --nproc_per_node <= the GPU count, "
                                 f"or --device cpu")
            args.device = f"cuda:{local_rank}"
            torch.cuda.set_device(args.device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())


def start_processes(args, **global_batches):
    """A training stage's start under torchrun (or alone): joins the process group, checks that every global
    batch splits over the processes, sets args.local_batch_size (this process's share of --train-batch-size),
    seeds torch, and returns the Python RNG that every process shares, so that all draw the same global batch."""
    init_distributed(args)
    check_divisible(args, **global_batches)
    args.local_batch_size = args.train_batch_size // args.world
    torch.manual_seed(args.seed)
    return random.Random(args.seed)


def end_distributed(args):
    """A multi-process run's last step: every process waits until rank 0 has written its results, then
    all leave the group together. A process that left while another still held the group sometimes
    aborted in gloo's teardown ("terminate called without an active exception", exit code -6: twice
    in about 30 two-process test runs), failing the whole torchrun job after its work was done."""
    if args.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def check_divisible(args, **sizes):
    """Every global batch size must split evenly over the processes (else the shards, and the mean
    the single-process run takes, would differ)."""
    for flag, size in sizes.items():
        if size % args.world:
            raise loading.UserError(f"--{flag.replace('_', '-')} {size} does not split over {args.world} processes; "
                             f"expected a multiple of {args.world}")


def shard(items, args):
    """This process's share of a global batch: items rank, rank + world, rank + 2 world, ... Shards of
    consecutive chunks of the global batch are consecutive chunks of the shard."""
    return items[args.rank::args.world]


def gather(values, args):
    """The inverse of shard(): the global batch, in its order, from every process's shard (a tensor)."""
    if args.world == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(args.world)]
    torch.distributed.all_gather(parts, values.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)  # global item k * world + r is shard r's item k


def all_reduce(values, args, op="sum"):
    """A float tensor summed (or "min", "max") over processes; unchanged with one process."""
    if args.world > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
               "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(values, ops[op])
    return values


def sync_gradients(params, args):
    """Sums the gradients over processes in one call. Each process's loss is its shard's share of the
    global mean (a sum over its items / the global count), so the sum is the single-process gradient.
    (torch's DistributedDataParallel does the same per backward; here the gradients of all N steps of
    a chunk are accumulated first, and peft's adapter switching needs the bare model, so one explicit
    all-reduce per optimizer step is simpler and sends less.)"""
    if args.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad)
        offset += grad.numel()


def optimizer_step(params, optimizer, args, max_grad_norm=None, policy=None):
    """The stages' update: gradients summed over processes (sync_gradients), clipped to
    `max_grad_norm` (default --max-grad-norm), one optimizer step; with `policy`, its published EMA
    follows the update (update_published_ema with --ema)."""
    sync_gradients(params, args)
    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if max_grad_norm is None else max_grad_norm)
    optimizer.step()
    if policy is not None:
        update_published_ema(policy, optimizer, args.ema)


# ----------------------------------------------------------------------------------------------
# Pictures


def image_grid(images, columns=8):
    """A PIL grid of (B, 3, H, W) images, uint8 or floats in [0, 1], with a grey 1-px border."""
    images = images.detach().cpu()
    images = (images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8))
    images = images.numpy().transpose(0, 2, 3, 1)
    rows = math.ceil(len(images) / columns)
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 128, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = image
    return Image.fromarray(grid)


def cpu_model():
    """The CPU's model name (/proc/cpuinfo): two 2-core AVX-512 machines, a Xeon and an EPYC, differ 1.4x in speed."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
