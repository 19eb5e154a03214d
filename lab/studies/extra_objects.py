"""Do the GenEval gains draw the asked scene, or more shapes than asked? (docs/experiments.md, 2026-12-04.)

GenEval's official rule, which the miniature follows, asks for AT LEAST each included count (counting prompts
are exact through their exclude clause) and does not mind objects of other classes: a picture full of shapes
of every colour passes "a photo of a circle". For each row (the base and peft adapters), the table's GenEval
test images (eval.py's sampler and seeds: 20 ODE steps, CFG 4.5, fp32, the merged-adapter sampling) and the
detector's objects in each. Reports per row: GenEval strict (the table's number, a check), the mean number of
objects detected against the number asked, the share of images with more objects than asked, and a stricter
"clean" accuracy: strict AND no object beyond those asked (the table's "GenEval, nothing unasked" since
2026-12-04). Usage (after `python pipeline.py`):
    python lab/studies/extra_objects.py NAME=PEFT_FOLDER,... [SEEDS] [CFG]
Writes extra_objects.txt beside this file (extra_objects-cfgCFG.txt with a CFG other than the table's 4.5).
"""
import os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import eval as evaluation, training, miniature.world
import loading

rows = [("base", None)] + evaluation.parse_adapters(sys.argv[1])
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
guidance = float(sys.argv[3]) if len(sys.argv) > 3 else None
here = os.path.dirname(os.path.abspath(__file__))
samples = zip(*evaluation.test_samples(loading.load_prompt_files(evaluation.TEST_PROMPTS), seeds))  # eval.py's list
prompts, metas, noise_seeds = map(list, zip(*[sample for sample in samples if sample[1]]))  # its GenEval images
asked = np.array([sum(c["count"] for c in m["include"]) for m in metas])
tags = sorted({m["tag"] for m in metas})
bundle = training.load_model("miniature/base")
guidance = bundle.defaults["guidance_scale"] if guidance is None else guidance
model = evaluation.load_adapters(bundle.transformer, rows[1:])
lines = [f"{len(prompts)} GenEval test images per row ({seeds} seeds per prompt); objects asked per image: "
         f"{asked.mean():.2f} on average; CFG {guidance:g}",
         "row | GenEval strict | clean (strict, nothing extra) | objects found | images with extras | "
         + " | ".join(f"objects {t}" for t in tags)]
for name, path in rows:
    images = evaluation.sample_row(bundle, model, None if path is None else name, prompts, noise_seeds,
                                   bundle.defaults["eval_steps"], guidance)
    scores = miniature.world.score(images, prompts, metas, names=("geneval",))
    strict, clean = scores["geneval_acc"], scores["geneval_clean"]
    found = np.array([len(miniature.world.detect_objects(image)) for image in miniature.world.to_uint8(images)])
    per_tag = [found[np.array([m["tag"] == t for m in metas])].mean() for t in tags]
    lines.append(f"{name} | {strict.mean():.3f} | {clean.mean():.3f} | {found.mean():.2f} | {(found > asked).mean():.2f} | "
                 + " | ".join(f"{n:.2f}" for n in per_tag))
    print(lines[-1], flush=True)
suffix = "" if guidance == bundle.defaults["guidance_scale"] else f"-cfg{guidance:g}"
open(os.path.join(here, f"extra_objects{suffix}.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
