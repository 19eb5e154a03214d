"""The whole Flow-OPD method in the miniature world, one command, and the paper's table.

    python pipeline.py            # the full run (README: its measured time) -> results/
    python pipeline.py --quick    # the same steps with tiny budgets, a smoke test -> results-quick/

Steps, each cached (a finished step is skipped, an interrupted one resumes from its checkpoint):
  1. the prompt files                         python -m lab prompts
  2. teachers: geneval                        stage1_grpo.py --reward geneval --objective nft (GRPO is too slow
                                              here: docs/experiments.md, Stage 1)
     ocr: a render specialist                 python -m lab specialist (no reward-trained OCR teacher moves here)
     and the quality anchor                   stage1_grpo.py --reward quality
  3. the mixed-reward baselines                stage1_grpo.py --reward geneval=0.5,ocr=0.5: GRPO (grpo-mix)
                                              and the GenEval teacher's NFT recipe (nft-mix)
  4. Stage 2 cold starts: merge and SFT       stage2_coldstart.py search (the merge chosen on a validation
                                              split of the training prompts) / sft
  5. Stage 3 OPD with MAR (two seeds),        stage3_opd.py --kl-weighting flat --guidance geneval=1,ocr=4.5;
     the paper's KL weighting, no MAR         the paper's weighting (opd-paper-kl), without MAR (opd-no-mar);
                                              behind --ablations: no cold start, ppo, per-epoch schedule, SFT start
  6. every row scored on the same prompts     eval.py, --samples-per-prompt seeds per prompt
Writes OUT/table.md (each score +- its standard error, and the share of each teacher's gain an OPD row
keeps), OUT/table.json, OUT/minutes.json (each step's minutes, a cached one's as first measured, the
evaluation's, and their sum), OUT/grid.png (one column per model), OUT/curve.png (each task's test score
against the trajectories each method sampled, teachers as lines), OUT/adapters/<row>/, OUT/logs/ and
OUT/commands.sh.
"""
import json
import math
import os
import shutil
import time

from PIL import Image

import common
import loading
import eval as evaluation
import stage1_grpo
import stage2_coldstart
import stage3_opd
import lab.commands
import miniature.world
import training

# The budgets. FULL trains every model in minutes on a 2-core CPU; QUICK only checks the wiring.
# The published EMAs are per optimizer update (bias-corrected, training.ema_decay): 0.95 over GRPO's 4 updates per
# epoch and 0.9 over NFT's 8 stand where the per-epoch 0.8 and 0.5 of results/'s run stood (0.8^(1/4), 0.5^(1/8))
GRPO = ["--sde-window", "2", "--lr", "1e-3", "--train-batch-size", "16", "--clip-range", "1e-3", "--ema", "0.95"]
# The GenEval teacher (docs/experiments.md, Stage 1): DiffusionNFT with its ramped soft update of the sampling policy,
# the recipe that gained most over three seeds at 50 epochs (+0.136, +0.178, +0.136) without diverging. Trained 30,
# not 50: the last 20 bought no GenEval (0.419 -> 0.422) and cost 0.05 quality and 0.15 OCR, which its student
# copied (docs/experiments.md)
NFT = ["--objective", "nft", "--lr", "3e-3", "--nft-times", "2", "--ema", "0.9", "--nft-old-decay", "0.5",
       "--nft-old-ramp", "20", "--train-precision", "bf16" if common.bf16_is_fast() else "fp32"]  # bf16 where native
