"""The one shared module of flow-opd: model loading, the SDE sampler, the per-step KL, the router,
LoRA adapters on one base model, and small I/O helpers. Equation numbers (M1, M3, ...) refer to
METHOD.md (kept in the project's shared notes and summarised in README.md).

Conventions (diffusers' SD3): sigma = 1 is noise, sigma = 0 is data, x_sigma = (1-sigma) x0 + sigma eps,
the model predicts the velocity eps - x0 and is fed timestep = 1000 sigma. Log-probabilities are
AVERAGED over dimensions (the released Flow-GRPO convention, to which its PPO clip range is
calibrated); the KL has both weightings (M3).
"""
import argparse
import atexit
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from typing import Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers warns about torchvision on import
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no per-shard bars for megabyte models
import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Model bundle: one loader for the real SD3 pipeline folder and the miniature model folder


@dataclasses.dataclass
class ModelBundle:
    transformer: torch.nn.Module        # SD3Transformer2DModel: velocity v(x, 1000 sigma, text)
    scheduler: object                   # FlowMatchEulerDiscreteScheduler: gives the sigmas
    encode: Callable                    # list[str] -> (embeds (B, T, D), pooled (B, P)), no grad
    decode: Callable                    # latents -> images (B, 3, H, W) in [0, 1], no grad
    latent_shape: Callable              # resolution (px) -> (C, h, w)
    resolution: int                     # the model's native resolution in pixels
    kind: str                           # "miniature" or "sd3"
    path: str
    defaults: dict = dataclasses.field(default_factory=lambda: {"eval_steps": 40, "guidance_scale": 4.5,  # paper's
                                                                "lora_targets": FLOW_GRPO_LORA_TARGETS})


# The published Flow-GRPO teachers' LoRA layout (r 32, alpha 64, Gaussian init) on SD3's joint attention
FLOW_GRPO_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                          "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
MINIATURE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # what the miniature results were trained with


def add_model_arguments(p):
    """The flags every stage and eval.py share to choose and place the base model."""
    p.add_argument("--model", default="miniature/base")  # miniature folder, SD3 pipeline folder or hub id (paper: stabilityai/stable-diffusion-3.5-medium)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")  # where everything runs
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"], default=None)  # frozen base weights (default: bf16 on GPU, fp32 on CPU); LoRA stays fp32
    p.add_argument("--no-t5", action="store_true")  # SD3: leave T5-XXL out (9 GiB less; only the CLIP encoders read prompts)
    p.add_argument("--gradient-checkpointing", action="store_true")  # recompute transformer blocks in backward: less memory, ~1.3x time
    p.add_argument("--resolution", type=int, default=None)  # image side in pixels (default: the model's; paper: 512)
    p.add_argument("--lora-targets", default=None)  # comma-separated LoRA modules of a new adapter (default: the model's; SD3: Flow-GRPO's 8)
    p.add_argument("--train-precision", choices=["bf16", "fp32"], default=None)  # passes with gradients: bf16 autocast or fp32 (default: bf16 with bf16 weights; fp32 with fp32 weights: bf16 autocast was 1.5x slower on one CPU, 1.07x faster on another, README "Speed")
    p.add_argument("--sample-precision", choices=["bf16", "fp32"], default=None)  # no-grad passes: rollouts, SFT samples (Stage 3's teacher/anchor velocities follow --train-precision); default bf16 on bf16 weights or where it is fast (common.bf16_is_fast), else fp32
    p.add_argument("--eval-precision", choices=["bf16", "fp32"], default=None)  # test evaluations (eval.py, in-training); default fp32 with fp32 weights: the same adapter scores the same on every CPU
    p.add_argument("--compile", action="store_true")  # torch.compile the transformer (worth it on GPU; on a 2-core CPU its compile time exceeds its gain at miniature budgets, BENCHMARKS.md)


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
            raise ValueError(f"--resolution {args.resolution} is not a positive multiple of {patch} (VAE factor "
                             f"{factor} x patch size); expected e.g. {bundle.resolution}")
        bundle = dataclasses.replace(bundle, resolution=args.resolution)
    args.resolution = bundle.resolution
    args.lora_targets = tuple(args.lora_targets.split(",")) if args.lora_targets else bundle.defaults["lora_targets"]
    for flag in ("train_precision", "sample_precision", "eval_precision"):  # autocast off on bf16 weights = a dtype clash
        if getattr(args, flag) == "fp32" and dtype == "bfloat16":
            raise ValueError(f"--{flag.replace('_', '-')} fp32 needs fp32 base weights (the weights are bf16, the "
                             f"default on {args.device}); expected --model-dtype float32 with it")
    args.train_bf16 = (args.train_precision or ("bf16" if dtype == "bfloat16" else "fp32")) == "bf16"
    args.sample_bf16 = (args.sample_precision or ("bf16" if dtype == "bfloat16" or bf16_is_fast(args.device) else "fp32")) == "bf16"
    args.eval_bf16 = (args.eval_precision or ("bf16" if dtype == "bfloat16" else "fp32")) == "bf16"
    if args.compile:
        bundle.transformer.compile()  # in place: LoRA layers added later are traced too; one graph per adapter state
    return bundle


