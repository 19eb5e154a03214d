"""Benchmarks (measured, never asserted by tests). Results are merged into BENCHMARKS.json (read by
other tools) and BENCHMARKS.md is rewritten from it.

    python bench.py peak      # the machine's bf16 / fp32 matmul peak (GFLOP/s)
    python bench.py sd35m     # full-size SD3.5-Medium transformer, random bf16 weights, this CPU:
                              #   Stage 3 peak RSS, adapters on one base vs one model copy per guide,
                              #   one OPD step at 256 px (time, FLOPs, MFU), and the memory of a
                              #   512 px training step with and without gradient checkpointing
    python bench.py loops     # the share of Stage 1 / Stage 3 training-loop time spent inside the
                              #   transformer's forward and backward (miniature defaults, 2 epochs each)
    python bench.py modes     # eager / torch.compile x fp32 / bf16 autocast, training pass and forward
    python bench.py pipeline  # minutes of the README's main command (python pipeline.py) from scratch

Each SD3.5-M measurement runs in its own process, so that its peak RSS is its own.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

import common

RESULTS = "BENCHMARKS.json"
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))  # its config.json
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens, as SD3.5-M's pipeline feeds them


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def matmul_peak(dtype, sizes=(1024, 2048, 4096), repeats=20):
    """GFLOP/s of square matmuls: the best over sizes and `repeats` timed runs after a warm-up (the peak
    moves by tens of % between runs on this shared 2-core machine, so the best is the honest limit)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def build_sd35m():
    """The SD3.5-M transformer with random weights, allocated once in bf16 (frozen, eval mode). Built on
    the meta device, then filled: a normal constructor's fp32 temporaries would stay in the allocator's
    arenas and inflate every peak-RSS number by ~1.5 GiB per model."""
    from diffusers import SD3Transformer2DModel
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**SD35M)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
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


def opd_step(policy, guides, optimizer, resolution, guidance=4.5):
    """One Stage 3 step for one prompt (M3-M5): the student's CFG velocity with grad, the routed teacher's
    and the anchor's under no_grad at the same state, KL + 0.04 KL_anchor, backward, AdamW step.
    `guides`: ("mixed", peft_model, [teacher, anchor]) = one mixed-adapter call on the student's base,
    or ("copies", [teacher_model, anchor_model]) = one call per separate model."""
    side = resolution // 8
    x = torch.randn(1, 16, side, side)
    embeds, pooled = torch.randn(1, TEXT_TOKENS, 4096), torch.randn(1, 2048)
    negative = (torch.zeros(1, TEXT_TOKENS, 4096), torch.zeros(1, 2048))
    sigma, sigma_next = 0.7, 0.6
    with torch.autocast("cpu", torch.bfloat16):
        v_student = common.velocity(policy, x, sigma, embeds, pooled, guidance, negative)
        with torch.no_grad():
            if guides[0] == "mixed":
                v_teacher, v_anchor = common.velocity(guides[1], x.expand(2, -1, -1, -1), sigma, embeds.expand(2, -1, -1),
                                                      pooled.expand(2, -1), guidance, negative,
                                                      adapter_names=guides[2]).chunk(2)
            else:
                v_teacher, v_anchor = (common.velocity(m, x, sigma, embeds, pooled, guidance, negative) for m in guides[1])
    kl = common.step_kl(v_student, v_teacher, sigma, sigma_next, 1.0, 0.7)
    kl_anchor = common.step_kl(v_student, v_anchor, sigma, sigma_next, 1.0, 0.7)
    (kl + 0.04 * kl_anchor).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sd35m_worker(layout, resolution, checkpointing, steps=2):
    """One measurement in this process: build the layout, run `steps` steps (the first counts FLOPs),
    time the last. Prints one JSON line."""
    start = time.time()
    policy = common.make_policy(build_sd35m(), 32, 64, targets=common.FLOW_GRPO_LORA_TARGETS)
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
            copy = common.add_lora(build_sd35m(), 32, 64, common.FLOW_GRPO_LORA_TARGETS, name="guide")
            random_guide(copy, "guide", i)
            copies.append(copy.eval().requires_grad_(False))
        guides = ("copies", [copies[0], BaseOf(policy)])  # the routed teacher (geneval) and the anchor
    else:  # the student alone, for the memory plan
        guides = None
    built = time.time() - start
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    from torch.utils.flop_counter import FlopCounterMode
    seconds, flops = [], 0
    for step in range(steps):
        t0 = time.perf_counter()
        if guides is None:
            x0 = torch.randn(1, 16, resolution // 8, resolution // 8)
            embeds, pooled = torch.randn(1, TEXT_TOKENS, 4096), torch.randn(1, 2048)
            loss = common.flow_matching_loss(policy, x0, embeds, pooled, bf16=True)  # bf16 weights
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elif step == 0:
            counter = FlopCounterMode(display=False)
            with counter:
                opd_step(policy, guides, optimizer, resolution)
            flops = counter.get_total_flops()
        else:
            opd_step(policy, guides, optimizer, resolution)
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"layout": layout, "resolution": resolution, "checkpointing": checkpointing,
                      "build_seconds": built, "step_seconds": seconds[-1], "flops": flops,
                      "peak_rss_gib": peak_rss_gib(), "params": sum(p.numel() for p in policy.get_base_model().parameters())}))