FULL = {"geneval": [*NFT, "--prompts-per-epoch", "32", "--train-batch-size", "64", "--steps", "6", "--epochs", "30"],
        "ocr": ["--steps", "1200", "--lr", "1e-3"],  # ~10 min on a 2-core AVX2 CPU: OCR +0.14 after 900 steps, +0.22 after 1350
        "grpo": [*GRPO, "--epochs", "12"],
        "search": [],  # its defaults: 64 validation prompts per task, 10 candidate merges (docs/experiments.md)
        "sft": ["--samples-per-task", "128", "--train-steps", "100"],
        # Stage 3: 512 trajectories, 8 updates per epoch of 4 trajectories each, every epoch's trajectories used twice,
        # a per-update EMA published (~20 of its 256 updates: it smooths the last updates' noise, not the cold start),
        # every step's velocity error weighted by the step's length alone: the paper's KL weighs the last steps
        # ~1000x the first and leaves the layout (GenEval) undistilled (opd-paper-kl; docs/experiments.md, 2026-12-03),
        # GenEval prompts unguided and OCR prompts at CFG 4.5: the guided KL weighs the unconditional branch, the same
        # for both tasks' prompts, by (1 - 4.5)^2: one student branch cannot match both teachers' (2026-12-04)
        # all 10 steps of each trajectory in one forward pass: the same loss, 1.4x faster (docs/speed.md)
        "opd": ["--epochs", "16", "--train-batch-size", "4", "--steps-per-pass", "10", "--updates-per-epoch", "8",
                "--inner-epochs", "2", "--lr", "1e-3", "--ema", "0.95", "--kl-weighting", "flat",
                "--guidance", "geneval=1,ocr=4.5"],
        "samples_per_prompt": "4",  # eval.py's seeds per prompt: standard errors ~0.025 instead of ~0.05
        "curve": {"grpo-mix": "4,8", "nft-mix": "10,25", "opd-merge": "4,8"}}  # --eval-at: the curve's inner
                                        # points; its ends are rows of eval.py (base / coldstart-merge, the trained row)
QUICK = {"geneval": [*NFT, "--epochs", "2", "--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4",
                     "--train-batch-size", "8", "--eval-steps", "4"],
         "ocr": ["--steps", "2", "--batch-size", "4"],
         "grpo": [*GRPO, "--epochs", "2", "--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4",
                  "--train-batch-size", "8", "--eval-steps", "4"],
         "sft": ["--samples-per-task", "8", "--train-steps", "2", "--batch-size", "8", "--sample-steps", "4"],
         "search": ["--val-per-task", "2", "--candidates", "delta:0.5,0.5;delta:1,1"],
         "opd": ["--epochs", "2", "--rollouts-per-epoch", "8", "--train-batch-size", "4", "--updates-per-epoch", "2",
                 "--steps", "4", "--eval-steps", "4", "--guidance", "geneval=1,ocr=4.5"],
         "samples_per_prompt": "1",
         "curve": {"grpo-mix": "1", "nft-mix": "1", "opd-merge": "1"}}
NAMES = ("base", "teacher-geneval", "teacher-ocr", "teacher-quality", "grpo-mix", "nft-mix", "coldstart-merge",
         "opd-merge", "opd-merge-seed1", "opd-paper-kl", "opd-sft", "opd-no-mar", "opd-no-coldstart", "opd-ppo",
         "opd-schedule")
CURVES = (("grpo-mix", "base", "GRPO-Mix"), ("nft-mix", "base", "NFT-Mix"),
          ("opd-merge", "coldstart-merge", "Flow-OPD"))  # (run, its start's row, label)
TASKS = {"geneval": "geneval_acc", "ocr": "ocr"}  # each teacher's task and its table column


ABLATIONS = ("coldstart-sft", "opd-sft", "opd-no-coldstart", "opd-ppo", "opd-schedule")  # with --ablations only


