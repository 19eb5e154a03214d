"""The miniature world: prompt files, renderer, scorers, router, tokenizer."""
import json
import random

import numpy as np
import pytest

import common
import loading
import miniature.model
import miniature.world


@pytest.fixture(scope="module")
def test_split():
    return miniature.world.test_items()


def renders(items, seed=0):
    rng = random.Random(seed)
    return [miniature.world.render(p, m, rng) for p, m in items]


def test_ground_truth_renders_score_high_on_geneval_and_ocr(test_split):
    items = test_split * 2
    images = renders(items)
    scores = miniature.world.score(images, [p for p, _ in items], [m for _, m in items])
    geneval = ~np.isnan(scores["geneval"])
    assert geneval.sum() == 192 and np.isnan(scores["geneval"][~geneval]).all()
    assert scores["geneval_acc"][geneval].mean() >= 0.95
    assert scores["geneval"][geneval].mean() >= 0.95
    assert scores["geneval_clean"][geneval].mean() >= 0.95 and np.isnan(scores["geneval_clean"][~geneval]).all()
    assert np.nanmean(scores["ocr"]) >= 0.95
    assert scores["quality"].mean() >= 0.85


def _score_as(rendered_prompt, scored_prompt, seed=0):
    """The scores of a correct render of one prompt when it is judged as another."""
    rng = random.Random(seed)
    images = [miniature.world.render(rendered_prompt, None, rng) for _ in range(8)]
    return miniature.world.score(images, [scored_prompt] * 8)


@pytest.mark.parametrize("rendered, asked", [
    ("a photo of two circles", "a photo of three circles"),            # wrong count
    ("a photo of four squares", "a photo of two squares"),             # too many
    ("a photo of a red triangle", "a photo of a blue triangle"),       # wrong colour
    ("a photo of a circle left of a square", "a photo of a circle right of a square"),  # wrong position
    ("a photo of a square above a triangle", "a photo of a square below a triangle"),
    ("a photo of a green circle and a yellow square", "a photo of a yellow circle and a green square"),
    ("a photo of a circle", "a photo of a triangle"),                  # wrong object
])
def test_wrong_renders_fail_geneval(rendered, asked):
    scores = _score_as(rendered, asked)
    assert scores["geneval_acc"].mean() == 0
    assert scores["geneval"].mean() <= 0.75
    assert _score_as(asked, asked)["geneval_acc"].mean() == 1


def test_unasked_objects_pass_geneval_but_not_nothing_unasked():
    # GenEval's official rule does not mind objects of other classes; geneval_clean does
    extra = _score_as("a photo of a circle and a square", "a photo of a circle")
    assert extra["geneval_acc"].mean() == 1 and extra["geneval_clean"].mean() == 0
    exact = _score_as("a photo of a circle", "a photo of a circle")
    assert exact["geneval_acc"].mean() == 1 and exact["geneval_clean"].mean() == 1
    wrong = _score_as("a photo of a circle", "a photo of a triangle")  # nothing extra, but not what was asked
    assert wrong["geneval_clean"].mean() == 0


def test_wrong_text_scores_low_on_ocr():
    assert _score_as('a sign that says "KX"', 'a sign that says "PE"')["ocr"].mean() <= 0.1
    partly = _score_as('a sign that says "KXA"', 'a sign that says "KXB"')["ocr"].mean()
    assert 0.5 <= partly <= 0.7  # one of three characters wrong


def test_ocr_reward_formula():
    assert miniature.world.ocr_reward("hello K7 there", 'a sign that says "k 7"') == 1.0  # substring, case/space-free
    assert miniature.world.ocr_reward("K8", 'a sign that says "K7"') == 0.5
    assert miniature.world.ocr_reward("", 'a sign that says "K7X"') == 0.0
    assert miniature.world.ocr_reward("ABCDEFG", 'a sign that says "X"') == 0.0  # distance capped at len(target)


def test_quality_prefers_clean_scenes_to_noise_blur_and_blank():
    image = np.asarray(miniature.world.render("a photo of a red circle and a blue square", None, random.Random(0)))
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    muddy = (0.5 * image + 0.5 * 128).astype(np.uint8)
    blank = np.full_like(image, 255)
    clean, noise, mud, empty = miniature.world.score(np.stack([image, noisy, muddy, blank]),
                                                     ["a photo of a red circle and a blue square"] * 4,
                                                     names=("quality",))["quality"]
    assert clean > 0.9 and noise < 0.7 * clean and mud < 0.5 * clean and empty == 0


