"""The CUDA path with the GPU defaults: bf16 base weights, bf16 autocast, fp32 LoRA. The rest of the suite is
the CPU contract and hides the GPU (conftest.py); on a machine with one, run these with

    FLOW_OPD_GPU_TESTS=1 python -m pytest tests/test_gpu.py

Only GenEval prompts are scored, so no OCR engine is needed."""
import json
import math

import pytest
import torch

import eval as evaluate
import stage1_grpo as stage1
import stage2_coldstart as stage2
import stage3_opd as stage3
from test_stage1 import check_one_tiny_epoch, prompt_files, tiny_args, tiny_epoch_setup  # noqa: F401 (a fixture)
from test_stage3 import random_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and FLOW_OPD_GPU_TESTS=1")
DEVICE = "cuda"  # every --device default where a GPU is present


def test_cuda_defaults_keep_fp32_lora_on_bf16_weights_and_the_first_ratio_is_one(tiny_model_dir, prompt_files, tmp_path):
    args, bundle = tiny_epoch_setup(tiny_model_dir, prompt_files, tmp_path)
    assert args.device == DEVICE and bundle.transformer.dtype == torch.bfloat16
    assert args.train_bf16 and args.sample_bf16 and args.eval_bf16
    # the rollout runs in the training precision and chunking, so bf16 on the GPU recomputes it bit for bit too
    policy = check_one_tiny_epoch(args, bundle, prompt_files)
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE for n, p in policy.named_parameters() if "lora_" in n)


def test_every_stage_and_eval_run_on_cuda(tiny_model_dir, prompt_files, tmp_path):
    train, test = prompt_files
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "grpo", "--epochs", "1"))
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "nft", "--epochs", "1", "--objective", "nft",
                          "--nft-guidance", "4.5"))
    for run in ("grpo", "nft"):  # a random model scores 0 everywhere, so its groups carry no signal: ran, finite
        log = [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
        assert len(log) == 2 and math.isfinite(log[-1]["loss"]) and log[-1]["eval"]["geneval"] >= 0, run
    # trained-looking (random) adapters as the teacher and the anchor, so that every KL is > 0
    teacher = random_adapter(tiny_model_dir, tmp_path / "teacher", 1)
    other = random_adapter(tiny_model_dir, tmp_path / "anchor", 2)
    stage2.main(["merge", "--model", tiny_model_dir, "--teachers", f"geneval={teacher},ocr={other}",
                 "--out", str(tmp_path / "merge")])
    stage2.main(["sft", "--model", tiny_model_dir, "--teachers", f"geneval={teacher}", "--train-prompts", train,
                 "--samples-per-task", "4", "--sample-steps", "2", "--train-steps", "2", "--batch-size", "4",
                 "--out", str(tmp_path / "sft")])
    assert all(math.isfinite(json.loads(line)["loss"]) for line in open(tmp_path / "sft" / "log.jsonl"))
    stage3.main(["--model", tiny_model_dir, "--teachers", f"geneval={teacher}", "--anchor", other,
                 "--init", str(tmp_path / "merge" / "adapter"), "--objective", "ppo", "--train-prompts", train,
                 "--test-prompts", test, "--rollouts-per-epoch", "4", "--train-batch-size", "4", "--steps", "3",
                 "--eval-steps", "2", "--eval-every", "1", "--epochs", "1", "--out", str(tmp_path / "opd")])
    log = [json.loads(line) for line in open(tmp_path / "opd" / "log.jsonl")]
    assert log[1]["ratio_min"] == log[1]["ratio_max"] == 1.0  # one update per epoch: on-policy in bf16 too
    assert 0 < log[1]["kl_teacher_geneval"] < math.inf and 0 < log[1]["kl_anchor"] < math.inf
    evaluate.main(["--model", tiny_model_dir, "--adapters", f"grpo={tmp_path / 'grpo' / 'adapter'},opd={tmp_path / 'opd' / 'adapter'}",
                   "--test-prompts", test, "--steps", "2", "--out", str(tmp_path / "eval")])
    rows = json.load(open(tmp_path / "eval" / "eval.json"))
    assert [r["model"] for r in rows] == ["base", "grpo", "opd"]
    assert {r["eval_precision"] for r in rows} == {"bf16"} and all(0 <= r["geneval"] <= 1 for r in rows)