def plan(runs, budget, model, dataset, ablations=True):
    """[(row name, script, argv)] in dependency order; each run writes runs/<name>/adapter. Stage 1 GRPO
    does not move GenEval or OCR in minutes (docs/experiments.md, "Stage 1 in the miniature world"), so the GenEval
    teacher is Stage 1 with DiffusionNFT's objective on the same rewards, and the OCR teacher, which no
    reward-trained run moved, a render specialist (python -m lab specialist); quality and GRPO-Mix are Stage 1 GRPO runs."""
    def out(name):
        return os.path.join(runs, name)

    def evals(name):  # evaluations during training: only the curve's inner points (eval.py scores every row)
        return ["--eval-at", budget["curve"][name]] if name in budget["curve"] else ["--eval-every", "0"]
    teachers = f"geneval={out('teacher-geneval')}/adapter,ocr={out('teacher-ocr')}/adapter"
    anchor = f"{out('teacher-quality')}/adapter"
    shared = ["--model", model, "--dataset", dataset]
    merge = ["--init", f"{out('coldstart-merge')}/adapter"]
    steps = [
        ("teacher-geneval", stage1_grpo, [*shared, "--reward", "geneval", *budget["geneval"], *evals("teacher-geneval")]),
        ("teacher-ocr", lab.commands, ["specialist", "--task", "ocr", *shared, *budget["ocr"]]),
        ("teacher-quality", stage1_grpo, [*shared, "--reward", "quality", *budget["grpo"], *evals("teacher-quality")]),
        ("grpo-mix", stage1_grpo, [*shared, "--reward", "geneval=0.5,ocr=0.5", "--mix", "sum", *budget["grpo"],
                                   *evals("grpo-mix")]),
        ("nft-mix", stage1_grpo, [*shared, "--reward", "geneval=0.5,ocr=0.5", "--mix", "sum", *budget["geneval"],
                                  *evals("nft-mix")]),  # the GenEval teacher's objective and budget, both rewards
        ("coldstart-merge", stage2_coldstart, ["search", *shared, "--teachers", teachers, *budget["search"]]),
        ("coldstart-sft", stage2_coldstart, ["sft", *shared, "--teachers", teachers, *budget["sft"]]),
        ("opd-merge", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge, *budget["opd"],
                                   *evals("opd-merge")]),
        ("opd-merge-seed1", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge, *budget["opd"],
                                         "--seed", "1", *evals("opd-merge-seed1")]),
        ("opd-paper-kl", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge, *budget["opd"],
                                      "--kl-weighting", "paper", *evals("opd-paper-kl")]),  # the last flag wins
        ("opd-sft", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor,
                                 "--init", f"{out('coldstart-sft')}/adapter", *budget["opd"], *evals("opd-sft")]),
        ("opd-no-mar", stage3_opd, [*shared, "--teachers", teachers, "--mar-lambda", "0", *merge, *budget["opd"],
                                    *evals("opd-no-mar")]),
        ("opd-no-coldstart", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *budget["opd"],
                                          *evals("opd-no-coldstart")]),
        ("opd-ppo", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge, "--objective", "ppo",
                                 *budget["opd"], *evals("opd-ppo")]),
        ("opd-schedule", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge,
                                      "--schedule", "epoch", *budget["opd"], *evals("opd-schedule")]),
    ]
    return [step for step in steps if ablations or step[0] not in ABLATIONS]


