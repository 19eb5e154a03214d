r"""Benchmarks (measured, never asserted by tests). Results are merged into BENCHMARKS.json (read by
other tools) and BENCHMARKS.md is rewritten from it.

    python -m bench peak      # the machine's bf16 / fp32 matmul peak (GFLOP/s)
    python -m bench sd35m-gpu # the same transformer on a CUDA GPU at the paper's 512 px: Stage 3 step and eval
                              #   sampler step time, achieved TFLOP/s and fraction of peak, the allocator's peak
                              #   per prompts-per-chunk, checkpointing on/off, torch.compile, flash SDPA
                              #   (--smoke: the same path on the CPU, one layer, nothing recorded)
    python -m bench sd35m     # full-size SD3.5-Medium transformer, random bf16 weights, this CPU:
                              #   Stage 3 peak RSS, adapters on one base vs one model copy per guide,
                              #   one OPD step at 256 px (time, FLOPs, MFU), and the memory of a
                              #   512 px training step with and without gradient checkpointing
    python -m bench loops     # the share of Stage 1 / Stage 3 training-loop time spent inside the
                              #   transformer's forward and backward (miniature defaults, 2 epochs each)
    python -m bench modes     # eager / torch.compile x fp32 / bf16 autocast, training pass and forward
    python -m bench sampler   # images per second of the miniature eval sampler
    python -m bench overheads # before/after seconds of the overheads the stages avoid
    python -m bench demo      # minutes of `make demo` on a fresh clone of HEAD, set-up included
    python -m bench pipeline  # minutes of everything from scratch: python pipeline.py --from-scratch --full
    python -m bench ocr       # the shipped rapidocr recogniser on rendered English text: the OCR reward of
                              #   perfect renders (miniature signs at 64 px; English phrases at 512 px, det+rec)

The SD3.5-M measurements live in bench/sd35m.py; each runs in its own process, so that its peak memory is its own.
"""
import argparse
import json
import os
import signal
import sys
import time

import torch

import common
import loading
import eval as evaluation
import miniature.world
import training
from bench.sd35m import matmul_peak, sd35m, sd35m_gpu  # the full-size SD3.5-M measurements, each in its own process