def bf16_is_fast(device="cpu"):
    """Whether bf16 matmuls run natively: on a GPU, or a CPU with AVX512-BF16/AMX. Elsewhere oneDNN emulates
    them, ~100x slower than fp32 (measured on a 2-core AVX2 EPYC: 0.9 against 111 GFLOP/s), so every
    default that picks bf16 for speed asks this first."""
    if torch.device(device).type != "cpu":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device, bf16):
    """bf16 autocast on `device` (a torch.device or tensor's device) when `bf16`, else full precision."""
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)


def load_model(path_or_id, device="cpu", dtype=torch.float32, text_encoder_3=True):
    """A ModelBundle from a diffusers StableDiffusion3Pipeline folder or hub id (T5 may be absent),
    or from a miniature model folder (made by `toy.py pretrain`)."""
    path = str(path_or_id)
    if os.path.isfile(os.path.join(path, "miniature.json")):
        return load_miniature(path, device, dtype)
    if os.path.isfile(os.path.join(path, "model_index.json")) or (not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
        return load_sd3(path, device, dtype, text_encoder_3)
    raise ValueError(f"cannot load model {path!r}: expected a miniature model folder (with miniature.json), "
                     f"a diffusers StableDiffusion3Pipeline folder (with model_index.json) or a hub id like "
                     f"'stabilityai/stable-diffusion-3.5-medium'")


def load_miniature(folder, device="cpu", dtype=torch.float32):
    """The miniature model: pixel-space SD3 transformer, tiny CLIP text encoder, exact decoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerFast
    with open(os.path.join(folder, "miniature.json")) as f:
        config = json.load(f)
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype).to(device)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype).to(device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, "tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    codec = None
    if config["space"] == "pca":
        from safetensors.torch import load_file
        codec = load_file(os.path.join(folder, "latent.safetensors"), device=str(device))

    @torch.no_grad()
    def encode(prompts):
        return encode_miniature(text_encoder, tokenizer, prompts, config["max_tokens"])

    @torch.no_grad()
    def decode(latents):
        return pixels_to_images(latents if codec is None else pca_decode(latents, codec))

    return ModelBundle(transformer, scheduler, encode, decode, miniature_latent_shape(transformer, codec),
                       config["resolution"], "miniature", str(folder),
                       {"eval_steps": config["eval_steps"], "guidance_scale": config["guidance_scale"],
                        "lora_targets": MINIATURE_LORA_TARGETS})


def miniature_latent_shape(transformer, codec):
    """resolution -> (C, h, w): pixels, or the PCA latent at 1/factor of the resolution."""
    channels = transformer.config.in_channels
    factor = 1 if codec is None else int(codec["factor"])
    return lambda res: (channels, res // factor, res // factor)


def encode_miniature(text_encoder, tokenizer, prompts, max_tokens):
    """Prompt embeddings of the miniature model (differentiable: pretraining trains the encoder)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_tokens, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    out = text_encoder(ids)
    return out.last_hidden_state, out.text_embeds


def pixels_to_images(x):
    """Pixels in [-1, 1] -> images in [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def pca_encode(pixels, codec):
    """A linear, near-exact latent space: each f x f x 3 pixel patch (pixels in [-1, 1]) projected on
    k principal components, times a global scale: (B, 3, H, W) -> (B, k, H/f, W/f)."""
    f = int(codec["factor"])
    b, _, height, width = pixels.shape
    patches = pixels.float().permute(0, 2, 3, 1).reshape(b, height // f, f, width // f, f, 3)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(b, height // f, width // f, f * f * 3)
    return ((patches - codec["mean"]) @ codec["basis"].T * codec["scale"]).permute(0, 3, 1, 2)


def pca_decode(latents, codec):
    """Inverse of pca_encode (exact on the span of the components): (B, k, h, w) -> (B, 3, h f, w f)."""
    f = int(codec["factor"])
    b, _, h, w = latents.shape
    patches = latents.float().permute(0, 2, 3, 1) / codec["scale"] @ codec["basis"] + codec["mean"]
    return patches.reshape(b, h, w, f, f, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * f, w * f)


def load_sd3(path_or_id, device="cpu", dtype=torch.float32, text_encoder_3=True, max_sequence_length=None):
    """The real model (SD3 / SD3.5) from a diffusers pipeline folder or hub id. Without T5 only the
    two CLIP encoders run and a single zero T5 row is appended (diffusers pads 256 zero rows)."""
    from diffusers import StableDiffusion3Pipeline
    has_t5 = text_encoder_3
    index = os.path.join(str(path_or_id), "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            has_t5 = has_t5 and (json.load(f).get("text_encoder_3") or [None])[0] is not None
    extra = {} if has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path_or_id, dtype=dtype, **extra).to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.eval().requires_grad_(False)
    seq_len = max_sequence_length or (128 if has_t5 else 1)

    @torch.no_grad()
    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=seq_len)
        return embeds, pooled

    @torch.no_grad()
    def decode(latents):
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return (pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    factor = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    resolution = min(512, pipe.transformer.config.sample_size * factor)  # the paper trains SD3.5-M at 512 px
    return ModelBundle(pipe.transformer, pipe.scheduler, encode, decode,
                       lambda res: (channels, res // factor, res // factor), resolution, "sd3", str(path_or_id))


# ----------------------------------------------------------------------------------------------
# Velocity with optional classifier-free guidance (the one helper every stage calls)


def velocity(model, x, sigma, embeds, pooled, guidance_scale=1.0, negative=None, **model_kwargs):
    """v = v_uncond + w (v_cond - v_uncond) (METHOD.md §0); one batched call, or a single conditional
    call when w == 1. `negative` is (embeds, pooled) of the empty prompt, batch 1 or B. `sigma` is a
    float or a (B,) tensor; the model is fed timestep = 1000 sigma."""
    batch = x.shape[0]
    names = model_kwargs.get("adapter_names")
    if names is not None and len(names) != batch:  # peft would raise AND leave its hooks attached
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch}; expected one per sample")
    timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device) * 1000).expand(batch)
    if guidance_scale == 1.0:
        return model(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                     timestep=timestep, return_dict=False, **model_kwargs)[0]
    if negative is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the negative (empty) prompt embeddings")
    neg_embeds, neg_pooled = (t.expand(batch, *t.shape[1:]) for t in negative)
    doubled = {k: (v + v if isinstance(v, list) else v) for k, v in model_kwargs.items()}  # e.g. adapter_names
    out = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([neg_embeds, embeds]),
                pooled_projections=torch.cat([neg_pooled, pooled]), timestep=torch.cat([timestep, timestep]),
                return_dict=False, **doubled)[0]
    v_uncond, v_cond = out.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


# ----------------------------------------------------------------------------------------------
# The SDE step with log-probability (M1) and the per-step KL (M3)


def sampling_sigmas(scheduler, num_steps):
    """sigma_0 = 1 > sigma_1 > ... > sigma_N = 0 of the scheduler (its shift applied), float32 (N+1,)."""
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.detach().float().cpu().clone()


def _as_batch(value, like):
    """A scalar or (B,) sigma as a tensor broadcastable against x (B, ...)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() else value


def sde_std(sigma, sigma_next, sigma_1, noise_level):
    """s_j = a sqrt(sigma_j / (1 - sigma~_j)) with sigma~_j = sigma_1 where sigma_j == 1 (M1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    safe = torch.where(sigma == 1, torch.as_tensor(sigma_1, dtype=torch.float32), sigma)
    return noise_level * torch.sqrt(sigma / (1 - safe))


def sde_step(x, v, sigma, sigma_next, sigma_1, noise_level, noise=None, x_next=None):
    """One Flow-GRPO SDE step (M1): returns (x_next, log_prob, mean, step_std).
      mu     = x (1 + s^2 D / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) D,   D = sigma_next - sigma
      x_next = mu + s sqrt|D| eps
      log p  = mean_d [ -(x_next - mu)^2 / (2 s^2 |D|) - log(s sqrt|D|) - log(2 pi) / 2 ]
    Pass `x_next` to score a stored transition instead of sampling one. With noise_level 0 the step
    is exactly the Euler ODE step x + v D and log_prob is None (a point mass has no density)."""
    x, v = x.float(), v.float()
    sigma_b, delta = _as_batch(sigma, x), _as_batch(sigma_next, x) - _as_batch(sigma, x)
    if noise_level == 0:
        mean = x + v * delta
        return (mean if x_next is None else x_next), None, mean, torch.zeros_like(sigma_b)
    s = _as_batch(sde_std(sigma, sigma_next, sigma_1, noise_level), x)
    mean = x * (1 + s**2 / (2 * sigma_b) * delta) + v * (1 + s**2 * (1 - sigma_b) / (2 * sigma_b)) * delta
    step_std = s * torch.sqrt(-delta)
    if x_next is None:
        x_next = mean + step_std * (noise if noise is not None else torch.randn_like(x))
    log_prob = (-((x_next.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - 0.5 * math.log(2 * math.pi))
    return x_next, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, step_std


def step_kl(v_student, v_teacher, sigma, sigma_next, sigma_1, noise_level, weighting="paper"):
    """Reverse KL between the student's and the teacher's Gaussian steps from the same state (M3),
    per sample (B,):
      paper: KL_j = ||mu_s - mu_t||^2 / (2 s^2 |D|) = (|D| / 2) (c / s)^2 ||v_s - v_t||^2,
             c = 1 + s^2 (1 - sigma) / (2 sigma)
      code:  mean_d (mu_s - mu_t)^2 / (2 s^2)       = KL_j |D| / D_dims   (the released code)"""
    v_student, v_teacher = v_student.float(), v_teacher.float()
    sigma_b = _as_batch(sigma, v_student)
    delta = _as_batch(sigma_next, v_student) - sigma_b
    s = _as_batch(sde_std(sigma, sigma_next, sigma_1, noise_level), v_student)
    c = 1 + s**2 * (1 - sigma_b) / (2 * sigma_b)
    squared = ((c * delta * (v_student - v_teacher)) ** 2).flatten(1)  # (mu_s - mu_t)^2
    if weighting == "paper":
        return squared.sum(1) / (2 * s**2 * -delta).flatten()
    if weighting == "code":
        return squared.mean(1) / (2 * s**2).flatten()
    raise ValueError(f"unknown KL weighting {weighting!r}; expected 'paper' or 'code'")


def per_sample_noise(generators, shape, device="cpu"):
    """One standard normal draw of `shape` per sample, each from that sample's own generator, so a
    sample depends only on its seed (not on batch size or position)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def rollout(model, embeds, pooled, latent_shape, sigmas, seeds, noise_level=0.7, guidance_scale=1.0,
            negative=None, decode=None, init_seeds=None, **model_kwargs):
    """Batched SDE sampling of whole trajectories (M1), reproducible from one seed per sample.
    `noise_level`: one a for every step, or a list of N (0 = a deterministic ODE step, as outside
    Flow-GRPO-Fast's SDE window). `init_seeds`: seeds of the initial noise when it must differ from
    `seeds` (e.g. one start shared by a GRPO group). Returns {"states": (B, N+1, C, h, w) x_0..x_N,
    "log_probs": (B, N) (0 at ODE steps) or None (all ODE), "sigmas": (N+1,), "images": decode(x_N) or None}."""
    levels = list(noise_level) if isinstance(noise_level, (list, tuple)) else [noise_level] * (len(sigmas) - 1)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    starts = generators if init_seeds is None else [torch.Generator().manual_seed(int(s)) for s in init_seeds]
    x = per_sample_noise(starts, latent_shape, embeds.device)
    states, log_probs = [x], []
    for j in range(len(sigmas) - 1):
        v = velocity(model, x, sigmas[j], embeds, pooled, guidance_scale, negative, **model_kwargs)
        noise = per_sample_noise(generators, latent_shape, x.device) if levels[j] > 0 else None
        x, log_prob, _, _ = sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], levels[j], noise)
        states.append(x)
        log_probs.append(log_prob if log_prob is not None else torch.zeros(len(x), device=x.device))
    return {"states": torch.stack(states, 1), "sigmas": sigmas,
            "log_probs": torch.stack(log_probs, 1) if any(a > 0 for a in levels) else None,
            "images": decode(x) if decode is not None else None}


