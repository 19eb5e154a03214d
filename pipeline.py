"""The whole Flow-OPD method in the miniature world, one command, and the paper's table.

    python pipeline.py                  # the demo: published teachers -> Stage 2 -> Stage 3 with MAR -> results/
    python pipeline.py --full           # also the second training seed, no MAR and the paper's KL weighting
    python pipeline.py --from-scratch   # first retrain every published Stage 1 product with its card's command
    python pipeline.py --quick          # the same steps with tiny budgets, a smoke test -> results-quick/

As the paper starts from published Flow-GRPO teachers, the demo starts from the miniature's published Stage 1
products, miniature/teachers/<name>/ (adapter + card: command, seed, machine, minutes, test scores):
  geneval   the GenEval teacher          stage1_grpo.py --reward geneval --objective nft (GRPO is too slow here)
  ocr       the OCR teacher              python -m lab specialist (no reward-trained OCR teacher moves here)
  quality   the quality anchor (MAR)     stage1_grpo.py --reward quality --objective nft
  grpo-mix  / nft-mix                    stage1_grpo.py --reward geneval=0.5,ocr=0.5, GRPO / the GenEval recipe
Steps, each cached (a finished step is skipped, an interrupted one resumes from its checkpoint):
  1. (--from-scratch) the five products above, with their cards' commands, into runs-scratch/
  2. the Stage 2 cold start                stage2_coldstart.py search (the merge chosen on a validation split
                                           of the training prompts)
  3. Stage 3 OPD with MAR                  stage3_opd.py --kl-weighting flat --guidance geneval=1,ocr=4.5
     (--full) a second seed, the paper's KL weighting (opd-paper-kl), no MAR (opd-no-mar);
     (--ablations) no cold start, ppo, per-epoch schedule, an SFT cold start;
     (--mar-sweep) MAR weights 0, 0.2 and 1 beside the demo's 0.04, chosen on Stage 2's validation split
  4. every row scored on the same prompts  eval.py --from-cards: a published row's scores are its card's (its
                                           grid slice is sampled again and must match them), the others sampled
Writes OUT/table.md (each score +- its standard error, and the share of each teacher's gain a row keeps),
OUT/table.json, OUT/minutes.json (each step's minutes, a cached one's as first measured, the evaluation's, and
their sum), OUT/grid.png (one column per model), OUT/curve.png (each task's test score against the trajectories
each method sampled, teachers as lines), OUT/adapters/<row>/, OUT/logs/ and OUT/commands.sh; with --mar-sweep
also OUT/mar.json, OUT/mar.png and OUT/mar-validation/.
"""
import hashlib
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
# copied. A validation split preferred 20 (less clutter; lab/studies/geneval_teacher_choice.txt), but that retrain
# gained +0.08 on the test and about nothing on Stage 2's validation prompts: too little to distil (2026-12-06)
def nft_recipe(lr):
    return ["--objective", "nft", "--lr", lr, "--nft-times", "2", "--ema", "0.9", "--nft-old-decay", "0.5",
            "--nft-old-ramp", "20", "--train-precision", "bf16" if common.bf16_is_fast() else "fp32"]  # bf16 where native


NFT = nft_recipe("3e-3")
FULL = {"geneval": [*NFT, "--prompts-per-epoch", "32", "--train-batch-size", "64", "--steps", "6", "--epochs", "30"],
        "ocr": ["--steps", "1200", "--lr", "1e-3"],  # ~10 min on a 2-core AVX2 CPU: OCR +0.14 after 900 steps, +0.22 after 1350
        "grpo": [*GRPO, "--epochs", "12"],
        # the quality anchor: chosen on a validation split among 8 epochs at lr 1e-3 / 5e-4 and 5 at 1e-3 (the one with
        # the best quality whose GenEval and OCR stay within 0.02 of the base; docs/experiments.md, 2026-12-05)
        "anchor": [*nft_recipe("5e-4"), "--prompts-per-epoch", "32", "--train-batch-size", "64", "--steps", "6",
                   "--epochs", "8"],
        # the search: its 10 candidate merges on 32 validation prompts per task (its default 64 took half the demo's
        # time; docs/experiments.md, 2026-12-05)
        "search": ["--val-per-task", "32"],
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
        "validation": ["--samples-per-prompt", "2"], "validation_per_task": 64,  # the MAR sweep's: Stage 2's split
        "curve": {"grpo-mix": "4,8", "nft-mix": "10,25"}}  # --eval-at: the curve's inner points (the published
                          # runs'); its ends are rows of eval.py (base / coldstart-merge, the trained row). Flow-OPD's
                          # line has its ends alone: two evaluations in training would cost the demo a minute
