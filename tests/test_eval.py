"""eval.py's uncertainty: each score's standard error over the test prompts, a prompt's seeds averaged first."""
import numpy as np
import pytest

import eval as evaluation


def test_standard_errors_average_each_prompts_seeds_first():
    # 2 seeds x 3 prompts in eval.py's order (seed block after seed block); prompt 3 is not judged (NaN)
    scores = {"ocr": np.array([0.0, 1.0, np.nan, 1.0, 1.0, np.nan])}
    prompt_means = [0.5, 1.0]
    assert evaluation.standard_errors(scores, 2)["ocr_se"] == pytest.approx(np.std(prompt_means, ddof=1) / np.sqrt(2))
    # read as 6 prompts of one seed each, the same numbers give a different (smaller-n) error
    assert evaluation.standard_errors(scores, 1)["ocr_se"] == pytest.approx(np.std([0, 1, 1, 1], ddof=1) / 2)
    assert np.isnan(evaluation.standard_errors({"x": np.array([1.0, np.nan])})["x_se"])  # one prompt: unknown


def test_rows_and_the_table_carry_the_errors():
    scores = {"geneval_acc": np.array([1.0, 0.0, 1.0, 1.0, np.nan]), "ocr": np.array([np.nan] * 4 + [0.5])}
    metas = [{"tag": "colors"}] * 4 + [None]
    row = {"model": "m", **evaluation.row_scores(scores, metas, ["geneval_acc", "ocr"])}
    assert row["geneval_acc"] == 0.75 and row["geneval_acc_se"] == pytest.approx(0.25)
    assert row["average"] == pytest.approx((0.75 + 0.5) / 2) and np.isnan(row["average_se"])  # one OCR prompt
    line = evaluation.markdown_table([row], ["geneval_acc", "ocr"]).splitlines()[-1]
    assert line.startswith("| m | 0.750 ± 0.250 | 0.500 |")


def test_the_grid_keeps_every_sample_pixel_and_gains_labels():
    from PIL import Image
    import torch
    import training
    images = torch.randint(0, 256, (2 * 3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = training.image_grid(images, 3)  # 2 prompts x 3 models
    labelled = evaluation.label_grid(grid, ["base", "teacher-geneval", "opd-merge"], ["a photo of a circle", "x"])
    left, top = labelled.width - grid.width, labelled.height - grid.height
    assert left > 0 and top > 0  # room for the prompts and the (upright) model names
    assert np.array_equal(np.asarray(labelled.crop((left, top, labelled.width, labelled.height))), np.asarray(grid))
    margin = np.asarray(labelled.convert("L").crop((0, 0, left, labelled.height)))
    assert (margin < 128).any()  # the prompts are written
    assert isinstance(labelled, Image.Image)
