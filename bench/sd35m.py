"""SD3.5-Medium's full-size transformer with random bf16 weights: the measurements of `python -m bench sd35m`
(this CPU) and `python -m bench sd35m-gpu` (a CUDA GPU), each in its own process (`python -m bench.sd35m
worker ...`), so that its peak memory is its own. bench/__main__.py records the results."""
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

import common
import loading
import training

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
    policy = training.make_policy(build_sd35m(device, layers), 32, 64, targets=loading.FLOW_GRPO_LORA_TARGETS).to(device)
    if checkpointing:
        policy.get_base_model().enable_gradient_checkpointing()
    if layout == "adapters":  # Flow-OPD here: 2 teachers + the anchor as adapters on the student's base
        for i, name in enumerate(("teacher_geneval", "teacher_ocr", "anchor")):
            random_guide(policy, name, i)
        loading.freeze_all_but(policy, "student")
        guides = ("mixed", policy, ["teacher_geneval", "anchor"])
    elif layout == "copies":  # the released layout: a separate model per teacher; its default anchor is the
        copies = []           # base, i.e. the student's model with its adapter disabled (one copy fewer than ours)
        for i in range(2):
            copy = loading.add_lora(build_sd35m(device, layers), 32, 64, loading.FLOW_GRPO_LORA_TARGETS, name="guide").to(device)
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


def run_worker(*args, timeout=None):
    """One measurement in its own process (its peak memory is its own); SystemExit on failure or past `timeout` s."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `-m bench.sd35m` imports the stages from there
    try:
        out = subprocess.run([sys.executable, "-m", "bench.sd35m", "worker",
                              *(str(int(a) if isinstance(a, bool) else a) for a in args)],
                             capture_output=True, text=True, cwd=root, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"worker {args} stopped at the budget's {timeout:.0f} s") from None
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


GPU_CASES = [  # (layout, checkpointing, prompts, compiled, flash), the most informative first: the recipe's
    # chunk plain and with each lever, then the memory plan's table, the student alone and the eval sampler
    ("adapters", 0, 4, 0, 0), ("adapters", 0, 4, 1, 0), ("adapters", 0, 4, 0, 1), ("adapters", 1, 8, 0, 0),
    ("adapters", 0, 8, 1, 1), ("sampler", 0, 16, 0, 0), ("adapters", 0, 1, 0, 0), ("adapters", 1, 1, 0, 0),
    ("adapters", 1, 16, 0, 0), ("sampler", 0, 16, 1, 1), ("copies", 0, 1, 0, 0), ("student", 0, 1, 0, 0),
    ("student", 1, 1, 0, 0)]
SMOKE_CASES = [("adapters", 0, 1, 0, 0), ("adapters", 0, 2, 1, 1), ("sampler", 0, 2, 0, 0)]


def case_name(layout, checkpointing, prompts, compiled, flash):
    """adapters_ckpt_8p_compiled_flash: what --cases takes and what the result keys carry."""
    return (f"{layout}_{'ckpt_' if checkpointing else ''}{prompts}p{'_compiled' if compiled else ''}"
            f"{'_flash' if flash else ''}")


def pick_cases(names, cases=GPU_CASES):
    """The cases named in a comma-separated `names` (all when empty), in the order of `cases`."""
    known = {case_name(*case): case for case in cases}
    wanted = [n for n in (names or "").split(",") if n]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise loading.UserError(f"unknown case(s) {unknown} in --cases; expected some of {list(known)}")
    return [case for name, case in known.items() if not wanted or name in wanted]


def sd35m_gpu(results, smoke=False, cases="", budget_seconds=240.0, log=None, worker=None):
    """The plan's table, measured: Stage 3 at 512 px with CFG per prompts-per-chunk, with and without
    gradient checkpointing, torch.compile (adapters in place), the flash SDPA kernel, adapters vs copies, the
    student's plain training step, and the eval sampler's step. Each: peak = the CUDA allocator's peak of its
    process (T5 and the CLIP encoders are not loaded: add their weights), achieved TFLOP/s (FLOPs counted
    eagerly, recomputation included) and the fraction of the measured matmul peak and of the data-sheet peak.
    Built for a short GPU loan: the cases run most informative first; before each, a case that could not finish
    within `budget_seconds` (at the pace of the slowest so far) is skipped; each result is added to `results`
    and appended to the JSON-lines file `log` the moment it exists, so whatever ends the run keeps it.
    A profiler trace of the first case goes to runs/bench-profile/. `smoke`: one layer at 128 px on the CPU
    (torch.compile included), nothing recorded (the path's test). `worker`: run_worker (a stand-in in tests)."""
    worker = worker or run_worker
    device, resolution, layers = ("cpu", 128, 1) if smoke else ("cuda", 512, 24)
    start = time.time()
    peak = matmul_peak(torch.bfloat16, sizes=(512,), repeats=2) if smoke else cuda_matmul_peak()
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
    results["gpu_name"], results["gpu_peak_bf16_gflops"] = name, peak
    results["gpu_spec_peak_bf16_tflops"] = spec_peak(name)
    flops_of, slowest, summary = {}, 0.0, []
    for i, case in enumerate(pick_cases(cases, SMOKE_CASES if smoke else GPU_CASES)):
        layout, checkpointing, prompts, compiled, flash = case
        label = case_name(*case)
        key = f"gpu_sd35m_{resolution}_{label}"
        left = budget_seconds - (time.time() - start)
        if left < max(slowest, 1.0):
            summary.append((label, f"skipped: {left:.0f} s of the budget left"))
            continue
        began = time.time()
        try:
            m = worker(layout, resolution, checkpointing, prompts, device, compiled, flash, layers,
                       "runs/bench-profile" if i == 0 else "", timeout=left)
        except SystemExit as error:  # out of memory, or past the budget: record it and go on
            print(error, file=sys.stderr)
            m = {"error": str(error).strip().splitlines()[-1][:200]}
        slowest = max(slowest, time.time() - began)
        record = case_result(key, m, prompts, flops_of, (layout, checkpointing), peak, results["gpu_spec_peak_bf16_tflops"])
        results.update(record)
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({"case": label, "device": name, **record}) + "\n")
        summary.append((label, summary_line(m, record, key)))
        print(json.dumps({key: m}), flush=True)
    print(f"\nsd35m-gpu on {name}, matmul peak {peak / 1e3:.1f} TFLOP/s, {time.time() - start:.0f} s "
          f"(budget {budget_seconds:.0f} s):")
    for case, line in summary:
        print(f"  {case:<32} {line}")
    return summary


