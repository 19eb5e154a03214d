"""The one module the stages share: the method first, in the paper's order, then the models and LoRA
adapters it runs on. Equation numbers (M1, M3, ...) refer to METHOD.md (the project's shared notes).

Contents
  The method
    velocity              v with optional classifier-free guidance (METHOD.md §0)
    sampling_sigmas       the sampler's sigmas 1 = sigma_0 > ... > sigma_N = 0, time-shifted (§0)
    sde_step              one Flow-GRPO SDE step and its log-probability (M1)
    step_kl               the closed-form KL between two Gaussian steps: a weighted L2 of velocities (M3)
    rollout               whole SDE trajectories, one seed per sample (M1)
    route                 the hard router R(c): a prompt's task, hence its teacher (§4)
    flow_matching_loss    the rectified-flow loss of SFT and NFT (§0, M6)
  Models and adapters
    ModelBundle, load_sd3 the real model (a diffusers SD3 pipeline folder or hub id)
    add_lora ... save_adapter   a trainable student and frozen teachers as LoRA adapters on ONE base (peft)
    UserError, atomic_write_dir the error a bad input raises; all-or-nothing writes

Conventions (diffusers' SD3): sigma = 1 is noise, sigma = 0 is data, x_sigma = (1-sigma) x0 + sigma eps,
the model predicts the velocity eps - x0 and is fed timestep = 1000 sigma. Log-probabilities are
AVERAGED over dimensions (the released Flow-GRPO convention, to which its PPO clip range is
calibrated); the KL has both weightings (M3).

velocity, sde_step (with sde_std and _as_batch), step_kl and route use only torch and the standard
library: they can be copied into another codebase as they are. This module imports nothing of the project.
"""
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
import torch


class UserError(ValueError):
    """A bad flag value, file, prompt or server reply: the entry points print `error: <message>` and
    exit with status 2 instead of a traceback (training.run_cli). Any other exception is a bug and raises."""


# ----------------------------------------------------------------------------------------------
# Velocity with optional classifier-free guidance (the one helper every stage calls)


def velocity(model, x, sigma, embeds, pooled, guidance_scale=1.0, negative=None, **model_kwargs):
    """v = v_uncond + w (v_cond - v_uncond) (METHOD.md §0) in one batched call: the conditional branch of every
    sample, the unconditional one of those with w != 1. w: a float, or a (B,) tensor, one scale per sample.
    `negative`: (embeds, pooled) of the empty prompt, batch 1 or B. `sigma`: a float or a (B,) tensor; the model
    is fed timestep = 1000 sigma. Needs only torch: `model` is any diffusers SD3 transformer or its peft wrapper."""
    batch = x.shape[0]
    names = model_kwargs.get("adapter_names")
    if names is not None and len(names) != batch:  # peft would raise AND leave its hooks attached
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch}; expected one per sample")
    timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device) * 1000).expand(batch)
    scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device).expand(batch)
    guided = (scale != 1.0).nonzero().squeeze(1)  # only these need the unconditional branch
    if len(guided) and negative is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the negative (empty) prompt embeddings")
    neg_embeds, neg_pooled = (t.expand(batch, *t.shape[1:])[guided] for t in negative or (embeds, pooled))
    both = {k: ([v[i] for i in guided.tolist()] + v if isinstance(v, list) else v) for k, v in model_kwargs.items()}
    out = model(hidden_states=torch.cat([x[guided], x]), encoder_hidden_states=torch.cat([neg_embeds, embeds]),
                pooled_projections=torch.cat([neg_pooled, pooled]), timestep=torch.cat([timestep[guided], timestep]),
                return_dict=False, **both)[0]  # both: e.g. adapter_names, one per row
    v_uncond, v, w = out[:len(guided)], out[len(guided):], scale[guided].to(out.dtype).view(-1, *[1] * (x.dim() - 1))
    v_guided = v_uncond + w * (v[guided] - v_uncond)
    return v_guided if len(guided) == batch else v.index_copy(0, guided, v_guided)


# ----------------------------------------------------------------------------------------------
# Sigmas: the sampler's schedule and the flow-matching training times (METHOD.md §0)