RESULTS = "BENCHMARKS.json"
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
                 training.load_model_from_args, loading.save_adapter)
    SD3Transformer2DModel.forward = timed(originals[0], "model")
    torch.autograd.backward = timed(originals[1], "model")
    evaluation.evaluate_policy = timed(originals[2], "excluded")
    training.load_model_from_args = timed(originals[3], "excluded")
    loading.save_adapter = timed(originals[4], "excluded")
    try:
        start = time.perf_counter()
        stage_main(argv)
        total = time.perf_counter() - start
    finally:
        (SD3Transformer2DModel.forward, torch.autograd.backward, evaluation.evaluate_policy,
         training.load_model_from_args, loading.save_adapter) = originals
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
    adapters = "miniature/teachers"  # the published teachers and anchor
    runs = {"stage1": (stage1_grpo.main, ["--reward", "geneval", "--epochs", "2", "--eval-every", "0",
                                          "--out", f"{out}/stage1"], 2 * 8 * 8 * 10),
            "stage3": (stage3_opd.main, ["--teachers", f"geneval={adapters}/geneval,ocr={adapters}/ocr",
                                         "--anchor", f"{adapters}/quality", "--epochs", "2", "--eval-every", "0",
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
    items = miniature.world.test_items()[:prompts]
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
    adapters = "miniature/teachers"  # the published teachers and anchor
    teacher_of, anchor = stage3_opd.load_guides(policy, {"geneval": f"{adapters}/geneval", "ocr": f"{adapters}/ocr"},
                                                f"{adapters}/quality")
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
            with loading.use_adapter(policy, name):
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
    """Wall minutes of every product from scratch, `python pipeline.py --from-scratch --full` (it writes results/)."""
    import pipeline
    if os.path.exists("runs"):
        raise SystemExit("python -m bench pipeline times the pipeline from scratch: move the runs/ folder away first")
    start = time.perf_counter()
    pipeline.main(["--from-scratch", "--full"])
    results["full_pipeline_minutes"] = (time.perf_counter() - start) / 60


def demo_minutes(results):
    """Wall minutes of the README's main command, `make demo`, on a fresh clone of HEAD: the virtual environment,
    the packages (pip's cache as this machine has it), the published teachers' Stage 2 and 3, and the table."""
    import subprocess
    import tempfile
    folder = tempfile.mkdtemp(prefix="flow-opd-demo-")
    subprocess.run(["git", "clone", "-q", os.getcwd(), folder], check=True)
    start = time.perf_counter()
    subprocess.run(["make", "demo"], cwd=folder, check=True)
    results["demo_minutes"] = (time.perf_counter() - start) / 60
    results["demo_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, check=True,
                                            capture_output=True, text=True).stdout.strip()
    print(f"make demo took {results['demo_minutes']:.1f} min; its results are in {folder}/results")


ENGLISH_PHRASES = ("Hello World", "OPEN 24 HOURS", "Fresh Coffee", "No Parking", "Welcome Home", "EXIT", "Sale 50% Off",
                   "Keep Calm", "Good Morning", "Library", "Danger High Voltage", "Happy Birthday", "Stop", "Pizza Place",
                   "Bus Stop", "Flow Matching", "Quiet Please", "Coffee Shop", "Thank You", "Summer 2024")


def ocr(results):
    """The OCR reward (docs/method.md M8) of the shipped recogniser (rapidocr's PP-OCRv6 small, multilingual:
    Chinese + English + ...; flow_grpo uses PaddleOCR lang="en", which rapidocr would download) on
    renders that are exactly right, so that 1 - reward is the engine's own error: the miniature's test
    signs at 64 px (recognition only, as the miniature scores) and English phrases drawn 48 px high on
    a 512 px canvas (detection + recognition, as the real path scores)."""
    import random
    from PIL import Image, ImageDraw, ImageFont
    import numpy as np
    signs = [p for p, _ in loading.load_prompts("dataset/ocr/test.txt")] if os.path.isfile("dataset/ocr/test.txt") else \
        [p for p, _ in miniature.world.test_items() if '"' in p]
    rng = random.Random(0)
    images = np.stack([np.asarray(miniature.world.render(p, rng=rng)) for p in signs])
    texts = miniature.world.ocr_read(images, mode="rec")
    small = [miniature.world.ocr_reward(t, p) for t, p in zip(texts, signs)]
    font = ImageFont.load_default(size=48)
    phrases, pictures = [], []
    for i, phrase in enumerate(ENGLISH_PHRASES):
        picture = Image.new("RGB", (512, 512), (235, 235, 225))
        ImageDraw.Draw(picture).text((40 + 10 * (i % 5), 200 + 20 * (i % 7)), phrase, fill=(20, 20, 20), font=font)
        pictures.append(np.asarray(picture))
        phrases.append(f'a sign that says "{phrase}"')
    texts = miniature.world.ocr_read(np.stack(pictures), mode="det")
    large = [miniature.world.ocr_reward(t, p) for t, p in zip(texts, phrases)]
    results.update({"ocr_rendered_signs_64px_mean_reward": float(np.mean(small)),
                    "ocr_rendered_signs_64px_exact": float(np.mean(np.array(small) == 1)),
                    "ocr_rendered_english_512px_mean_reward": float(np.mean(large)),
                    "ocr_rendered_english_512px_exact": float(np.mean(np.array(large) == 1)),
                    "ocr_rendered_english_512px_misread": [t for t, r in zip(texts, large) if r < 1]})


def write(results, command):
    results["machine"] = (f"{training.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
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
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["peak", "sd35m", "sd35m-gpu", "loops", "modes", "sampler", "overheads",
                                    "pipeline", "demo", "ocr"], help="which benchmark (see above)")
    p.add_argument("--smoke", action="store_true",
                   help="sd35m-gpu's path on the CPU with one layer at 128 px, compile included; records nothing")
    p.add_argument("--budget-seconds", type=training.positive_float, default=240.0,
                   help="sd35m-gpu: skip a case that could not finish within this many seconds of the start")
    p.add_argument("--cases", default="", help="sd35m-gpu: comma-separated case names (default: all, most "
                   "informative first; e.g. adapters_4p,adapters_4p_compiled)")
    p.add_argument("--log", default="runs/bench/sd35m-gpu.jsonl",
                   help="sd35m-gpu: JSON-lines file each case's result is appended to as it finishes")
    args = p.parse_args(argv)
    if args.smoke:
        results = {}
        sd35m_gpu(results, smoke=True, cases=args.cases, budget_seconds=args.budget_seconds)
        return print(json.dumps(results, indent=1))
    results = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    if args.what == "sd35m-gpu":  # a short GPU loan: whatever ends the run, the finished cases are merged
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run unwinds through finally
        os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
        try:
            sd35m_gpu(results, cases=args.cases, budget_seconds=args.budget_seconds, log=args.log)
        finally:
            write(results, "python -m bench sd35m-gpu")
            signal.signal(signal.SIGTERM, previous)
        return
    if args.what == "peak":
        results["peak_bf16_gflops"] = matmul_peak(torch.bfloat16)
        results["peak_fp32_gflops"] = matmul_peak(torch.float32)
    else:
        {"loops": loops, "modes": modes, "pipeline": pipeline_minutes, "demo": demo_minutes, "sampler": sampler,
         "overheads": overheads, "sd35m-gpu": sd35m_gpu, "sd35m": sd35m, "ocr": ocr}[args.what](results)
    write(results, f"python -m bench {args.what}")
    print(json.dumps({k: v for k, v in results.items() if k != "commands"}, indent=1))


if __name__ == "__main__":
    training.run_cli(main)
