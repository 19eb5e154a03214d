"""The miniature world: prompts, a renderer, scorers and a tiny SD3 model that runs on a laptop CPU.

    python toy.py prompts   --out dataset                  # write flow_grpo-format prompt files
    python toy.py pretrain  --out miniature/base           # train the shipped base model (see its README)
    python toy.py sample    --model miniature/base --out results/base   # grid + scores of a model

Scenes are 64x64 RGB: coloured flat shapes on white (the `geneval` task) or black text on white
(the `ocr` task). Every prompt can be rendered correctly, which is the pretraining data, and every
image can be scored programmatically (geneval, quality) or by a real OCR engine (rapidocr).
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 64
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 190, 20)}
SHAPES = ["circle", "square", "triangle"]
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ["left of", "right of", "above", "below"]
# Characters rapidocr reads without confusion at this size (O/0, I/1, Q, S/5, Z/2, C/6 are ambiguous).
OCR_ALPHABET = "ABDEFGHJKLMNPRTUVWXY34789"
GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
POSITION_THRESHOLD = 0.1  # GenEval's: centre offsets shrink by 10% of the summed box sizes


# ----------------------------------------------------------------------------------------------
# Prompts, in GenEval's metadata schema and flow_grpo's OCR text format

def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def geneval_item(tag, shapes, colors=(), count=1, relation=None):
    """One GenEval metadata record: {"tag", "include", ["exclude"], "prompt"}."""
    if tag == "single_object":
        include, prompt = [{"class": shapes[0], "count": 1}], f"a photo of a {shapes[0]}"
    elif tag == "two_object":
        include = [{"class": shapes[0], "count": 1}, {"class": shapes[1], "count": 1}]
        prompt = f"a photo of a {shapes[0]} and a {shapes[1]}"
    elif tag == "counting":
        item = {"tag": tag, "include": [{"class": shapes[0], "count": count}],
                "exclude": [{"class": shapes[0], "count": count + 1}],
                "prompt": f"a photo of {NUMBERS[count]} {PLURALS[shapes[0]] if count > 1 else shapes[0]}"}
        return item
    elif tag == "colors":
        include = [{"class": shapes[0], "count": 1, "color": colors[0]}]
        prompt = f"a photo of {_article(colors[0])} {colors[0]} {shapes[0]}"
    elif tag == "position":
        # GenEval: the second clause is `relation` of the first; the prompt names the second first.
        include = [{"class": shapes[1], "count": 1}, {"class": shapes[0], "count": 1, "position": [relation, 0]}]
        prompt = f"a photo of a {shapes[0]} {relation} a {shapes[1]}"
    elif tag == "color_attr":
        include = [{"class": shapes[0], "count": 1, "color": colors[0]},
                   {"class": shapes[1], "count": 1, "color": colors[1]}]
        prompt = f"a photo of {_article(colors[0])} {colors[0]} {shapes[0]} and {_article(colors[1])} {colors[1]} {shapes[1]}"
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")
    return {"tag": tag, "include": include, "prompt": prompt}


def all_geneval_items(tag):
    """Every composition of a tag in the miniature world, in a fixed order."""
    pairs = [p for p in itertools.permutations(SHAPES, 2)]
    if tag == "single_object":
        return [geneval_item(tag, [s]) for s in SHAPES]
    if tag == "two_object":
        return [geneval_item(tag, list(p)) for p in pairs]
    if tag == "counting":
        return [geneval_item(tag, [s], count=n) for s in SHAPES for n in (2, 3, 4)]
    if tag == "colors":
        return [geneval_item(tag, [s], [c]) for s in SHAPES for c in COLORS]
    if tag == "position":
        return [geneval_item(tag, list(p), relation=r) for p in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [geneval_item(tag, list(p), list(c)) for p in pairs for c in itertools.permutations(COLORS, 2)]
    raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")


def ocr_prompt(text):
    return f'a sign that says "{text}"'


def split_prompt_sets(seed=0, test_per_tag=16, n_ocr_test=64, n_ocr_train=2000, train_per_tag=300):
    """Deterministic train/test prompt lists. Test compositions are held out of train wherever a tag
    has more than a handful (colors, position, color_attr; all OCR strings). single_object,
    two_object and counting have 3-9 compositions, so train and test share them (as in GenEval,
    where every test prompt is sampled with fresh seeds)."""
    rng = random.Random(seed)
    geneval_train, geneval_test = [], []
    for tag in GENEVAL_TAGS:
        items = all_geneval_items(tag)
        rng.shuffle(items)
        n_held = len(items) // 4 if len(items) >= 12 else 0
        held, kept = items[:n_held], items[n_held:]
        test_pool = held or kept
        geneval_test += [test_pool[i % len(test_pool)] for i in range(test_per_tag)]
        geneval_train += [kept[i % len(kept)] for i in range(train_per_tag)]
    rng.shuffle(geneval_train)
    texts = set()
    while len(texts) < n_ocr_test + n_ocr_train:
        texts.add("".join(rng.choice(OCR_ALPHABET) for _ in range(rng.randint(1, 3))))
    texts = sorted(texts)
    rng.shuffle(texts)
    ocr_test = [ocr_prompt(t) for t in texts[:n_ocr_test]]
    ocr_train = [ocr_prompt(t) for t in texts[n_ocr_test:]]
    return {"geneval": (geneval_train, geneval_test), "ocr": (ocr_train, ocr_test)}


def write_prompt_files(out_dir, seed=0):
    """dataset/geneval/{train,test}_metadata.jsonl and dataset/ocr/{train,test}.txt, as flow_grpo."""
    sets = split_prompt_sets(seed)
    paths = {}
    for split, index in (("train", 0), ("test", 1)):
        path = os.path.join(out_dir, "geneval", f"{split}_metadata.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in sets["geneval"][index])
        paths[f"geneval_{split}"] = path
        path = os.path.join(out_dir, "ocr", f"{split}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(p + "\n" for p in sets["ocr"][index])
        paths[f"ocr_{split}"] = path
    return paths


def held_out_prompts(seed=0):
    """Test prompts that must never appear in pretraining data."""
    sets = split_prompt_sets(seed)
    train = {m["prompt"] for m in sets["geneval"][0]}
    return {m["prompt"] for m in sets["geneval"][1] if m["prompt"] not in train} | set(sets["ocr"][1])


_GENEVAL_PATTERNS = None


def parse_prompt(prompt):
    """Inverse of the prompt builders: the metadata of any miniature prompt (None if it is not one)."""
    global _GENEVAL_PATTERNS
    quoted = re.search(r'"([^"]*)"', prompt)
    if quoted:
        return {"tag": "ocr", "text": quoted.group(1), "prompt": prompt}
    if _GENEVAL_PATTERNS is None:
        _GENEVAL_PATTERNS = {m["prompt"]: m for tag in GENEVAL_TAGS for m in all_geneval_items(tag)}
    return _GENEVAL_PATTERNS.get(prompt.strip())


# ----------------------------------------------------------------------------------------------
# Renderer: a correct image for any prompt, with random placement and size

def _draw_shape(draw, shape, cx, cy, size, color):
    h = size / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=color)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=color)


def _relation_holds(a, b, relation):
    """GenEval's relative position of box a to box b (boxes as x0, y0, x1, y1)."""
    return relation in relative_positions(a, b)


