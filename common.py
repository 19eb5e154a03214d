"""The method, and nothing else: the functions every stage shares, in the paper's order. Equation numbers
(M1, M3, ...) refer to docs/method.md.

    velocity              v with optional classifier-free guidance (docs/method.md, M0)
    sampling_sigmas       the sampler's sigmas 1 = sigma_0 > ... > sigma_N = 0, time-shifted (M0)
    sde_step              one Flow-GRPO SDE step and its log-probability (M1)
    step_kl               the closed-form KL between two Gaussian steps: a weighted L2 of velocities (M3)
    rollout               whole SDE trajectories, one seed per sample (M1)
    route                 the hard router R(c): a prompt's task, hence its teacher (M4)
    flow_matching_loss    the rectified-flow loss of SFT and NFT (M0, M6)

Conventions (diffusers' SD3): sigma = 1 is noise, sigma = 0 is data, x_sigma = (1-sigma) x0 + sigma eps,
the model predicts the velocity eps - x0 and is fed timestep = 1000 sigma. Log-probabilities are
AVERAGED over dimensions (the released Flow-GRPO convention, to which its PPO clip range is
calibrated); the KL has both weightings (M3).

Everything here needs only torch and the standard library, and this module imports nothing of the project:
velocity, sde_step (with sde_std and _as_batch), step_kl and route can be copied into another codebase as
they are. The models, adapters, prompt files and atomic writes the method runs on are in loading.py.
"""
import math
import os
import re

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers warns about torchvision on import
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no per-shard bars for megabyte models
import torch

# ----------------------------------------------------------------------------------------------
# Velocity with optional classifier-free guidance (the one helper every stage calls)


def velocity(model, x, sigma, embeds, pooled, guidance_scale=1.0, negative=None, **model_kwargs):
    """v = v_uncond + w (v_cond - v_uncond) (docs/method.md M0) in one batched call: the conditional branch of every
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
# Sigmas: the sampler's schedule and the flow-matching training times (docs/method.md M0)


def sampling_sigmas(scheduler, num_steps):
    """sigma_0 = 1 > sigma_1 > ... > sigma_N = 0 of the scheduler (its shift applied), float32 (N+1,)."""
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.detach().float().cpu().clone()


def shift_sigmas(sigma, shift):
    """The SD3 time shift sigma' = shift sigma / (1 + (shift - 1) sigma), as the scheduler applies it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_sigmas(n, shift, device="cpu"):
    """n flow-matching training times: logit-normal(0, 1), then time-shifted like the sampler (docs/method.md M0)."""
    return shift_sigmas(torch.sigmoid(torch.randn(n, device=device)), shift)


def forward_noise(x0, sigma, noise):
    """x_sigma = (1 - sigma) x0 + sigma eps, the forward process (docs/method.md M0); sigma a float or (B,)."""
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
# Prompts and the hard router R(c) (docs/method.md M4)


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


# ----------------------------------------------------------------------------------------------
# The flow-matching loss (SFT cold start M6, DiffusionNFT)


def flow_matching_loss(model, x0, embeds, pooled, shift=3.0, bf16=False, guidance_scale=1.0, negative=None,
                       sigma=None, noise=None):
    """Rectified-flow loss || v(x_sigma, sigma, c) - (eps - x0) ||^2 at x_sigma = (1 - sigma) x0 + sigma eps,
    sigma logit-normal(0, 1) then time-shifted like the sampler (docs/method.md M0, M6's SFT). With
    guidance_scale w != 1 the guided velocity is fitted: samples drawn with CFG w are then the model's
    own CFG-w distribution, instead of having guidance applied twice at sampling. `sigma`, `noise`: given
    draws (e.g. one process's share of a global batch's), else drawn here."""
    sigma = training_sigmas(len(x0), shift, x0.device) if sigma is None else sigma
    noise = torch.randn_like(x0) if noise is None else noise
    x_sigma = forward_noise(x0, sigma, noise)
    with autocast(x0.device, bf16):
        v = velocity(model, x_sigma, sigma, embeds, pooled, guidance_scale, negative)
    return ((v.float() - (noise - x0)) ** 2).mean()
