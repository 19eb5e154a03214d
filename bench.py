r"""Benchmarks (measured, never asserted by tests). Results are merged into BENCHMARKS.json (read by
other tools) and BENCHMARKS.md is rewritten from it.

    python bench.py peak      # the machine's bf16 / fp32 matmul peak (GFLOP/s)
    python bench.py sd35m-gpu # the same transformer on a CUDA GPU at the paper's 512 px: Stage 3 step and eval
                              #   sampler step time, achieved TFLOP/s and fraction of peak, the allocator's peak
                              #   per prompts-per-chunk, checkpointing on/off, torch.compile, flash SDPA
                              #   (--smoke: the same path on the CPU, one layer, nothing recorded)
    python bench.py sd35m     # full-size SD3.5-Medium transformer, random bf16 weights, this CPU:
                              #   Stage 3 peak RSS, adapters on one base vs one model copy per guide,
                              #   one OPD step at 256 px (time, FLOPs, MFU), and the memory of a
                              #   512 px training step with and without gradient checkpointing
    python bench.py loops     # the share of Stage 1 / Stage 3 training-loop time spent inside the
                              #   transformer's forward and backward (miniature defaults, 2 epochs each)
    python bench.py modes     # eager / torch.compile x fp32 / bf16 autocast, training pass and forward
    python bench.py sampler   # images per second of the miniature eval sampler
    python bench.py overheads # before/after seconds of the overheads the stages avoid
    python bench.py pipeline  # minutes of the README's main command (python pipeline.py) from scratch
    python bench.py ocr       # the shipped rapidocr recogniser on rendered English text: the OCR reward of
                              #   perfect renders (miniature signs at 64 px; English phrases at 512 px, det+rec)

Each SD3.5-M measurement runs in its own process, so that its peak RSS is its own.
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

import common
import eval as evaluation
import toy_world
import training

RESULTS = "BENCHMARKS.json"
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))  # its config.json
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens, as SD3.5-M's pipeline feeds them


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def matmul_peak(dtype, sizes=(1024, 2048, 4096), repeats=20, budget_seconds=5.0):
    """GFLOP/s of square matmuls: the best over sizes and `repeats` timed runs after a warm-up (the peak
    moves by tens of % between runs on this shared 2-core machine, so the best is the honest limit).
    Each size gets at most `budget_seconds`, and larger sizes are skipped once one matmul takes more
    than a second: where bf16 is emulated (0.9 GFLOP/s on an AVX2 CPU) a 4096 matmul takes minutes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start > 1.0:
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
            break
        spent = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - start
            best, spent = max(best, 2 * n**3 / seconds / 1e9), spent + seconds
            if spent > budget_seconds:
                break
    return best