QUICK = {"geneval": [*NFT, "--epochs", "2", "--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4",
                     "--train-batch-size", "8", "--eval-steps", "4"],
         "ocr": ["--steps", "2", "--batch-size", "4"],
         "anchor": [*NFT, "--epochs", "2", "--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4",
                    "--train-batch-size", "8", "--eval-steps", "4"],
         "grpo": [*GRPO, "--epochs", "2", "--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4",
                  "--train-batch-size", "8", "--eval-steps", "4"],
         "sft": ["--samples-per-task", "8", "--train-steps", "2", "--batch-size", "8", "--sample-steps", "4"],
         "search": ["--val-per-task", "2", "--candidates", "delta:0.5,0.5;delta:1,1"],
         "opd": ["--epochs", "2", "--rollouts-per-epoch", "8", "--train-batch-size", "4", "--updates-per-epoch", "2",
                 "--steps", "4", "--eval-steps", "4", "--guidance", "geneval=1,ocr=4.5"],
         "samples_per_prompt": "1",
         "validation": ["--steps", "4"], "validation_per_task": 2,
         "curve": {"grpo-mix": "1", "nft-mix": "1", "opd-merge": "1"}}
NAMES = ("base", "teacher-geneval", "teacher-ocr", "teacher-quality", "grpo-mix", "nft-mix", "coldstart-merge",
         "opd-merge", "opd-merge-seed1", "opd-paper-kl", "opd-sft", "opd-no-mar", "opd-mar-0p2", "opd-mar-1",
         "opd-no-coldstart", "opd-ppo",
         "opd-schedule")
CURVES = (("grpo-mix", "base", "GRPO-Mix"), ("nft-mix", "base", "NFT-Mix"),
          ("opd-merge", "coldstart-merge", "Flow-OPD"))  # (run, its start's row, label)
TASKS = {"geneval": "geneval_acc", "ocr": "ocr"}  # each teacher's task and its table column


TEACHERS = "miniature/teachers"  # the published Stage 1 products, each with its card (lab/publish.py)
PUBLISHED = {"teacher-geneval": "geneval", "teacher-ocr": "ocr", "teacher-quality": "quality", "grpo-mix": "grpo-mix",
             "nft-mix": "nft-mix"}  # row -> its folder in TEACHERS
DEMO = ("coldstart-merge", "opd-merge")  # what `make demo` trains
FULL_ROWS = ("opd-merge-seed1", "opd-paper-kl", "opd-no-mar")  # --full adds these rows
# --mar-sweep: each row's lambda (opd-merge runs at stage3_opd.py's default, 0.04)
MAR_SWEEP = {"opd-no-mar": 0.0, "opd-merge": 0.04, "opd-mar-0p2": 0.2, "opd-mar-1": 1.0}
MAR_KEPT_SLACK = 0.05  # the chosen lambda may cost each task's gain kept at most 5 points against no MAR
ABLATIONS = ("coldstart-sft", "opd-sft", "opd-no-coldstart", "opd-ppo", "opd-schedule")  # with --ablations only
# Each step's minutes on the 2-core AMD EPYC (docs/experiments.md, 2026-12-04 to 06), for the progress line's
# estimate of what is left
EXPECTED_MINUTES = {"teacher-geneval": 9.1, "teacher-ocr": 7.7, "teacher-quality": 2.4, "grpo-mix": 3.0,
                    "nft-mix": 11.0, "coldstart-merge": 2.8, "coldstart-sft": 4.0, "evaluation": 2.2}  # eval: per row


