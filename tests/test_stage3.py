"""Stage 2 (M6 merges, SFT) and Stage 3 (routing, mixed-adapter teachers, gradients, resume, bad input)
on a randomly initialised miniature model."""
import dataclasses
import json
import math
import os
import random
import types

import pytest
import torch
from safetensors.torch import load_file

import common
import loading
import eval as evaluation
import stage2_coldstart as stage2
import stage3_opd as stage3
import training
import miniature.world


def random_adapter(model_dir, folder, seed, rank=4, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A peft folder with random A and B (a 'trained' adapter) on the tiny base."""
    torch.manual_seed(seed)
    bundle = training.load_model(model_dir)
    peft = loading.add_lora(bundle.transformer, rank, 2 * rank, targets)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    loading.save_adapter(peft, "student", str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"geneval": random_adapter(tiny_model_dir, root / "geneval", 1),
            "ocr": random_adapter(tiny_model_dir, root / "ocr", 2),
            "quality": random_adapter(tiny_model_dir, root / "quality", 3),
            "rank8": random_adapter(tiny_model_dir, root / "rank8", 4, rank=8),
            "qv": random_adapter(tiny_model_dir, root / "qv", 5, targets=("to_q", "to_v"))}


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """{"train": "geneval.jsonl,ocr.txt", "test": ...}: small prompt files of both tasks."""
    folder = tmp_path_factory.mktemp("prompts")
    items = miniature.world.all_geneval_items("colors") + miniature.world.all_geneval_items("position")
    random.Random(0).shuffle(items)
    files = {}
    for split, part, words in (("train", items[:12], ("AB", "KEY", "TEA", "RED")), ("test", items[12:14], ("AB", "YE"))):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in part))
        (folder / f"{split}.txt").write_text("".join(miniature.world.ocr_prompt(w) + "\n" for w in words))
        files[split] = f"{folder / f'{split}.jsonl'},{folder / f'{split}.txt'}"
    return files


def delta_weights(peft, adapter):
    """{module: dense dW} of one adapter (peft's own get_delta_weight, scaling included)."""
    return {name: module.get_delta_weight(adapter) for name, module in peft.named_modules()
            if hasattr(module, "lora_A") and adapter in module.lora_A}


def merged_deltas(tiny_model_dir, folder):
    from peft import PeftModel
    bundle = training.load_model(tiny_model_dir)
    return delta_weights(PeftModel.from_pretrained(bundle.transformer, folder, adapter_name="m"), "m")


def teacher_deltas(tiny_model_dir, adapters, weights):
    from peft import PeftModel
    bundle = training.load_model(tiny_model_dir)
    peft = PeftModel.from_pretrained(bundle.transformer, adapters["geneval"], adapter_name="geneval")
    loading.load_adapter(peft, adapters["ocr"], "ocr")
    g, o = delta_weights(peft, "geneval"), delta_weights(peft, "ocr")
    return {name: weights[0] * g[name] + weights[1] * o[name] for name in g}


def relative_error(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


def test_merge_rules_against_the_dense_weighted_delta_sum(tiny_model_dir, adapters, tmp_path):
    teachers = f"geneval={adapters['geneval']},ocr={adapters['ocr']}"
    expected = teacher_deltas(tiny_model_dir, adapters, (0.7, 0.3))
    errors = {}
    for rule in ("delta", "svd", "ab"):
        stage2.main(["merge", "--model", tiny_model_dir, "--teachers", teachers, "--weights", "0.7,0.3",
                     "--rule", rule, "--out", str(tmp_path / rule)])
        errors[rule] = relative_error(merged_deltas(tiny_model_dir, str(tmp_path / rule / "adapter")), expected)
    assert errors["delta"] < 1e-5  # exact to float precision
    # svd to rank r: the best rank-r approximation of the rank-2r sum, so some error but less than ab's
    assert 1e-3 < errors["svd"] < errors["ab"]
    assert errors["ab"] > 0.3, errors  # the released A/B averaging is not the average of dW
    stage2.main(["merge", "--model", tiny_model_dir, "--teachers", teachers, "--weights", "0.7,0.3",
                 "--rule", "svd", "--svd-rank", "8", "--out", str(tmp_path / "svd8")])
    assert relative_error(merged_deltas(tiny_model_dir, str(tmp_path / "svd8" / "adapter")), expected) < 1e-4


def test_merge_search_scores_candidates_on_training_prompts_only(tiny_model_dir, adapters, prompt_files, tmp_path,
                                                                 monkeypatch):
    read, load = [], loading.load_prompts
    monkeypatch.setattr(loading, "load_prompts", lambda path: read.append(path) or load(path))
    teachers = f"geneval={adapters['geneval']},ocr={adapters['ocr']}"
    stage2.main(["search", "--model", tiny_model_dir, "--teachers", teachers, "--train-prompts", prompt_files["train"],
                 "--candidates", "delta:0.5,0.5;delta:1,1;ties:1,1", "--val-per-task", "3", "--out", str(tmp_path / "s")])
    test_files = prompt_files["test"].split(",")
    assert read and not set(test_files) & set(read)  # no test file was even opened
    found = json.load(open(tmp_path / "s" / "search.json"))
    train = {p for f in prompt_files["train"].split(",") for p, _ in load(f)}
    test = {p for f in test_files for p, _ in load(f)}
    assert len(found["validation_prompts"]) == 6 and set(found["validation_prompts"]) <= train - test
    best = max(found["candidates"], key=lambda r: r["worst_kept"])
    assert [c["rule"] for c in found["candidates"]] == ["delta", "delta", "ties"]
    assert found["chosen"] == {"rule": best["rule"], "weights": best["weights"]}
    weights = ",".join(str(w) for w in best["weights"])
    stage2.main(["merge", "--model", tiny_model_dir, "--teachers", teachers, "--rule", best["rule"], "--weights", weights,
                 "--out", str(tmp_path / "m")])  # the written adapter is that merge
    written, direct = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("s", "m"))
    assert written.keys() == direct.keys() and all(torch.allclose(written[k], direct[k], atol=1e-6) for k in written)


def test_merge_bad_input(tiny_model_dir, adapters, tmp_path):
    with pytest.raises(ValueError, match="rank/alpha/targets"):  # ab adds A and B key by key: one layout only
        stage2.main(["merge", "--model", tiny_model_dir, "--rule", "ab", "--teachers",
                     f"geneval={adapters['geneval']},ocr={adapters['rank8']}", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="has 3 numbers for 2 teachers"):
        stage2.main(["merge", "--model", tiny_model_dir, "--teachers",
                     f"geneval={adapters['geneval']},ocr={adapters['ocr']}", "--weights", "1,2,3", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        stage2.main(["merge", "--teachers", f"geneval={tmp_path / 'nowhere'}", "--out", str(tmp_path)])


def test_unequal_rank_teachers_and_anchor_merge_and_run_in_one_mixed_batch(tiny_model_dir, adapters, tmp_path):
    teachers = {"geneval": adapters["geneval"], "ocr": adapters["rank8"]}  # rank 4 and rank 8
    stage2.main(["merge", "--model", tiny_model_dir, "--teachers", ",".join(f"{t}={p}" for t, p in teachers.items()),
                 "--weights", "0.5,0.5", "--out", str(tmp_path / "merge")])
    assert relative_error(merged_deltas(tiny_model_dir, str(tmp_path / "merge" / "adapter")), {
        n: 0.5 * g + 0.5 * o for (n, g), o in zip(merged_deltas(tiny_model_dir, adapters["geneval"]).items(),
                                                  merged_deltas(tiny_model_dir, adapters["rank8"]).values())}) < 1e-5
    bundle = training.load_model(tiny_model_dir)
    policy = training.make_policy(bundle.transformer, init=str(tmp_path / "merge" / "adapter"))  # a rank-12 student
    names, anchor = stage3.load_guides(policy, teachers, adapters["qv"])  # an anchor on other targets
    x, embeds, pooled = torch.randn(3, *bundle.latent_shape(bundle.resolution)), *bundle.encode(["a", "b", "c"])
    rows = [names["geneval"], names["ocr"], anchor]
    with torch.no_grad():
        mixed = common.velocity(policy, x, 0.5, embeds, pooled, adapter_names=rows)
        for i, name in enumerate(rows):
            with loading.use_adapter(policy, name):
                alone = common.velocity(policy, x[i:i + 1], 0.5, embeds[i:i + 1], pooled[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-6)
        with loading.use_adapter(policy, None):
            assert not torch.allclose(mixed[2:], common.velocity(policy, x[2:], 0.5, embeds[2:], pooled[2:]))


def test_sft_cold_start_trains_a_student_stage3_can_start_from(tiny_model_dir, adapters, prompt_files, tmp_path):
    stage2.main(["sft", "--model", tiny_model_dir, "--teachers", f"geneval={adapters['geneval']},ocr={adapters['ocr']}",
                 "--train-prompts", prompt_files["train"], "--samples-per-task", "4", "--sample-steps", "2",
                 "--train-steps", "3", "--batch-size", "4", "--out", str(tmp_path / "sft")])
    log = [json.loads(line) for line in open(tmp_path / "sft" / "log.jsonl")]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "sft" / "adapter" / "adapter_model.safetensors"))
    assert max(t.abs().max().item() for k, t in saved.items() if "lora_B" in k) > 0  # trained: B starts at zero
    bundle = training.load_model(tiny_model_dir)
    policy = training.make_policy(bundle.transformer, init=str(tmp_path / "sft" / "adapter"))
    student = {n: p for n, p in policy.named_parameters() if ".student." in n}
    assert all(p.requires_grad for p in student.values()) and len(student) == len(saved)
    for key, tensor in saved.items():  # Stage 3 starts from exactly the SFT weights
        name = next(n for n in student if n.replace(".student", "").endswith(key.replace("base_model.model.", "")))
        torch.testing.assert_close(student[name].detach(), tensor.float())


def test_sft_micro_batches_accumulate_to_the_same_update_as_one_batch(tiny_model_dir, adapters, prompt_files, tmp_path):
    written = {}
    for micro in ("4", "1"):
        stage2.main(["sft", "--model", tiny_model_dir, "--teachers", f"geneval={adapters['geneval']},ocr={adapters['ocr']}",
                     "--train-prompts", prompt_files["train"], "--samples-per-task", "4", "--sample-steps", "2",
                     "--train-steps", "2", "--batch-size", "4", "--micro-batch-size", micro, "--out", str(tmp_path / micro)])
        written[micro] = load_file(tmp_path / micro / "adapter" / "adapter_model.safetensors")
    assert written["4"].keys() == written["1"].keys()
    for key in written["4"]:
        torch.testing.assert_close(written["1"][key], written["4"][key], rtol=1e-5, atol=1e-6)
    assert all(written["4"][k].abs().max() > 0 for k in written["4"] if "lora_B" in k)  # B starts at 0: it trained


def stage3_args(model_dir, adapters, prompt_files, out, *extra):
    return ["--model", model_dir, "--teachers", f"geneval={adapters['geneval']},ocr={adapters['ocr']}",
            "--train-prompts", prompt_files["train"], "--test-prompts", prompt_files["test"], "--out", str(out),
            "--rollouts-per-epoch", "4", "--train-batch-size", "4", "--steps", "3", "--eval-steps", "2",
            "--lora-rank", "4", "--lora-alpha", "8", "--eval-every", "1", "--lr", "1e-2", *extra]


def setup_policy(model_dir, adapters, anchor, bf16=False):
    bundle = training.load_model(model_dir)
    policy = training.make_policy(bundle.transformer, 4, 8)
    teacher_of, anchor_name = stage3.load_guides(policy, {"geneval": adapters["geneval"], "ocr": adapters["ocr"]}, anchor)
    args = types.SimpleNamespace(train_batch_size=4, mar_lambda=0.04, guidance=4.5, negative=bundle.encode([""]),
                                 train_bf16=bf16, sample_bf16=bf16, rank=0, world=1, local_batch_size=4, steps=3,
                                 noise_level=0.7, resolution=None, objective="pathwise",
                                 kl_weighting="paper", mar_kl_weighting=None, clip_range=1e-3, gamma=0.0, max_grad_norm=1.0,
                                 updates_per_epoch=None, inner_epochs=1, ema=0.9, steps_per_pass=1)
    return bundle, policy, teacher_of, anchor_name, args


@pytest.mark.parametrize("anchor,guidance", [("base", 4.5), ("quality", 4.5), ("quality", {"geneval": 1.0, "ocr": 4.5})])
def test_mixed_batch_teacher_and_anchor_velocities_equal_each_adapter_alone(tiny_model_dir, adapters, anchor, guidance):
    bundle, policy, teacher_of, anchor_name, args = setup_policy(
        tiny_model_dir, adapters, "base" if anchor == "base" else adapters["quality"], bf16=False)
    args.sample_bf16, args.guidance = True, guidance  # bf16 rollouts; the guides follow the fp32 training precision
    picked = [("a red circle", None), ('a sign that says "AB"', None), ("two blue squares", None), ('"KEY"', None)]
    batch = stage3.sample_epoch(policy, bundle, picked, {"geneval": 1, "ocr": 1}, args, seed=0)
    assert batch["routes"] == ["geneval", "ocr", "geneval", "ocr"]
    scales = [guidance[r] if isinstance(guidance, dict) else guidance for r in batch["routes"]]
    assert batch["guidance"].tolist() == scales  # each trajectory at its task's scale, kept for training
    v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]], anchor_name, args)
    j = 1
    x, sigma = batch["states"][:, j], batch["sigmas"][j]
    for i, route in enumerate(batch["routes"]):
        one = dict(x=x[i:i + 1], sigma=sigma, embeds=batch["embeds"][i:i + 1], pooled=batch["pooled"][i:i + 1],
                   guidance_scale=scales[i], negative=args.negative)
        with torch.no_grad(), loading.use_adapter(policy, teacher_of[route]):
            alone = common.velocity(policy, **one)
        torch.testing.assert_close(v_teacher[i, j], alone[0], atol=1e-5, rtol=1e-5)
        with torch.no_grad(), loading.use_adapter(policy, None if anchor == "base" else "anchor"):
            anchor_alone = common.velocity(policy, **one)
        torch.testing.assert_close(v_anchor[i, j], anchor_alone[0], atol=1e-5, rtol=1e-5)
        with torch.no_grad(), loading.use_adapter(policy, "student"), common.autocast(x.device, True):
            sampler = common.velocity(policy, **{**one, "x": batch["states"][i:i + 1, 0], "sigma": batch["sigmas"][0]})
        torch.testing.assert_close(batch["velocities"][i, 0], sampler[0].float(), atol=2e-2, rtol=2e-2)  # at its scale
    assert not torch.allclose(v_teacher[0, j], v_anchor[0, j], atol=1e-3)  # the adapters do differ


@pytest.mark.parametrize("objective", ["pathwise", "ppo"])
def test_only_the_student_learns_and_the_first_ppo_ratio_is_one(tiny_model_dir, adapters, objective):
    bundle, policy, teacher_of, anchor_name, args = setup_policy(tiny_model_dir, adapters, adapters["quality"])
    args.objective = objective
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".student.lora_B" in n:
                p.normal_(0, 0.01)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    picked = [("a red circle", None), ('a sign that says "AB"', None)] * 4
    batch = stage3.sample_epoch(policy, bundle, picked, {"geneval": 1, "ocr": 1}, args, seed=0)
    v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]], anchor_name, args)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    stats = stage3.train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args)
    assert stats["updates"] == 2 and stats["kl_teacher_geneval"] > 0 and stats["kl_teacher_ocr"] > 0
    assert stats["kl_anchor"] > 0
    if objective == "ppo":
        assert stats["ratio_min"] < 1 or stats["ratio_max"] > 1  # the second chunk is off-policy
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    # the student learns, its published EMA follows each update; teachers and anchor stay as they were
    assert changed and all(".student." in n or ".ema." in n for n in changed), sorted(changed)[:5]
    assert any(".student." in n for n in changed) and any(".ema." in n for n in changed)
    assert all(p.grad is None for n, p in policy.named_parameters() if ".student." not in n)


