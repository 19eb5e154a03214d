"""Where along the trajectory a student differs from its teachers (docs/experiments.md, 2026-12-03).

For each student adapter, its own SDE trajectories (stage3's sampler: 10 steps, a = 0.7, CFG 4.5) on
PROMPTS training prompts per task; at every step j, the mean over those trajectories of
||v_student - v_teacher||^2 / dims with each prompt's routed teacher, per task. Beside it the paper
KL's weight per unit of that error, (|D_j| / 2) (c_j / s_j)^2 dims (M3), and the flat weighting's
(|D_j| / 2) dims. Usage (after `python pipeline.py --from-scratch`, whose runs-scratch/ holds the teachers):
    python lab/studies/kl_per_step.py runs-scratch NAME,NAME,... [PROMPTS]
Writes kl_per_step.txt and kl_per_step.png (one chart per task) beside this file.
"""
import os, random, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common, training, stage3_opd as s3
import loading

runs, names = sys.argv[1], sys.argv[2].split(",")
per_task = int(sys.argv[3]) if len(sys.argv) > 3 else 32
here = os.path.dirname(os.path.abspath(__file__))
teachers = f"geneval={runs}/teacher-geneval/adapter,ocr={runs}/teacher-ocr/adapter"
lines, errors = [], {}
for name in names:
    args = s3.parse_args(["--teachers", teachers, "--mar-lambda", "0", "--init", f"{runs}/{name}/adapter",
                          "--out", "/tmp/kl_per_step", "--rollouts-per-epoch", str(2 * per_task)])
    training.start_processes(args, train_batch_size=args.train_batch_size)
    bundle = training.load_model_from_args(args)
    training.sampling_defaults(args, bundle)
    policy = training.make_policy(bundle.transformer, init=args.init)
    teacher_of, anchor_name = s3.load_guides(policy, loading.parse_teachers(teachers), "base")
    items = loading.prompts_by_task("", loading.parse_teachers(teachers), args.dataset, "train")
    picked = s3.draw_prompts(items, 2 * per_task, random.Random(0), shares={t: 1 for t in items})
    batch = s3.sample_epoch(policy, bundle, picked, teacher_of, args, seed=777)
    v_teacher, _ = s3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]], anchor_name, args)
    error = ((batch["velocities"] - v_teacher) ** 2).flatten(2).mean(2)  # (B, N) per dim
    for task in sorted(items):
        rows = torch.tensor([r == task for r in batch["routes"]])
        errors[(name, task)] = error[rows].mean(0).tolist()
sigmas = batch["sigmas"]
dims = batch["states"][0, 0].numel()
paper = [float(common.step_kl(torch.ones(1, dims), torch.zeros(1, dims), sigmas[j], sigmas[j + 1], sigmas[1], 0.7))
         for j in range(len(sigmas) - 1)]
flat = [float(common.step_kl(torch.ones(1, dims), torch.zeros(1, dims), sigmas[j], sigmas[j + 1], sigmas[1], 0.7, "flat"))
        for j in range(len(sigmas) - 1)]
lines.append("step j: " + " ".join(f"{j:>7d}" for j in range(len(paper))))
lines.append("sigma_j: " + " ".join(f"{float(s):7.3f}" for s in sigmas[:-1]))
lines.append("paper KL weight: " + " ".join(f"{w:7.3g}" for w in paper))
lines.append("flat weight: " + " ".join(f"{w:7.3g}" for w in flat))
for (name, task), values in errors.items():
    lines.append(f"{name} {task} mean ||v_s - v_T||^2 / dims: " + " ".join(f"{v:7.4f}" for v in values))
    lines.append(f"{name} {task} paper KL_j: " + " ".join(f"{v * w:7.3f}" for v, w in zip(values, paper)))
open(os.path.join(here, "kl_per_step.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
from PIL import Image
charts = [training.line_chart({name: list(enumerate(errors[(name, task)])) for name in names}, None, "step j",
                              f"{task}: ||v_s - v_T||^2 / dims") for task in sorted({t for _, t in errors})]
picture = Image.new("RGB", (sum(c.size[0] for c in charts), charts[0].size[1]), "white")
for i, chart in enumerate(charts):
    picture.paste(chart, (i * chart.size[0], 0))
picture.save(os.path.join(here, "kl_per_step.png"))