def products(runs, from_scratch):
    """{row: adapter folder} of the five Stage 1 products: the published ones, or this run's own."""
    if from_scratch:
        return {row: os.path.join(runs, row, "adapter") for row in PUBLISHED}
    folders = {row: os.path.join(TEACHERS, name) for row, name in PUBLISHED.items()}
    missing = [f for f in folders.values() if not os.path.isfile(os.path.join(f, "adapter_model.safetensors"))]
    if missing:
        raise loading.UserError(f"published teacher {missing[0]!r} has no adapter_model.safetensors; expected the "
                                f"repository's {TEACHERS}/, or run with --from-scratch to train them")
    return folders


def plan(runs, budget, model, dataset, made=None):
    """[(row name, script, argv)] of every step in dependency order; each run writes runs/<name>/adapter.
    `made`: {row: adapter} of the Stage 1 products the later steps use (default: this plan's own runs). Stage 1 GRPO
    does not move GenEval or OCR in minutes (docs/experiments.md, "Stage 1 in the miniature world"), so the GenEval
    teacher and the anchor are Stage 1 with DiffusionNFT's objective, and the OCR teacher, which no reward-trained
    run moved, a render specialist (python -m lab specialist); GRPO-Mix is Stage 1 GRPO."""
    def out(name):
        return os.path.join(runs, name)

    def evals(name):  # evaluations during training: only the curve's inner points (eval.py scores every row)
        return ["--eval-at", budget["curve"][name]] if name in budget["curve"] else ["--eval-every", "0"]
    made = made or {row: f"{out(row)}/adapter" for row in PUBLISHED}
    teachers = f"geneval={made['teacher-geneval']},ocr={made['teacher-ocr']}"
    anchor = made["teacher-quality"]
    shared = ["--model", model, "--dataset", dataset]
    merge = ["--init", f"{out('coldstart-merge')}/adapter"]
    steps = [
        ("teacher-geneval", stage1_grpo, [*shared, "--reward", "geneval", *budget["geneval"], *evals("teacher-geneval")]),
        ("teacher-ocr", lab.commands, ["specialist", "--task", "ocr", *shared, *budget["ocr"]]),
        # the anchor judges scenes: trained on GenEval prompts alone, it leaves the signs' glyphs to the base (trained
        # on signs too, its flat fills cost 0.04-0.05 OCR; docs/experiments.md, 2026-12-05)
        ("teacher-quality", stage1_grpo, [*shared, "--reward", "quality", "--train-prompts",
                                          f"geneval={dataset}/{loading.DEFAULT_PROMPT_FILES['geneval']['train']}",
                                          *budget["anchor"], *evals("teacher-quality")]),
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
        *((row, stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge, *budget["opd"],
                             "--mar-lambda", f"{lam:g}", *evals(row)])
          for row, lam in MAR_SWEEP.items() if row.startswith("opd-mar-")),
        ("opd-no-coldstart", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *budget["opd"],
                                          *evals("opd-no-coldstart")]),
        ("opd-ppo", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge, "--objective", "ppo",
                                 *budget["opd"], *evals("opd-ppo")]),
        ("opd-schedule", stage3_opd, [*shared, "--teachers", teachers, "--anchor", anchor, *merge,
                                      "--schedule", "epoch", *budget["opd"], *evals("opd-schedule")]),
    ]
    return steps


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


def adapter_inputs(argv):
    """{folder: sha256 prefix of its weights} of every peft folder a step's arguments name (teachers, --init, the
    anchor): what a command cannot show has changed, e.g. a published teacher replaced at the same path."""
    found = {}
    for folder in (piece.split("=", 1)[-1] for token in argv for piece in str(token).split(",")):  # name=folder too
        weights = os.path.join(folder, "adapter_model.safetensors")
        if os.path.isfile(weights):
            found[folder] = hashlib.sha256(open(weights, "rb").read()).hexdigest()[:16]
    return found


