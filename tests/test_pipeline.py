"""The one-command pipeline in --quick mode on the shipped base: every step runs, caching works, and
the table has the rows and keys other tools read."""
import json
import os

import pipeline


def test_quick_pipeline_writes_the_table_and_caches_its_steps(tmp_path, capsys):
    out, runs = tmp_path / "results", tmp_path / "runs"
    pipeline.main(["--quick", "--ablations", "--out", str(out), "--runs", str(runs)])
    table = json.load(open(out / "table.json"))
    assert [row["model"] for row in table] == list(pipeline.NAMES)
    for row in table:
        for key in ("geneval_acc", "geneval_clean", "geneval_clean_se", "geneval", "ocr", "quality", "average",
                    "adapter", "command", "geneval/position"):
            assert key in row, (row["model"], key)
        assert 0 <= row["geneval_clean"] <= row["geneval_acc"] <= 1 and 0 <= row["ocr"] <= 1
        if row["model"] != "base":
            assert os.path.isfile(os.path.join(row["adapter"], "adapter_model.safetensors"))
            assert row["command"].startswith("python ")
    for name in ("table.md", "grid.png", "curve.png", "commands.sh", "logs/grpo-mix.jsonl", "logs/opd-merge.jsonl"):
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
    pipeline.main(["--quick", "--out", str(out), "--runs", str(runs)])  # a rerun only re-scores; without the ablations
    assert capsys.readouterr().out.count("[cached]") == len(pipeline.plan("runs", pipeline.QUICK, "model", "dataset", False))
    assert [row["model"] for row in json.load(open(out / "table.json"))] == [n for n in pipeline.NAMES
                                                                            if n not in pipeline.ABLATIONS]
    assert "GenEval gain kept" in open(out / "table.md").read() and "nothing unasked" in open(out / "table.md").read()
