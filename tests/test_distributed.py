"""torchrun: a 2-process gloo job on the CPU matches the single-process run with the same global batch
(prompts sharded, rewards gathered for global advantage statistics, gradients summed, rank 0 writes)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import stage1_grpo as stage1
import stage2_coldstart as stage2
import stage3_opd as stage3
import training
from test_stage1 import prompt_files as geneval_prompt_files, tiny_args  # noqa: F401 (a fixture)
from test_stage3 import adapters, prompt_files, stage3_args  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32 no-grad passes on every machine: where bf16 is native it is their default, and the shards' smaller
# batches round differently in bf16 than these tolerances allow (a 0.3 % KL difference measured)
FP32 = ("--sample-precision", "fp32")


def torchrun(script, argv, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on a 2-core machine
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               os.path.join(ROOT, script), *argv]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def records(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]


def assert_same_run(one, two, keys):
    """The same logged statistics, epoch by epoch, and the same published adapter (float tolerance:
    the processes' smaller matmuls round differently; the published EMA is a bias-corrected average of the
    students after each update, so it carries their rounding differences in full, up to ~1e-4 here)."""
    found = set()
    for a, b in zip(records(one), records(two), strict=True):
        for key in keys:
            assert (key in a) == (key in b), (a.get("epoch", a.get("step")), key)  # a key one run logs, both do
            if key in a:
                found.add(key)
                assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), (a.get("epoch", a.get("step")), key)
    assert found == set(keys), f"never logged: {set(keys) - found}"  # a misspelt key is not skipped silently
    weights_one = load_file(os.path.join(one, "adapter", "adapter_model.safetensors"))
    weights_two = load_file(os.path.join(two, "adapter", "adapter_model.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    for name, value in weights_one.items():
        assert (weights_two[name] - value).abs().max() <= 3e-4 * max(1.0, value.abs().max().item()), name


def test_stage1_two_processes_match_one(tiny_model_dir, geneval_prompt_files, tmp_path):
    extra = ("--reward", "quality", "--epochs", "2", "--eval-every", "0", "--prompts-per-epoch", "2", "--group-size", "4",
             "--train-batch-size", "4")  # quality: a reward that varies within a group even for a random model
    stage1.main(tiny_args(tiny_model_dir, geneval_prompt_files, tmp_path / "one", *extra))
    torchrun("stage1_grpo.py", tiny_args(tiny_model_dir, geneval_prompt_files, tmp_path / "two", *extra))
    assert all(r["updates"] == 2 for r in records(tmp_path / "one")[1:])  # both chunks trained: a real comparison
    assert_same_run(tmp_path / "one", tmp_path / "two", ("reward_mean", "reward_std", "loss", "kl", "ratio_min",
                                                         "ratio_max", "updates", "skipped_groups"))


@pytest.mark.parametrize("objective", ["pathwise", "ppo"])
def test_stage3_two_processes_match_one(tiny_model_dir, adapters, prompt_files, tmp_path, objective):  # noqa: F811
    extra = ("--epochs", "2", "--eval-every", "0", "--rollouts-per-epoch", "8", "--train-batch-size", "4",
             "--anchor", adapters["quality"], "--objective", objective, *FP32)
    stage3.main(stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path / "one", *extra))
    torchrun("stage3_opd.py", stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path / "two", *extra))
    ratios = ("ratio_min", "ratio_max") if objective == "ppo" else ()  # pathwise has no policy ratio to log
    assert_same_run(tmp_path / "one", tmp_path / "two", ("loss", "kl_anchor", "kl_teacher_geneval", "kl_teacher_ocr",
                                                         *ratios, "updates"))


def test_stage2_sft_two_processes_match_one(tiny_model_dir, adapters, prompt_files, tmp_path):  # noqa: F811
    def argv(out):
        return ["sft", "--model", tiny_model_dir, "--teachers", f"geneval={adapters['geneval']},ocr={adapters['ocr']}",
                "--train-prompts", prompt_files["train"], "--samples-per-task", "4", "--sample-steps", "2",
                "--train-steps", "3", "--batch-size", "4", "--lr", "1e-2", *FP32, "--out", str(out)]
    stage2.main(argv(tmp_path / "one"))
    torchrun("stage2_coldstart.py", argv(tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ("loss",))


def test_a_batch_that_does_not_split_over_the_processes_is_a_clear_error(tiny_model_dir, adapters, prompt_files,  # noqa: F811
                                                                         tmp_path):
    argv = stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path, "--rollouts-per-epoch", "7")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "stage3_opd.py"), *argv]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "--rollouts-per-epoch 7 does not split over 2 processes" in done.stderr


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # torchrun --nproc_per_node 2 on a one-GPU machine
    with pytest.raises(ValueError, match=r"process 1 of 2 on this machine has no GPU \(1 visible\)"):
        training.init_distributed(argparse.Namespace(device="cuda"))