def run_step(name, script, argv, runs):
    """Runs one step unless its adapter exists; an interrupted step resumes. Returns (command, minutes).
    A finished step made by another command (other teachers, other budgets), or from adapters that have changed
    since, is refused, never silently reused."""
    folder = os.path.join(runs, name)
    command, inputs = step_command(script, step_argv(script, argv, folder)), adapter_inputs(argv)
    timing = os.path.join(folder, "minutes.json")
    made = json.load(open(timing)) if os.path.isfile(timing) else {}
    if os.path.isdir(os.path.join(folder, "adapter")):
        if made.get("command", command) != command:
            raise loading.UserError(f"{folder} was made by another command ({made['command']!r}); expected {command!r}"
                                    f": move it away, or pass another --runs folder")
        changed = sorted(path for path, sha in made.get("inputs", inputs).items() if inputs.get(path) != sha)
        if changed:
            raise loading.UserError(f"{folder} was made from adapters that have changed since ({', '.join(changed)}); "
                                    f"expected the same weights: move it away, or pass another --runs folder")
        print(f"[cached] {name}")
        return command, made.get("minutes")
    print(f"[run] {command}")
    start = time.time()
    script.main(step_argv(script, argv, folder))
    minutes = (time.time() - start) / 60
    with open(timing, "w") as f:
        json.dump({"minutes": minutes, "command": command, "inputs": inputs}, f)
    return command, minutes


def step_argv(script, argv, folder):
    """A step's arguments with its run folder, and --resume where the script can resume."""
    return [*argv, "--out", folder, *(["--resume"] if script in (stage1_grpo, stage3_opd) else [])]


def step_command(script, argv):
    """The shell command of a step (what commands.sh and a published card hold)."""
    program = "-m lab" if script is lab.commands else os.path.basename(script.__file__)
    return f"python {program} {' '.join(argv)}"


def expected_minutes(name):
    """A step's minutes on the 2-core EPYC (Stage 3 runs: 4.5), for the progress line."""
    return EXPECTED_MINUTES.get(name, 4.5 if name.startswith("opd-") else 3.0)


def progress(done, total, name, started, spent_expected, left_expected):
    """One line before each step: the elapsed minutes and an estimate of those left, the EPYC's minutes scaled by
    how fast this machine has gone so far."""
    elapsed = (time.time() - started) / 60
    pace = elapsed / spent_expected if spent_expected > 0.5 else 1.0
    print(f"[{done + 1}/{total}] {name}: {elapsed:.1f} min elapsed, about {pace * left_expected:.1f} min left",
          flush=True)


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


def side_by_side(charts):
    """One picture of equal-sized charts in a row."""
    width, height = charts[0].size
    picture = Image.new("RGB", (width * len(charts), height), "white")
    for i, chart in enumerate(charts):
        picture.paste(chart, (i * width, 0))
    return picture


def curve_png(logs, table, path):
    """Each task's test score against the trajectories each method sampled, GRPO-Mix, NFT-Mix and Flow-OPD side
    by side, each teacher's score as a dashed line: the start's row (base / the merge cold start), the run's
    in-training evaluations (one seed per prompt), then its own row. OPD's count is its own rollouts from the
    cold start: the teachers' training trajectories are not counted (the table's train minutes hold them)."""
    rows = {row["model"]: row for row in table}
    logs = {name: [json.loads(line) for line in open(logs[name])] for name, _, _ in CURVES}
    charts = []
    for task, column in TASKS.items():
        series = {label: [(0, rows[start][column]), *((r["trajectories"], r["eval"][column]) for r in logs[name]
                                                      if "eval" in r), (logs[name][-1]["trajectories"], rows[name][column])]
                  for name, start, label in CURVES}
        charts.append(line_chart(series, f"test {column}: the table's rows at the ends, one seed per prompt between",
                                 "trajectories sampled by the method (OPD: the student's own; log scale)",
                                 {f"{task} teacher": rows[f"teacher-{task}"][column], "base": rows["base"][column]}))
    side_by_side(charts).save(path)


# ----------------------------------------------------------------------------------------------
# MAR's weight: Stage 3 at several lambda, chosen on a validation split of the training prompts (--mar-sweep)