def build_sd35m(device="cpu", layers=SD35M["num_layers"]):
    """The SD3.5-M transformer with random weights, allocated once in bf16 on `device` (frozen, eval mode).
    Built on the meta device, then filled: a normal constructor's fp32 temporaries would stay in the
    allocator's arenas and inflate every peak-RSS number by ~1.5 GiB per model."""
    from diffusers import SD3Transformer2DModel
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**{**SD35M, "num_layers": layers,
                                             "dual_attention_layers": tuple(range(min(13, layers)))})
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0, 0.02, generator=generator)
            else:
                param.fill_(1.0 if "norm" in name else 0.0)
    for buffer in model.buffers():  # the positional embedding table is a buffer
        if buffer.is_floating_point():
            buffer.normal_(0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def random_guide(peft_model, name, seed):
    """A teacher-like adapter (the published layout: r 32, alpha 64, 8 projections) with non-zero B."""
    if name not in peft_model.peft_config:
        peft_model.add_adapter(name, peft_model.peft_config["student"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if f".{name}." in param_name and "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)


class BaseOf(torch.nn.Module):
    """The student's model with its adapters disabled: the released code's default anchor."""
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(**kwargs)


def random_inputs(prompts, resolution, device):
    """Latents and prompt embeddings in SD3.5-M's shapes (16 latent channels, 333 x 4096 tokens, 2048 pooled)."""
    side = resolution // 8
    return (torch.randn(prompts, 16, side, side, device=device), torch.randn(prompts, TEXT_TOKENS, 4096, device=device),
            torch.randn(prompts, 2048, device=device))


def opd_step(policy, guides, optimizer, resolution, guidance=4.5, prompts=1, device="cpu"):
    """One Stage 3 step for `prompts` prompts (M3-M5): the student's CFG velocity with grad, the routed
    teacher's and the anchor's under no_grad at the same state, KL + 0.04 KL_anchor, backward, AdamW step.
    `guides`: ("mixed", peft_model, [teacher, anchor]) = one mixed-adapter call on the student's base,
    or ("copies", [teacher_model, anchor_model]) = one call per separate model."""
    x, embeds, pooled = random_inputs(prompts, resolution, device)
    negative = (torch.zeros(1, TEXT_TOKENS, 4096, device=device), torch.zeros(1, 2048, device=device))
    sigma, sigma_next = 0.7, 0.6
    with common.autocast(device, True):
        v_student = common.velocity(policy, x, sigma, embeds, pooled, guidance, negative)
        with torch.no_grad():
            if guides[0] == "mixed":
                teacher, anchor = guides[2]
                v_teacher, v_anchor = common.velocity(guides[1], x.repeat(2, 1, 1, 1), sigma, embeds.repeat(2, 1, 1),
                                                      pooled.repeat(2, 1), guidance, negative,
                                                      adapter_names=[teacher] * prompts + [anchor] * prompts).chunk(2)
            else:
                v_teacher, v_anchor = (common.velocity(m, x, sigma, embeds, pooled, guidance, negative) for m in guides[1])
    kl = common.step_kl(v_student, v_teacher, sigma, sigma_next, 1.0, 0.7)
    kl_anchor = common.step_kl(v_student, v_anchor, sigma, sigma_next, 1.0, 0.7)
    (kl + 0.04 * kl_anchor).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sampling_step(policy, resolution, prompts, device, guidance=4.5):
    """One step of the eval sampler: the student's CFG velocity for `prompts` prompts, no gradient."""
    x, embeds, pooled = random_inputs(prompts, resolution, device)
    negative = (torch.zeros(1, TEXT_TOKENS, 4096, device=device), torch.zeros(1, 2048, device=device))
    with torch.no_grad(), common.autocast(device, True):
        common.velocity(policy, x, 0.7, embeds, pooled, guidance, negative)


def sd35m_worker(layout, resolution, checkpointing, prompts=1, device="cpu", compiled=False, flash=False, layers=24,
                 profile=None):
    """One measurement in this process: build the layout, run steps (the first counts FLOPs), time the
    last (on a GPU: the median of 3 after 2 warm-ups, cuBLAS/autotuning/compilation being in the first). Prints
    one JSON line; peak memory is the process's RSS on CPU, the allocator's peak on a GPU. `compiled`:
    torch.compile of the transformer with the adapters in place; `flash`: SDPA restricted to its flash
    kernel; AdamW is the fused one on a GPU; `profile`: a folder for a torch.profiler trace of the last step."""
    cuda = device.startswith("cuda")
    steps = 5 if cuda else 2
    start = time.time()
    policy = training.make_policy(build_sd35m(device, layers), 32, 64, targets=common.FLOW_GRPO_LORA_TARGETS).to(device)
    if checkpointing:
        policy.get_base_model().enable_gradient_checkpointing()
    if layout == "adapters":  # Flow-OPD here: 2 teachers + the anchor as adapters on the student's base
        for i, name in enumerate(("teacher_geneval", "teacher_ocr", "anchor")):
            random_guide(policy, name, i)
        common.freeze_all_but(policy, "student")
        guides = ("mixed", policy, ["teacher_geneval", "anchor"])
    elif layout == "copies":  # the released layout: a separate model per teacher; its default anchor is the
        copies = []           # base, i.e. the student's model with its adapter disabled (one copy fewer than ours)
        for i in range(2):
            copy = common.add_lora(build_sd35m(device, layers), 32, 64, common.FLOW_GRPO_LORA_TARGETS, name="guide").to(device)
            random_guide(copy, "guide", i)
            copies.append(copy.eval().requires_grad_(False))
        guides = ("copies", [copies[0], BaseOf(policy)])  # the routed teacher (geneval) and the anchor
    else:  # the student alone ("student": its training step, for the memory plan; "sampler": eval sampling)
        guides = None
    if compiled:  # the base model's forward, adapters included, is what the steps spend their time in
        policy.get_base_model().compile()
    built = time.time() - start
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4,
                                  **({"fused": True} if cuda else {}))

    def step():
        if layout == "sampler":
            sampling_step(policy, resolution, prompts, device)
        elif guides is None:
            x0, embeds, pooled = random_inputs(prompts, resolution, device)
            loss = common.flow_matching_loss(policy, x0, embeds, pooled, bf16=True)  # bf16 weights
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            opd_step(policy, guides, optimizer, resolution, prompts=prompts, device=device)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    seconds, flops = [], 0
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash else contextlib.nullcontext():
        for i in range(steps):
            t0 = time.perf_counter()
            if i == 0 and not compiled:  # FLOPs of eager ops (a compiled graph hides them: counted uncompiled)
                counter = FlopCounterMode(display=False)
                with counter:
                    step()
                flops = counter.get_total_flops()
            elif i == steps - 1 and profile:
                from torch.profiler import ProfilerActivity, profile as profiler
                with profiler(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as trace:
                    step()
                    if cuda:
                        torch.cuda.synchronize()
                os.makedirs(profile, exist_ok=True)
                trace.export_chrome_trace(os.path.join(profile, f"{layout}_{resolution}_{prompts}p.json"))
                print(trace.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25),
                      file=sys.stderr)
            else:
                step()
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gib()
    print(json.dumps({"layout": layout, "resolution": resolution, "checkpointing": checkpointing, "prompts": prompts,
                      "compiled": compiled, "flash": flash, "build_seconds": built,
                      "step_seconds": sorted(seconds[2:])[1] if cuda else seconds[-1],
                      "flops": flops, "peak_gib": peak,
                      "params": sum(p.numel() for p in policy.get_base_model().parameters())}))


def loop_efficiency(stage_main, argv):
    """Runs a stage's main(argv) and splits the wall time of its training epochs (everything but model
    loading and the test evaluations) into time inside the transformer's forward and autograd's backward,
    and the rest (sampling bookkeeping, scoring, logging, I/O). Returns (fraction inside, seconds,
    {"grad": samples through a forward with gradients, "no_grad": samples through a no-grad forward})."""
    from diffusers import SD3Transformer2DModel
    import eval as evaluation
    clock = {"model": 0.0, "excluded": 0.0, "excluding": False, "depth": 0}
    samples = {"grad": 0, "no_grad": 0}

    def timed(function, key):
        def wrapper(*args, **kwargs):
            if clock["depth"] or (key == "model" and clock["excluding"]):
                return function(*args, **kwargs)  # nested (a forward inside a forward) or inside an evaluation
            if function is originals[0]:
                x = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
                samples["grad" if torch.is_grad_enabled() else "no_grad"] += len(x)
            clock["depth"] += 1
            clock["excluding"] = key == "excluded"
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - start
                clock["depth"] -= 1
                clock["excluding"] = False
        return wrapper
    originals = (SD3Transformer2DModel.forward, torch.autograd.backward, evaluation.evaluate_policy,
                 training.load_model_from_args, common.save_adapter)
    SD3Transformer2DModel.forward = timed(originals[0], "model")
    torch.autograd.backward = timed(originals[1], "model")
    evaluation.evaluate_policy = timed(originals[2], "excluded")
    training.load_model_from_args = timed(originals[3], "excluded")
    common.save_adapter = timed(originals[4], "excluded")
    try:
        start = time.perf_counter()
        stage_main(argv)
        total = time.perf_counter() - start
    finally:
        (SD3Transformer2DModel.forward, torch.autograd.backward, evaluation.evaluate_policy,
         training.load_model_from_args, common.save_adapter) = originals
    loop = total - clock["excluded"]
    return clock["model"] / loop, loop, samples


def miniature_flops_per_sample():
    """FLOPs of one sample through the miniature transformer with a LoRA (its text tokens included):
    (no-grad forward, forward + backward to the LoRA weights), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    bundle = training.load_model("miniature/base")
    policy = training.make_policy(bundle.transformer, 32, 64, targets=bundle.defaults["lora_targets"])
    x, (embeds, pooled) = torch.randn(8, *bundle.latent_shape(bundle.resolution)), bundle.encode(["a red circle"] * 8)
    counts = []
    for grad in (False, True):
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(grad):
            v = common.velocity(policy, x, 0.5, embeds, pooled)
            if grad:
                v.square().mean().backward()
        counts.append(counter.get_total_flops() / len(x))
    return counts


def loops(results, out="runs/bench-loops"):
    """Loop efficiency, training throughput (SDE trajectory-steps per second, rollouts and updates
    included) and achieved FLOP/s of Stage 1 and Stage 3 at the miniature defaults, 2 epochs each."""
    import stage1_grpo
    import stage3_opd
    adapters = "results/adapters"
    runs = {"stage1": (stage1_grpo.main, ["--reward", "geneval", "--epochs", "2", "--eval-every", "0",
                                          "--out", f"{out}/stage1"], 2 * 8 * 8 * 10),
            "stage3": (stage3_opd.main, ["--teachers", f"geneval={adapters}/teacher-geneval,ocr={adapters}/teacher-ocr",
                                         "--anchor", f"{adapters}/teacher-quality", "--epochs", "2", "--eval-every", "0",
                                         "--out", f"{out}/stage3"], 2 * 32 * 10)}  # epochs x trajectories x steps
    forward_flops, train_flops = miniature_flops_per_sample()
    peak = matmul_peak(torch.float32, sizes=(1024, 2048), repeats=10)  # the loops run in fp32 where bf16 is emulated
    for name, (main, argv, trajectory_steps) in runs.items():
        fraction, seconds, samples = loop_efficiency(main, argv)
        gflops = (samples["no_grad"] * forward_flops + samples["grad"] * train_flops) / seconds / 1e9
        results.update({f"loop_efficiency_{name}": fraction, f"loop_seconds_{name}_2_epochs": seconds,
                        f"{name}_trajectory_steps_per_second": trajectory_steps / seconds,
                        f"{name}_loop_gflops": gflops, f"{name}_loop_mfu_fp32": gflops / peak})
    results["loops_fp32_peak_gflops"] = peak


def modes(results, batch=16, repeats=5):
    """Seconds of one miniature training pass (student LoRA forward + backward, batch 16, CFG 4.5) and of one
    no-grad forward, for eager fp32, eager bf16 autocast, compiled fp32 and compiled bf16 autocast."""
    bundle = training.load_model("miniature/base")
    policy = training.make_policy(bundle.transformer, 32, 64, targets=bundle.defaults["lora_targets"])
    shape = bundle.latent_shape(bundle.resolution)
    x = torch.randn(batch, *shape)
    embeds, pooled = bundle.encode(["a photo of a red circle"] * batch)
    negative = bundle.encode([""])
    compiled = torch.compile(policy)
    timings = {}
    for name, model, bf16 in (("eager_fp32", policy, False), ("eager_bf16", policy, True),
                              ("compiled_fp32", compiled, False), ("compiled_bf16", compiled, True)):
        for grad in (True, False):
            seconds = []
            for _ in range(repeats + 1):  # the first run compiles / warms up
                start = time.perf_counter()
                with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    v = common.velocity(model, x, 0.5, embeds, pooled, 4.5, negative)
                if grad:
                    v.float().square().mean().backward()
                seconds.append(time.perf_counter() - start)
            timings[f"{name}_{'train' if grad else 'forward'}"] = min(seconds[1:])
            if name.startswith("compiled"):  # the first call's extra time: what --compile costs per run and shape
                results[f"miniature_compile_seconds_{name}_{'train' if grad else 'forward'}"] = seconds[0] - min(seconds[1:])
    results.update({f"miniature_seconds_{k}": v for k, v in timings.items()})
    results["compile_speedup_train_bf16"] = timings["eager_bf16_train"] / timings["compiled_bf16_train"]
    results["bf16_speedup_train_eager"] = timings["eager_fp32_train"] / timings["eager_bf16_train"]
    results["bf16_speedup_forward_eager"] = timings["eager_fp32_forward"] / timings["eager_bf16_forward"]
    results["compile_speedup_forward_bf16"] = timings["eager_bf16_forward"] / timings["compiled_bf16_forward"]


def sampler(results, prompts=64, steps=20):
    """Images per second of the miniature eval sampler (deterministic ODE, 20 steps, CFG 4.5, batch 64):
    in fp32 (eval.py's default on fp32 weights), and in bf16 autocast where bf16 is native (the
    default of the stages' rollouts there)."""
    bundle = training.load_model("miniature/base")
    items = toy_world.test_items()[:prompts]
    for bf16 in (False, True) if common.bf16_is_fast() else (False,):
        evaluation.sample_images(bundle, [p for p, _ in items[:4]], list(range(4)), 2, 4.5, bf16=bf16)  # warm-up
        start = time.perf_counter()
        evaluation.sample_images(bundle, [p for p, _ in items], list(range(prompts)), steps, 4.5, bf16=bf16)
        results["sampler_images_per_second" + ("_bf16" if bf16 else "")] = prompts / (time.perf_counter() - start)
    results.pop("sampler_bf16", None)  # replaced by the two keys


def best_seconds(function, repeats=5):
    function()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def overheads(results, batch=16):
    """Before/after seconds of the overheads the stages avoid, on the miniature model (batch 16, CFG 4.5):
    teacher and anchor velocities in one mixed-adapter call vs two calls; the single conditional call at
    guidance 1 vs a doubled CFG batch; a per-step .item() host sync vs accumulating on the device;
    encoding the epoch's prompts once vs at every step."""
    import stage3_opd
    bundle = training.load_model("miniature/base")
    policy = training.make_policy(bundle.transformer, 32, 64, targets=bundle.defaults["lora_targets"])
    adapters = "results/adapters"
    teacher_of, anchor = stage3_opd.load_guides(policy, {"geneval": f"{adapters}/teacher-geneval",
                                                         "ocr": f"{adapters}/teacher-ocr"}, f"{adapters}/teacher-quality")
    x = torch.randn(batch, *bundle.latent_shape(bundle.resolution))
    prompts = ["a photo of a red circle", 'a sign that says "K7"'] * (batch // 2)
    embeds, pooled = bundle.encode(prompts)
    negative = bundle.encode([""])
    names = [teacher_of["geneval"], teacher_of["ocr"]] * (batch // 2)

    @torch.no_grad()
    def mixed():
        common.velocity(policy, x.repeat(2, 1, 1, 1), 0.5, embeds.repeat(2, 1, 1), pooled.repeat(2, 1), 4.5, negative,
                        adapter_names=names + [anchor] * batch)

    @torch.no_grad()
    def separate():  # one call per teacher (each on its own samples) and one for the anchor
        for name in (teacher_of["geneval"], teacher_of["ocr"], anchor):
            rows = [i for i, n in enumerate(names) if n == name] if name != anchor else list(range(batch))
            with common.use_adapter(policy, name):
                common.velocity(policy, x[rows], 0.5, embeds[rows], pooled[rows], 4.5, negative)

    @torch.no_grad()
    def guided(scale):
        return lambda: common.velocity(policy, x, 0.5, embeds, pooled, scale, negative)

    def train_steps(sync):
        def run():
            total = torch.zeros(())
            for _ in range(3):
                v = common.velocity(policy, x, 0.5, embeds, pooled, 4.5, negative)
                loss = v.square().mean()
                loss.backward()
                if sync:
                    float(loss.item())
                else:
                    total += loss.detach()
            total.item()
        return run
    steps = 10
    results.update({
        "overhead_guides_seconds_separate_calls": best_seconds(separate),
        "overhead_guides_seconds_one_mixed_call": best_seconds(mixed),
        "overhead_cfg_seconds_doubled_batch_at_guidance_1": best_seconds(guided(1.0000001)),
        "overhead_cfg_seconds_single_call_at_guidance_1": best_seconds(guided(1.0)),
        "overhead_sync_seconds_3_steps_item_per_step": best_seconds(train_steps(True)),
        "overhead_sync_seconds_3_steps_accumulated": best_seconds(train_steps(False)),
        "overhead_text_seconds_encode_every_step": best_seconds(lambda: [bundle.encode(prompts) for _ in range(steps)]),
        "overhead_text_seconds_encode_once": best_seconds(lambda: bundle.encode(prompts)),
    })


def pipeline_minutes(results):
    """Wall minutes of the README's main command, `python pipeline.py`, from scratch (it writes results/)."""
    import pipeline
    if os.path.exists("runs"):
        raise SystemExit("bench.py pipeline times the pipeline from scratch: move the runs/ folder away first")
    start = time.perf_counter()
    pipeline.main([])
    results["full_pipeline_minutes"] = (time.perf_counter() - start) / 60


ENGLISH_PHRASES = ("Hello World", "OPEN 24 HOURS", "Fresh Coffee", "No Parking", "Welcome Home", "EXIT", "Sale 50% Off",
                   "Keep Calm", "Good Morning", "Library", "Danger High Voltage", "Happy Birthday", "Stop", "Pizza Place",
                   "Bus Stop", "Flow Matching", "Quiet Please", "Coffee Shop", "Thank You", "Summer 2024")


def ocr(results):
    """The OCR reward (METHOD.md §8) of the shipped recogniser (rapidocr's PP-OCRv6 small, multilingual:
    Chinese + English + ...; flow_grpo uses PaddleOCR lang="en", which rapidocr would download) on
    renders that are exactly right, so that 1 - reward is the engine's own error: the miniature's test
    signs at 64 px (recognition only, as the miniature scores) and English phrases drawn 48 px high on
    a 512 px canvas (detection + recognition, as the real path scores)."""
    import random
    from PIL import Image, ImageDraw, ImageFont
    import numpy as np
    signs = [p for p, _ in common.load_prompts("dataset/ocr/test.txt")] if os.path.isfile("dataset/ocr/test.txt") else \
        [p for p, _ in toy_world.test_items() if '"' in p]
    rng = random.Random(0)
    images = np.stack([np.asarray(toy_world.render(p, rng=rng)) for p in signs])
    texts = toy_world.ocr_read(images, mode="rec")
    small = [toy_world.ocr_reward(t, p) for t, p in zip(texts, signs)]
    font = ImageFont.load_default(size=48)
    phrases, pictures = [], []
    for i, phrase in enumerate(ENGLISH_PHRASES):
        picture = Image.new("RGB", (512, 512), (235, 235, 225))
        ImageDraw.Draw(picture).text((40 + 10 * (i % 5), 200 + 20 * (i % 7)), phrase, fill=(20, 20, 20), font=font)
        pictures.append(np.asarray(picture))
        phrases.append(f'a sign that says "{phrase}"')
    texts = toy_world.ocr_read(np.stack(pictures), mode="det")
    large = [toy_world.ocr_reward(t, p) for t, p in zip(texts, phrases)]
    results.update({"ocr_rendered_signs_64px_mean_reward": float(np.mean(small)),
                    "ocr_rendered_signs_64px_exact": float(np.mean(np.array(small) == 1)),
                    "ocr_rendered_english_512px_mean_reward": float(np.mean(large)),
                    "ocr_rendered_english_512px_exact": float(np.mean(np.array(large) == 1)),
                    "ocr_rendered_english_512px_misread": [t for t, r in zip(texts, large) if r < 1]})


def run_worker(*args):
    out = subprocess.run([sys.executable, __file__, "sd35m-worker", *(str(int(a) if isinstance(a, bool) else a) for a in args)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_matmul_peak(dtype=torch.bfloat16, n=8192, repeats=10):
    """GFLOP/s of an n^3 matmul on the GPU on random data: the median of `repeats` after 3 warm-ups."""
    a, b = torch.randn(n, n, dtype=dtype, device="cuda"), torch.randn(n, n, dtype=dtype, device="cuda")
    times = []
    for i in range(3 + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times[3:])[repeats // 2] / 1e9


# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity), by a word of the device name
SPEC_PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def spec_peak(name):
    return next((peak for key, peak in SPEC_PEAK_BF16_TFLOPS.items() if key in name), None)


GPU_CASES = [  # (layout, checkpointing, prompts, compiled, flash): the plan's table, then what speeds the step up
    ("adapters", 0, 1, 0, 0), ("adapters", 0, 4, 0, 0), ("adapters", 1, 1, 0, 0), ("adapters", 1, 16, 0, 0),
    ("adapters", 0, 4, 1, 0), ("adapters", 0, 4, 0, 1), ("adapters", 0, 8, 1, 1), ("copies", 0, 1, 0, 0),
    ("student", 0, 1, 0, 0), ("student", 1, 1, 0, 0), ("sampler", 0, 16, 0, 0), ("sampler", 0, 16, 1, 1)]


def sd35m_gpu(results, smoke=False):
    """The plan's table, measured: Stage 3 at 512 px with CFG per prompts-per-chunk, with and without
    gradient checkpointing, adapters vs copies, the student's plain training step, and the eval sampler's
    step; then torch.compile (adapters in place), the flash SDPA kernel, and larger chunks without
    recomputation. Each: peak = the CUDA allocator's peak of its process (T5 and the CLIP encoders are
    not loaded: add their weights), achieved TFLOP/s (FLOPs counted eagerly, recomputation included) and
    the fraction of the measured matmul peak and of the data-sheet peak. A profiler trace of the first
    case goes to runs/bench-profile/. `smoke`: one layer at 128 px on the CPU, nothing recorded (the path's test)."""
    device, resolution, layers = ("cpu", 128, 1) if smoke else ("cuda", 512, 24)
    peak = matmul_peak(torch.bfloat16, sizes=(512,), repeats=2) if smoke else cuda_matmul_peak()
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
    results["gpu_name"], results["gpu_peak_bf16_gflops"] = name, peak
    results["gpu_spec_peak_bf16_tflops"] = spec_peak(name)
    flops_of = {}
    smoke_cases = [GPU_CASES[0], ("adapters", 0, 2, 1, 1), ("sampler", 0, 2, 0, 0)]
    for i, (layout, checkpointing, prompts, compiled, flash) in enumerate(smoke_cases if smoke else GPU_CASES):
        key = (f"gpu_sd35m_{resolution}_{layout}_{'ckpt_' if checkpointing else ''}{prompts}p"
               f"{'_compiled' if compiled else ''}{'_flash' if flash else ''}")
        try:
            m = run_worker(layout, resolution, checkpointing, prompts, device, compiled, flash, layers,
                           "runs/bench-profile" if i == 0 else "")
        except SystemExit as error:  # e.g. out of memory: record it and go on
            print(error, file=sys.stderr)
            results[key + "_error"] = str(error).strip().splitlines()[-1][:200]
            continue
        results[key + "_peak_gib"] = m["peak_gib"]
        results[key + "_step_seconds"] = m["step_seconds"]
        if m["flops"]:  # compiled: the eager count of the same step, which is linear in the prompts
            flops_of[(layout, checkpointing)] = m["flops"] / prompts
        flops = m["flops"] or flops_of.get((layout, checkpointing), 0) * prompts
        if flops:
            results[key + "_tflops_achieved"] = flops / m["step_seconds"] / 1e12
            results[key + "_mfu"] = flops / m["step_seconds"] / 1e9 / peak
            if results["gpu_spec_peak_bf16_tflops"]:
                results[key + "_fraction_of_spec_peak"] = flops / m["step_seconds"] / 1e12 / results["gpu_spec_peak_bf16_tflops"]
        print(json.dumps({key: m}), flush=True)


def sd35m(results):
    peak = matmul_peak(torch.bfloat16)
    adapters = run_worker("adapters", 256, 0, 1, "cpu")
    copies = run_worker("copies", 256, 0, 1, "cpu")
    plain = run_worker("student", 512, 0, 1, "cpu")
    checkpointed = run_worker("student", 512, 1, 1, "cpu")
    results.update({
        "sd35m_params": adapters["params"],
        "sd35m_stage3_peak_rss_gib_adapters": adapters["peak_gib"],
        "sd35m_stage3_peak_rss_gib_copies": copies["peak_gib"],
        "sd35m_stage3_rss_ratio_adapters_vs_copies": adapters["peak_gib"] / copies["peak_gib"],
        "sd35m_opd_step_seconds_256": adapters["step_seconds"],
        "sd35m_opd_step_seconds_256_copies": copies["step_seconds"],
        "sd35m_opd_step_gflop_256": adapters["flops"] / 1e9,
        "sd35m_train_step_512_peak_rss_gib": plain["peak_gib"],
        "sd35m_train_step_512_peak_rss_gib_checkpointing": checkpointed["peak_gib"],
        "sd35m_train_step_512_seconds": plain["step_seconds"],
        "sd35m_train_step_512_seconds_checkpointing": checkpointed["step_seconds"],
        "sd35m_peak_bf16_gflops": peak,  # measured here, on the same machine as the step
        "sd35m_opd_step_mfu": adapters["flops"] / adapters["step_seconds"] / 1e9 / peak,
    })


def write(results, command):
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {common.bf16_is_fast()}"
                          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)
    results.setdefault("machine_of", {})[command] = results["machine"]  # machines differ between sessions
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)
    write_markdown(results)


def write_markdown(results):
    """BENCHMARKS.md: every key of BENCHMARKS.json, under the machine each command last ran on."""
    lines = ["# Benchmarks", "", "Each command's numbers come from the machine it last ran on:", ""]
    lines += [f"- `{c}`: {results['machine_of'].get(c, 'x86_64, 2 cores, torch 2.13.0+cpu, native bf16')}" for c in results["commands"]]
    lines += ["", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()
              if k not in ("machine", "commands", "machine_of")]
    with open("BENCHMARKS.md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["peak", "sd35m", "sd35m-gpu", "loops", "modes", "sampler", "overheads",
                                    "pipeline", "ocr", "sd35m-worker"], help="which benchmark (see above)")
    p.add_argument("worker_args", nargs="*",
                   help="internal: layout, resolution, checkpointing, prompts, device[, compiled, flash, layers, profile]")
    p.add_argument("--smoke", action="store_true",
                   help="sd35m-gpu's path on the CPU with one layer at 128 px; records nothing (checks the script)")
    args = p.parse_args(argv)
    if args.what == "sd35m-worker":
        layout, resolution, checkpointing, prompts, device, *more = args.worker_args
        compiled, flash, layers, profile = (more + ["0", "0", "24", ""])[:4] if len(more) < 4 else more
        return sd35m_worker(layout, int(resolution), bool(int(checkpointing)), int(prompts), device, bool(int(compiled)),
                            bool(int(flash)), int(layers), profile or None)
    if args.smoke:
        results = {}
        sd35m_gpu(results, smoke=True)
        return print(json.dumps(results, indent=1))
    results = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    if args.what == "peak":
        results["peak_bf16_gflops"] = matmul_peak(torch.bfloat16)
        results["peak_fp32_gflops"] = matmul_peak(torch.float32)
    else:
        {"loops": loops, "modes": modes, "pipeline": pipeline_minutes, "sampler": sampler, "overheads": overheads,
         "sd35m-gpu": sd35m_gpu, "sd35m": sd35m, "ocr": ocr}[args.what](results)
    write(results, f"python bench.py {args.what}")
    print(json.dumps({k: v for k, v in results.items() if k != "commands"}, indent=1))


if __name__ == "__main__":
    training.run_cli(main)
