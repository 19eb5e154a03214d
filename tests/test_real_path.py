"""The real path on a tiny StableDiffusion3Pipeline folder (two CLIP encoders, T5 absent, a VAE), built
locally in exactly SD3.5-Medium's formats: every stage and eval.py run on it; a published Flow-GRPO
teacher (peft folder, by hub id from the hub cache) is a Stage 3 teacher; our adapters load with
diffusers' load_lora_weights; gradient checkpointing changes no gradient."""
import json
import os

import numpy as np
import pytest
import torch

import common
import loading
import eval as evaluation
import stage1_grpo
import stage2_coldstart
import stage3_opd
import training

HUB_ID = "jieliu/SD3.5M-FlowGRPO-GenEval"


@pytest.fixture(scope="module")
def real_prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_prompts")
    metas = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
             {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a photo of a red square"}]
    with open(folder / "geneval.jsonl", "w") as f:
        f.write("".join(json.dumps(m) + "\n" for m in metas))
    (folder / "ocr.txt").write_text('a sign that says "K7"\na poster that says "HELLO"\n')
    return f"{folder}/geneval.jsonl,{folder}/ocr.txt"


def published_teacher(model_dir, folder, seed):
    """An adapter exactly as Flow-GRPO publishes its teachers: PeftModel.save_pretrained of a LoRA
    (Gaussian init, alpha = 2 r) on SD3's 8 joint-attention projections, B non-zero."""
    from peft import LoraConfig, get_peft_model
    bundle = training.load_model(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(loading.FLOW_GRPO_LORA_TARGETS))
    model = get_peft_model(bundle.transformer, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(str(folder))
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    return str(folder)


@pytest.fixture
def hub_cache(tmp_path, tiny_sd3_dir, monkeypatch):
    """The hub cache holding HUB_ID as snapshot_download leaves it (refs/main -> snapshots/<commit>)."""
    import huggingface_hub.constants
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    published_teacher(tiny_sd3_dir, repo / "snapshots" / commit, seed=1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return str(repo / "snapshots" / commit)


def test_every_stage_and_eval_run_on_a_tiny_sd3_pipeline_with_a_published_teacher(
        tiny_sd3_dir, tiny_clip_dir, real_prompts, hub_cache, tmp_path):
    shared = ["--model", tiny_sd3_dir, "--lora-rank", "4", "--lora-alpha", "8", "--pickscore-model", tiny_clip_dir,
              "--pickscore-processor", tiny_clip_dir]
    run = tmp_path / "runs"
    stage1_grpo.main([*shared, "--reward", "pickscore", "--train-prompts", real_prompts, "--test-prompts", real_prompts,
                      "--prompts-per-epoch", "2", "--group-size", "2", "--steps", "2", "--epochs", "1", "--eval-steps",
                      "2", "--eval-every", "1", "--gradient-checkpointing", "--out", str(run / "teacher-ocr")])
    log = [json.loads(line) for line in open(run / "teacher-ocr" / "log.jsonl")]
    assert set(log[0]["eval"]) >= {"ocr", "pickscore"} and np.isfinite(log[-1]["reward_pickscore"])
    assert loading.adapter_layout(str(run / "teacher-ocr" / "adapter"))[2] == sorted(loading.FLOW_GRPO_LORA_TARGETS)
    teachers = f"geneval={HUB_ID},ocr={run / 'teacher-ocr' / 'adapter'}"  # the published layout, by hub id
    stage2_coldstart.main(["merge", *shared, "--teachers", teachers, "--out", str(run / "merge")])
    stage2_coldstart.main(["sft", *shared, "--teachers", teachers, "--train-prompts", real_prompts, "--samples-per-task",
                           "2", "--sample-steps", "2", "--train-steps", "1", "--batch-size", "2",
                           "--gradient-checkpointing", "--out", str(run / "sft")])
    stage3_opd.main([*shared, "--teachers", teachers, "--anchor", HUB_ID, "--init", str(run / "merge" / "adapter"),
                     "--train-prompts", real_prompts, "--test-prompts", real_prompts, "--rollouts-per-epoch", "4",
                     "--train-batch-size", "2", "--steps", "2", "--epochs", "1", "--eval-steps", "2", "--eval-every", "1",
                     "--gradient-checkpointing", "--out", str(run / "opd")])
    record = [json.loads(line) for line in open(run / "opd" / "log.jsonl")][-1]
    assert np.isfinite(record["loss"]) and {"ocr", "pickscore"} <= set(record["eval"])
    evaluation.main(["--model", tiny_sd3_dir, "--pickscore-model", tiny_clip_dir, "--pickscore-processor", tiny_clip_dir,
                     "--adapters", f"opd={run / 'opd' / 'adapter'},geneval={HUB_ID}", "--test-prompts", real_prompts,
                     "--steps", "2", "--out", str(tmp_path / "eval")])
    rows = json.load(open(tmp_path / "eval" / "eval.json"))
    assert [r["model"] for r in rows] == ["base", "opd", "geneval"]
    assert all(np.isfinite(r["pickscore"]) and np.isfinite(r["ocr"]) for r in rows)
    assert rows[0]["pickscore"] != rows[2]["pickscore"]  # the published teacher changes the images
    assert "PickScore / 26" in open(tmp_path / "eval" / "table.md").read()


def test_hub_id_teacher_equals_the_same_folder_loaded_by_path(tiny_sd3_dir, hub_cache):
    bundle = training.load_model(tiny_sd3_dir)
    by_id = evaluation.load_adapters(bundle.transformer, [("teacher", HUB_ID)])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, pooled = bundle.encode(["a photo of a circle", 'a sign that says "K7"'])
    v_id = common.velocity(by_id, x, 0.6, embeds, pooled)
    other = training.load_model(tiny_sd3_dir)
    by_path = evaluation.load_adapters(other.transformer, [("teacher", hub_cache)])
    torch.testing.assert_close(v_id, common.velocity(by_path, x, 0.6, embeds, pooled), rtol=0, atol=0)
    with loading.use_adapter(by_id, None):
        assert (v_id - common.velocity(by_id, x, 0.6, embeds, pooled)).abs().max() > 1e-3


def test_an_uncached_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on our machines: no hub
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-teacher' is not a local folder and could not be fetched"):
        loading.parse_teachers("geneval=nobody/no-such-teacher")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        loading.parse_teachers("geneval=/no/such/folder")


def test_stage_adapter_loads_with_diffusers_load_lora_weights_and_gives_the_same_output(tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    bundle = training.load_model(tiny_sd3_dir)
    policy = training.make_policy(bundle.transformer, 4, 8)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".student." in name and "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    loading.save_adapter(policy, "student", str(tmp_path / "adapter"))
    ours = evaluation.load_adapters(training.load_model(tiny_sd3_dir).transformer, [("a", str(tmp_path / "adapter"))])
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    base_latents = pipe("a red circle", num_inference_steps=3, guidance_scale=4.5, output_type="latent",
                        generator=torch.Generator().manual_seed(0), height=16, width=16).images
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    assert pipe.get_active_adapters(), "load_lora_weights loaded nothing"
    lora_latents = pipe("a red circle", num_inference_steps=3, guidance_scale=4.5, output_type="latent",
                        generator=torch.Generator().manual_seed(0), height=16, width=16).images
    pipe.unload_lora_weights()
    pipe.transformer = ours  # the same pipeline call, with the adapter loaded our way
    our_latents = pipe("a red circle", num_inference_steps=3, guidance_scale=4.5, output_type="latent",
                       generator=torch.Generator().manual_seed(0), height=16, width=16).images
    torch.testing.assert_close(lora_latents, our_latents, rtol=1e-5, atol=1e-5)
    assert (lora_latents - base_latents).abs().max() > 1e-3


def test_gradient_checkpointing_changes_no_gradient(tiny_sd3_dir):
    grads = []
    for checkpointing in (False, True):
        bundle = training.load_model(tiny_sd3_dir)
        if checkpointing:
            bundle.transformer.enable_gradient_checkpointing()
        torch.manual_seed(0)
        policy = training.make_policy(bundle.transformer, 4, 8)
        x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        embeds, pooled = bundle.encode(["a photo of a circle", "two squares"])
        torch.manual_seed(2)
        common.flow_matching_loss(policy, x0, embeds, pooled, bf16=False).backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bad_resolution_is_a_clear_error(tiny_sd3_dir, tmp_path):
    with pytest.raises(ValueError, match="--resolution 18 is not a positive multiple of 4"):
        stage1_grpo.main(["--model", tiny_sd3_dir, "--resolution", "18", "--reward", "ocr", "--out", str(tmp_path)])