def validation_files(dataset, folder, per_task=64, seed=0):
    """Stage 2's validation split (per_task training prompts of each task, drawn with seed) as prompt files."""
    split = stage2_coldstart.validation_split(loading.prompts_by_task(None, list(TASKS), dataset, "train"),
                                              per_task, seed)
    os.makedirs(folder, exist_ok=True)
    paths = {"geneval": os.path.join(folder, "geneval.jsonl"), "ocr": os.path.join(folder, "ocr.txt")}
    with open(paths["geneval"], "w") as f:
        f.writelines(json.dumps(meta) + "\n" for _, meta in split["geneval"])
    with open(paths["ocr"], "w") as f:
        f.writelines(prompt + "\n" for prompt, _ in split["ocr"])
    return ",".join(f"{task}={path}" for task, path in paths.items())


def mar_points(table):
    """[(lambda, row)] of the sweep's rows in `table` (eval.json rows), each with its gains kept, by lambda."""
    rows = {row["model"]: row for row in table}
    points = []
    for name, lam in sorted(MAR_SWEEP.items(), key=lambda item: item[1]):
        row = dict(rows[name])
        for task, column in TASKS.items():
            row[f"kept_{task}"] = evaluation.gain_kept(row[column], rows["base"][column], rows[f"teacher-{task}"][column])
        points.append((lam, row))
    return points


def choose_lambda(validation):
    """The MAR weight of the sweep with the highest validation quality among those that keep each task's gain within
    MAR_KEPT_SLACK of no MAR's (lambda 0): what MAR may buy, and what it may cost."""
    points = mar_points(validation)
    no_mar = points[0][1]
    allowed = [(lam, row) for lam, row in points
               if not any(row[f"kept_{t}"] < no_mar[f"kept_{t}"] - MAR_KEPT_SLACK for t in TASKS)]  # NaN: no gain
    return max(allowed, key=lambda point: point[1]["quality"])[0]


def mar_png(test, validation, chosen, path):
    """Each task's gain kept, quality and nothing-unasked against lambda, on the test and validation prompts."""
    charts = []
    for title, keys in (("gain kept (1 = the teacher's)", [("kept_geneval", "GenEval"), ("kept_ocr", "OCR")]),
                        ("quality and GenEval nothing unasked", [("quality", "quality"),
                                                                  ("geneval_clean", "nothing unasked")])):
        series = {f"{label}, {split}": [(lam, row[key]) for lam, row in mar_points(table)]
                  for split, table in (("test", test), ("validation", validation)) for key, label in keys}
        base = {row["model"]: row for row in test}["base"]
        levels = {"teacher": 1.0} if keys[0][0] == "kept_geneval" else {"base quality (test)": base["quality"]}
        charts.append(line_chart(series, f"MAR: {title}; chosen on validation: lambda {chosen:g}",
                                 "MAR weight lambda (log scale past 0)", levels))
    side_by_side(charts).save(path)