def sampling_sigmas(scheduler, num_steps):
    """sigma_0 = 1 > sigma_1 > ... > sigma_N = 0 of the scheduler (its shift applied), float32 (N+1,)."""
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.detach().float().cpu().clone()


def shift_sigmas(sigma, shift):
    """The SD3 time shift sigma' = shift sigma / (1 + (shift - 1) sigma), as the scheduler applies it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_sigmas(n, shift, device="cpu"):
    """n flow-matching training times: logit-normal(0, 1), then time-shifted like the sampler (METHOD.md §0)."""
    return shift_sigmas(torch.sigmoid(torch.randn(n, device=device)), shift)


def forward_noise(x0, sigma, noise):
    """x_sigma = (1 - sigma) x0 + sigma eps, the forward process (METHOD.md §0); sigma a float or (B,)."""
    return _as_batch(1 - sigma, x0) * x0 + _as_batch(sigma, x0) * noise


def _as_batch(value, like):
    """A scalar or (B,) sigma as a tensor broadcastable against x (B, ...)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() else value


# ----------------------------------------------------------------------------------------------
# The SDE step with log-probability (M1) and the per-step KL (M3)


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
    is exactly the Euler ODE step x + v D and log_prob is None (a point mass has no density).
    Plain tensors and floats in and out: copy it with sde_std and _as_batch, it needs only torch."""
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
      code:  mean_d (mu_s - mu_t)^2 / (2 s^2)       = KL_j |D| / D_dims   (the released code)
      flat:  (|D| / 2) ||v_s - v_t||^2               = KL_j (s / c)^2      (not the paper's: the velocity L2
             integrated over time, without the (c / s)^2 that grows ~1000x from the first step to the last)
    Plain tensors and floats in and out: copy it with sde_std and _as_batch, it needs only torch."""
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
    if weighting == "flat":
        return squared.sum(1) / (2 * c**2 * -delta).flatten()
    raise ValueError(f"unknown KL weighting {weighting!r}; expected 'paper', 'code' or 'flat'")


# ----------------------------------------------------------------------------------------------
# Rollouts: whole SDE trajectories (M1)


def per_sample_noise(generators, shape, device="cpu"):
    """One standard normal draw of `shape` per sample, each from that sample's own generator, so a
    sample depends only on its seed (not on batch size or position)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


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


@torch.no_grad()
def rollout(model, embeds, pooled, latent_shape, sigmas, seeds, noise_level=0.7, guidance_scale=1.0,
            negative=None, decode=None, init_seeds=None, keep_velocities=False, **model_kwargs):
    """Batched SDE sampling of whole trajectories (M1), reproducible from one seed per sample.
    `noise_level`: one a for every step, or a list of N (0 = a deterministic ODE step, as outside
    Flow-GRPO-Fast's SDE window). `init_seeds`: seeds of the initial noise when it must differ from
    `seeds` (e.g. one start shared by a GRPO group). Returns {"states": (B, N+1, C, h, w) x_0..x_N,
    "velocities": (B, N, C, h, w) the sampling policy's v at x_0..x_N-1 with `keep_velocities` (as much memory
    as the states) else None, "log_probs": (B, N) (0 at ODE steps) or None (all ODE), "sigmas": (N+1,),
    "images": decode(x_N) or None}."""
    levels = list(noise_level) if isinstance(noise_level, (list, tuple)) else [noise_level] * (len(sigmas) - 1)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    starts = generators if init_seeds is None else [torch.Generator().manual_seed(int(s)) for s in init_seeds]
    x = per_sample_noise(starts, latent_shape, embeds.device)
    states, velocities, log_probs = [x], [], []
    for j in range(len(sigmas) - 1):
        v = velocity(model, x, sigmas[j], embeds, pooled, guidance_scale, negative, **model_kwargs)
        if keep_velocities:
            velocities.append(v.float())
        noise = per_sample_noise(generators, latent_shape, x.device) if levels[j] > 0 else None
        x, log_prob, _, _ = sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], levels[j], noise)
        states.append(x)
        log_probs.append(log_prob if log_prob is not None else torch.zeros(len(x), device=x.device))
    return {"states": torch.stack(states, 1), "velocities": torch.stack(velocities, 1) if velocities else None,
            "sigmas": sigmas,
            "log_probs": torch.stack(log_probs, 1) if any(a > 0 for a in levels) else None,
            "images": decode(x) if decode is not None else None}


def rollout_chunks(model, embeds, pooled, latent_shape, sigmas, seeds, chunk_size, noise_level=0.7,
                   guidance_scale=1.0, negative=None, decode=None, bf16=True, init_seeds=None, keep_velocities=False):
    """rollout() over chunks of `chunk_size` samples, bf16 autocast or not: with the same chunks and
    precision as a policy update that follows, it recomputes the stored log-probs bit for bit (the
    first PPO ratio is exactly 1). Returns rollout()'s dict for the whole batch."""
    chunks, scale = [], torch.as_tensor(guidance_scale, dtype=torch.float32).expand(len(seeds))  # float or per sample
    for start in range(0, len(seeds), chunk_size):
        part = slice(start, start + chunk_size)
        with autocast(embeds.device, bf16):
            chunks.append(rollout(model, embeds[part], pooled[part], latent_shape, sigmas, seeds[part], noise_level,
                                  scale[part], negative, decode, init_seeds[part] if init_seeds else None,
                                  keep_velocities))
    out = {key: torch.cat([c[key] for c in chunks]) for key in ("states", "velocities", "log_probs", "images")
           if chunks[0][key] is not None}
    return {"images": None, "log_probs": None, "velocities": None, **out, "sigmas": sigmas}