def summary_line(m, record, key):
    """One case's line of the closing summary: its error, or step time, peak memory and achieved throughput."""
    if "error" in m:
        return m["error"]
    line = f"{m['step_seconds']:.3f} s/step, {m['peak_gib']:.1f} GiB"
    if key + "_mfu" in record:
        line += f", {record[key + '_tflops_achieved']:.1f} TFLOP/s ({100 * record[key + '_mfu']:.0f} % of the matmul peak)"
    return line


def case_result(key, m, prompts, flops_of, family, peak, spec_tflops):
    """The result keys of one case: its error, or peak memory, step time, achieved TFLOP/s and the fractions of
    the measured and data-sheet peaks. A compiled case's FLOPs are the eager count of the same family, which
    is linear in the prompts (`flops_of` carries it from an earlier case)."""
    if "error" in m:
        return {key + "_error": m["error"]}
    out = {key + "_peak_gib": m["peak_gib"], key + "_step_seconds": m["step_seconds"]}
    if m["flops"]:
        flops_of[family] = m["flops"] / prompts
    flops = m["flops"] or flops_of.get(family, 0) * prompts
    if flops:
        out[key + "_tflops_achieved"] = flops / m["step_seconds"] / 1e12
        out[key + "_mfu"] = flops / m["step_seconds"] / 1e9 / peak
        if spec_tflops:
            out[key + "_fraction_of_spec_peak"] = flops / m["step_seconds"] / 1e12 / spec_tflops
    return out


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


if __name__ == "__main__":  # one worker: layout, resolution, checkpointing, prompts, device[, compiled, flash, layers, profile]
    layout, resolution, checkpointing, prompts, device, *more = sys.argv[2:]
    compiled, flash, layers, profile = more + ["0", "0", "24", ""][len(more):]
    sd35m_worker(layout, int(resolution), bool(int(checkpointing)), int(prompts), device, bool(int(compiled)),
                 bool(int(flash)), int(layers), profile or None)