def mar_sweep(args, runs, out, dataset, budget, rows, test_table):
    """Scores the sweep's rows, the base and both teachers on the validation split, chooses lambda there, writes
    OUT/mar.json (both splits' points and the choice) and OUT/mar.png."""
    folder = os.path.join(out, "mar-validation")
    names = ["teacher-geneval", "teacher-ocr", *MAR_SWEEP]
    evaluation.main(["--model", args.model, "--adapters", ",".join(f"{n}={dict(rows)[n]}" for n in names),
                     "--test-prompts", validation_files(dataset, os.path.join(runs, "validation-prompts"),
                                                       budget["validation_per_task"]),
                     "--out", folder, *budget["validation"]])
    validation = json.load(open(os.path.join(folder, "eval.json")))
    chosen = choose_lambda(validation)
    with open(os.path.join(out, "mar.json"), "w") as f:
        json.dump({"chosen_lambda": chosen, "rule": " ".join(choose_lambda.__doc__.split(":")[0].split()),
                   "validation": [{"lambda": lam, **row} for lam, row in mar_points(validation)],
                   "test": [{"lambda": lam, **row} for lam, row in mar_points(test_table)]}, f, indent=1)
    mar_png(test_table, validation, chosen, os.path.join(out, "mar.png"))
    print(f"MAR sweep: lambda {chosen:g} chosen on the validation split; wrote {out}/mar.json and mar.png")


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
        name = row["model"] + evaluation.CARD_MARK * (row.get("scores_from") == "card")
        lines.append(f"| {name} | {cell(row, 'geneval_acc')} | {cell(row, 'ocr')} | {cell(row, 'quality')} | "
                     f"{cell(row, 'average')} | {kept[0]:.0%} | {kept[1]:.0%} | {cell(row, 'geneval_clean')} | {minutes} |")
    seeds = [rows[n] for n in ("opd-merge", "opd-merge-seed1") if n in rows]
    if len(seeds) == 2:
        lines.append("")
        lines.append("Flow-OPD over its two training seeds, mean (half the spread): " + ", ".join(
            f"{c} {(seeds[0][c] + seeds[1][c]) / 2:.3f} ({abs(seeds[0][c] - seeds[1][c]) / 2:.3f})"
            for c in ("geneval_acc", "ocr", "quality", "average")))
    lines += ["", evaluation.MINIATURE_GENEVAL]
    if any(row.get("scores_from") == "card" for row in table):
        lines += ["", evaluation.CARD_NOTE]
    return "\n".join(lines) + "\n"


def write_table(args, out, table, rows, commands, minutes, eval_argv, started, eval_minutes):
    """OUT/table.json (eval.json with each row's command, minutes and adapter), table.md, commands.sh and
    minutes.json; a trained row's adapter is copied to OUT/adapters/ (a published one stays where it is)."""
    for row in table:
        row["command"] = commands.get(row["model"], "(the shipped base, no training)")
        row["train_minutes"] = minutes.get(row["model"])
        if row["adapter"] and not row["adapter"].startswith(TEACHERS):
            row["adapter"] = os.path.join(out, "adapters", row["model"])
            shutil.copytree(dict(rows)[row["model"]], row["adapter"], dirs_exist_ok=True)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table_markdown(table))
    flags = "".join(f" --{f.replace('_', '-')}" for f in ("quick", "full", "ablations", "from_scratch", "mar_sweep")
                    if getattr(args, f))
    with open(os.path.join(out, "commands.sh"), "w") as f:
        f.write(f"# produced by: python pipeline.py{flags} (every seed is 0 unless the command says otherwise)\n")
        f.writelines(f"{commands[n]}\n" for n, _ in rows[1:] if n in commands)
        f.write(f"python eval.py {' '.join(eval_argv)}\n")
    this_run = (time.time() - started) / 60
    with open(os.path.join(out, "minutes.json"), "w") as f:  # a from-scratch run's time, also when steps were cached
        json.dump({"steps": minutes, "evaluation": eval_minutes, "this_run": this_run,
                   "all_steps_and_evaluation": sum(m or 0 for m in minutes.values()) + eval_minutes}, f, indent=1)
    return this_run