def rollout_chunks(model, embeds, pooled, latent_shape, sigmas, seeds, chunk_size, noise_level=0.7,
                   guidance_scale=1.0, negative=None, decode=None, bf16=True, init_seeds=None):
    """rollout() over chunks of `chunk_size` samples, bf16 autocast or not: with the same chunks and
    precision as a policy update that follows, it recomputes the stored log-probs bit for bit (the
    first PPO ratio is exactly 1). Returns rollout()'s dict for the whole batch."""
    chunks = []
    for start in range(0, len(seeds), chunk_size):
        part = slice(start, start + chunk_size)
        with autocast(embeds.device, bf16):
            chunks.append(rollout(model, embeds[part], pooled[part], latent_shape, sigmas, seeds[part], noise_level,
                                  guidance_scale, negative, decode, init_seeds[part] if init_seeds else None))
    out = {key: torch.cat([c[key] for c in chunks]) for key in ("states", "log_probs", "images")
           if chunks[0][key] is not None}
    return {"images": None, "log_probs": None, **out, "sigmas": sigmas}


# ----------------------------------------------------------------------------------------------
# Prompts and the hard router R(c) (METHOD.md §4)

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def load_prompts(path):
    """[(prompt, metadata or None)] from flow_grpo's formats: a GenEval metadata .jsonl (one JSON
    object with a "prompt" per line) or a .txt file (one prompt per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; expected a .jsonl of GenEval metadata "
                                f"or a .txt with one prompt per line")
    items = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    meta = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); expected one JSON object per line") from None
                if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
                    raise ValueError(f"{path}:{number}: expected a JSON object with a string \"prompt\", got {line.strip()[:80]!r}")
                items.append((meta["prompt"], meta))
            else:
                items.append((line.strip(), None))
    if not items:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return items


def route(prompt, metadata, tasks):
    """R(c): the task (teacher) of one prompt. From its metadata tag where present (a GenEval tag ->
    'geneval', or an explicit "task"), else by rule: quoted text -> 'ocr', otherwise 'geneval'.
    A prompt whose task is not among `tasks` is an error."""
    metadata = metadata or {}
    if "task" in metadata:
        task = metadata["task"]
    elif metadata.get("tag") in GENEVAL_TAGS:
        task = "geneval"
    elif metadata.get("tag") == "ocr" or re.search(r'"[^"]+"', prompt):
        task = "ocr"
    else:
        task = "geneval"
    if task not in tasks:
        raise ValueError(f"prompt {prompt!r} routes to task {task!r}, but the teachers are {sorted(tasks)}")
    return task


DEFAULT_PROMPT_FILES = {"geneval": {"train": "geneval/train_metadata.jsonl", "test": "geneval/test_metadata.jsonl"},
                        "ocr": {"train": "ocr/train.txt", "test": "ocr/test.txt"}}


def prompts_by_task(files, tasks, dataset, split):
    """{task: [(prompt, metadata)]}: the prompts of comma-separated `files` (or, when empty, the
    dataset's `split` files of `tasks`) grouped by the router. A prompt routed to a task outside
    `tasks`, or a task left with no prompt, is an error now rather than mid-run."""
    if dataset == "dataset" and not files and not os.path.isdir(dataset):
        import toy
        toy.write_prompt_files(dataset)  # the miniature world's prompt files, made on first use
    unknown = [t for t in tasks if t not in DEFAULT_PROMPT_FILES]
    if not files and unknown:
        raise ValueError(f"no default prompt files for task(s) {unknown}; pass the prompt files explicitly")
    paths = files.split(",") if files else [os.path.join(dataset, DEFAULT_PROMPT_FILES[t][split]) for t in tasks]
    grouped = {task: [] for task in tasks}
    for prompt, meta in (item for path in paths for item in load_prompts(path)):
        grouped[route(prompt, meta, set(tasks))].append((prompt, meta))
    empty = [task for task, items in grouped.items() if not items]
    if empty:
        raise ValueError(f"no {split} prompt routes to task(s) {empty}; expected prompts of every task in {paths}")
    return grouped


# ----------------------------------------------------------------------------------------------
# LoRA adapters on ONE base model (peft): a trainable student, frozen named teachers


def add_lora(transformer, rank=32, alpha=64, targets=FLOW_GRPO_LORA_TARGETS, name="student"):
    """Wraps the transformer in a PeftModel with one trainable LoRA adapter `name` (the paper's
    rank 32 / alpha 64 on the attention projections). Returns the PeftModel: call it like the
    transformer; it also accepts adapter_names=[...] for per-sample mixed-adapter batches."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    return get_peft_model(transformer, config, adapter_name=name)


def load_adapter(peft_model, folder, name):
    """Loads a frozen adapter from a peft folder (adapter_config.json + adapter_model.safetensors,
    the layout of the published Flow-GRPO LoRAs; or their hub id) and restores the previously active adapter."""
    folder = resolve_adapter(folder)
    if not os.path.isfile(os.path.join(str(folder), "adapter_config.json")):
        raise FileNotFoundError(f"adapter folder {str(folder)!r} has no adapter_config.json; expected a peft "
                                f"folder with adapter_config.json and adapter_model.safetensors")
    check_adapter_fits(peft_model, folder)
    active = peft_model.active_adapter
    peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    peft_model.set_adapter(active)
    freeze_all_but(peft_model, active)
    return peft_model


def check_adapter_fits(peft_model, folder):
    """(peft_model: a PeftModel or the bare base.) A clear error if a peft adapter folder was trained on another base: every LoRA pair must name
    a linear layer of this base with matching input/output sizes."""
    from safetensors import safe_open
    weights = os.path.join(str(folder), "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"adapter folder {str(folder)!r} has no adapter_model.safetensors")
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    modules = dict(base.named_modules())
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
            if not match:
                continue
            module = modules.get(match.group(1))
            layer = getattr(module, "base_layer", module)
            shape = f.get_slice(key).get_shape()
            size, expected = (shape[1], "in_features") if match.group(2) == "A" else (shape[0], "out_features")
            if layer is None or getattr(layer, expected, None) != size:
                found = "no such layer" if layer is None else f"{expected}={getattr(layer, expected, None)}"
                raise ValueError(f"adapter {str(folder)!r} does not fit this base model: {key} has {expected}={size} "
                                 f"but the base has {found}; expected an adapter trained on this base")


def parse_teachers(text):
    """'geneval=PATH,ocr=PATH' -> {'geneval': PATH, 'ocr': PATH}, each a peft folder that exists."""
    teachers = {}
    for part in filter(None, text.split(",")):
        task, sep, path = part.partition("=")
        path = resolve_adapter(path) if path else path
        if not sep or not task or not path:
            raise ValueError(f"cannot parse {part!r} in --teachers {text!r}; expected task=peft_folder,task=peft_folder")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"teacher {task!r}: adapter folder {path!r} has no adapter_config.json; expected a "
                                    f"peft folder such as runs/teacher-{task}/adapter")
        teachers[task] = path
    if not teachers:
        raise ValueError("--teachers is empty; expected task=peft_folder,...")
    return teachers


def adapter_layout(folder):
    """(rank, alpha, sorted target modules) of a peft adapter folder."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    targets = config["target_modules"]
    return config["r"], config["lora_alpha"], sorted([targets] if isinstance(targets, str) else targets)


def check_same_layout(adapters):
    """All adapters {name: folder} have one rank, alpha and target set (as Flow-GRPO's teachers do);
    a mismatch usually means a wrong folder, and breaks the `ab` rule."""
    layouts = {name: adapter_layout(folder) for name, folder in adapters.items()}
    first = next(iter(layouts))
    for name, layout in layouts.items():
        if layout != layouts[first]:
            raise ValueError(f"adapter {name!r} ({adapters[name]}) has rank/alpha/targets {layout}, but {first!r} "
                             f"({adapters[first]}) has {layouts[first]}; expected teachers of one LoRA layout")


def freeze_all_but(peft_model, trainable):
    """Only adapter `trainable`'s LoRA weights require grad (peft's set_adapter unfreezes the one it
    activates, which would make a teacher trainable)."""
    for param_name, param in peft_model.named_parameters():
        param.requires_grad_(trainable is not None and f".{trainable}." in param_name)


@contextlib.contextmanager
def use_adapter(peft_model, name):
    """Runs the block with adapter `name` active (None: adapters disabled, the base model), then
    restores the previous adapter and the student-only trainable set."""
    previous = peft_model.active_adapter
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    try:
        if name is None:
            with peft_model.disable_adapter():
                yield peft_model
        else:
            peft_model.set_adapter(name)
            yield peft_model
    finally:
        if name is not None:
            peft_model.set_adapter(previous)
        for n, p in peft_model.named_parameters():
            p.requires_grad_(n in trainable)


def save_adapter(peft_model, name, folder):
    """Writes adapter `name` atomically as a peft folder (adapter_config.json + adapter_model.safetensors,
    the published Flow-GRPO layout) that also holds pytorch_lora_weights.safetensors, the same weights in
    diffusers' format, so `StableDiffusion3Pipeline.load_lora_weights(folder)` works too."""
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    def write(tmp):
        peft_model.save_pretrained(tmp, selected_adapters=[name])
        where = os.path.join(tmp, name) if name != "default" else tmp
        state = {key.removeprefix("base_model.model."): value.contiguous() for key, value in
                 get_peft_model_state_dict(peft_model, adapter_name=name).items()}
        StableDiffusion3Pipeline.save_lora_weights(where, transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=peft_model.peft_config[name].to_dict())
    atomic_write_dir(folder, write, subfolder=name if name != "default" else None)


def resolve_adapter(path_or_id):
    """A peft adapter folder from a local path or a hub id such as 'jieliu/SD3.5M-FlowGRPO-GenEval' (the
    published Flow-GRPO teachers): the hub cache first, then a download."""
    path = str(path_or_id)
    if os.path.exists(path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return path
    from huggingface_hub import snapshot_download
    patterns = ["adapter_config.json", "adapter_model.safetensors"]
    try:
        return snapshot_download(path, allow_patterns=patterns, local_files_only=True)
    except Exception:
        try:
            return snapshot_download(path, allow_patterns=patterns)
        except Exception as err:
            raise FileNotFoundError(f"adapter {path!r} is not a local folder and could not be fetched from the hub "
                                    f"({type(err).__name__}); expected a peft folder or a hub id like "
                                    f"'jieliu/SD3.5M-FlowGRPO-GenEval'") from None


# ----------------------------------------------------------------------------------------------
# Training state shared by the stages: the student, its EMA, checkpoints, the flow-matching loss


def make_policy(transformer, rank=32, alpha=64, init=None, targets=FLOW_GRPO_LORA_TARGETS):
    """A PeftModel with the trainable adapter "student" (a fresh LoRA, or the peft folder `init`,
    e.g. a Stage 2 cold start) and "ema", its moving average (what is evaluated and published)."""
    if init:
        from peft import PeftModel
        init = resolve_adapter(init)
        if not os.path.isfile(os.path.join(str(init), "adapter_config.json")):
            raise FileNotFoundError(f"initial adapter folder {str(init)!r} has no adapter_config.json; expected a "
                                    f"peft folder (e.g. a stage2_coldstart.py output)")
        check_adapter_fits(transformer, init)
        policy = PeftModel.from_pretrained(transformer, str(init), adapter_name="student", is_trainable=True)
    else:
        policy = add_lora(transformer, rank, alpha, targets)
    policy.add_adapter("ema", policy.peft_config["student"])
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in lora_state(policy, "student").items():
            params[name.replace(".student.", ".ema.")].copy_(value)
    freeze_all_but(policy, "student")
    return policy.eval()  # no dropout anywhere; and peft's mixed-adapter batches run in eval mode only


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
    atomic_write_dir(os.path.join(folder, "checkpoint"), write)


def load_checkpoint(folder, policy, optimizer, rng):
    """Restores what save_checkpoint wrote; returns (epoch, log). A clear error if it was written for
    another model or LoRA shape."""
    state = torch.load(os.path.join(folder, "checkpoint", "state.pt"), weights_only=False)
    params = dict(policy.named_parameters())
    saved = {name: value for adapter in state["adapters"].values() for name, value in adapter.items()}
    for name, value in saved.items():
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"checkpoint {folder}/checkpoint does not fit this model and LoRA: {name} "
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


def sampling_defaults(args, bundle):
    """Fills the guidance and eval settings left unset with the model's, and the negative prompt."""
    args.guidance = args.guidance if args.guidance is not None else bundle.defaults["guidance_scale"]
    args.eval_guidance = args.eval_guidance if args.eval_guidance is not None else bundle.defaults["guidance_scale"]
    args.eval_steps = args.eval_steps or bundle.defaults["eval_steps"]
    args.negative = bundle.encode([""])  # CFG's empty prompt, also for --nft-guidance when sampling is unguided


def epoch_list(text):
    """'4,8' -> [4, 8]: the --eval-at argument (epochs >= 0; '' = none)."""
    try:
        epochs = [int(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of epochs; expected e.g. '4,8'") from None
    if any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"{text!r} has a negative epoch; expected epochs >= 0 (0 = the untrained start)")
    return epochs


def evaluation_due(args, epoch):
    """Whether the test scores are taken after `epoch` (0 = the untrained start): at the --eval-at epochs
    when given (pipeline.py: only the curve's inner points, as eval.py scores the ends), else every
    --eval-every epochs and at the last one (--eval-every 0: never)."""
    if args.eval_at is not None:
        return epoch in args.eval_at
    return args.eval_every > 0 and (epoch % args.eval_every == 0 or epoch == args.epochs)


def start_run(args, policy, optimizer, rng, evaluate):
    """Resumes from OUT/checkpoint with --resume, else starts OUT/log.jsonl with the untrained
    policy's test scores (`evaluate(None)`, where evaluation_due at epoch 0). Returns (last finished epoch, log)."""
    if args.eval_every < 0:
        raise ValueError(f"--eval-every {args.eval_every} is negative; expected a number of epochs, or 0 for no evaluation")
    os.makedirs(args.out, exist_ok=True)
    if args.resume and os.path.isdir(os.path.join(args.out, "checkpoint")):
        epoch, log = load_checkpoint(args.out, policy, optimizer, rng)
        print(f"resumed from {args.out}/checkpoint at epoch {epoch}")
        return epoch, log
    log = [{"epoch": 0, "trajectories": 0, **({"eval": evaluate(None)} if evaluation_due(args, 0) and args.rank == 0 else {})}]
    if args.rank == 0:  # only the first process evaluates and writes
        with open(os.path.join(args.out, "log.jsonl"), "w") as f:
            f.write(json.dumps(log[0]) + "\n")
    return 0, log


def end_epoch(args, record, log, policy, optimizer, rng, finite, bad_epochs, evaluate):
    """The stages' shared end of an epoch: the test scores (`evaluate(png_path)`) where evaluation_due,
    an atomic checkpoint with each periodic evaluation (every epoch with --eval-every 0 or --eval-at);
    the record appended to the log and OUT/log.jsonl; a clear stop after --max-bad-epochs non-finite
    epochs in a row, the last good checkpoint kept."""
    epoch = record["epoch"]
    evaluating = evaluation_due(args, epoch)
    due = evaluating or args.eval_at is not None or args.eval_every == 0  # when a checkpoint is written
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
    if finite and due and first:
        save_checkpoint(args.out, policy, optimizer, epoch, rng, log)


def shift_sigmas(sigma, shift):
    """The SD3 time shift sigma' = shift sigma / (1 + (shift - 1) sigma), as the scheduler applies it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_sigmas(n, shift, device="cpu"):
    """n flow-matching training times: logit-normal(0, 1), then time-shifted like the sampler (METHOD.md §0)."""
    return shift_sigmas(torch.sigmoid(torch.randn(n, device=device)), shift)


def forward_noise(x0, sigma, noise):
    """x_sigma = (1 - sigma) x0 + sigma eps, the forward process (METHOD.md §0); sigma a float or (B,)."""
    return _as_batch(1 - sigma, x0) * x0 + _as_batch(sigma, x0) * noise


def flow_matching_loss(model, x0, embeds, pooled, shift=3.0, bf16=False, guidance_scale=1.0, negative=None,
                       sigma=None, noise=None):
    """Rectified-flow loss || v(x_sigma, sigma, c) - (eps - x0) ||^2 at x_sigma = (1 - sigma) x0 + sigma eps,
    sigma logit-normal(0, 1) then time-shifted like the sampler (METHOD.md §0, M6's SFT). With
    guidance_scale w != 1 the guided velocity is fitted: samples drawn with CFG w are then the model's
    own CFG-w distribution, instead of having guidance applied twice at sampling. `sigma`, `noise`: given
    draws (e.g. one process's share of a global batch's), else drawn here."""
    sigma = training_sigmas(len(x0), shift, x0.device) if sigma is None else sigma
    noise = torch.randn_like(x0) if noise is None else noise
    x_sigma = forward_noise(x0, sigma, noise)
    with autocast(x0.device, bf16):
        v = velocity(model, x_sigma, sigma, embeds, pooled, guidance_scale, negative)
    return ((v.float() - (noise - x0)) ** 2).mean()


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
                raise ValueError(f"process {local_rank} of {os.environ.get('LOCAL_WORLD_SIZE')} on this machine has no GPU "
                                 f"({gpus} visible); expected --nproc_per_node <= the GPU count, "
                                 f"or --device cpu")
            args.device = f"cuda:{local_rank}"
            torch.cuda.set_device(args.device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())


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
            raise ValueError(f"--{flag.replace('_', '-')} {size} does not split over {args.world} processes; "
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


def optimizer_step(params, optimizer, args, max_grad_norm=None):
    """The stages' update: gradients summed over processes (sync_gradients), clipped to
    `max_grad_norm` (default --max-grad-norm), one optimizer step."""
    sync_gradients(params, args)
    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if max_grad_norm is None else max_grad_norm)
    optimizer.step()


# ----------------------------------------------------------------------------------------------
# Atomic writes and images


def atomic_write_dir(folder, write, subfolder=None):
    """Calls write(tmp_dir) and then moves the result into `folder` in one rename, so `folder` is
    either the old complete version or the new complete one. `subfolder`: the part of tmp_dir to keep."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        write(tmp)
        source = os.path.join(tmp, subfolder) if subfolder else tmp
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.rename(folder, os.path.join(old, "previous"))
        try:
            os.rename(source, folder)
        except OSError:
            if old:
                os.rename(os.path.join(old, "previous"), folder)
            raise
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def atomic_torch_save(obj, path):
    """torch.save to a temporary file, then an atomic rename over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def image_grid(images, columns=8):
    """A PIL grid of (B, 3, H, W) images in [0, 1] with a grey 1-px border."""
    images = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    rows = math.ceil(len(images) / columns)
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 128, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = image
    return Image.fromarray(grid)


def line_chart(series, path, x_label, y_label, size=(640, 400)):
    """A PNG line chart of {label: [(x, y), ...]} with PIL alone (no plotting dependency)."""
    from PIL import ImageDraw
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    points = [xy for line in series.values() for xy in line]
    if not points:
        raise ValueError(f"nothing to plot for {path!r}: every series is empty")
    (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*points)]
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    left, top, right, bottom = 60, 20, size[0] - 20, size[1] - 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x, y):
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.text((5, at(x0, y)[1] - 6), f"{y:.3f}", fill="black")
        x = x0 + (x1 - x0) * k / 4
        draw.text((at(x, y0)[0] - 10, bottom + 5), f"{x:g}", fill="black")
    draw.text((left, size[1] - 22), x_label, fill="black")
    draw.text((left + 5, top + 2), y_label, fill="black")
    for i, (label, line) in enumerate(series.items()):
        color = colors[i % len(colors)]
        xy = [at(x, y) for x, y in sorted(line)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((right - 170, top + 8 + 14 * i), label, fill=color)
    image.save(path)