def loop_efficiency(stage_main, argv):
    """Runs a stage's main(argv) and splits the wall time of its training epochs (everything but model
    loading and the test evaluations) into time inside the transformer's forward and autograd's backward,
    and the rest (sampling bookkeeping, scoring, logging, I/O). Returns (fraction inside, seconds)."""
    from diffusers import SD3Transformer2DModel
    import eval as evaluation
    clock = {"model": 0.0, "excluded": 0.0, "excluding": False, "depth": 0}

    def timed(function, key):
        def wrapper(*args, **kwargs):
            if clock["depth"] or (key == "model" and clock["excluding"]):
                return function(*args, **kwargs)  # nested (a forward inside a forward) or inside an evaluation
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
                 common.load_model_from_args, common.save_adapter)
    SD3Transformer2DModel.forward = timed(originals[0], "model")
    torch.autograd.backward = timed(originals[1], "model")
    evaluation.evaluate_policy = timed(originals[2], "excluded")
    common.load_model_from_args = timed(originals[3], "excluded")
    common.save_adapter = timed(originals[4], "excluded")
    try:
        start = time.perf_counter()
        stage_main(argv)
        total = time.perf_counter() - start
    finally:
        (SD3Transformer2DModel.forward, torch.autograd.backward, evaluation.evaluate_policy,
         common.load_model_from_args, common.save_adapter) = originals
    loop = total - clock["excluded"]
    return clock["model"] / loop, loop


def loops(results, out="runs/bench-loops"):
    import stage1_grpo
    import stage3_opd
    fraction1, seconds1 = loop_efficiency(stage1_grpo.main, ["--reward", "geneval", "--epochs", "2", "--eval-every", "1000",
                                                             "--out", f"{out}/stage1"])
    adapters = "results/adapters"
    fraction3, seconds3 = loop_efficiency(stage3_opd.main, [
        "--teachers", f"geneval={adapters}/teacher-geneval,ocr={adapters}/teacher-ocr", "--anchor",
        f"{adapters}/teacher-quality", "--epochs", "2", "--eval-every", "1000", "--out", f"{out}/stage3"])
    results.update({"loop_efficiency_stage1": fraction1, "loop_seconds_stage1_2_epochs": seconds1,
                    "loop_efficiency_stage3": fraction3, "loop_seconds_stage3_2_epochs": seconds3})


def modes(results, batch=16, repeats=5):
    """Seconds of one miniature training pass (student LoRA forward + backward, batch 16, CFG 4.5) and of one
    no-grad forward, for eager fp32, eager bf16 autocast, compiled fp32 and compiled bf16 autocast."""
    bundle = common.load_model("miniature/base")
    policy = common.make_policy(bundle.transformer, 32, 64, targets=bundle.defaults["lora_targets"])
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
    results.update({f"miniature_seconds_{k}": v for k, v in timings.items()})
    results["compile_speedup_train_bf16"] = timings["eager_bf16_train"] / timings["compiled_bf16_train"]
    results["bf16_speedup_train_eager"] = timings["eager_fp32_train"] / timings["eager_bf16_train"]
    results["bf16_speedup_forward_eager"] = timings["eager_fp32_forward"] / timings["eager_bf16_forward"]
    results["compile_speedup_forward_bf16"] = timings["eager_bf16_forward"] / timings["compiled_bf16_forward"]


