"""The real path gives the paper's numbers and bounded memory (issue 29), on the tiny SD3 pipeline and
stand-in reward servers that send exactly what flow_grpo's reward-server sends."""
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import loading
import eval as evaluation
import rewards
import training
from test_rewards import _Server


def geneval_answer(request, n):
    """app_geneval.py's answer, with three different values per image so that a mix-up shows: scores
    (partial credit) 0.5, rewards (the official check) 1.0, strict_rewards (exact counts) 0.0."""
    k = len(request["images"])
    return 200, pickle.dumps({"scores": [0.5] * k, "rewards": [1.0] * k, "strict_rewards": [0.0] * k,
                              "group_rewards": {}, "group_strict_rewards": {}})


def test_geneval_column_is_the_official_metric_and_strict_an_extra_column(tiny_sd3_dir, tmp_path):
    metas = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
             {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
              "prompt": "a photo of two cats"}]
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text("".join(json.dumps(m) + "\n" for m in metas))
    server = _Server(geneval_answer)
    try:
        evaluation.main(["--model", tiny_sd3_dir, "--test-prompts", str(prompts), "--eval-rewards", "geneval",
                         "--geneval-url", server.url, "--steps", "2", "--out", str(tmp_path / "eval")])
    finally:
        server.close()
    row = json.load(open(tmp_path / "eval" / "eval.json"))[0]
    assert (row["geneval_acc"], row["geneval_strict"], row["geneval"]) == (1.0, 0.0, 0.5)
    assert row["average"] == 1.0  # the official metric is the averaged column; strict is shown beside it
    header = open(tmp_path / "eval" / "table.md").read().splitlines()[0]
    assert header == "| model | GenEval | average | GenEval strict (exact counts) |"
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b in server.requests[0]["images"])


def test_miniature_table_says_which_geneval_rule_it_implements(tiny_model_dir, tmp_path):
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                   "prompt": "a photo of a circle"}) + "\n")
    evaluation.main(["--model", tiny_model_dir, "--test-prompts", str(prompts), "--eval-rewards", "geneval",
                     "--steps", "2", "--out", str(tmp_path / "eval")])
    table = open(tmp_path / "eval" / "table.md").read()
    assert "| model | GenEval | average |" in table and "official rule" in table and "strict" not in table.splitlines()[0]


def test_deqa_is_scaled_once_as_the_server_already_divides_by_5():
    # reward-server deqa.py: compute_deqascore returns model.score(images) / 5, so a 4-of-5 image is 0.8
    server = _Server(lambda request, n: (200, pickle.dumps({"outputs": [4.0 / 5] * len(request["images"])})))
    try:
        out = rewards.deqa_server_scorer(rewards.server_client(server.url, timeout=5, retries=0))(
            torch.rand(2, 3, 16, 16), ["a", "b"], [None] * 2)
    finally:
        server.close()
    np.testing.assert_allclose(out["deqa"], [0.8, 0.8])


def test_jpegs_for_the_servers_use_pil_default_quality_like_flow_grpo():
    image = torch.rand(1, 3, 32, 32)
    buffer = io.BytesIO()
    Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, format="JPEG")
    assert rewards.jpeg_bytes(image) == [buffer.getvalue()]  # flow_grpo: img.save(buffer, format="JPEG")
    assert rewards.jpeg_bytes(image, 95) != [buffer.getvalue()]
    args = training.parser("x")
    rewards.add_arguments(args)
    assert args.parse_args([]).jpeg_quality == 75


def test_no_t5_embeddings_equal_diffusers_no_t5_encode_prompt(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline
    bundle = loading.load_sd3(tiny_sd3_dir, text_encoder_3=False)
    prompts = ["a photo of a circle", 'a sign that says "K7"']
    embeds, pooled = bundle.encode(prompts)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    want, _, want_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                 max_sequence_length=128)
    assert torch.equal(embeds, want) and torch.equal(pooled, want_pooled)
    clip_tokens = pipe.tokenizer.model_max_length
    assert embeds.shape[1] == clip_tokens + 128 and not embeds[:, clip_tokens:].any()  # 128 zero T5 rows


