"""Does a GenEval reward that charges for unasked objects make a teacher that draws the scene, not clutter?
(docs/experiments.md, 2026-12-04; lab/studies/extra_objects.txt is the question.)

Trains the pipeline's GenEval teacher (Stage 1, DiffusionNFT, the budget of `results/commands.sh`) with its
training reward changed: GenEval's partial credit times min(1, asked / found), found being the detector's objects
in the image, so a picture with twice the asked objects earns half. The evaluation stays the official rule.
Then scores the base and the new teacher as extra_objects.py does (strict, "clean" = strict and nothing extra,
objects per image) on the table's GenEval test images. Usage (2-core CPU: ~10 min of training):
    python lab/studies/clean_geneval_teacher.py OUT_FOLDER
Writes clean_geneval_teacher.txt beside this file.
"""
import os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common, eval as evaluation, stage1_grpo, training, miniature.world
import loading

out, here = sys.argv[1], os.path.dirname(os.path.abspath(__file__))
official = miniature.world.geneval_score


def charged_for_extras(image, meta):
    """(partial credit x min(1, asked / found), strict): the training reward of this study only."""
    partial, strict = official(image, meta)
    asked, found = sum(c["count"] for c in meta["include"]), len(miniature.world.detect_objects(image))
    return partial * min(1.0, asked / max(found, 1)), strict


miniature.world.geneval_score = charged_for_extras  # what miniature.world.score calls for the "geneval" reward
stage1_grpo.main(["--model", "miniature/base", "--dataset", "dataset", "--reward", "geneval", "--objective", "nft",
                  "--lr", "3e-3", "--nft-times", "2", "--ema", "0.9", "--nft-old-decay", "0.5", "--nft-old-ramp", "20",
                  "--train-precision", "bf16" if common.bf16_is_fast() else "fp32", "--prompts-per-epoch", "32",
                  "--train-batch-size", "64", "--steps", "6", "--epochs", "30", "--eval-every", "0", "--out", out,
                  "--resume"])
miniature.world.geneval_score = official

samples = zip(*evaluation.test_samples(loading.load_prompt_files(evaluation.TEST_PROMPTS), 4))  # eval.py's list
prompts, metas, noise_seeds = map(list, zip(*[sample for sample in samples if sample[1]]))  # its GenEval images
asked = np.array([sum(c["count"] for c in m["include"]) for m in metas])
bundle = training.load_model("miniature/base")
model = evaluation.load_adapters(bundle.transformer, [("teacher", os.path.join(out, "adapter"))])
lines = [f"{len(prompts)} GenEval test images per row (4 seeds per prompt); objects asked: {asked.mean():.2f}",
         "row | GenEval strict | clean (strict, nothing extra) | objects found | images with extras | quality"]
for name in ("base", "teacher"):
    images = evaluation.sample_row(bundle, model, None if name == "base" else name, prompts, noise_seeds,
                                   bundle.defaults["eval_steps"], bundle.defaults["guidance_scale"])
    scores = miniature.world.score(images, prompts, metas, names=("geneval", "quality"))
    found = np.array([len(miniature.world.detect_objects(image)) for image in miniature.world.to_uint8(images)])
    strict = scores["geneval_acc"]
    lines.append(f"{name} | {strict.mean():.3f} | {scores['geneval_clean'].mean():.3f} | {found.mean():.2f} | "
                 f"{(found > asked).mean():.2f} | {scores['quality'].mean():.3f}")
    print(lines[-1], flush=True)
open(os.path.join(here, "clean_geneval_teacher.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