def parse_args(argv=None):
    p = training.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of every step (CI runs it)")
    p.add_argument("--full", action="store_true",
                   help="also the second training seed, no MAR and the paper's KL weighting (the README's table)")
    p.add_argument("--ablations", action="store_true",
                   help="also the ablation rows (SFT start, no cold start, ppo, per-epoch schedule; results/ablations/)")
    p.add_argument("--from-scratch", action="store_true",
                   help=f"retrain the published Stage 1 products ({TEACHERS}/) with their cards' commands first")
    p.add_argument("--mar-sweep", action="store_true",
                   help=f"also Stage 3 at each MAR weight {sorted(MAR_SWEEP.values())}, lambda chosen on a validation "
                        f"split -> OUT/mar.png")
    p.add_argument("--model", default="miniature/base", help="the base model")
    p.add_argument("--out", default=None, help="results folder (default: results/, or results-quick/ with --quick)")
    p.add_argument("--runs", default=None,
                   help="run folders (default: runs/, runs-quick/ with --quick, + -scratch with --from-scratch)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = args.out or ("results-quick" if args.quick else "results")
    runs = args.runs or ("runs-quick" if args.quick else "runs") + ("-scratch" if args.from_scratch else "")
    dataset = "dataset"
    miniature.world.ensure_prompt_files(dataset)
    budget, test_files = FULL, ""
    if args.quick:  # a few test prompts of every task, so that the many evaluations take seconds
        test_files = quick_test_files(dataset, os.path.join(runs, "test-prompts"))
        budget = {**QUICK, "grpo": [*QUICK["grpo"], "--test-prompts", test_files],
                  "opd": [*QUICK["opd"], "--test-prompts", test_files]}
    started = time.time()
    made = products(runs, args.from_scratch)
    chosen = {*(PUBLISHED if args.from_scratch else ()), *DEMO, *(FULL_ROWS if args.full else ()),
              *(ABLATIONS if args.ablations else ()), *(MAR_SWEEP if args.mar_sweep else ())}
    steps = [step for step in plan(runs, budget, args.model, dataset, made) if step[0] in chosen]
    rows = [("base", None), *made.items(), *((n, os.path.join(runs, n, "adapter")) for n in NAMES if n in chosen
                                              and n not in PUBLISHED)]
    expected = [0 if os.path.isdir(os.path.join(runs, n, "adapter")) else expected_minutes(n) for n, _, _ in steps]
    expected.append(EXPECTED_MINUTES["evaluation"] * sum(not (a and a.startswith(TEACHERS)) for _, a in rows[1:]))
    commands, minutes = {}, {}
    for i, (name, script, step_argv) in enumerate(steps):
        progress(i, len(steps) + 1, name, started, sum(expected[:i]), sum(expected[i:]))
        commands[name], minutes[name] = run_step(name, script, step_argv, runs)
    for row, adapter in made.items():
        if not args.from_scratch:  # a published product: the command its card holds, its card's minutes
            card = json.load(open(os.path.join(adapter, evaluation.CARD)))
            commands[row], minutes[row] = card["command"], card["train_minutes"]
    eval_argv = ["--model", args.model, "--adapters", ",".join(f"{n}={a}" for n, a in rows[1:]), "--out", out,
                 "--samples-per-prompt", budget["samples_per_prompt"], "--from-cards",
                 *(["--steps", "4", "--test-prompts", test_files] if args.quick else [])]
    progress(len(steps), len(steps) + 1, "evaluation", started, sum(expected[:-1]), expected[-1])
    eval_started = time.time()
    evaluation.main(eval_argv)
    eval_minutes = (time.time() - eval_started) / 60
    table = json.load(open(os.path.join(out, "eval.json")))
    this_run = write_table(args, out, table, rows, commands, minutes, eval_argv, started, eval_minutes)
    if args.mar_sweep:
        mar_sweep(args, runs, out, dataset, budget, rows, table)
    logs = {n: log_file(a) for n, a in rows[1:]}
    if all(os.path.isfile(logs.get(run, "")) for run, _, _ in CURVES):
        curve_png(logs, table, os.path.join(out, "curve.png"))
    shutil.rmtree(os.path.join(out, "logs"), ignore_errors=True)  # the logs behind the README's numbers, this run's only
    os.makedirs(os.path.join(out, "logs"))
    for name, log in logs.items():
        if os.path.isfile(log):
            shutil.copy(log, os.path.join(out, "logs", f"{name}.jsonl"))
    print(open(os.path.join(out, "table.md")).read())
    print(f"pipeline done in {this_run:.1f} min; wrote {out}/table.md, table.json, grid.png, curve.png, adapters/, "
          f"logs/, commands.sh")


def log_file(adapter):
    """The training log of an adapter: beside a run's adapter/ folder, or inside a published product's folder."""
    folder = os.path.normpath(adapter)
    return os.path.join(os.path.dirname(folder) if os.path.basename(folder) == "adapter" else folder, "log.jsonl")


if __name__ == "__main__":
    training.run_cli(main)