def test_gradient_accumulation_and_steps_per_pass_give_the_update_of_one_big_batch(tiny_model_dir, adapters):
    """One update over 8 trajectories of 3 steps: one backward chunk of 8 trajectories one step at a time, four
    chunks of 2 accumulated, or several steps of each trajectory in one pass (--steps-per-pass): the same
    guides, statistics and update."""
    before, after, guides, logged = [], [], [], []
    for chunk, steps_per_pass in ((8, 1), (2, 1), (2, 3), (8, 2)):
        torch.manual_seed(0)
        bundle, policy, teacher_of, anchor_name, args = setup_policy(tiny_model_dir, adapters, adapters["quality"])
        args.train_batch_size, args.local_batch_size, args.updates_per_epoch = chunk, chunk, 1
        args.steps_per_pass, args.guidance = steps_per_pass, {"geneval": 1.0, "ocr": 4.5}
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if ".student.lora_B" in n:
                    p.normal_(0, 0.01)
        picked = [("a red circle", None), ('a sign that says "AB"', None)] * 4
        batch = stage3.sample_epoch(policy, bundle, picked, {"geneval": 1, "ocr": 1}, args, seed=0)
        v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]],
                                                      anchor_name, args)
        guides.append((batch["states"], v_teacher, v_anchor))
        before.append({n: p.detach().clone() for n, p in policy.named_parameters() if ".student." in n})
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        stats = stage3.train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args)
        assert stats["updates"] == 1
        logged.append([stats[k] for k in ("loss", "kl_anchor", "kl_teacher_geneval", "kl_teacher_ocr")])
        after.append({n: p.detach().clone() for n, p in policy.named_parameters() if ".student." in n})
    for states, v_teacher, v_anchor in guides[1:]:  # float tolerance: chunked sums and batches round differently
        torch.testing.assert_close(states, guides[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v_teacher, guides[0][1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v_anchor, guides[0][2], atol=1e-4, rtol=1e-4)
    for stats in logged[1:]:
        assert stats == pytest.approx(logged[0], rel=1e-4)
    for other in after[1:]:  # under 1 % of Adam's first step (lr 1e-2 per weight)
        moved = max((after[0][n] - other[n]).abs().max().item() for n in after[0])
        assert moved < 1e-4, moved
    # the update that all four agree on is a real one: Adam's first step moves a weight with a gradient by ~lr
    assert max((after[0][n] - before[0][n]).abs().max().item() for n in after[0]) > 5e-3


def test_merged_sampling_matches_the_adapter_and_restores_the_base_bit_for_bit(tiny_model_dir, adapters):
    """eval.adapter_for_sampling: the adapter merged into the fp32 base for the block samples what the LoRA
    branch samples (within one level of 255), and the base weights are restored exactly."""
    bundle = training.load_model(tiny_model_dir)
    model = evaluation.load_adapters(bundle.transformer, [("a", adapters["geneval"]), ("b", adapters["ocr"])])
    sampler = dataclasses.replace(bundle, transformer=model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = ["a red circle", 'a sign that says "AB"'] * 3

    def images(context, name):
        with context(model, name):
            return evaluation.sample_images(sampler, prompts, list(range(len(prompts))), 4, 4.5, bf16=False).int()
    for name in ("a", "b", None):
        merged, unmerged = images(evaluation.adapter_for_sampling, name), images(loading.use_adapter, name)
        assert (merged - unmerged).abs().max() <= 1 and (merged != unmerged).float().mean() < 0.01
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    assert not torch.equal(images(loading.use_adapter, "a"), images(loading.use_adapter, "b"))


@pytest.mark.parametrize("mar_kl_weighting", [None, "paper"])
def test_the_mar_term_is_measured_in_its_own_kl_weighting(tiny_model_dir, adapters, mar_kl_weighting):
    """--mar-kl-weighting sets the units of M5's KL only; by default they are --kl-weighting's."""
    bundle, policy, teacher_of, anchor_name, args = setup_policy(tiny_model_dir, adapters, adapters["quality"])
    args.kl_weighting, args.mar_kl_weighting, args.updates_per_epoch = "flat", mar_kl_weighting, 1
    picked = [("a red circle", None), ('a sign that says "AB"', None)] * 4
    batch = stage3.sample_epoch(policy, bundle, picked, {"geneval": 1, "ocr": 1}, args, seed=0)
    v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]], anchor_name, args)
    sigmas, steps = batch["sigmas"], len(batch["sigmas"]) - 1
    expected = {w: sum(common.step_kl(batch["velocities"][:, j], v_anchor[:, j], sigmas[j], sigmas[j + 1], sigmas[1],
                                      args.noise_level, w).mean().item() for j in range(steps)) / steps
                for w in ("flat", "paper")}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    stats = stage3.train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args)
    assert stats["kl_anchor"] == pytest.approx(expected[mar_kl_weighting or "flat"], rel=1e-3)
    assert expected["paper"] > 2 * expected["flat"]  # the two units do differ on this sampler


