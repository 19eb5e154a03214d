"""The one-command pipeline in --quick mode on the shipped base: the demo on the published teachers, every step
from scratch, caching, a cache made by another command refused, and the table's rows and keys other tools read."""
import json
import os
import re

import pytest

import loading
import pipeline


def check_table(out, names):
    table = json.load(open(out / "table.json"))
    assert [row["model"] for row in table] == list(names)
    for row in table:
        for key in ("geneval_acc", "geneval_clean", "geneval_clean_se", "geneval", "ocr", "quality", "average",
                    "adapter", "command", "geneval/position", "scores_from"):
            assert key in row, (row["model"], key)
        assert 0 <= row["geneval_clean"] <= row["geneval_acc"] <= 1 and 0 <= row["ocr"] <= 1
        if row["model"] != "base":
            assert os.path.isfile(os.path.join(row["adapter"], "adapter_model.safetensors"))
            assert row["command"].startswith("python ")
    assert "GenEval gain kept" in open(out / "table.md").read() and "nothing unasked" in open(out / "table.md").read()
    return table


def test_quick_demo_uses_the_published_teachers(tmp_path, capsys):
    out, runs = tmp_path / "results", tmp_path / "runs"
    pipeline.main(["--quick", "--out", str(out), "--runs", str(runs)])
    check_table(out, ["base", *pipeline.PUBLISHED, *pipeline.DEMO])
    assert sorted(os.listdir(runs)) == sorted([*pipeline.DEMO, "test-prompts"])  # no Stage 1 run of its own
    commands = open(out / "commands.sh").read()
    assert f"--teachers geneval={pipeline.TEACHERS}/geneval,ocr={pipeline.TEACHERS}/ocr" in commands
    assert f"--anchor {pipeline.TEACHERS}/quality" in commands
    lines = capsys.readouterr().out  # a progress line before each step: elapsed and estimated minutes left
    assert re.search(r"\[1/3\] coldstart-merge: \d+\.\d min elapsed, about \d+\.\d min left", lines)
    assert re.search(r"\[3/3\] evaluation: \d+\.\d min elapsed, about \d+\.\d min left", lines)


def test_quick_pipeline_from_scratch_runs_every_step_and_caches_it(tmp_path, capsys):
    out, runs = tmp_path / "results", tmp_path / "runs"
    pipeline.main(["--quick", "--from-scratch", "--full", "--ablations", "--mar-sweep", "--out", str(out), "--runs",
                   str(runs)])
    check_table(out, pipeline.NAMES)
    mar = json.load(open(out / "mar.json"))
    lambdas = sorted(pipeline.MAR_SWEEP.values())
    assert [p["lambda"] for p in mar["validation"]] == lambdas == [p["lambda"] for p in mar["test"]]
    assert mar["chosen_lambda"] in pipeline.MAR_SWEEP.values()
    for name in ("table.md", "grid.png", "curve.png", "mar.png", "commands.sh", "logs/grpo-mix.jsonl",
                 "logs/opd-merge.jsonl"):
        assert os.path.isfile(out / name), name
    for log in os.listdir(out / "logs"):  # strict JSON: a reward no prompt of a batch had is left out, not NaN
        assert "NaN" not in open(out / "logs" / log).read(), log
    minutes = json.load(open(out / "minutes.json"))
    assert set(minutes["steps"]) == {n for n, _, _ in pipeline.plan("runs", pipeline.QUICK, "m", "d")}
    assert minutes["all_steps_and_evaluation"] == sum(minutes["steps"].values()) + minutes["evaluation"] > 0
    for run, _, _ in pipeline.CURVES:  # the curve's inner point is evaluated in training, its ends by eval.py
        log = [json.loads(line) for line in open(out / "logs" / f"{run}.jsonl")]
        assert [r["epoch"] for r in log if "eval" in r] == [1] and log[-1]["epoch"] == 2
    capsys.readouterr()
    pipeline.main(["--quick", "--from-scratch", "--out", str(out), "--runs", str(runs)])  # only re-scores
    assert capsys.readouterr().out.count("[cached]") == len(pipeline.PUBLISHED) + len(pipeline.DEMO)
    check_table(out, ["base", *pipeline.PUBLISHED, *pipeline.DEMO])
    with pytest.raises(loading.UserError, match="coldstart-merge was made by another command"):
        pipeline.main(["--quick", "--out", str(out), "--runs", str(runs)])  # the published teachers, not these
    weights = runs / "teacher-geneval" / "adapter" / "adapter_model.safetensors"  # a teacher replaced in place
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    with pytest.raises(loading.UserError, match="coldstart-merge was made from adapters that have changed since"):
        pipeline.main(["--quick", "--from-scratch", "--out", str(out), "--runs", str(runs)])


def test_mar_weight_is_the_best_quality_that_keeps_each_gain_within_five_points():
    def row(model, geneval, ocr, quality):
        return {"model": model, "geneval_acc": geneval, "ocr": ocr, "quality": quality}
    table = [row("base", 0.2, 0.5, 0.8), row("teacher-geneval", 0.4, 0.4, 0.8), row("teacher-ocr", 0.1, 0.7, 0.8),
             row("opd-no-mar", 0.40, 0.70, 0.80), row("opd-merge", 0.40, 0.70, 0.81),  # kept 100 % / 100 %
             row("opd-mar-0p2", 0.392, 0.692, 0.83),  # kept 96 % / 96 %: within 5 points
             row("opd-mar-1", 0.38, 0.70, 0.90)]  # GenEval kept 90 %: the best quality, but 10 points lost
    assert pipeline.choose_lambda(table) == 0.2
    table[5]["ocr"] = 0.688  # OCR kept 94 %: now 0.2 costs 6 points too
    assert pipeline.choose_lambda(table) == 0.04