def quick_test_files(dataset, folder):
    """Every 8th GenEval test prompt (2 per category) and every 8th OCR test prompt, as prompt files."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for task, split in loading.DEFAULT_PROMPT_FILES.items():
        source = os.path.join(dataset, split["test"])
        path = os.path.join(folder, os.path.basename(source))
        with open(source) as f, open(path, "w") as out:
            out.writelines(line for i, line in enumerate(f) if i % 8 == 0)
        paths.append(path)
    return ",".join(paths)


def run_step(name, script, argv, runs):
    """Runs one step unless its adapter exists; an interrupted step resumes. Returns (command, minutes)."""
    folder = os.path.join(runs, name)
    resumable = script in (stage1_grpo, stage3_opd)
    argv = [*argv, "--out", folder, *(["--resume"] if resumable else [])]
    program = "-m miniature" if script is lab.commands else os.path.basename(script.__file__)
    command = f"python {program} {' '.join(argv)}"
    timing = os.path.join(folder, "minutes.json")
    if os.path.isdir(os.path.join(folder, "adapter")):
        print(f"[cached] {name}")
        return command, json.load(open(timing))["minutes"] if os.path.isfile(timing) else None
    print(f"[run] {command}")
    start = time.time()
    script.main(argv)
    minutes = (time.time() - start) / 60
    with open(timing, "w") as f:
        json.dump({"minutes": minutes}, f)
    return command, minutes


def line_chart(series, title, x_label, levels, size=(640, 420)):
    """A PIL line chart (no plotting dependency) of {label: [(x, y), ...]}, dashed grey lines at `levels`
    {label: y}. The x axis is logarithmic past its first step, log(1 + x / x_min) with x_min the smallest x > 0,
    so that a run of 512 trajectories and one of 7680 both show their shape; its ticks are the true counts."""
    from PIL import ImageDraw, ImageFont
    colors, grey = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)], (110, 110, 110)
    font = ImageFont.load_default(size=13)
    points = [xy for line in series.values() for xy in line]
    x_min = min([x for x, _ in points if x > 0] or [1])
    scale = lambda x: math.log1p(x / x_min)  # noqa: E731
    ys = [y for _, y in points] + list(levels.values())
    pad = (max(ys) - min(ys)) * 0.06 or 1e-3
    x_max = max(x for x, _ in points)
    (x0, x1), (y0, y1) = (0, 1.04 * scale(x_max) or 1), (min(ys) - pad, max(ys) + pad)
    left, top, right, bottom = 58, 44, size[0] - 16, size[1] - 46
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x, y):
        return left + (scale(x) - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        y = y0 + pad + (y1 - y0 - 2 * pad) * k / 4
        draw.text((left - 6, at(0, y)[1]), f"{y:.3f}", fill="black", font=font, anchor="rm")
    ticks = [0] + [x_min * 4 ** k for k in range(20) if x_min * 4 ** k < x_max / 1.5] + [x_max]
    for x in ticks:
        px = at(x, y0)[0]
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px, bottom + 6), f"{x:g}", fill="black", font=font, anchor="ma")
    draw.text(((left + right) / 2, size[1] - 6), x_label, fill="black", font=font, anchor="md")
    draw.text((left, 8), title, fill="black", font=font)
    for label, y in levels.items():
        py = at(0, y)[1]
        for px in range(int(left), int(right), 12):
            draw.line([(px, py), (min(px + 6, right), py)], fill=grey, width=1)
        draw.text((right - 4, py - 2), label, fill=grey, font=font, anchor="rd")
    legend_x = left
    for i, (label, line) in enumerate(series.items()):
        color = colors[i % len(colors)]
        xy = [at(x, y) for x, y in sorted(line)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((legend_x, 26), label, fill=color, font=font)
        legend_x += draw.textlength(label, font=font) + 18
    return image


def curve_png(runs, table, path):
    """Each task's test score against the trajectories each method sampled, GRPO-Mix, NFT-Mix and Flow-OPD side
    by side, each teacher's score as a dashed line: the start's row (base / the merge cold start), the run's
    in-training evaluations (one seed per prompt), then its own row. OPD's count is its own rollouts from the
    cold start: the teachers' training trajectories are not counted (the table's train minutes hold them)."""
    rows = {row["model"]: row for row in table}
    logs = {name: [json.loads(line) for line in open(os.path.join(runs, name, "log.jsonl"))] for name, _, _ in CURVES}
    charts = []
    for task, column in TASKS.items():
        series = {label: [(0, rows[start][column]), *((r["trajectories"], r["eval"][column]) for r in logs[name]
                                                      if "eval" in r), (logs[name][-1]["trajectories"], rows[name][column])]
                  for name, start, label in CURVES}
        charts.append(line_chart(series, f"test {column}: the table's rows at the ends, one seed per prompt between",
                                 "trajectories sampled by the method (OPD: the student's own; log scale)",
                                 {f"{task} teacher": rows[f"teacher-{task}"][column], "base": rows["base"][column]}))
    width, height = charts[0].size
    picture = Image.new("RGB", (width * len(charts), height), "white")
    for i, chart in enumerate(charts):
        picture.paste(chart, (i * width, 0))
    picture.save(path)


def table_markdown(table):
    """The paper-style table: every score +- its standard error, and the share of each teacher's gain over the
    base that a row keeps on that teacher's task (eval.gain_kept), with how each row was made."""
    rows = {row["model"]: row for row in table}

    def cell(row, column):
        return f"{row[column]:.3f} ± {row.get(column + '_se', float('nan')):.3f}"
    lines = ["| row | GenEval | OCR | quality | average | GenEval gain kept | OCR gain kept | GenEval, nothing unasked "
             "| train min |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        kept = [evaluation.gain_kept(row[c], rows["base"][c], rows[f"teacher-{t}"][c]) for t, c in TASKS.items()]
        minutes = f"{row['train_minutes']:.1f}" if row.get("train_minutes") is not None else ""
        lines.append(f"| {row['model']} | {cell(row, 'geneval_acc')} | {cell(row, 'ocr')} | {cell(row, 'quality')} | "
                     f"{cell(row, 'average')} | {kept[0]:.0%} | {kept[1]:.0%} | {cell(row, 'geneval_clean')} | {minutes} |")
    seeds = [rows[n] for n in ("opd-merge", "opd-merge-seed1") if n in rows]
    if len(seeds) == 2:
        lines.append("")
        lines.append("Flow-OPD over its two training seeds, mean (half the spread): " + ", ".join(
            f"{c} {(seeds[0][c] + seeds[1][c]) / 2:.3f} ({abs(seeds[0][c] - seeds[1][c]) / 2:.3f})"
            for c in ("geneval_acc", "ocr", "quality", "average")))
    lines += ["", evaluation.MINIATURE_GENEVAL]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = training.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of every step (CI runs it)")
    p.add_argument("--model", default="miniature/base", help="the base model")
    p.add_argument("--out", default=None, help="results folder (default: results/, or results-quick/ with --quick)")
    p.add_argument("--ablations", action="store_true",
                   help="also the ablation rows (SFT start, no cold start, ppo, per-epoch schedule): ~1.4x the time "
                        "(from scratch on a 2-core EPYC: 109 min against ~80; results/ablations/)")
    p.add_argument("--runs", default=None, help="run folders (default: runs/, or runs-quick/ with --quick)")
    args = p.parse_args(argv)
    out = args.out or ("results-quick" if args.quick else "results")
    runs = args.runs or ("runs-quick" if args.quick else "runs")
    dataset = "dataset"
    miniature.world.ensure_prompt_files(dataset)
    budget, test_files = FULL, ""
    if args.quick:  # a few test prompts of every task, so that the many evaluations take seconds
        test_files = quick_test_files(dataset, os.path.join(runs, "test-prompts"))
        budget = {**QUICK, "grpo": [*QUICK["grpo"], "--test-prompts", test_files],
                  "opd": [*QUICK["opd"], "--test-prompts", test_files]}
    started = time.time()
    commands, minutes = {}, {}
    for name, script, step_argv in plan(runs, budget, args.model, dataset, args.ablations):
        commands[name], minutes[name] = run_step(name, script, step_argv, runs)
    rows = [(name, os.path.join(runs, name, "adapter")) for name in NAMES[1:] if args.ablations or name not in ABLATIONS]
    eval_argv = ["--model", args.model, "--adapters", ",".join(f"{n}={a}" for n, a in rows), "--out", out,
                 "--samples-per-prompt", budget["samples_per_prompt"],
                 *(["--steps", "4", "--test-prompts", test_files] if args.quick else [])]
    eval_started = time.time()
    evaluation.main(eval_argv)
    eval_minutes = (time.time() - eval_started) / 60
    table = json.load(open(os.path.join(out, "eval.json")))
    for row in table:
        row["command"] = commands.get(row["model"], "(the shipped base, no training)")
        row["train_minutes"] = minutes.get(row["model"])
        if row["adapter"]:
            row["adapter"] = os.path.join(out, "adapters", row["model"])
            shutil.copytree(os.path.join(runs, row["model"], "adapter"), row["adapter"], dirs_exist_ok=True)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table_markdown(table))
    with open(os.path.join(out, "commands.sh"), "w") as f:
        f.write(f"# produced by: python pipeline.py{' --quick' * args.quick}{' --ablations' * args.ablations} "
                f"(every seed is 0)\n")
        f.writelines(f"{commands[n]}\n" for n, _, _ in plan(runs, budget, args.model, dataset, args.ablations))
        f.write(f"python eval.py {' '.join(eval_argv)}\n")
    with open(os.path.join(out, "minutes.json"), "w") as f:  # a from-scratch run's time, also when steps were cached
        json.dump({"steps": minutes, "evaluation": eval_minutes, "this_run": (time.time() - started) / 60,
                   "all_steps_and_evaluation": sum(m or 0 for m in minutes.values()) + eval_minutes}, f, indent=1)
    curve_png(runs, table, os.path.join(out, "curve.png"))
    shutil.rmtree(os.path.join(out, "logs"), ignore_errors=True)  # the logs behind the README's numbers, this run's only
    os.makedirs(os.path.join(out, "logs"))
    for name, _, _ in plan(runs, budget, args.model, dataset, args.ablations):
        if os.path.isfile(os.path.join(runs, name, "log.jsonl")):
            shutil.copy(os.path.join(runs, name, "log.jsonl"), os.path.join(out, "logs", f"{name}.jsonl"))
    print(open(os.path.join(out, "table.md")).read())
    print(f"pipeline done in {(time.time() - started) / 60:.1f} min; wrote {out}/table.md, table.json, grid.png, "
          f"curve.png, adapters/, logs/, commands.sh")


if __name__ == "__main__":
    training.run_cli(main)