def test_inner_epochs_reuse_the_trajectories_and_log_the_drift(tiny_model_dir, adapters):
    bundle, policy, teacher_of, anchor_name, args = setup_policy(tiny_model_dir, adapters, adapters["quality"])
    args.updates_per_epoch, args.inner_epochs = 2, 3
    picked = [("a red circle", None), ('a sign that says "AB"', None)] * 4
    batch = stage3.sample_epoch(policy, bundle, picked, {"geneval": 1, "ocr": 1}, args, seed=0)
    v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]], anchor_name, args)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    stats = stage3.train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args)
    assert stats["updates"] == 6 and len(stats["kl_to_sampler"]) == 3
    drift = stats["kl_to_sampler"]
    assert drift[0] < drift[1] < drift[2]  # every pass further from the policy that sampled the states
    assert stats["kl_teacher_geneval"] > 0  # logged from the first, on-policy pass
    args.guidance, args.updates_per_epoch, args.inner_epochs = {"geneval": 1.0, "ocr": 4.5}, 1, 1
    batch = stage3.sample_epoch(policy, bundle, picked, {"geneval": 1, "ocr": 1}, args, seed=1)
    v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]], anchor_name, args)
    stats = stage3.train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args)
    assert stats["kl_to_sampler"][0] < 1e-6  # before its one update, the student is its sampler, at each task's scale


