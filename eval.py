"""Evaluate a base model and any number of LoRA adapters on the same test prompts and seeds.

    python eval.py --out results/eval                                        # the base alone
    python eval.py --adapters teacher-geneval=runs/teacher-geneval/adapter,teacher-ocr=runs/teacher-ocr/adapter

Deterministic ODE (noise 0) at the model's eval step count and guidance. Writes OUT/eval.json (one
row per model: per-task scores, GenEval per-category accuracy), OUT/scores.json (every sample's scores, per row),
OUT/table.md and OUT/grid.png (one column per model, the same prompts and seeds in every column).

With --from-cards, a row whose folder holds a card.json scored under this exact protocol (a published teacher,
lab/publish.py) takes its scores from the card: only the grid's prompts are sampled, and their scores must equal
the card's, sample for sample, or the run stops.
"""
import contextlib
import dataclasses
import hashlib
import json
import os

import numpy as np
import torch

import common
import loading
import rewards
import miniature.world
import training
from miniature.world import GENEVAL_TAGS, REWARDS, score

# The table's column of each reward: GenEval's is the official check (the paper's metric; rewards.py)
COLUMN_OF = {"geneval": "geneval_acc", "ocr": "ocr", "quality": "quality", "deqa": "deqa", "pickscore": "pickscore"}
TITLE = {"geneval_acc": "GenEval", "geneval_strict": "GenEval strict (exact counts)",
         "geneval_clean": "GenEval, nothing unasked", "ocr": "OCR", "quality": "quality", "deqa": "DeQA / 5",
         "pickscore": "PickScore / 26"}
# Shown where the scorer gives them, not averaged: exact counts from flow_grpo's GenEval server, the official rule
# with no unasked object from the miniature's detector (miniature.world.nothing_unasked)
EXTRA_COLUMNS = ("geneval_strict", "geneval_clean")
TEST_PROMPTS = "dataset/geneval/test_metadata.jsonl,dataset/ocr/test.txt"  # the miniature's test split, both tasks
# What the miniature world's GenEval detector implements (miniature.world.geneval_score), said under its table
MINIATURE_GENEVAL = ("GenEval: the official rule (at least each asked count; the exclude clause of counting prompts "
                     "makes their count exact), as flow_grpo's server `rewards`; the miniature has no exact-count variant. "
                     "\"Nothing unasked\": the official rule and no object drawn beyond the asked ones.")


CARD = "card.json"  # a published row's card: its command, machine, minutes and test scores (lab/publish.py)
CARD_MARK = " †"  # the table's mark of a row whose scores are its card's
CARD_NOTE = "† scores from the row's published card (card.json); its grid slice was sampled again here and matched them."
SLICE_TOLERANCE = 1e-5  # scores are stored to 6 decimals; a rescored slice must match to that rounding


def protocol(prompts, seeds, steps, guidance, bf16):
    """What makes two evaluations comparable sample for sample: the exact prompts and seeds (hashed), steps,
    guidance and precision. A card's scores stand in for sampling only under an equal protocol."""
    digest = hashlib.sha256(json.dumps([list(prompts), [int(s) for s in seeds]]).encode()).hexdigest()[:16]
    return {"prompts_and_seeds": digest, "samples": len(prompts), "steps": steps, "guidance_scale": guidance,
            "precision": "bf16" if bf16 else "fp32"}


def card_scores(folder, wanted):
    """{reward: per-sample array} from folder/card.json if its test scores were taken under `wanted` (protocol),
    else None: a card scored another way is not used, and the row is sampled."""
    path = os.path.join(folder, CARD) if folder and os.path.isdir(folder) else None
    if not path or not os.path.isfile(path):
        return None
    card = json.load(open(path))
    if card.get("test", {}).get("protocol") != wanted:
        return None
    return {name: np.asarray(values, dtype=float) for name, values in card["test"]["per_sample"].items()}


def per_sample_lists(scores):
    """Scores as JSON lists, 6 decimals (NaN where a reward does not judge the prompt)."""
    return {name: [round(float(v), 6) for v in values] for name, values in scores.items()}