def test_quality_dislikes_objects_nobody_asked_for():
    """Hand-made: the exact render of "a photo of a circle", the same with four more shapes drawn on it, and a
    sign with a shape beside its text. Each hallucinated object divides the score (docs/method.md M8)."""
    from PIL import ImageDraw
    exact = miniature.world.render("a photo of a red circle", None, random.Random(3))
    cluttered = exact.copy()
    draw = ImageDraw.Draw(cluttered)
    for k, (shape, color) in enumerate([("square", "blue"), ("triangle", "green"), ("circle", "yellow"),
                                        ("square", "red")]):
        miniature.world._draw_shape(draw, shape, 8 + 16 * k, 56, 10, miniature.world.COLORS[color])
    sign = miniature.world.render('a sign that says "KEY"', None, random.Random(0))
    sign_and_shape = sign.copy()
    miniature.world._draw_shape(ImageDraw.Draw(sign_and_shape), "circle", 56, 8, 12, miniature.world.COLORS["red"])
    prompts = ["a photo of a red circle"] * 2 + ['a sign that says "KEY"'] * 2
    images = np.stack([np.asarray(im) for im in (exact, cluttered, sign, sign_and_shape)])
    q = miniature.world.score(images, prompts, names=("quality", "geneval"))
    assert [miniature.world.unasked_objects(im, miniature.world.parse_prompt(p)) for im, p in zip(images, prompts)] \
        == [0, 4, 0, 1]
    assert q["geneval_acc"][0] == q["geneval_acc"][1] == 1  # the official rule lets the clutter pass
    assert q["quality"][0] > 0.9 and q["quality"][1] < 0.25 * q["quality"][0] + 0.01
    assert q["quality"][2] > 0.5 and q["quality"][3] < 0.55 * q["quality"][2] + 0.01


def test_score_rejects_unknown_reward_and_length_mismatch():
    images = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        miniature.world.score(images, ["a", "b"], names=("aesthetic",))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        miniature.world.score(images, ["a"])


def test_router_on_a_mixed_list():
    items = [("a photo of two circles", {"tag": "counting"}), ('a sign that says "K7"', None),
             ("a photo of a red square", None), ('a photo of a cat holding a sign that says "hi"', None),
             ('a banner "X"', {"tag": "position"}), ("anything", {"task": "ocr"})]
    assert [common.route(p, m, {"geneval", "ocr"}) for p, m in items] == \
        ["geneval", "ocr", "geneval", "ocr", "geneval", "ocr"]
    with pytest.raises(ValueError, match="routes to task 'ocr'.*teachers are \\['geneval'\\]"):
        common.route('a sign that says "K7"', None, {"geneval"})


def test_prompt_files_are_deterministic_and_hold_out_test_compositions(tmp_path):
    paths = miniature.world.write_prompt_files(str(tmp_path / "a"))
    again = miniature.world.write_prompt_files(str(tmp_path / "b"))
    for key in paths:
        assert open(paths[key]).read() == open(again[key]).read()
    train = loading.load_prompts(paths["geneval_train"])
    test = loading.load_prompts(paths["geneval_test"])
    assert len(test) == 96 and {m["tag"] for _, m in test} == set(miniature.world.GENEVAL_TAGS)
    assert all(set(m) >= {"tag", "include", "prompt"} for _, m in train + test)
    train_prompts = {p for p, _ in train}
    for tag in ("colors", "position", "color_attr"):
        assert not {p for p, m in test if m["tag"] == tag} & train_prompts, tag
    ocr_train = {p for p, _ in loading.load_prompts(paths["ocr_train"])}
    ocr_test = [p for p, _ in loading.load_prompts(paths["ocr_test"])]
    assert len(ocr_test) == 64 and not set(ocr_test) & ocr_train
    assert all(common.route(p, None, {"geneval", "ocr"}) == "ocr" for p in ocr_test)
    held = miniature.world.held_out_prompts()
    rng = random.Random(0)
    for _ in range(20):
        prompts, images = miniature.model.pretraining_batch(rng, 16, held)
        assert not set(prompts) & held and images.shape == (16, 64, 64, 3)


def test_malformed_or_missing_prompt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad_metadata.jsonl"
    bad.write_text(json.dumps({"prompt": "a photo of a circle", "tag": "single_object"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad_metadata.jsonl:2: not valid JSON"):
        loading.load_prompts(str(bad))
    bad.write_text(json.dumps({"tag": "single_object"}) + "\n")
    with pytest.raises(ValueError, match="bad_metadata.jsonl:1: expected a JSON object with a string \"prompt\""):
        loading.load_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        loading.load_prompts(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        loading.load_prompts(str(empty))


def test_tokenizer_covers_every_prompt_in_at_most_16_tokens():
    tokenizer = miniature.model.build_tokenizer()
    unk = tokenizer.convert_tokens_to_ids("[UNK]")
    prompts = [m["prompt"] for tag in miniature.world.GENEVAL_TAGS for m in miniature.world.all_geneval_items(tag)]
    prompts += [miniature.world.ocr_prompt("K7X"), miniature.world.ocr_prompt("A"), ""]
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        assert len(ids) <= miniature.model.MAX_TOKENS and unk not in ids, prompt
    assert tokenizer.convert_ids_to_tokens(tokenizer(miniature.world.ocr_prompt("K7X")).input_ids)[-6:] == \
        ['"', "K", "7", "X", '"', "[EOS]"]