def test_stage3_runs_with_mar_off_and_resume_reproduces_the_next_epoch(tiny_model_dir, adapters, prompt_files, tmp_path):
    stage3.main(stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path / "nomar", "--epochs", "1",
                            "--mar-lambda", "0", "--objective", "ppo", "--gamma", "0.9"))
    log = [json.loads(line) for line in open(tmp_path / "nomar" / "log.jsonl")]
    assert log[1]["kl_anchor"] == 0 and log[1]["ratio_min"] == log[1]["ratio_max"] == 1.0
    common_args = ("--anchor", adapters["quality"], "--init", adapters["geneval"], "--schedule", "epoch")
    stage3.main(stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path / "full", "--epochs", "2", *common_args))
    stage3.main(stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path / "part", "--epochs", "1", *common_args))
    stage3.main(stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path / "part", "--epochs", "2", "--resume",
                            *common_args))
    full = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    part = [json.loads(line) for line in open(tmp_path / "part" / "log.jsonl")]
    assert [r.get("task") for r in full] == [None, "geneval", "ocr"]
    for key in ("loss", "kl_teacher_ocr", "kl_anchor", "eval"):
        assert part[2][key] == full[2][key], key
    assert os.path.isfile(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "full" / "samples_epoch0002.png")


def test_task_shares_draw_exact_counts_and_the_default_keeps_its_random_stream():
    items = {"geneval": [("g", i) for i in range(50)], "ocr": [("o", i) for i in range(50)]}
    for count, shares, expected in [(32, {"geneval": 2, "ocr": 1}, 21), (32, {"geneval": 1, "ocr": 1}, 16),
                                    (7, {"geneval": 1, "ocr": 0}, 7), (5, {"geneval": 0.5, "ocr": 0.5}, 3)]:  # a tie: first task
        for seed in range(5):
            picked = stage3.draw_prompts(items, count, random.Random(seed), shares=shares)
            assert len(picked) == count and sum(p[0] == "g" for p in picked) == expected  # 32*2/3 = 21.33 -> 21
    orders = {tuple(p[0] for p in stage3.draw_prompts(items, 8, random.Random(s), shares={"geneval": 1, "ocr": 1}))
              for s in range(5)}
    assert len(orders) > 1  # shuffled, not task-sorted
    counts = [sum(p[0] == "g" for p in stage3.draw_prompts(items, 32, random.Random(s))) for s in range(20)]
    assert len(set(counts)) > 1  # the default draws each prompt's task, so the mix varies
    rng = random.Random(3)  # the default's stream is the original interleaved task, item draws
    expected = [(lambda t: items[t][rng.randrange(50)])(["geneval", "ocr"][rng.randrange(2)]) for _ in range(6)]
    assert stage3.draw_prompts(items, 6, random.Random(3)) == expected
    assert stage3.parse_task_shares("geneval=2,ocr=1", items) == {"geneval": 2.0, "ocr": 1.0}
    assert stage3.parse_task_numbers("2.5", items, "--guidance", "") == {"geneval": 2.5, "ocr": 2.5}
    for text, match in [("geneval=2", "expected one number for each training task"),
                        ("geneval=0,ocr=0", "all zero"), ("geneval=-1,ocr=1", "is -1.0; expected a number >= 0"),
                        ("geneval=two,ocr=1", "'two' of 'geneval' in --task-shares")]:
        with pytest.raises(loading.UserError, match=match):
            stage3.parse_task_shares(text, items)