def check_slice(rescored, card, index, row):
    """Raises unless the freshly sampled and scored slice `index` equals the card's scores for those samples."""
    for name, values in rescored.items():
        expected = card[name][index]
        same = np.isclose(values, expected, rtol=0, atol=SLICE_TOLERANCE) | (np.isnan(values) & np.isnan(expected))
        if not same.all():
            k = int(np.flatnonzero(~same)[0])
            raise loading.UserError(
                f"row {row!r}: the card's {name} for sample {int(index[k])} is {expected[k]:.6f} but rescoring gives "
                f"{values[k]:.6f}; expected the published adapter to reproduce its card (re-publish it, or run "
                f"without --from-cards)")


def sample_images(bundle, prompts, seeds, num_steps, guidance_scale, noise_level=0.0, batch_size=None, bf16=None,
                  decode_batch_size=None):
    """Images (B, 3, H, W) as uint8 on the CPU of a ModelBundle for prompts/seeds (deterministic ODE by
    default). Memory stays flat in the number of prompts: the transformer samples `batch_size` prompts at
    a time (default: the model's, 16 for SD3) under bf16 autocast if `bf16` (default: where
    bf16 is fast, common.bf16_is_fast); the VAE decodes `decode_batch_size` latents at a time (SD3: 4) outside the
    autocast, in its own weights' precision (flow_grpo decodes in fp32); each batch's images leave the
    device as uint8 (a 512 px image: 0.75 MB, a quarter of fp32), which every scorer reads exactly as it
    would the float images (miniature.world.to_uint8 rounds the same way)."""
    batch_size = batch_size or bundle.defaults["eval_batch_size"]
    decode_batch_size = decode_batch_size or bundle.defaults["decode_batch_size"]
    sigmas = common.sampling_sigmas(bundle.scheduler, num_steps)
    negative = bundle.encode([""])
    images = []
    for i in range(0, len(prompts), batch_size):
        embeds, pooled = bundle.encode(prompts[i:i + batch_size])
        with common.autocast(embeds.device, common.bf16_is_fast(embeds.device) if bf16 is None else bf16):
            latents = common.rollout(bundle.transformer, embeds, pooled, bundle.latent_shape(bundle.resolution),
                                     sigmas, seeds[i:i + batch_size], noise_level, guidance_scale, negative)["states"][:, -1]
        for j in range(0, len(latents), decode_batch_size):
            images.append(torch.from_numpy(miniature.world.to_uint8(bundle.decode(latents[j:j + decode_batch_size]))
                                           .transpose(0, 3, 1, 2).copy()))
        del latents
    return torch.cat(images)


def test_samples(items, samples_per_prompt=1, seed=0):
    """(prompts, metadata, seeds) of K samples of each [(prompt, metadata)] item: sample k of item i uses seed i +
    k * len(items) (+ seed), so every row of a table sees the same noise; K seeds shrink a score's standard error
    ~sqrt(K) (one seed per prompt: ~0.047 on the miniature's GenEval)."""
    prompts = [p for p, _ in items] * samples_per_prompt
    return prompts, [m for _, m in items] * samples_per_prompt, [seed + i for i in range(len(prompts))]


def sample_row(bundle, model, name, prompts, seeds, num_steps, guidance_scale, batch_size=None, bf16=False):
    """One table row's images: `model` from load_adapters, with its adapter `name` (None: the base) merged for
    sampling (adapter_for_sampling)."""
    with adapter_for_sampling(model, name) if model is not bundle.transformer else torch.no_grad():
        return sample_images(dataclasses.replace(bundle, transformer=model), prompts, seeds, num_steps, guidance_scale,
                             batch_size=batch_size, bf16=bf16)


def evaluate(bundle, items, num_steps, guidance_scale, seed=0, scorer=None, names=REWARDS, bf16=False):
    """Scores of a model on [(prompt, metadata)]: {"geneval_acc", "geneval", "ocr", "quality",
    "geneval/<tag>"...} means, and the images. Seeds are seed + index, so every model sees the same noise.
    `scorer`: a function with score()'s signature (default miniature.world.score; rewards.make_scorer for real models).
    fp32 by default, as eval.py: the same weights then score the same on every CPU (bf16 rounding moved
    a row's GenEval by up to 0.04, docs/speed.md)."""
    prompts, metas = [p for p, _ in items], [m for _, m in items]
    images = sample_images(bundle, prompts, [seed + i for i in range(len(prompts))], num_steps, guidance_scale, bf16=bf16)
    return summarize((scorer or score)(images, prompts, metas, names=names), metas), images


