"""Which GenEval teacher to publish, chosen on a validation split (issue 44's fallback; docs/experiments.md,
2026-12-06). Every candidate was trained on 1704 GenEval training prompts and evaluated by eval.py on the other
96 (4 seeds each, the table's sampler and CFG), so no test prompt takes part in the choice. The rule, written down
before the last three candidates and the budget curve were scored: gain at least MIN_GAIN on the official rule over the base (below it a student's share
of the gain cannot be measured on the test), and among those the highest "nothing unasked".
It chose 20 epochs of the published recipe; retrained on all training prompts, that teacher gained +0.08 on the
test and about nothing on Stage 2's validation prompts, so the 30-epoch teacher stayed (docs/experiments.md).
Usage:  python lab/studies/geneval_teacher_choice.py BASE_EVAL_JSON NAME=EVAL_JSON ...   (eval.py's eval.json files;
the base row is taken from the first; NAMEs "<N>ep" are one recipe after N epochs, drawn as a curve; a NAME
starting "ref:" is drawn for reference, not a candidate: e.g. a teacher trained on all training prompts, these 96
included)  ->  geneval_teacher_choice.txt and .png beside this file.
"""
import json, os, sys

MIN_GAIN = 0.10   # official gain over the base on validation a teacher needs to be worth distilling
BAR_GAIN, BAR_CLEAN = 0.15, -0.02  # issue 44's bars: official >= base + 0.15, nothing unasked >= base - 0.02


def row(path, model):
    """(official, se, nothing unasked, se, quality) of `model` in an eval.json, else of its only row but the base."""
    rows = {r["model"]: r for r in json.load(open(path))}
    others = [r for name, r in rows.items() if name != "base"]
    if model not in rows and len(others) != 1:
        raise SystemExit(f"{path} has no row {model!r} and not exactly one row besides the base: {list(rows)}")
    r = rows[model] if model in rows else others[0]
    return r["geneval_acc"], r["geneval_acc_se"], r["geneval_clean"], r["geneval_clean_se"], r["quality"]


def choose(base, candidates):
    """The candidate with the highest nothing-unasked among those gaining >= MIN_GAIN official; None if none does."""
    eligible = {name: r for name, r in candidates.items() if r[0] - base[0] >= MIN_GAIN and not name.startswith("ref:")}
    return max(eligible, key=lambda name: eligible[name][2]) if eligible else None


def scatter(base, candidates, chosen, path, size=(640, 480), lim=((0.1, 0.6), (0.0, 0.25))):
    """Official against nothing unasked, ± se bars; the region of issue 44's bars shaded, the rule's line dotted."""
    from PIL import Image, ImageDraw, ImageFont
    font, image = ImageFont.load_default(size=13), Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 40, size[0] - 20, size[1] - 50
    (x0, x1), (y0, y1) = lim
    at = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))  # noqa: E731
    draw.rectangle([*at(base[0] + BAR_GAIN, y1), *at(x1, base[2] + BAR_CLEAN)], fill=(215, 240, 215))
    draw.text(at(base[0] + BAR_GAIN, y1), " issue 44's bars", fill=(40, 120, 40), font=font, anchor="la")
    rule_x = at(base[0] + MIN_GAIN, 0)[0]
    for py in range(top, bottom, 10):
        draw.line([(rule_x, py), (rule_x, py + 4)], fill="grey")
    draw.text((rule_x + 3, bottom - 4), f"rule: gain >= {MIN_GAIN:g}", fill="grey", font=font, anchor="ld")
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(6):
        x, y = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        draw.text((at(x, y0)[0], bottom + 6), f"{x:.2f}", fill="black", font=font, anchor="ma")
        draw.text((left - 6, at(x0, y)[1]), f"{y:.2f}", fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, size[1] - 6), "GenEval, official rule (validation)", fill="black", font=font, anchor="md")
    draw.text((left, 10), "GenEval teacher candidates on validation: official (x) against nothing unasked (y), ± se", fill="black", font=font)
    budget = sorted((int(name[:-2]), r) for name, r in candidates.items() if name[:-2].isdigit() and name.endswith("ep"))
    if budget:  # "<N>ep" rows are one recipe's budget curve, joined from the base (0 epochs) on
        draw.line([at(r[0], r[2]) for r in [base] + [r for _, r in budget]], fill=(160, 190, 220), width=2)
    for name, r in [("base", base)] + list(candidates.items()):
        color = (0, 0, 0) if name == "base" else (214, 39, 40) if name == chosen else \
            (150, 150, 150) if name.startswith("ref:") else (31, 119, 180)
        (px, py), (ax, ay), (bx, by) = at(r[0], r[2]), at(r[0] - r[1], r[2] - r[3]), at(r[0] + r[1], r[2] + r[3])
        draw.line([(ax, py), (bx, py)], fill=color), draw.line([(px, ay), (px, by)], fill=color)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.text((px + 6, py - 6), name + (" (chosen)" if name == chosen else ""), fill=color, font=font, anchor="ld")
    image.save(path)


if __name__ == "__main__":
    base = row(sys.argv[1], "base")
    candidates = {spec.split("=", 1)[0]: row(spec.split("=", 1)[1], spec.split("=", 1)[0]) for spec in sys.argv[2:]}
    chosen = choose(base, candidates)
    here = os.path.dirname(os.path.abspath(__file__))
    lines = ["GenEval teacher candidates on the validation split (96 GenEval training prompts held out x 4 seeds)",
             f"rule: official gain >= {MIN_GAIN} over the base, then the highest nothing unasked -> {chosen}",
             "row | official ± se | nothing unasked ± se | quality | meets issue 44's bars"]
    for name, r in [("base", base)] + list(candidates.items()):
        bars = r[0] - base[0] >= BAR_GAIN and r[2] - base[2] >= BAR_CLEAN
        lines.append(f"{name} | {r[0]:.3f} ± {r[1]:.3f} | {r[2]:.3f} ± {r[3]:.3f} | {r[4]:.3f} | {'yes' if bars else 'no'}")
    open(os.path.join(here, "geneval_teacher_choice.txt"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    scatter(base, candidates, chosen, os.path.join(here, "geneval_teacher_choice.png"))