def test_stage3_bad_input_is_a_clear_error(tiny_model_dir, adapters, prompt_files, tmp_path):
    def run(*extra, teachers=None):
        argv = stage3_args(tiny_model_dir, adapters, prompt_files, tmp_path, "--epochs", "1", *extra)
        if teachers:
            argv[argv.index("--teachers") + 1] = teachers
        stage3.main(argv)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        run(teachers=f"geneval={adapters['geneval']},ocr={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="routes to task 'ocr', but the teachers are \\['geneval'\\]"):
        run(teachers=f"geneval={adapters['geneval']}")
    with pytest.raises(SystemExit):
        run("--mar-lambda", "-1")
    with pytest.raises(loading.UserError, match="--guidance 'geneval=1' names \\['geneval'\\]; expected one number for each"):
        run("--guidance", "geneval=1")


def test_best_of_n_keeps_each_prompts_best_sample_and_caches_them(tiny_model_dir, prompt_files, tmp_path):
    argv = ["bestofn", "--model", tiny_model_dir, "--reward", "task", "--train-prompts", prompt_files["train"],
            "--samples-per-task", "2", "--n", "3", "--sample-steps", "2", "--train-steps", "2", "--batch-size", "2",
            "--lora-rank", "4", "--lora-alpha", "8", "--out", str(tmp_path / "bon")]
    stage2.main(argv)
    cached = torch.load(tmp_path / "bon" / "samples.pt")
    assert len(cached["prompts"]) == 4 and cached["latents"].shape[0] == 4
    assert (cached["best"] >= cached["mean"]).all()
    log = [json.loads(line) for line in open(tmp_path / "bon" / "log.jsonl")]
    assert log[0]["n"] == 3 and len(log) == 3
    def no_sampling(*args, **kwargs):
        raise AssertionError("a rerun sampled again instead of refitting from the cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage2, "best_of_n_samples", no_sampling)
        stage2.main(argv)  # a rerun refits from the cached samples
    assert torch.equal(torch.load(tmp_path / "bon" / "samples.pt")["latents"], cached["latents"])
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        stage2.main([*argv[:4], "aesthetic", *argv[5:]])


def test_best_of_n_keeps_the_sample_its_reward_ranks_first(tiny_model_dir, prompt_files, tmp_path):
    """bestofn --reward quality (continuous, so the ranking is not a tie) against the candidates sampled and scored
    here: each prompt's n base samples at seeds seed + 1000 i + k, scored by miniature.world.score."""
    stage2.main(["bestofn", "--model", tiny_model_dir, "--reward", "quality", "--train-prompts", prompt_files["train"],
                 "--samples-per-task", "2", "--n", "3", "--sample-steps", "2", "--train-steps", "1", "--batch-size", "2",
                 "--lora-rank", "4", "--lora-alpha", "8", "--sample-precision", "fp32", "--out", str(tmp_path / "bon")])
    cached = torch.load(tmp_path / "bon" / "samples.pt")
    bundle = training.load_model(tiny_model_dir)
    sigmas = common.sampling_sigmas(bundle.scheduler, 2)
    for i, prompt in enumerate(cached["prompts"]):
        embeds, pooled = bundle.encode([prompt] * 3)
        run = common.rollout(bundle.transformer, embeds, pooled, bundle.latent_shape(bundle.resolution), sigmas,
                             [1000 * i + k for k in range(3)], 0.0, bundle.defaults["guidance_scale"],
                             bundle.encode([""]), bundle.decode)
        scores = torch.as_tensor(miniature.world.score(run["images"], [prompt] * 3, names=("quality",))["quality"])
        assert scores.max() > scores.min()  # a real ranking
        assert cached["best"][i].item() == pytest.approx(scores.max().item(), abs=1e-6)
        assert cached["mean"][i].item() == pytest.approx(scores.mean().item(), abs=1e-6)
        torch.testing.assert_close(cached["latents"][i], run["states"][scores.argmax(), -1], atol=1e-5, rtol=1e-5)