def relative_positions(box_a, box_b):
    """The set of relations of box a to box b, by GenEval's rule (threshold 0.1 of the box sizes)."""
    box_a, box_b = np.asarray(box_a, float), np.asarray(box_b, float)
    center_a, center_b = (box_a[:2] + box_a[2:]) / 2, (box_b[:2] + box_b[2:]) / 2
    dims = (box_a[2:] - box_a[:2]) + (box_b[2:] - box_b[:2])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, ok in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                  ("above", dy < -0.5), ("below", dy > 0.5)) if ok}


def _objects_to_draw(meta, rng):
    """(shape, colour name, clause index) for each object a GenEval record asks for."""
    objects = []
    for i, clause in enumerate(meta["include"]):
        for _ in range(clause["count"]):
            objects.append((clause["class"], clause.get("color") or rng.choice(list(COLORS)), i))
    return objects


def render(prompt, meta=None, rng=None):
    """A PIL image that satisfies the prompt (GenEval metadata or quoted text), randomly laid out."""
    rng = rng or random.Random()
    meta = meta or parse_prompt(prompt)
    if meta is None:
        raise ValueError(f"cannot render prompt {prompt!r}: not a miniature-world prompt")
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if meta.get("tag") == "ocr" or "include" not in meta:
        text = meta.get("text") if "text" in meta else parse_prompt(prompt)["text"]
        # A sign: character k centred in the k-th of three 20-px cells (a monospaced line), 24-27 px high,
        # jittered by +-2 px, so that the glyphs, not the layout, are what the model must learn.
        font = ImageFont.load_default(size=rng.randint(24, 27))
        dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
        for k, char in enumerate(text):
            left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
            x = 2 + 20 * k + (20 - (right - left)) // 2 - left + dx
            draw.text((x, (SIZE - (bottom - top)) // 2 - top + dy), char, font=font, fill=INK)
        return image
    objects = _objects_to_draw(meta, rng)
    lo, hi = (13, 21) if len(objects) <= 2 else (10, 14)
    for _ in range(1000):  # rejection sampling of a non-overlapping layout that satisfies positions
        placed = []
        for shape, color, clause in objects:
            size = rng.randint(lo, hi)
            cx, cy = rng.uniform(size / 2 + 1, SIZE - size / 2 - 1), rng.uniform(size / 2 + 1, SIZE - size / 2 - 1)
            box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
            if any(box[0] < b[2] + 3 and b[0] < box[2] + 3 and box[1] < b[3] + 3 and b[1] < box[3] + 3
                   for *_, b in placed):
                break
            placed.append((shape, color, clause, size, box))
        if len(placed) < len(objects):
            continue
        ok = True
        for i, clause in enumerate(meta["include"]):
            if "position" in clause:
                relation, j = clause["position"]
                ok &= all(_relation_holds(a[4], b[4], relation) for a in placed if a[2] == i
                          for b in placed if b[2] == j)
        if ok:
            break
    else:
        raise RuntimeError(f"could not lay out {prompt!r}")
    for shape, color, _, size, box in placed:
        _draw_shape(draw, shape, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, size, COLORS[color])
    return image


# ----------------------------------------------------------------------------------------------
# Scorers: score(images, prompts, metadata) -> {name: per-image array}

def to_uint8(images):
    """(B, H, W, 3) uint8 from a float tensor/array in [0, 1] (B, 3, H, W), a uint8 array or PIL list."""
    if isinstance(images, (list, tuple)):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    return images


_PALETTE_NAMES = ["background", "ink"] + list(COLORS)
_PALETTE = np.array([BACKGROUND, INK] + list(COLORS.values()), dtype=np.float32)


def quantize(image):
    """Nearest-palette label per pixel, and the distance to it (RGB in [0, 1] units)."""
    d = np.linalg.norm(image[:, :, None, :].astype(np.float32) - _PALETTE[None, None], axis=-1) / 255
    return d.argmin(-1), d.min(-1)


def detect_objects(image, min_area=12):
    """Flat-colour shapes: per-colour connected components, shape from the fill ratio of the box."""
    import cv2
    labels, _ = quantize(image)
    objects = []
    if np.mean(labels == 0) < 0.5:
        return objects  # not a scene on a white background: nothing a detector would trust
    for index, color in enumerate(_PALETTE_NAMES[2:], start=2):
        count, _, stats, _ = cv2.connectedComponentsWithStats((labels == index).astype(np.uint8), connectivity=4)
        for x, y, w, h, area in stats[1:]:
            fill = area / float(w * h)
            if area < min_area or min(w, h) < 4 or fill < 0.4 or max(w, h) > 2.5 * min(w, h):
                continue  # specks, streaks and ragged blobs are not objects
            shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
            objects.append({"class": shape, "color": color, "box": (x, y, x + w, y + h), "area": int(area)})
    return sorted(objects, key=lambda o: -o["area"])


def geneval_score(image, meta):
    """(partial credit, strict correctness) of one image for one GenEval record.
    Strict follows GenEval: enough objects of each included class (with the asked colour), fewer
    than the excluded count, every pair in the asked relation. Partial credit averages one term per
    check: found/asked count (penalising extras when the count is exact), colour, position."""
    objects = detect_objects(image)
    terms, matched = [], []
    for clause in meta["include"]:
        same_class = [o for o in objects if o["class"] == clause["class"]]
        n = clause["count"]
        exact = any(e["class"] == clause["class"] and e["count"] == n + 1 for e in meta.get("exclude", []))
        found = len(same_class)
        terms.append(1 - min(abs(found - n), n) / n if exact else min(found, n) / n)
        if clause.get("color"):
            same_class = [o for o in same_class if o["color"] == clause["color"]]
            terms.append(min(len(same_class), n) / n)
        matched.append(same_class)
    for i, clause in enumerate(meta["include"]):
        if "position" in clause:
            relation, j = clause["position"]
            pairs = [(a, b) for a in matched[i] for b in matched[j] if a is not b]
            terms.append(np.mean([_relation_holds(a["box"], b["box"], relation) for a, b in pairs]) if pairs else 0.0)
    strict = all(len(m) >= c["count"] for m, c in zip(matched, meta["include"]))
    for clause in meta.get("exclude", []):
        strict &= sum(o["class"] == clause["class"] for o in objects) < clause["count"]
    strict &= all(t == 1 for t in terms)
    return float(np.mean(terms)), float(strict)


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_reward(recognised, prompt):
    """METHOD.md §8: 1 if the quoted target is a substring of the recognised text (lower-cased,
    spaces removed), else 1 - min(Levenshtein, len(target)) / len(target)."""
    target = re.search(r'"([^"]*)"', prompt).group(1).replace(" ", "").lower()
    recognised = recognised.replace(" ", "").lower()
    if not target or target in recognised:
        return 1.0
    return 1 - min(levenshtein(recognised, target), len(target)) / len(target)


_OCR_ENGINE = None


def ocr_read(images, mode="rec"):
    """Text in each image by rapidocr (PP-OCR models shipped in its wheel, offline).
    mode "rec": recognition only on the whole image (one line of text; ~20 ms per image);
    mode "det": detection + recognition (~70 ms). The engine keeps the last call's flags, so all
    three are passed on every call."""
    global _OCR_ENGINE
    if _OCR_ENGINE is None:
        from rapidocr import RapidOCR
        _OCR_ENGINE = RapidOCR(params={"Det.limit_side_len": 128, "Global.log_level": "critical"})
    texts = []
    for image in to_uint8(images):
        out = _OCR_ENGINE(image, use_det=mode == "det", use_cls=False, use_rec=True)
        texts.append("".join(out.txts) if out.txts else "")
    return texts


def quality_score(image):
    """A no-reference quality score for flat-colour scenes (the miniature stand-in for DeQA):
    content x (0.7 palette fidelity + 0.3 cleanliness). Fidelity is how close pixels are to a
    palette colour (crisp flat fills, no muddy or blurred colours); cleanliness penalises isolated
    speckle pixels (noise); content is 0 for a blank image, so emptiness is not 'quality'."""
    labels, dist = quantize(image)
    fidelity = float(np.exp(-(dist / 0.12) ** 2).mean())
    padded = np.pad(labels, 1, mode="edge")
    neighbours = [padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]]
    speckle = float(np.mean(np.all([labels != n for n in neighbours], axis=0)))
    content = min(1.0, float(np.mean(labels != 0)) / 0.02)
    return content * (0.7 * fidelity + 0.3 * max(0.0, 1 - 20 * speckle))


REWARDS = ("geneval", "ocr", "quality")


def score(images, prompts, metadata=None, names=REWARDS):
    """The one reward API: {name: float array of len(images)}.
    geneval -> partial credit (training reward) and geneval_strict (GenEval-style accuracy);
    ocr -> METHOD.md §8; quality -> see quality_score. A task reward is NaN for prompts of the
    other task (an OCR prompt has no GenEval score)."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; expected one of {list(REWARDS)}")
    images = to_uint8(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    metadata = metadata or [None] * len(prompts)
    metas = [m if m and "include" in m else parse_prompt(p) for p, m in zip(prompts, metadata)]
    out = {}
    if "geneval" in names:
        pairs = [geneval_score(im, m) if m and "include" in m else (np.nan, np.nan) for im, m in zip(images, metas)]
        out["geneval"] = np.array([p for p, _ in pairs])
        out["geneval_strict"] = np.array([s for _, s in pairs])
    if "ocr" in names:
        is_ocr = [bool(re.search(r'"[^"]*"', p)) for p in prompts]
        texts = ocr_read(images[is_ocr]) if any(is_ocr) else []
        rewards, texts = np.full(len(prompts), np.nan), iter(texts)
        for i, p in enumerate(prompts):
            if is_ocr[i]:
                rewards[i] = ocr_reward(next(texts), p)
        out["ocr"] = rewards
    if "quality" in names:
        out["quality"] = np.array([quality_score(im) for im in images])
    return out


# ----------------------------------------------------------------------------------------------
# The miniature model: a real diffusers SD3Transformer2DModel in pixel space + a tiny CLIP encoder

MAX_TOKENS = 16
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[UNK]", "[EOS]"]  # EOS id 3, not 2: CLIP's pooled-token rule


def build_tokenizer():
    """A word-level tokenizer built locally: one token per vocabulary word, one per quoted character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for tag in GENEVAL_TAGS for m in all_geneval_items(tag) for w in m["prompt"].split()}
                   | set(ocr_prompt("").replace('"', " ").split()) | set(NUMBERS.values()))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words + ['"'] + sorted(set(OCR_ALPHABET + "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r'[a-z]+|[A-Z0-9]|"|[^a-zA-Z0-9"]+'), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=MAX_TOKENS)


def fit_pca_codec(factor=4, channels=12, n_images=2048, seed=0):
    """The PCA latent space (common.pca_encode/pca_decode) fitted on pretraining renders."""
    import torch
    _, images = pretraining_batch(random.Random(seed), n_images, held_out_prompts())
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    codec = {"factor": torch.tensor(factor), "scale": torch.tensor(1.0)}
    patches = pixels.permute(0, 2, 3, 1).reshape(-1, SIZE // factor, factor, SIZE // factor, factor, 3)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(-1, factor * factor * 3)
    codec["mean"] = patches.mean(0)
    codec["basis"] = torch.linalg.svd(patches - codec["mean"], full_matrices=False)[2][:channels].contiguous()
    from common import pca_encode
    codec["scale"] = 1 / pca_encode(pixels, codec).std()
    return codec


def build_model(width=192, depth=6, head_dim=32, text_width=128, text_layers=2, patch=8, seed=0, channels=3, side=SIZE):
    """A randomly initialised miniature model: (transformer, text_encoder, tokenizer, scheduler)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=text_width // 32, max_position_embeddings=MAX_TOKENS,
        projection_dim=text_width, bos_token_id=1, eos_token_id=3, pad_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=side, patch_size=patch, in_channels=channels, out_channels=channels, num_layers=depth,
        attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=text_width,
        caption_projection_dim=width, pooled_projection_dim=text_width, pos_embed_max_size=side // patch,
        qk_norm="rms_norm")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return transformer, text_encoder, tokenizer, scheduler


def save_model(folder, transformer, text_encoder, tokenizer, scheduler, card=None, dtype=None, codec=None,
               eval_steps=20, guidance_scale=4.5):
    """Writes the folder that common.load_model reads, atomically. `dtype` casts the stored weights
    (bfloat16 halves the shipped size)."""
    import copy
    from common import atomic_write_dir

    def write(tmp):
        from diffusers.utils import logging as diffusers_logging
        diffusers_logging.set_verbosity_error()  # .to(bf16) warns about fp32-kept modules; SD3 has none
        for name, module in (("transformer", transformer), ("text_encoder", text_encoder)):
            (copy.deepcopy(module).to(dtype) if dtype is not None else module).save_pretrained(os.path.join(tmp, name))
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        if codec is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in codec.items()}, os.path.join(tmp, "latent.safetensors"))
        with open(os.path.join(tmp, "miniature.json"), "w") as f:
            json.dump({"resolution": SIZE, "max_tokens": MAX_TOKENS, "space": "pixels" if codec is None else "pca",
                       "eval_steps": eval_steps, "guidance_scale": guidance_scale}, f, indent=1)
        if card:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card)
    atomic_write_dir(folder, write)


def pretraining_batch(rng, batch_size, held_out):
    """Prompts from the whole miniature world except the held-out test compositions, half GenEval
    (a uniformly drawn tag), half OCR strings, with a correct render of each."""
    prompts, images = [], []
    while len(prompts) < batch_size:
        if rng.random() < 0.5:
            meta = rng.choice(all_geneval_items(rng.choice(GENEVAL_TAGS)))
            prompt = meta["prompt"]
        else:
            meta, prompt = None, ocr_prompt("".join(rng.choice(OCR_ALPHABET) for _ in range(rng.randint(1, 3))))
        if prompt in held_out:
            continue
        prompts.append(prompt)
        images.append(np.asarray(render(prompt, meta, rng)))
    return prompts, np.stack(images)


def test_items(dataset_seed=0):
    """[(prompt, metadata)] of both tasks' test splits (the same lists the prompt files hold)."""
    sets = split_prompt_sets(dataset_seed)
    return [(m["prompt"], m) for m in sets["geneval"][1]] + [(p, None) for p in sets["ocr"][1]]


def sample_images(bundle, prompts, seeds, num_steps, guidance_scale, noise_level=0.0, batch_size=64, bf16=None):
    """Images of a ModelBundle for prompts/seeds (deterministic ODE by default), in batches, under bf16
    autocast if `bf16` (default: where bf16 is fast, common.bf16_is_fast)."""
    import torch
    from common import autocast, bf16_is_fast, rollout, sampling_sigmas
    sigmas = sampling_sigmas(bundle.scheduler, num_steps)
    negative = bundle.encode([""])
    images = []
    for i in range(0, len(prompts), batch_size):
        embeds, pooled = bundle.encode(prompts[i:i + batch_size])
        with autocast(embeds.device, bf16_is_fast(embeds.device) if bf16 is None else bf16):
            out = rollout(bundle.transformer, embeds, pooled, bundle.latent_shape(bundle.resolution), sigmas,
                          seeds[i:i + batch_size], noise_level, guidance_scale, negative, bundle.decode)
        images.append(out["images"])
    return torch.cat(images)


def evaluate(bundle, items, num_steps, guidance_scale, seed=0, scorer=None, names=REWARDS, bf16=False):
    """Scores of a model on [(prompt, metadata)]: {"geneval_strict", "geneval", "ocr", "quality",
    "geneval/<tag>"...} means, and the images. Seeds are seed + index, so every model sees the same noise.
    `scorer`: a function with score()'s signature (default toy.score; rewards.make_scorer for real models).
    fp32 by default, as eval.py: the same weights then score the same on every CPU (bf16 rounding moved
    a row's GenEval strict by up to 0.04, README)."""
    prompts, metas = [p for p, _ in items], [m for _, m in items]
    images = sample_images(bundle, prompts, [seed + i for i in range(len(prompts))], num_steps, guidance_scale, bf16=bf16)
    return summarize((scorer or score)(images, prompts, metas, names=names), metas), images


def summarize(scores, metas):
    """Mean of each reward over the prompts it applies to, and GenEval strict accuracy per tag."""
    result = {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
              for name, values in scores.items()}
    for tag in GENEVAL_TAGS:
        mask = np.array([bool(m) and m.get("tag") == tag for m in metas])
        if mask.any() and "geneval_strict" in scores:
            result[f"geneval/{tag}"] = float(scores["geneval_strict"][mask].mean())
    return result


def rectified_flow_loss(transformer, text_encoder, tokenizer, x0, prompts, shift, bf16=True):
    """Pretraining's rectified-flow loss (common.flow_matching_loss) with the text encoder trained too."""
    import torch
    import common
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        embeds, pooled = common.encode_miniature(text_encoder, tokenizer, prompts, MAX_TOKENS)
    return common.flow_matching_loss(transformer, x0, embeds, pooled, shift, bf16)


def pretrain(args):
    """Rectified-flow pretraining of the miniature model on renders (shifted logit-normal timesteps,
    caption dropout for CFG, bf16 autocast, EMA weights, atomic resumable checkpoints)."""
    import copy
    import torch
    from tqdm import tqdm
    from common import load_model, pca_encode
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    codec = fit_pca_codec(seed=args.seed) if args.space == "pca" else None
    if codec is None:
        transformer, text_encoder, tokenizer, scheduler = build_model(args.width, args.depth, seed=args.seed)
    else:
        transformer, text_encoder, tokenizer, scheduler = build_model(
            args.width, args.depth, seed=args.seed, patch=2, channels=len(codec["basis"]), side=SIZE // int(codec["factor"]))
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    run = {"transformer": transformer, "text_encoder": text_encoder,
           "optimizer": torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99)),
           "ema_transformer": copy.deepcopy(transformer).requires_grad_(False),
           "ema_text_encoder": copy.deepcopy(text_encoder).requires_grad_(False)}
    work = args.out + ".work"
    step, elapsed, log = load_pretraining_checkpoint(work, run, rng, args.steps)
    held_out, items = held_out_prompts(args.dataset_seed), test_items(args.dataset_seed)
    bar = tqdm(total=args.steps, initial=step, desc="pretrain", dynamic_ncols=True)
    while step < args.steps:
        start = time.time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in run["optimizer"].param_groups:
            group["lr"] = lr
        prompts, images = pretraining_batch(rng, args.batch_size, held_out)
        prompts = [("" if rng.random() < args.caption_dropout else p) for p in prompts]
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        x0 = x0 if codec is None else pca_encode(x0, codec)
        loss = rectified_flow_loss(transformer, text_encoder, tokenizer, x0, prompts, scheduler.config.shift, args.bf16)
        run["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run["optimizer"].step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name in ("transformer", "text_encoder"):
                for ema_param, param in zip(run["ema_" + name].parameters(), run[name].parameters()):
                    ema_param.lerp_(param, 1 - decay)
        step += 1
        elapsed += time.time() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % args.eval_every == 0 or step == args.steps:
            save_model(work + "/ema", run["ema_transformer"], run["ema_text_encoder"], tokenizer, scheduler, codec=codec)
            result, samples = evaluate(load_model(work + "/ema"), items, args.eval_steps, args.guidance)
            log.append({"step": step, "loss": loss.item(), "minutes": elapsed / 60, **result})
            bar.write(json.dumps(log[-1]))
            save_pretraining_checkpoint(work, run, rng, step, elapsed, log, samples)
    bar.close()
    save_model(args.out, run["ema_transformer"], run["ema_text_encoder"], tokenizer, scheduler, dtype=torch.bfloat16,
               codec=codec, eval_steps=args.eval_steps, guidance_scale=args.guidance)
    result, _ = evaluate(load_model(args.out), items, args.eval_steps, args.guidance)  # the weights as shipped
    card = model_card(args, log, result)
    with open(os.path.join(args.out, "README.md.tmp"), "w") as f:
        f.write(card)
    os.replace(os.path.join(args.out, "README.md.tmp"), os.path.join(args.out, "README.md"))
    print(card)


def save_pretraining_checkpoint(work, run, rng, step, elapsed, log, samples):
    """An atomic resumable checkpoint, the EMA snapshot of this step, the log and a sample grid."""
    import torch
    from common import atomic_torch_save, image_grid
    os.makedirs(os.path.join(work, "samples"), exist_ok=True)
    pick = list(range(0, 96, 6)) + list(range(96, 112))
    image_grid(samples[pick], 8).resize((8 * 66 * 2, 4 * 66 * 2), Image.NEAREST).save(
        os.path.join(work, "samples", f"step{step:06d}.png"))
    torch.save({k: run[k].state_dict() for k in ("ema_transformer", "ema_text_encoder")},
               os.path.join(work, f"ema_step{step:06d}.pt"))
    atomic_torch_save({**{k: module.state_dict() for k, module in run.items()}, "step": step, "elapsed": elapsed,
                       "log": log, "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state()},
                      os.path.join(work, "checkpoint.pt"))
    with open(os.path.join(work, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)


def load_pretraining_checkpoint(work, run, rng, steps):
    """Restores `run` (modules, optimizer, EMA) and the RNG states from work/checkpoint.pt if it exists:
    (step, elapsed seconds, log). With a checkpoint past `steps` (constant LR after warm-up), the EMA
    snapshot saved at `steps` is exactly what a run of `steps` steps ends with."""
    import torch
    path = os.path.join(work, "checkpoint.pt")
    if not os.path.exists(path):
        os.makedirs(work, exist_ok=True)
        return 0, 0.0, []
    ckpt = torch.load(path, weights_only=False)
    for key, module in run.items():
        module.load_state_dict(ckpt[key])
    rng.setstate(ckpt["python_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"resumed from {path} at step {ckpt['step']}")
    if ckpt["step"] <= steps:
        return ckpt["step"], ckpt["elapsed"], ckpt["log"]
    snapshot = os.path.join(work, f"ema_step{steps:06d}.pt")
    if not os.path.exists(snapshot):
        raise ValueError(f"--steps {steps} is below the checkpoint's step {ckpt['step']} and there is no EMA "
                         f"snapshot {snapshot}; expected --steps to be a multiple of --eval-every")
    for key, state in torch.load(snapshot).items():
        run[key].load_state_dict(state)
    log = [r for r in ckpt["log"] if r["step"] <= steps]
    return steps, log[-1]["minutes"] * 60, log


def model_card(args, log, result):
    """The shipped base model's card: how it was made and what it scores."""
    rows = "\n".join(f"| {name} | {value:.3f} |" for name, value in result.items())
    curve = "\n".join(f"| {r['step']} | {r['minutes']:.1f} | {r['loss']:.4f} | {r['geneval_strict']:.3f} | "
                      f"{r['ocr']:.3f} | {r['quality']:.3f} |" for r in log)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
                     if k not in ("command", "func", "bf16")) + ("" if args.bf16 else " --no-bf16")
    space = ("a 16x16x12 PCA latent of 4x4 pixel patches (`latent.safetensors`; linear, near-exact decoding), "
             "patch 2" if args.space == "pca" else "pixel space (64x64x3), patch 8")
    return f"""# The miniature base model

A {sum(p.numel() for p in __import__('common').load_model(args.out).transformer.parameters()) / 1e6:.2f}M-parameter
diffusers `SD3Transformer2DModel` (width {args.width}, depth {args.depth}) working in {space}: 64 image
tokens, with a tiny CLIP text encoder (16 tokens, local word-level tokenizer). Pretrained from scratch
with the rectified-flow loss (shifted logit-normal timesteps, caption dropout {args.caption_dropout},
bf16 autocast, EMA {args.ema}) on renders of the miniature world. Weights stored in bf16.

Reproduce (2-core CPU, {log[-1]['minutes']:.1f} min of training steps, evaluations excluded):

    python toy.py pretrain {flags}

## Scores of the shipped weights on the test split
Deterministic ODE, {args.eval_steps} steps, CFG {args.guidance}, seeds 0..159 (`python toy.py sample` recomputes them).

| metric | value |
|---|---|
{rows}

## Training curve (EMA weights, same evaluation)

| step | train minutes | loss | GenEval strict | OCR | quality |
|---|---|---|---|---|---|
{curve}
"""


def specialist(args):
    """A task specialist of the miniature world: a LoRA fitted with the rectified-flow loss to fresh
    renders of one task's training prompts ("all": both tasks, the multi-task baseline). It stands in
    for a GRPO teacher where GRPO needs far more samples than minutes give (README, Stage 1)."""
    import torch
    from tqdm import tqdm
    import common
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tasks = list(common.DEFAULT_PROMPT_FILES) if args.task == "all" else [args.task]
    if args.task not in (*common.DEFAULT_PROMPT_FILES, "all"):
        raise ValueError(f"unknown task {args.task!r}; expected one of {[*common.DEFAULT_PROMPT_FILES, 'all']}")
    items = [item for task in tasks for item in common.prompts_by_task("", [task], args.dataset, "train")[task]]
    bundle = common.load_model(args.model)
    from safetensors.torch import load_file
    codec = load_file(os.path.join(args.model, "latent.safetensors"))
    policy = common.make_policy(bundle.transformer, args.lora_rank, args.lora_alpha, targets=bundle.defaults["lora_targets"])
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    empty = bundle.encode([""])
    log, start = [], time.time()
    for step in tqdm(range(1, args.steps + 1), desc=f"specialist {args.task}"):
        picked = [items[rng.randrange(len(items))] for _ in range(args.batch_size)]
        images = np.stack([np.asarray(render(p, m, rng)) for p, m in picked])
        x0 = common.pca_encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, codec)
        embeds, pooled = bundle.encode([p for p, _ in picked])
        keep = torch.rand(len(picked)) >= args.caption_dropout  # keeps CFG's empty-prompt branch in tune
        embeds = torch.where(keep[:, None, None], embeds, empty[0].expand_as(embeds))
        pooled = torch.where(keep[:, None], pooled, empty[1].expand_as(pooled))
        loss = common.flow_matching_loss(policy, x0, embeds, pooled, bundle.scheduler.config.shift, args.bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    common.save_adapter(policy, "student", os.path.join(args.out, "adapter"))
    print(f"wrote {args.out}/adapter ({args.task} specialist, {args.steps} steps, {(time.time() - start) / 60:.1f} min)")


def sample(args):
    """Samples a grid from a model and scores it on the test split."""
    from common import image_grid, load_model
    bundle = load_model(args.model)
    with open(os.path.join(args.model, "miniature.json")) as f:
        defaults = json.load(f)
    steps, guidance = args.steps or defaults["eval_steps"], args.guidance or defaults["guidance_scale"]
    result, images = evaluate(bundle, test_items(args.dataset_seed), steps, guidance, args.seed)
    os.makedirs(args.out, exist_ok=True)
    pick = list(range(0, 96, 3)) + list(range(96, 160, 2))
    image_grid(images[pick], 8).resize((8 * 66 * 2, 8 * 66 * 2), Image.NEAREST).save(os.path.join(args.out, "grid.png"))
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump({"model": args.model, "steps": steps, "guidance_scale": guidance, "seed": args.seed, **result}, f, indent=1)
    print(json.dumps(result, indent=1))
    print(f"wrote {args.out}/grid.png and {args.out}/scores.json")


def latent_study(args):
    """Measures the small-latent alternative to pixel space: a PCA of f x f pixel patches (a linear,
    near-exact encoder/decoder) at the same 64-token sequence, scored on decoded test renders."""
    rng = random.Random(0)
    _, train = pretraining_batch(rng, 512, held_out_prompts())
    items = test_items()
    test = np.stack([np.asarray(render(p, m, rng)) for p, m in items]).astype(np.float32) / 127.5 - 1

    def to_patches(images, f):
        n = len(images)
        return images.reshape(n, SIZE // f, f, SIZE // f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, f * f * 3)

    def from_patches(patches, n, f):
        return patches.reshape(n, SIZE // f, SIZE // f, f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, SIZE, SIZE, 3)
    exact = score(((test + 1) * 127.5).round().astype(np.uint8), [p for p, _ in items], [m for _, m in items])
    print(f"pixels 64x64x3: exact, geneval_strict {np.nanmean(exact['geneval_strict']):.3f}, "
          f"ocr {np.nanmean(exact['ocr']):.3f}, quality {exact['quality'].mean():.3f}")
    for f, k in [(4, 12), (4, 24), (8, 48)]:
        data = to_patches(train.astype(np.float32) / 127.5 - 1, f)
        mean = data.mean(0)
        basis = np.linalg.svd(data - mean, full_matrices=False)[2][:k]
        decoded = from_patches((to_patches(test, f) - mean) @ basis.T @ basis + mean, len(test), f)
        psnr = 10 * np.log10(4 / ((decoded - test) ** 2).mean())
        scores = score(((np.clip(decoded, -1, 1) + 1) * 127.5).round().astype(np.uint8),
                       [p for p, _ in items], [m for _, m in items])
        print(f"latent {SIZE // f}x{SIZE // f}x{k}: PSNR {psnr:.1f} dB, geneval_strict "
              f"{np.nanmean(scores['geneval_strict']):.3f}, ocr {np.nanmean(scores['ocr']):.3f}, "
              f"quality {scores['quality'].mean():.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts", help="write the prompt files")
    p.add_argument("--out", default="dataset")  # folder for geneval/*.jsonl and ocr/*.txt
    p.add_argument("--dataset-seed", type=int, default=0)  # seed of the train/test split
    p.set_defaults(func=lambda a: print(json.dumps(write_prompt_files(a.out, a.dataset_seed), indent=1)))
    p = sub.add_parser("pretrain", help="pretrain the miniature base model")
    p.add_argument("--out", default="miniature/base")  # model folder; checkpoints go to OUT.work/
    p.add_argument("--steps", type=int, default=2000)  # optimizer steps
    p.add_argument("--batch-size", type=int, default=64)  # renders per step
    p.add_argument("--lr", type=float, default=5e-4)  # AdamW peak learning rate
    p.add_argument("--warmup", type=int, default=100)  # linear warm-up steps
    p.add_argument("--ema", type=float, default=0.998)  # EMA decay of the saved weights
    p.add_argument("--caption-dropout", type=float, default=0.1)  # empty-prompt rate, so CFG works
    p.add_argument("--space", choices=["pixels", "pca"], default="pca")  # pixels, or the PCA latent (4x4 patch -> 12)
    p.add_argument("--width", type=int, default=192)  # transformer width
    p.add_argument("--depth", type=int, default=6)  # transformer blocks
    p.add_argument("--no-bf16", dest="bf16", action="store_false")  # fp32 instead of bf16 autocast
    p.add_argument("--eval-every", type=int, default=400)  # steps between test evaluations + grids
    p.add_argument("--eval-steps", type=int, default=20)  # ODE steps of those evaluations
    p.add_argument("--guidance", type=float, default=4.5)  # CFG scale of those evaluations
    p.add_argument("--seed", type=int, default=0)  # init, data and noise seed
    p.add_argument("--dataset-seed", type=int, default=0)  # which test split is held out
    p.set_defaults(func=pretrain)
    p = sub.add_parser("sample", help="sample a grid and score a model on the test split")
    p.add_argument("--model", default="miniature/base")  # model folder
    p.add_argument("--out", default="results/base")  # where grid.png and scores.json go
    p.add_argument("--steps", type=int, default=None)  # ODE steps (default: the model's eval_steps)
    p.add_argument("--guidance", type=float, default=None)  # CFG scale (default: the model's)
    p.add_argument("--seed", type=int, default=0)  # seeds are seed + prompt index
    p.add_argument("--dataset-seed", type=int, default=0)  # which test split
    p.set_defaults(func=sample)
    p = sub.add_parser("specialist", help="fit a task-specialist LoRA to renders (the quick teachers)")
    p.add_argument("--task", required=True)  # geneval, ocr, or all (both: the multi-task baseline)
    p.add_argument("--model", default="miniature/base")  # base model folder
    p.add_argument("--dataset", default="dataset")  # folder of the prompt files (train split used)
    p.add_argument("--out", required=True)  # run folder; the result is OUT/adapter
    p.add_argument("--steps", type=int, default=200)  # optimizer steps
    p.add_argument("--batch-size", type=int, default=32)  # renders per step
    p.add_argument("--lr", type=float, default=5e-4)  # AdamW learning rate
    p.add_argument("--lora-rank", type=int, default=32)  # LoRA rank (the teachers' layout)
    p.add_argument("--lora-alpha", type=int, default=64)  # LoRA alpha
    p.add_argument("--caption-dropout", type=float, default=0.1)  # empty-prompt rate, as in pretraining
    p.add_argument("--bf16", action="store_true")  # bf16 autocast (default fp32: 1.5x faster training on this CPU)
    p.add_argument("--seed", type=int, default=0)  # renders, noise
    p.set_defaults(func=specialist)
    p = sub.add_parser("latent-study", help="measure a small PCA latent space against pixel space")
    p.set_defaults(func=latent_study)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
