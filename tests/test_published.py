"""The published Stage 1 products (miniature/teachers/): each card holds the command the pipeline runs to retrain
it, and its adapter reproduces the card's test scores sample for sample (eval.py --from-cards)."""
import json
import os
import shutil

import numpy as np
import pytest

import eval as evaluation
import loading
import pipeline


def card(folder):
    return json.load(open(os.path.join(folder, evaluation.CARD)))


def published():
    return {row: os.path.join(pipeline.TEACHERS, name) for row, name in pipeline.PUBLISHED.items()}


def test_each_card_holds_the_command_that_retrains_it_from_scratch():
    steps = {name: (script, argv) for name, script, argv in
             pipeline.plan("runs-scratch", pipeline.FULL, "miniature/base", "dataset")}
    for row, folder in published().items():
        script, argv = steps[row]
        expected = pipeline.step_command(script, pipeline.step_argv(script, argv, f"runs-scratch/{row}"))
        native = expected.replace("--train-precision fp32", "--train-precision bf16")  # the cards' CPU had bf16
        assert card(folder)["command"] == native, row
        assert {"seed", "machine", "date", "train_minutes", "note"} <= set(card(folder)), row
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            assert os.path.isfile(os.path.join(folder, name)), (row, name)


def test_cards_hold_every_sample_under_the_pipelines_protocol():
    for row, folder in {"base": "miniature/base", **published()}.items():
        test = card(folder)["test"]
        assert test["samples_per_prompt"] == int(pipeline.FULL["samples_per_prompt"]), row
        assert test["protocol"]["samples"] == 160 * test["samples_per_prompt"], row
        for name, values in test["per_sample"].items():
            assert len(values) == test["protocol"]["samples"], (row, name)
        quality = np.array(test["per_sample"]["quality"])
        assert abs(quality.mean() - test["scores"]["quality"]) < 1e-5, row


def test_a_slice_of_every_card_is_reproduced_sample_for_sample(tmp_path):
    """The grid's 16 prompts x 1 seed of each published row (and the base) are sampled and scored again: eval.py
    raises unless each equals the card's score for that sample, then takes the row's scores from its card."""
    rows = published()
    evaluation.main(["--adapters", ",".join(f"{r}={f}" for r, f in rows.items()), "--samples-per-prompt", "4",
                     "--from-cards", "--out", str(tmp_path)])
    table = {row["model"]: row for row in json.load(open(tmp_path / "eval.json"))}
    for row, folder in {"base": "miniature/base", **rows}.items():
        assert table[row]["scores_from"] == "card", row
        assert table[row]["quality"] == pytest.approx(card(folder)["test"]["scores"]["quality"], abs=1e-5), row
    assert evaluation.CARD_NOTE in open(tmp_path / "table.md").read()


def test_a_card_its_adapter_does_not_reproduce_is_refused(tmp_path):
    folder = tmp_path / "ocr"
    shutil.copytree(published()["teacher-ocr"], folder)
    edited = card(folder)
    edited["test"]["per_sample"]["quality"][0] += 0.01  # sample 0 is the grid's first
    json.dump(edited, open(folder / evaluation.CARD, "w"))
    with pytest.raises(loading.UserError, match="row 'teacher-ocr': the card's quality for sample 0"):
        evaluation.main(["--adapters", f"teacher-ocr={folder}", "--no-base-row", "--samples-per-prompt", "4",
                         "--from-cards", "--grid-prompts", "2", "--out", str(tmp_path / "eval")])


def test_a_card_of_another_protocol_is_not_used(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "cat"\n')
    evaluation.main(["--adapters", f"teacher-ocr={published()['teacher-ocr']}", "--test-prompts", f"ocr={prompts}",
                     "--steps", "2", "--from-cards", "--out", str(tmp_path / "eval")])
    assert {row["scores_from"] for row in json.load(open(tmp_path / "eval" / "eval.json"))} == {"sampled"}