def pipeline_minutes(results):
    """Wall minutes of the README's main command, `python pipeline.py`, from scratch (it writes results/)."""
    import pipeline
    if os.path.exists("runs"):
        raise SystemExit("bench.py pipeline times the pipeline from scratch: move the runs/ folder away first")
    start = time.perf_counter()
    pipeline.main([])
    results["full_pipeline_minutes"] = (time.perf_counter() - start) / 60


def run_worker(*args):
    out = subprocess.run([sys.executable, __file__, "sd35m-worker", *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sd35m(results):
    adapters = run_worker("adapters", 256, 0)
    copies = run_worker("copies", 256, 0)
    plain = run_worker("student", 512, 0)
    checkpointed = run_worker("student", 512, 1)
    results.update({
        "sd35m_params": adapters["params"],
        "sd35m_stage3_peak_rss_gib_adapters": adapters["peak_rss_gib"],
        "sd35m_stage3_peak_rss_gib_copies": copies["peak_rss_gib"],
        "sd35m_stage3_rss_ratio_adapters_vs_copies": adapters["peak_rss_gib"] / copies["peak_rss_gib"],
        "sd35m_opd_step_seconds_256": adapters["step_seconds"],
        "sd35m_opd_step_seconds_256_copies": copies["step_seconds"],
        "sd35m_opd_step_gflop_256": adapters["flops"] / 1e9,
        "sd35m_train_step_512_peak_rss_gib": plain["peak_rss_gib"],
        "sd35m_train_step_512_peak_rss_gib_checkpointing": checkpointed["peak_rss_gib"],
        "sd35m_train_step_512_seconds": plain["step_seconds"],
        "sd35m_train_step_512_seconds_checkpointing": checkpointed["step_seconds"],
    })


def write(results, command):
    if "sd35m_opd_step_gflop_256" in results and "peak_bf16_gflops" in results:  # against the latest peak
        results["sd35m_opd_step_mfu"] = (results["sd35m_opd_step_gflop_256"] / results["sd35m_opd_step_seconds_256"]
                                         / results["peak_bf16_gflops"])
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {common.bf16_is_fast()}")
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)
    results.setdefault("machine_of", {})[command] = results["machine"]  # machines differ between sessions
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)
    lines = ["# Benchmarks", "", "Each command's numbers come from the machine it last ran on:", ""]
    lines += [f"- `{c}`: {results['machine_of'].get(c, 'x86_64, 2 cores, torch 2.13.0+cpu, native bf16')}" for c in results["commands"]]
    lines += ["", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()
              if k not in ("machine", "commands", "machine_of")]
    with open("BENCHMARKS.md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["peak", "sd35m", "loops", "modes", "pipeline", "sd35m-worker"])  # which benchmark
    p.add_argument("worker_args", nargs="*")  # internal: layout, resolution, checkpointing of one worker
    args = p.parse_args(argv)
    if args.what == "sd35m-worker":
        layout, resolution, checkpointing = args.worker_args
        return sd35m_worker(layout, int(resolution), bool(int(checkpointing)))
    results = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    if args.what == "peak":
        results["peak_bf16_gflops"] = matmul_peak(torch.bfloat16)
        results["peak_fp32_gflops"] = matmul_peak(torch.float32)
    elif args.what == "loops":
        loops(results)
    elif args.what == "modes":
        modes(results)
    elif args.what == "pipeline":
        pipeline_minutes(results)
    else:
        sd35m(results)
    write(results, f"python bench.py {args.what}")
    print(json.dumps({k: v for k, v in results.items() if k != "commands"}, indent=1))


if __name__ == "__main__":
    main()