# ----------------------------------------------------------------------------------------------
# Prompts and the hard router R(c) (METHOD.md §4)


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def route(prompt, metadata, tasks):
    """R(c): the task (teacher) of one prompt. From its metadata tag where present (a GenEval tag ->
    'geneval', or an explicit "task"), else by rule: quoted text -> 'ocr', otherwise 'geneval'.
    A prompt whose task is not among `tasks` is a plain ValueError. Needs only `re` and GENEVAL_TAGS:
    strings and dicts in, a string out, so it can be copied into another codebase."""
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
                    raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); expected one JSON object per line") from None
                if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
                    raise UserError(f"{path}:{number}: expected a JSON object with a string \"prompt\", got {line.strip()[:80]!r}")
                items.append((meta["prompt"], meta))
            else:
                items.append((line.strip(), None))
    if not items:
        raise UserError(f"prompt file {path!r} holds no prompts")
    return items


DEFAULT_PROMPT_FILES = {"geneval": {"train": "geneval/train_metadata.jsonl", "test": "geneval/test_metadata.jsonl"},
                        "ocr": {"train": "ocr/train.txt", "test": "ocr/test.txt"}}
# Other tasks' files in flow_grpo's dataset layout (--dataset flow_grpo/dataset): PickScore trains on dataset/pickscore
TASK_PROMPT_FILES = {**DEFAULT_PROMPT_FILES, "pickscore": {"train": "pickscore/train.txt", "test": "pickscore/test.txt"}}


def load_prompt_files(spec):
    """[(prompt, metadata)] of comma-separated prompt files. An entry `task=path` labels each of its prompts
    with that task (metadata "task", which the router R(c) follows): a plain prompt file such as flow_grpo's
    dataset/pickscore/train.txt then routes to its teacher, e.g. "pickscore=dataset/pickscore/train.txt"."""
    items = []
    for entry in filter(None, spec.split(",")):
        task, _, path = entry.rpartition("=")
        items += [(prompt, {**(meta or {}), "task": task} if task else meta) for prompt, meta in load_prompts(path)]
    return items


def default_prompt_files(tasks, dataset, split):
    """The `task=path` spec of the tasks' own `split` files in `dataset` (TASK_PROMPT_FILES)."""
    unknown = [t for t in tasks if t not in TASK_PROMPT_FILES]
    if unknown:
        raise UserError(f"no default prompt files for task(s) {unknown} (known: {sorted(TASK_PROMPT_FILES)}); pass the "
                        f"prompt files explicitly, labelled task=path")
    return ",".join(f"{t}={os.path.join(dataset, TASK_PROMPT_FILES[t][split])}" for t in tasks)