def summarize(scores, metas):
    """Mean of each reward over the prompts it applies to, and GenEval accuracy (the official rule) per tag."""
    result = {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
              for name, values in scores.items()}
    for tag in GENEVAL_TAGS:
        mask = np.array([bool(m) and m.get("tag") == tag for m in metas])
        if mask.any() and "geneval_acc" in scores:
            result[f"geneval/{tag}"] = float(scores["geneval_acc"][mask].mean())
    return result


def parse_adapters(text):
    """'name=path,name=path' -> [(name, path)]; a bare path is named by its folder."""
    rows = []
    for part in filter(None, (text or "").split(",")):
        name, _, path = part.rpartition("=")
        name = name or os.path.basename(os.path.normpath(os.path.dirname(path) if path.endswith("adapter") else path))
        if "." in name:  # torch module names (peft adapter names) cannot hold a dot
            raise loading.UserError(f"row name {name!r} in --adapters has a '.'; expected a name without dots, e.g. "
                             f"{name.replace('.', '-')!r}")
        path = loading.resolve_adapter(path)  # a hub id (e.g. a published Flow-GRPO teacher) -> its cached folder
        if not os.path.isdir(path):
            raise FileNotFoundError(f"adapter folder {path!r} (for row {name!r}) does not exist; expected a peft "
                                    f"folder with adapter_config.json and adapter_model.safetensors")
        rows.append((name, path))
    return rows


def load_adapters(transformer, adapters):
    """All adapters as named frozen adapters on ONE base (peft); returns the model to call."""
    if not adapters:
        return transformer
    from peft import PeftModel
    adapters = [(name, loading.resolve_adapter(path)) for name, path in adapters]
    loading.check_adapter_fits(transformer, adapters[0][1])
    model = PeftModel.from_pretrained(transformer, adapters[0][1], adapter_name=adapters[0][0], is_trainable=False)
    for name, path in adapters[1:]:
        loading.load_adapter(model, path, name)
    return model


@contextlib.contextmanager
def adapter_for_sampling(peft_model, name):
    """loading.use_adapter, with the adapter merged into fp32 base weights for the block (one matmul per layer
    instead of the LoRA branch in every pass: a miniature row samples ~1.2x faster, its images within one level
    of 255 of the unmerged ones, docs/speed.md), then the base weights restored bit for bit. bf16 base weights
    are not merged: Delta W would be rounded to bf16."""
    with loading.use_adapter(peft_model, name):
        base = {n: p for n, p in peft_model.named_parameters() if n.endswith("base_layer.weight")}  # what merging writes
        if name is None or any(p.dtype != torch.float32 for p in base.values()):
            yield peft_model
            return
        saved = {n: p.detach().clone() for n, p in base.items()}
        peft_model.merge_adapter([name])
        try:
            yield peft_model
        finally:
            peft_model.unmerge_adapter()
            with torch.no_grad():
                for n, p in base.items():
                    p.copy_(saved[n])