class PeakTensorMemory(TorchDispatchMode):
    """The peak bytes of CPU tensors created inside the context and alive at once (a storage counts
    until the allocator frees it, seen through a weak reference to it)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if not ref.expired()}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr():
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def test_eval_memory_does_not_grow_with_the_number_of_prompts(tiny_sd3_dir):
    bundle = training.load_model(tiny_sd3_dir)
    assert bundle.defaults["eval_batch_size"] == 16 and bundle.defaults["decode_batch_size"] == 4
    decoded = []
    decode = bundle.decode
    bundle.decode = lambda latents: (decoded.append(len(latents)), decode(latents))[1]
    peaks = {}
    for n in (16, 64):
        with PeakTensorMemory() as memory:
            images = evaluation.sample_images(bundle, [f"a photo of {i} circles" for i in range(n)], list(range(n)), 2, 4.5)
        peaks[n] = memory.peak
        assert images.shape[0] == n and images.dtype == torch.uint8 and images.device.type == "cpu"
    assert max(decoded) == 4  # the VAE decodes 4 latents at a time
    assert peaks[64] < 2 * peaks[16], peaks


def test_peak_tensor_memory_sees_a_big_batch():
    # the measuring stick itself: a batch 4x as big is ~4x the peak
    def work(n):
        with PeakTensorMemory() as memory:
            x = torch.ones(n, 1000)
            y = (x * 2).sum()
            del x
        return memory.peak, y
    assert 3.5 < work(64)[0] / work(16)[0] < 4.5


def test_pickscore_in_half_precision_and_offloaded_scores_as_fp32(tiny_clip_dir):
    images, prompts = torch.rand(3, 3, 32, 32), ["a red circle", "a blue square", 'a sign that says "K7"']
    full = rewards.pickscore_scorer(tiny_clip_dir, tiny_clip_dir, dtype="float32")(images, prompts)["pickscore"]
    half = rewards.pickscore_scorer(tiny_clip_dir, tiny_clip_dir, dtype="bfloat16", offload=True)
    assert half.model.dtype == torch.bfloat16 and half.model.device.type == "cpu"
    np.testing.assert_allclose(half(images, prompts)["pickscore"], full, atol=0.02)
    assert half.model.device.type == "cpu"  # back on the CPU after scoring


def dense_deltas(folder):
    """{module: (alpha / r) B A} of a peft folder, read from its files alone."""
    from safetensors.torch import load_file
    config = json.load(open(f"{folder}/adapter_config.json"))
    weights = load_file(f"{folder}/adapter_model.safetensors")
    return {key[:-len(".lora_A.weight")]: config["lora_alpha"] / config["r"] *
            weights[key.replace("lora_A", "lora_B")].double() @ weights[key].double()
            for key in weights if key.endswith("lora_A.weight")}


def test_delta_merge_on_a_bf16_base_is_exact_to_fp32(tiny_sd3_dir, tmp_path):
    import stage2_coldstart
    from test_real_path import published_teacher
    one, two = published_teacher(tiny_sd3_dir, tmp_path / "one", 1), published_teacher(tiny_sd3_dir, tmp_path / "two", 2)
    stage2_coldstart.main(["merge", "--model", tiny_sd3_dir, "--model-dtype", "bfloat16", "--teachers",
                           f"geneval={one},ocr={two}", "--weights", "0.7,0.3", "--out", str(tmp_path / "merge")])
    got, a, b = dense_deltas(tmp_path / "merge" / "adapter"), dense_deltas(one), dense_deltas(two)
    error = max(((got[k] - (0.7 * a[k] + 0.3 * b[k])).norm() / (0.7 * a[k] + 0.3 * b[k]).norm()).item() for k in a)
    assert error < 1e-6, error
    # the same merge left to peft alone is rounded to the bf16 base (what the fix is for)
    bundle = training.load_model(tiny_sd3_dir, dtype=torch.bfloat16)
    model = evaluation.load_adapters(bundle.transformer, [("geneval", one), ("ocr", two)])
    model.add_weighted_adapter(["geneval", "ocr"], [0.7, 0.3], "plain", combination_type="cat")
    module = model.base_model.model.transformer_blocks[0].attn.to_q
    assert module.lora_A["plain"].weight.dtype == torch.bfloat16


def test_a_pickscore_teacher_trains_on_its_prompt_set_and_the_router_sends_it_its_prompts(
        tiny_sd3_dir, tiny_clip_dir, tmp_path):
    import stage1_grpo
    import stage3_opd
    from test_real_path import published_teacher
    dataset = tmp_path / "dataset"  # flow_grpo's layout: dataset/pickscore/{train,test}.txt, plain prompts
    (dataset / "pickscore").mkdir(parents=True)
    (dataset / "pickscore" / "train.txt").write_text("a cat in a garden\na red car at night\n")
    (dataset / "pickscore" / "test.txt").write_text("a bowl of fruit\n")
    (dataset / "geneval").mkdir()
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    for split in ("train", "test"):
        (dataset / "geneval" / f"{split}_metadata.jsonl").write_text(json.dumps(meta) + "\n")
    shared = ["--model", tiny_sd3_dir, "--lora-rank", "4", "--lora-alpha", "8", "--pickscore-model", tiny_clip_dir,
              "--pickscore-processor", tiny_clip_dir, "--dataset", str(dataset), "--steps", "2", "--epochs", "1",
              "--eval-steps", "2", "--eval-every", "1"]
    stage1_grpo.main([*shared, "--reward", "pickscore", "--prompts-per-epoch", "2", "--group-size", "2",
                      "--out", str(tmp_path / "teacher-pickscore")])
    assert np.isfinite(json.loads(open(tmp_path / "teacher-pickscore" / "log.jsonl").readlines()[-1])["reward_pickscore"])
    grouped = loading.prompts_by_task("", ["geneval", "pickscore"], str(dataset), "train")
    assert [p for p, _ in grouped["pickscore"]] == ["a cat in a garden", "a red car at night"]  # no "task" key in the file
    assert [p for p, _ in grouped["geneval"]] == ["a photo of a circle"]
    given = f"geneval={dataset}/geneval/train_metadata.jsonl,pickscore={dataset}/pickscore/train.txt"
    assert loading.prompts_by_task(given, ["geneval", "pickscore"], str(dataset), "train") == grouped
    with pytest.raises(ValueError, match=r"no train prompt routes to task\(s\) \['pickscore'\].*label it, task=path"):
        loading.prompts_by_task(f"{dataset}/pickscore/train.txt", ["geneval", "pickscore"], str(dataset), "train")
    teachers = f"geneval={published_teacher(tiny_sd3_dir, tmp_path / 'geneval', 1)},pickscore={tmp_path / 'teacher-pickscore' / 'adapter'}"
    stage3_opd.main([*shared, "--teachers", teachers, "--rollouts-per-epoch", "4", "--train-batch-size", "2",
                     "--eval-rewards", "pickscore", "--out", str(tmp_path / "opd")])
    record = [json.loads(line) for line in open(tmp_path / "opd" / "log.jsonl")][-1]
    assert np.isfinite(record["kl_teacher_pickscore"]) and np.isfinite(record["eval"]["pickscore"])
