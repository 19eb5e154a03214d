"""Publishing a Stage 1 product: its adapter and a card, as the paper's teachers are published artifacts.

    python eval.py --adapters teacher-geneval=runs/teacher-geneval/adapter,... --samples-per-prompt 4 --out E
    python -m lab publish --row teacher-geneval --adapter runs/teacher-geneval/adapter --eval E \\
        --command "python stage1_grpo.py ..." --minutes 6.9 --machine "2-core ..." --out miniature/teachers/geneval

The folder gets the adapter in peft's format (adapter_config.json + adapter_model.safetensors, what every stage
loads), the run's log.jsonl, card.json (the command, seed, machine, minutes, and the test scores: means +- standard
errors and every sample's score, under eval.py's protocol) and README.md (the same card, to read). `eval.py
--from-cards` then takes a published row's scores from card.json and rescores only its grid slice, which must match.
`--adapter none --out miniature/base` writes the base model's card.json only (its README is its model card).
"""
import json
import os
import shutil

import eval as evaluation
import loading

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
COLUMNS = (("geneval_acc", "GenEval (official)"), ("geneval_clean", "GenEval, nothing unasked"), ("ocr", "OCR"),
           ("quality", "quality"), ("average", "average"))


def eval_row(folder, row):
    """(the row of eval.json, its per-sample scores) of `row` in an eval.py output folder."""
    rows = {r["model"]: r for r in json.load(open(os.path.join(folder, "eval.json")))}
    if row not in rows:
        raise loading.UserError(f"--eval {folder!r} has no row {row!r}; expected one of {sorted(rows)}")
    per_sample = json.load(open(os.path.join(folder, "scores.json")))[row]
    return rows[row], per_sample


def card_markdown(card):
    """README.md of a published product: what it is, how it was made, its test scores."""
    scores = card["test"]["scores"]
    lines = [f"# {card['row']}", "", card["note"], "", "## How it was made", "", "```bash", card["command"], "```", "",
             f"Seed {card['seed']}; {card['machine']}; {card['date']}; "
             + (f"{card['train_minutes']:.1f} training minutes." if card["train_minutes"] else "no training."), "",
             "## Test scores", "", f"eval.py's protocol: {card['test']['protocol']['samples']} samples (the test "
             f"prompts x {card['test']['samples_per_prompt']} seeds), {card['test']['protocol']['steps']}-step ODE, "
             f"CFG {card['test']['protocol']['guidance_scale']}, {card['test']['protocol']['precision']}; mean "
             "± standard error over prompts. Every sample's score is in card.json.", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * len(COLUMNS) + "|",
             "| " + " | ".join(f"{scores[c]:.3f} ± {scores[c + '_se']:.3f}" for c, _ in COLUMNS) + " |"]
    return "\n".join(lines) + "\n"


def publish(args):
    """Writes OUT/ (adapter, log, card.json, README.md) in one rename: a folder is the old product or the new one."""
    row, per_sample = eval_row(args.eval, args.row)
    note = open(args.note).read().strip() if args.note and os.path.isfile(args.note) else (args.note or "")
    card = {"row": args.row, "command": args.command, "seed": args.seed, "machine": args.machine, "date": args.date,
            "train_minutes": args.minutes, "note": note,
            "test": {"protocol": row["protocol"], "samples_per_prompt": row["samples_per_prompt"],
                     "scores": {k: v for k, v in row.items() if isinstance(v, float)}, "per_sample": per_sample}}
    if args.adapter == "none":  # the base model: its card next to its weights
        with open(os.path.join(args.out, evaluation.CARD), "w") as f:
            json.dump(card, f, indent=1)
        print(f"wrote {args.out}/{evaluation.CARD}")
        return

    def write(tmp):
        for name in ADAPTER_FILES:
            shutil.copy(os.path.join(args.adapter, name), tmp)
        log = args.log or os.path.join(os.path.dirname(os.path.normpath(args.adapter)), "log.jsonl")
        if os.path.isfile(log):
            shutil.copy(log, os.path.join(tmp, "log.jsonl"))
        with open(os.path.join(tmp, evaluation.CARD), "w") as f:
            json.dump(card, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card_markdown(card))
    loading.atomic_write_dir(args.out, write)
    print(f"wrote {args.out}: " + ", ".join(f"{title} {card['test']['scores'][c]:.3f}" for c, title in COLUMNS))


def add_command(command):
    """The `publish` subcommand of `python -m lab` (lab/commands.py)."""
    p = command("publish", "publish a trained adapter with its card (command, machine, minutes, test scores)")
    p.add_argument("--row", required=True, help="its row in --eval (e.g. teacher-geneval)")
    p.add_argument("--adapter", required=True, help="peft folder to publish, or none (the base model's card)")
    p.add_argument("--eval", required=True, help="eval.py --out folder that scored it (eval.json + scores.json)")
    p.add_argument("--command", required=True, help="the exact command that trained it")
    p.add_argument("--seed", type=int, default=0, help="its training seed")
    p.add_argument("--machine", required=True, help="where it was trained")
    p.add_argument("--date", required=True, help="when it was trained")
    p.add_argument("--minutes", type=float, default=None, help="its training minutes")
    p.add_argument("--log", default=None, help="its training log (default: log.jsonl beside the adapter folder)")
    p.add_argument("--note", default="", help="what it is and which bars it meets (text, or a file holding it)")
    p.add_argument("--out", required=True, help="the published folder (e.g. miniature/teachers/geneval)")
    p.set_defaults(func=publish)
