"""Is the quality a GenEval gain costs a flaw of the teacher's drawing, or of what a correct scene holds?
(docs/experiments.md, 2026-12-03.)

For each row (the base and peft adapters), the table's GenEval test images (eval.py's sampler: 20 ODE
steps, CFG 4.5, fp32, the same seeds as the table's) and each image's GenEval verdict
and quality score (miniature.world.score). Reports each row's quality over all its GenEval images, over the
ones it gets right and wrong, and per GenEval tag; and, over the prompt/seed pairs that every row gets
right, each row's quality on the same correct scenes. Usage (after `python pipeline.py`):
    python lab/studies/quality_vs_geneval.py NAME=PEFT_FOLDER,... [SEEDS]
Writes quality_vs_geneval.txt beside this file (the committed one, of 2026-12-03, was sampled with the LoRA branch
unmerged, before eval.sample_row: images within one level of 255 of today's; its adapters were replaced since).
"""
import os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import eval as evaluation, training, miniature.world
import loading

rows = [("base", None)] + evaluation.parse_adapters(sys.argv[1])
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
here = os.path.dirname(os.path.abspath(__file__))
samples = zip(*evaluation.test_samples(loading.load_prompt_files(evaluation.TEST_PROMPTS), seeds))  # eval.py's list
prompts, metas, noise_seeds = map(list, zip(*[sample for sample in samples if sample[1]]))  # its GenEval images
bundle = training.load_model("miniature/base")
model = evaluation.load_adapters(bundle.transformer, rows[1:])
scores = {}
for name, path in rows:
    images = evaluation.sample_row(bundle, model, None if path is None else name, prompts, noise_seeds,
                                   bundle.defaults["eval_steps"], bundle.defaults["guidance_scale"])
    scores[name] = miniature.world.score(images, prompts, metas, names=("geneval", "quality"))
tags = sorted({m["tag"] for m in metas})
both = np.all([scores[n]["geneval_acc"] == 1 for n, _ in rows], axis=0)
lines = [f"{len(prompts)} GenEval test images per row ({seeds} seeds per prompt); {both.sum()} prompt/seed pairs "
         f"every row gets right",
         "row | GenEval | quality all | right (n) | wrong (n) | on the pairs all rows get right | "
         + " | ".join(f"quality {t}" for t in tags)]
for name, _ in rows:
    acc, quality = scores[name]["geneval_acc"], scores[name]["quality"]
    per_tag = [quality[np.array([m["tag"] == t for m in metas])].mean() for t in tags]
    lines.append(f"{name} | {acc.mean():.3f} | {quality.mean():.3f} | {quality[acc == 1].mean():.3f} ({int(acc.sum())}) | "
                 f"{quality[acc == 0].mean():.3f} ({int((acc == 0).sum())}) | {quality[both].mean():.3f} | "
                 + " | ".join(f"{q:.3f}" for q in per_tag))
open(os.path.join(here, "quality_vs_geneval.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
