"""The miniature world: its prompts, a renderer that draws every prompt correctly, and its scorers.

Scenes are 64x64 RGB: coloured flat shapes on white (the `geneval` task) or black text on white
(the `ocr` task). Every prompt can be rendered correctly, which is the pretraining data, and every
image can be scored programmatically (geneval, quality) or by a real OCR engine (rapidocr). The tiny
model that learns this world is miniature/model.py; its commands are lab/commands.py.
"""
import itertools
import json
import os
import random
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import loading

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
        raise loading.UserError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")
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
    raise loading.UserError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")


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


def ensure_prompt_files(dataset):
    """Writes the miniature world's prompt files on first use, into the default folder "dataset" only:
    any other folder is the user's, and a missing one is their error (loading.load_prompts says so)."""
    if dataset == "dataset" and not os.path.isdir(dataset):
        write_prompt_files(dataset)


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
        raise loading.UserError(f"cannot render prompt {prompt!r}: not a miniature-world prompt")
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
        images = images.detach().cpu()
        images = (images.float() if images.is_floating_point() else images).numpy()
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


def unasked_objects(image, meta):
    """How many objects the detector finds beyond those the prompt asks for: a GenEval record's counts, none
    for a sign (an OCR prompt asks for text only)."""
    asked = sum(clause["count"] for clause in meta["include"]) if meta and "include" in meta else 0
    return max(0, len(detect_objects(image)) - asked)


def nothing_unasked(image, meta):
    """True when the detector finds no object beyond the GenEval record's asked ones. GenEval's rule does not ask
    this: a picture full of shapes passes "a photo of a circle", and the miniature's GenEval teacher gains largely
    by such clutter (docs/experiments.md, 2026-12-04), so the table shows strict AND this as its own column."""
    return unasked_objects(image, meta) == 0


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_reward(recognised, prompt):
    """docs/method.md M8: 1 if the quoted target is a substring of the recognised text (lower-cased,
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


def quality_score(image, unasked=0):
    """The miniature's stand-in for DeQA / PickScore: what RL alignment degrades here, scored in [0, 1] as
    content x (0.7 palette fidelity + 0.3 cleanliness) / (1 + unasked). Fidelity is how close pixels are to a
    palette colour (crisp flat fills, no muddy or blurred colours); cleanliness penalises isolated speckle
    pixels (noise); content is 0 for a blank image, so emptiness is not 'quality'; `unasked` is the number of
    hallucinated objects (unasked_objects), so five shapes for "a photo of a circle" score a fifth of one."""
    labels, dist = quantize(image)
    fidelity = float(np.exp(-(dist / 0.12) ** 2).mean())
    padded = np.pad(labels, 1, mode="edge")
    neighbours = [padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]]
    speckle = float(np.mean(np.all([labels != n for n in neighbours], axis=0)))
    content = min(1.0, float(np.mean(labels != 0)) / 0.02)
    return content * (0.7 * fidelity + 0.3 * max(0.0, 1 - 20 * speckle)) / (1 + unasked)


REWARDS = ("geneval", "ocr", "quality")


def score(images, prompts, metadata=None, names=REWARDS):
    """The one reward API: {name: float array of len(images)}.
    geneval -> partial credit (training reward), geneval_acc (GenEval-style accuracy) and geneval_clean
    (geneval_acc and nothing unasked drawn);
    ocr -> docs/method.md M8; quality -> see quality_score. A task reward is NaN for prompts of the
    other task (an OCR prompt has no GenEval score)."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise loading.UserError(f"unknown reward {unknown[0]!r}; expected one of {list(REWARDS)}")
    images = to_uint8(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    metadata = metadata or [None] * len(prompts)
    metas = [m if m and "include" in m else parse_prompt(p) for p, m in zip(prompts, metadata)]
    out = {}
    if "geneval" in names:
        pairs = [geneval_score(im, m) if m and "include" in m else (np.nan, np.nan) for im, m in zip(images, metas)]
        out["geneval"] = np.array([p for p, _ in pairs])
        out["geneval_acc"] = np.array([s for _, s in pairs])
        out["geneval_clean"] = np.array([s * nothing_unasked(im, m) if m and "include" in m else np.nan
                                         for (_, s), im, m in zip(pairs, images, metas)])
    if "ocr" in names:
        is_ocr = [bool(re.search(r'"[^"]*"', p)) for p in prompts]
        texts = ocr_read(images[is_ocr]) if any(is_ocr) else []
        rewards, texts = np.full(len(prompts), np.nan), iter(texts)
        for i, p in enumerate(prompts):
            if is_ocr[i]:
                rewards[i] = ocr_reward(next(texts), p)
        out["ocr"] = rewards
    if "quality" in names:
        out["quality"] = np.array([quality_score(im, unasked_objects(im, m)) for im, m in zip(images, metas)])
    return out


def test_items(dataset_seed=0):
    """[(prompt, metadata)] of both tasks' test splits (the same lists the prompt files hold)."""
    sets = split_prompt_sets(dataset_seed)
    return [(m["prompt"], m) for m in sets["geneval"][1]] + [(p, None) for p in sets["ocr"][1]]