def evaluate_policy(bundle, policy, adapter, items, steps, guidance, out_png=None, scorer=None, names=miniature.world.REWARDS,
                    bf16=None):
    """Test scores of `policy` (a PeftModel) with `adapter` active: the stages' periodic evaluation.
    Deterministic ODE; prompt i uses seed i, as in the table. Optionally writes a sample grid.
    `scorer`/`names`: the scorer and rewards (rewards.from_args), default the miniature world's."""
    with adapter_for_sampling(policy, adapter):
        result, images = evaluate(dataclasses.replace(bundle, transformer=policy), items, steps, guidance,
                                      scorer=scorer, names=names, bf16=bf16)
    if out_png:
        training.image_grid(images[::max(1, len(images) // 32)][:32], 8).save(out_png)
    return result


def standard_errors(scores, samples_per_prompt=1):
    """{"<reward>_se"}: the standard error of each reward's mean over the test prompts it judges. The
    samples of one prompt (`scores` holds K blocks of the prompts, eval.py's order) are averaged first,
    since K seeds of one prompt are not K independent draws of the test set: se = std(prompt means) / sqrt(n)."""
    out = {}
    for name, values in scores.items():
        per_prompt = np.asarray(values, dtype=float).reshape(samples_per_prompt, -1).mean(0)
        judged = per_prompt[np.isfinite(per_prompt)]
        out[f"{name}_se"] = float(judged.std(ddof=1) / np.sqrt(len(judged))) if len(judged) > 1 else float("nan")
    return out


def row_scores(scores, metas, columns, samples_per_prompt=1):
    """summarize, the standard error of each score, and the average of the table's columns (its standard
    error treats the columns as independent: they are means over different prompts, except quality)."""
    row = {**summarize(scores, metas), **standard_errors(scores, samples_per_prompt)}
    shown = [c for c in columns if c in row and np.isfinite(row[c])]
    row["average"] = float(np.mean([row[c] for c in shown]))
    row["average_se"] = float(np.sqrt(sum(row.get(f"{c}_se", np.nan) ** 2 for c in shown)) / len(shown))
    return row


def gain_kept(score, base, teacher):
    """The share of a teacher's gain over the base that a model keeps on the teacher's task (1 = all of it)."""
    return (score - base) / (teacher - base) if teacher != base else float("nan")


def markdown_table(rows, columns, extra=()):
    """One line per row: each column's mean +- its standard error, the average of `columns`, then the
    `extra` columns (shown, not averaged). A row scored from its card is marked †."""
    def cell(r, c):
        se = r.get(f"{c}_se", float("nan"))
        return f"{r.get(c, float('nan')):.3f}" + (f" ± {se:.3f}" if np.isfinite(se) else "")
    shown = (*columns, "average", *extra)
    head = "| model | " + " | ".join(TITLE.get(c, c) for c in shown) + " |\n" + "|---" * (len(shown) + 1) + "|\n"
    name = lambda r: r["model"] + CARD_MARK * (r.get("scores_from") == "card")  # noqa: E731
    return head + "".join(f"| {name(r)} | " + " | ".join(cell(r, c) for c in shown) + " |\n" for r in rows)


def label_grid(grid, column_names, row_names, font_size=12):
    """The grid of training.image_grid (one row per prompt, one column per model) with each column's name
    written upwards above it and each row's prompt at its left, so the picture reads without the table."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=font_size)
    cell_w, cell_h = grid.width / len(column_names), grid.height / len(row_names)
    header = int(max(font.getlength(n) for n in column_names)) + 10
    left = min(int(max(font.getlength(p) for p in row_names)) + 10, 260)
    picture = Image.new("RGB", (left + grid.width, header + grid.height), "white")
    picture.paste(grid, (left, header))
    names = Image.new("RGB", (header, grid.width), "white")  # drawn across, then turned to read upwards
    draw = ImageDraw.Draw(names)
    for i, name in enumerate(column_names):
        draw.text((header - 5, (i + 0.5) * cell_w), name, fill="black", font=font, anchor="rm")
    picture.paste(names.transpose(Image.Transpose.ROTATE_90), (left, 0))
    draw = ImageDraw.Draw(picture)
    for i, prompt in enumerate(row_names):
        while font.getlength(prompt) > left - 10:
            prompt = prompt[:-2] + "…"
        draw.text((left - 5, header + (i + 0.5) * cell_h), prompt, fill="black", font=font, anchor="rm")
    return picture


def main(argv=None):
    p = training.parser(__doc__)
    training.add_model_arguments(p)  # --model, --device, --model-dtype, --resolution (others unused here)
    rewards.add_arguments(p)  # --eval-rewards (default: the world's columns), --pickscore-model, --geneval-url, ...
    p.add_argument("--adapters", default="", help='name=peft_folder,...; a row "base" (no adapter) comes first')
    p.add_argument("--no-base-row", action="store_true", help="leave the base model's row out")
    p.add_argument("--test-prompts", default=TEST_PROMPTS,
                   help="comma-separated prompt files, each path or task=path")
    p.add_argument("--steps", type=training.positive_int, default=None,
                   help="ODE steps (default: the model's; paper: 40)")
    p.add_argument("--guidance", type=training.nonnegative_float, default=None,
                   help="CFG (default: the model's; paper: 4.5)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i in every row")
    p.add_argument("--samples-per-prompt", type=training.positive_int, default=1,
                   help="K: sample k of prompt i uses seed + i + k * (number of prompts)")
    p.add_argument("--batch-size", type=training.positive_int, default=None,
                   help="prompts sampled at once (default: the model's: 64 miniature, 16 SD3; 24 GB at 512 px: 8)")
    p.add_argument("--grid-prompts", type=training.positive_int, default=16,
                   help="prompts shown in the grid (spread over the split)")
    p.add_argument("--out", default="results/eval", help="output folder")
    p.add_argument("--from-cards", action="store_true",
                   help="rows with a card.json of this protocol take its scores; only their grid slice is rescored")
    args = p.parse_args(argv)
    adapters = parse_adapters(args.adapters)
    if args.test_prompts == p.get_default("test_prompts"):
        miniature.world.ensure_prompt_files("dataset")
    items = loading.load_prompt_files(args.test_prompts)
    prompts, metas, seeds = test_samples(items, args.samples_per_prompt, args.seed)
    bundle = training.load_model_from_args(args)
    score, names = rewards.from_args(args, bundle)
    columns = [COLUMN_OF[n] for n in names]
    note = f"\n{MINIATURE_GENEVAL}\n" if bundle.kind == "miniature" and "geneval" in names else ""
    steps = args.steps or bundle.defaults["eval_steps"]
    guidance = args.guidance if args.guidance is not None else bundle.defaults["guidance_scale"]
    model = load_adapters(bundle.transformer, adapters)
    runs = ([] if args.no_base_row else [("base", None)]) + adapters
    if not runs:
        raise loading.UserError("--no-base-row without --adapters leaves no row to evaluate; expected --adapters "
                               "name=peft_folder,... or the base row")
    rows, shown_images, per_sample = [], [], {}
    shown = np.linspace(0, len(items) - 1, min(args.grid_prompts, len(items))).round().astype(int)
    wanted = protocol(prompts, seeds, steps, guidance, args.eval_bf16)
    for name, path in runs:
        card = card_scores(path or args.model, wanted) if args.from_cards else None
        subset = shown if card is not None else np.arange(len(prompts))
        images = sample_row(bundle, model, None if path is None else name, [prompts[i] for i in subset],
                            [seeds[i] for i in subset], steps, guidance, args.batch_size, args.eval_bf16)
        scores = score(images, [prompts[i] for i in subset], [metas[i] for i in subset], names=names)
        if card is not None:
            check_slice(scores, card, shown, name)
            scores = card
        per_sample[name] = per_sample_lists(scores)
        rows.append({"model": name, "adapter": path, "steps": steps, "guidance_scale": guidance, "seed": args.seed,
                     "samples_per_prompt": args.samples_per_prompt,
                     "eval_precision": "bf16" if args.eval_bf16 else "fp32", "protocol": wanted,
                     "scores_from": "card" if card is not None else "sampled",
                     **row_scores(scores, metas, columns, args.samples_per_prompt)})
        extra = [c for c in EXTRA_COLUMNS if c in rows[0]]
        shown_images.append(images if card is not None else images[shown])
        print(markdown_table(rows[-1:], columns, extra).splitlines()[-1])
    if any(r["scores_from"] == "card" for r in rows):
        note += f"\n{CARD_NOTE}\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump(per_sample, f)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown_table(rows, columns, extra) + note)
    grid = torch.stack(shown_images, 1).flatten(0, 1)  # row = prompt, column = model
    label_grid(training.image_grid(grid, len(runs)), [n for n, _ in runs],
               [items[i][0] for i in shown]).save(os.path.join(args.out, "grid.png"))
    print(markdown_table(rows, columns, extra) + note)
    print(f"wrote {args.out}/eval.json, scores.json, table.md and grid.png (columns: {', '.join(n for n, _ in runs)})")


if __name__ == "__main__":
    training.run_cli(main)