def prompts_by_task(files, tasks, dataset, split):
    """{task: [(prompt, metadata)]}: the prompts of comma-separated `files` (`path` or `task=path`; when
    empty, the dataset's `split` files of `tasks`, each labelled with its task) grouped by the router. A
    prompt routed to a task outside `tasks`, or a task left with no prompt, is an error now rather than mid-run."""
    spec = files or default_prompt_files(tasks, dataset, split)
    grouped = {task: [] for task in tasks}
    for prompt, meta in load_prompt_files(spec):
        try:
            grouped[route(prompt, meta, set(tasks))].append((prompt, meta))
        except ValueError as err:  # route() raises a plain ValueError, to stay copyable without this module
            raise UserError(f"{err} (in {spec})") from None
    empty = [task for task, items in grouped.items() if not items]
    if empty:
        raise UserError(f"no {split} prompt routes to task(s) {empty}; expected prompts of every task in {spec} "
                        f"(a plain prompt file of another task: label it, task=path)")
    return grouped


# ----------------------------------------------------------------------------------------------
# The flow-matching loss (SFT cold start M6, DiffusionNFT)


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


# ==============================================================================================
# Below: the models and adapters the method runs on, and atomic writes. No method here.


# ----------------------------------------------------------------------------------------------
# The model bundle: what every stage needs of a base model (SD3 here; toy_model.py for the miniature)


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
                                                                "lora_targets": FLOW_GRPO_LORA_TARGETS,
                                                                # eval: prompts sampled / latents VAE-decoded at once
                                                                "eval_batch_size": 16, "decode_batch_size": 4})


# The published Flow-GRPO teachers' LoRA layout (r 32, alpha 64, Gaussian init) on SD3's joint attention
FLOW_GRPO_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                          "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


def load_sd3(path_or_id, device="cpu", dtype=torch.float32, text_encoder_3=True, max_sequence_length=128):
    """The real model (SD3 / SD3.5) from a diffusers pipeline folder or hub id. The prompt embeddings are
    diffusers' encode_prompt at `max_sequence_length` T5 tokens (flow_grpo's 128, on which the published
    teachers were trained). Without T5 only the two CLIP encoders run and, exactly as diffusers does,
    `max_sequence_length` zero rows stand where T5's would: after context_embedder identical rows are
    identical keys, so their number changes the attention."""
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

    @torch.no_grad()
    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
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
                raise UserError(f"adapter {str(folder)!r} does not fit this base model: {key} has {expected}={size} "
                                 f"but the base has {found}; expected an adapter trained on this base")


def parse_teachers(text):
    """'geneval=PATH,ocr=PATH' -> {'geneval': PATH, 'ocr': PATH}, each a peft folder that exists."""
    teachers = {}
    for part in filter(None, text.split(",")):
        task, sep, path = part.partition("=")
        path = resolve_adapter(path) if path else path
        if not sep or not task or not path:
            raise UserError(f"cannot parse {part!r} in --teachers {text!r}; expected task=peft_folder,task=peft_folder")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"teacher {task!r}: adapter folder {path!r} has no adapter_config.json; expected a "
                                    f"peft folder such as runs/teacher-{task}/adapter")
        teachers[task] = path
    if not teachers:
        raise UserError("--teachers is empty; expected task=peft_folder,...")
    return teachers


def adapter_layout(folder):
    """(rank, alpha, sorted target modules) of a peft adapter folder."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    targets = config["target_modules"]
    return config["r"], config["lora_alpha"], sorted([targets] if isinstance(targets, str) else targets)


def check_same_layout(adapters):
    """All adapters {name: folder} have one rank, alpha and target set: what the `ab` merge rule (adding
    A and B matrices key by key) needs. Other rules and Stage 3's mixed batches take any layouts."""
    layouts = {name: adapter_layout(folder) for name, folder in adapters.items()}
    first = next(iter(layouts))
    for name, layout in layouts.items():
        if layout != layouts[first]:
            raise UserError(f"adapter {name!r} ({adapters[name]}) has rank/alpha/targets {layout}, but {first!r} "
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
# Atomic writes: a folder or file is either the old complete version or the new one


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
