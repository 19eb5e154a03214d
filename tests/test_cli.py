"""Every entry point explains its flags, and a user error is one line `error: ...` with exit status 2;
a run killed mid-epoch and resumed with default flags ends exactly where an uninterrupted run ends."""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import pipeline
import rewards
import stage1_grpo as stage1
import stage2_coldstart as stage2
import stage3_opd as stage3
import lab.commands
from conftest import ROOT, cli_error
from test_stage3 import adapters, prompt_files, stage3_args  # noqa: F401 (fixtures)


def test_every_flag_of_every_project_file_has_help():
    bare = []
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                if not any(k.arg == "help" for k in node.keywords):
                    bare.append(f"{os.path.basename(path)}:{node.lineno}")
    assert not bare, bare


@pytest.mark.parametrize("main, argv, flag", [
    (stage1.main, [], "--nft-old-ramp"), (stage2.main, [], "--svd-rank"), (stage3.main, [], "--mar-lambda"),
    (evaluation.main, [], "--samples-per-prompt"), (pipeline.main, [], "--quick"),
    (lab.commands.main, ["specialist"], "--caption-dropout")])
def test_help_documents_the_flags_with_their_defaults(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert flag in text and "(default: " in text


def test_bad_inputs_are_one_line_and_status_2(tiny_model_dir, adapters, prompt_files, tmp_path, capsys):
    def stage3_error(*extra, teachers=None):
        argv = stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path / "run", *extra)
        if teachers:
            argv[argv.index("--teachers") + 1] = teachers
        return cli_error(stage3.main, argv, capsys)
    assert "argument --epochs: '-1' is not a positive integer" in stage3_error("--epochs", "-1")
    assert "argument --ema: '1.5' is not a number in [0, 1)" in stage3_error("--ema", "1.5")
    assert "argument --lr: 'nan' is not a finite number > 0" in stage3_error("--lr", "nan")
    assert "missing-teacher" in stage3_error(teachers=f"geneval={adapters['geneval']},ocr={tmp_path / 'missing-teacher'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle", "tag": "colors"}\n{"prompt": oops}\n')
    assert f"{bad}:2: not valid JSON" in stage3_error("--train-prompts", f"{bad},{prompt_files['train'].split(',')[1]}")
    assert "no default prompt files for task(s) ['style']" in stage3_error(
        "--train-prompts", "", teachers=f"geneval={adapters['geneval']},style={adapters['ocr']}")
    assert "routes to task 'ocr', but the teachers are ['geneval']" in stage3_error(teachers=f"geneval={adapters['geneval']}")
    assert "'0' is not a positive integer" in cli_error(evaluation.main, ["--samples-per-prompt", "0"], capsys)
    assert "unknown task 'style'" in cli_error(lab.commands.main, ["specialist", "--task", "style", "--out", str(tmp_path)], capsys)
    post = rewards.server_client("http://127.0.0.1:9", timeout=0.5, retries=0)  # nothing listens on port 9
    assert "reward server http://127.0.0.1:9 failed 1 times" in cli_error(lambda argv: post({"images": []}), [], capsys)
    assert not os.path.exists(tmp_path / "run" / "adapter")  # no bad input wrote a result


def test_the_command_line_itself_prints_one_line_without_a_traceback(tmp_path):
    for argv in (["stage3_opd.py", "--teachers", "x", "--out", str(tmp_path), "--epochs", "-1"],
                 ["eval.py", "--adapters", f"row={tmp_path / 'nothing-here'}", "--out", str(tmp_path)]):
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
        assert "-1" in lines[0] or "nothing-here" in lines[0]


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_model_dir, adapters, prompt_files, tmp_path,
                                                                   monkeypatch):
    # default --eval-every 5 and --save-every 1: the checkpoint no longer waits for an evaluation
    argv = lambda out, *extra: stage3_args(tiny_model_dir, adapters, prompt_files, out, "--epochs", "3",  # noqa: E731
                                           "--eval-every", "5", "--anchor", adapters["quality"], *extra)
    stage3.main(argv(tmp_path / "whole"))
    train, calls = stage3.train_on_rollouts, []

    def dies_in_epoch_two(*args, **kwargs):  # the kill: after epoch 2's rollouts, before its update
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return train(*args, **kwargs)
    monkeypatch.setattr(stage3, "train_on_rollouts", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        stage3.main(argv(tmp_path / "killed"))
    assert not os.path.exists(tmp_path / "killed" / "adapter")
    redone = []
    monkeypatch.setattr(stage3, "train_on_rollouts", lambda *a, **k: redone.append(1) or train(*a, **k))
    stage3.main(argv(tmp_path / "killed", "--resume"))
    assert len(redone) == 2  # epoch 1 came from its checkpoint: only epochs 2 and 3 were trained again
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("whole", "killed")]
    assert [r["epoch"] for r in logs[1]] == [0, 1, 2, 3]  # epoch 2 redone once, not logged twice
    assert [r.get("loss") for r in logs[0]] == [r.get("loss") for r in logs[1]]
    assert logs[0][-1]["eval"] == logs[1][-1]["eval"]
