"""Stage 1 (Flow-GRPO, M2): advantages, the PPO-clip loss, one tiny epoch, resume, bad input."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import common
import loading
import rewards
import stage1_grpo as stage1
from conftest import cli_error
import training
import miniature.world


def test_group_advantages_per_prompt_mean_global_std():
    rewards = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0]
    advantages, informative = stage1.group_advantages(rewards, [0, 0, 0, 1, 1, 1])
    std = np.std(rewards) + 1e-4
    np.testing.assert_allclose(advantages, [-1 / std, 0, 1 / std, 0, 0, 0])
    assert informative.tolist() == [True, True, True, False, False, False]


def test_ppo_clip_loss_on_hand_made_numbers():
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, ratio = stage1.ppo_clip_loss(log_prob, old, advantages, clip_range=0.2)
    # max(-A r, -A clip(r)): -1.2 (capped gain), 1.5 (full penalty), -0.5, 0.8
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    torch.testing.assert_close(ratio, torch.tensor([1.5, 1.5, 0.5, 0.5]))


def test_mixing_rules():
    scores = {"geneval": np.array([1.0, 0.0, np.nan, np.nan]), "ocr": np.array([np.nan, np.nan, 1.0, 0.5])}
    weights = {"geneval": 0.5, "ocr": 0.5}
    np.testing.assert_allclose(stage1.combine_rewards(scores, weights), [0.5, 0.0, 0.5, 0.25])
    advantages, informative = stage1.mixed_advantages(scores, weights, [0, 0, 1, 1])
    assert advantages[0] > 0 > advantages[1] and advantages[2] > 0 > advantages[3] and informative.all()


def test_parse_rewards_and_its_errors():
    assert stage1.parse_rewards("geneval") == {"geneval": 1.0}
    assert stage1.parse_rewards("geneval=0.5,ocr=0.5") == {"geneval": 0.5, "ocr": 0.5}
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        stage1.parse_rewards("aesthetic")
    with pytest.raises(ValueError, match="weight 'half' of 'ocr'.*not a number"):
        stage1.parse_rewards("geneval=0.5,ocr=half")


def test_evaluation_schedule_every_k_or_at_named_epochs():
    import argparse

    def due(epochs=12, **kw):
        args = argparse.Namespace(epochs=epochs, **{"eval_every": 5, "eval_at": None, **kw})
        return [e for e in range(epochs + 1) if training.evaluation_due(args, e)]
    assert due() == [0, 5, 10, 12]  # every --eval-every epochs and the last
    assert due(eval_every=0) == []
    assert due(eval_at=training.epoch_list("4,8")) == [4, 8]  # pipeline.py: the ends are eval.py's rows
    assert due(eval_at=training.epoch_list("")) == []
    for bad in ("4;8", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            training.epoch_list(bad)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    train, test = folder / "train_metadata.jsonl", folder / "test_metadata.jsonl"
    items = miniature.world.all_geneval_items("colors") + miniature.world.all_geneval_items("counting")
    random.Random(0).shuffle(items)
    train.write_text("".join(json.dumps(m) + "\n" for m in items[:12]))
    test.write_text("".join(json.dumps(m) + "\n" for m in items[12:16]))
    return str(train), str(test)


def tiny_args(model_dir, prompt_files, out, *extra):
    return ["--model", model_dir, "--reward", "geneval", "--train-prompts", prompt_files[0],
            "--test-prompts", prompt_files[1], "--out", str(out), "--prompts-per-epoch", "2", "--group-size", "4",
            "--steps", "3", "--train-batch-size", "4", "--eval-steps", "2", "--lora-rank", "4", "--lora-alpha", "8",
            "--eval-every", "1", "--lr", "1e-2", *extra]


def tiny_epoch_setup(model_dir, prompt_files, out):
    """stage1's args and model as main() sets them up (the device's defaults), for epochs driven by hand."""
    args = stage1.parse_args(tiny_args(model_dir, prompt_files, out))
    args.rewards = stage1.parse_rewards(args.reward)
    args.rank, args.world, args.local_batch_size = 0, 1, args.train_batch_size
    bundle = training.load_model_from_args(args)
    args.score, args.eval_rewards = rewards.from_args(args, bundle)
    args.guidance, args.eval_guidance, args.eval_steps = 4.5, 4.5, 2
    args.negative = bundle.encode([""])
    return args, bundle


def check_one_tiny_epoch(args, bundle, prompt_files):
    """One epoch by hand: the first update recomputes the rollout's log-probs bit for bit (ratio 1), the
    second chunk is off-policy, and only LoRA weights change. Returns the policy."""
    base = {n: p.detach().clone() for n, p in bundle.transformer.named_parameters()}
    policy = loading.add_lora(bundle.transformer, 4, 8)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)  # a non-trivial policy
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    items = loading.load_prompts(prompt_files[0])
    batch = stage1.sample_epoch(policy, bundle, items, args.rewards, args, random.Random(0), seed=0)
    reward, advantages, informative = stage1.advantages_of(batch, args.rewards, "sum")
    assert batch["states"].shape[:2] == (8, 4) and batch["log_probs"].shape == (8, 3)
    ones = torch.ones(4, device=args.device)
    for j in range(2):
        _, _, ratio = stage1.policy_step_loss(policy, batch, torch.arange(4), j, ones, args)
        assert torch.equal(ratio, ones), j
    informative[:] = True  # a random model may give a zero-variance group; train on everything here
    advantages = np.where(advantages == 0, 1.0, advantages)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    stats = stage1.train_on_epoch(policy, batch, advantages, informative, optimizer, args)
    assert stats["updates"] == 2 and math.isfinite(stats["loss"])
    assert stats["ratio_min"] != 1 or stats["ratio_max"] != 1  # the second chunk is off-policy
    changed = {n for n, p in policy.named_parameters() if "lora_" in n and not torch.equal(p, lora_before[n])}
    assert changed and all("lora_" in n for n in changed)
    for n, p in policy.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    return policy


def test_one_tiny_epoch_changes_only_lora_weights_and_starts_at_ratio_one(tiny_model_dir, prompt_files, tmp_path):
    check_one_tiny_epoch(*tiny_epoch_setup(tiny_model_dir, prompt_files, tmp_path), prompt_files)


def test_resume_reproduces_the_next_epoch(tiny_model_dir, prompt_files, tmp_path):
    # quality is continuous, so every group has a spread and both epochs update (geneval on a random model would not)
    quality = ("--reward", "quality")
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "full", *quality, "--epochs", "2"))
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "part", *quality, "--epochs", "1"))
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "part", *quality, "--epochs", "2", "--resume"))
    full = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    part = [json.loads(line) for line in open(tmp_path / "part" / "log.jsonl")]
    assert [r["epoch"] for r in part] == [0, 1, 2] and "eval" in part[0]
    assert full[1]["updates"] > 0 and full[2]["updates"] > 0 and full[2]["skipped_groups"] == 0
    from safetensors.torch import load_file
    weights = [load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("full", "part")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for key in ("reward_mean", "loss", "kl", "ratio_min", "ratio_max", "eval"):
        assert part[2].get(key) == full[2].get(key), key
    assert os.path.isfile(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "full" / "samples_epoch0002.png")


def test_bad_input_is_a_clear_error(tiny_model_dir, prompt_files, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--reward", "aesthetic"))
    with pytest.raises(ValueError, match="not a number"):
        stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--reward", "geneval=x"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--train-prompts", str(tmp_path / "missing.jsonl")))
    assert "argument --nft-shift: '-1' is not a finite number > 0" in cli_error(
        stage1.main, tiny_args(tiny_model_dir, prompt_files, tmp_path, "--objective", "nft", "--nft-shift", "-1"), capsys)
    with pytest.raises(ValueError, match="--nft-times, --nft-guidance only apply to --objective nft"):
        stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--nft-times", "2", "--nft-guidance", "4.5"))
    with pytest.raises(ValueError, match="--nft-beta only apply to --objective nft"):  # even at its default value
        stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--nft-beta", "1.0"))
    assert "argument --nft-old-decay: '1' is not a number in [0, 1)" in cli_error(
        stage1.main, tiny_args(tiny_model_dir, prompt_files, tmp_path, "--objective", "nft", "--nft-old-decay", "1"), capsys)
    assert "argument --nft-old-ramp: '-2' is not an integer >= 0" in cli_error(
        stage1.main, tiny_args(tiny_model_dir, prompt_files, tmp_path, "--objective", "nft", "--nft-old-ramp", "-2"), capsys)
    with pytest.raises(ValueError, match="--nft-old-ramp 5 ramps --nft-old-decay, which is 0"):
        stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--objective", "nft", "--nft-old-ramp", "5"))
    for flag in ("--train-precision", "--sample-precision", "--eval-precision"):  # autocast off on bf16 weights
        with pytest.raises(ValueError, match=f"{flag} fp32 needs fp32 base weights"):
            stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--model-dtype", "bfloat16", flag, "fp32"))


def test_eval_puts_base_and_adapters_in_one_table(tiny_model_dir, prompt_files, tmp_path):
    import eval as evaluate
    # quality: every group has a spread, so the epoch updates and the adapter differs from the base
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "run", "--reward", "quality", "--epochs", "1"))
    adapter = str(tmp_path / "run" / "adapter")
    evaluate.main(["--model", tiny_model_dir, "--adapters", f"a={adapter},b={adapter}", "--test-prompts",
                   prompt_files[1], "--steps", "2", "--out", str(tmp_path / "eval")])
    rows = json.load(open(tmp_path / "eval" / "eval.json"))
    assert [r["model"] for r in rows] == ["base", "a", "b"] and rows[0]["adapter"] is None
    assert {r["eval_precision"] for r in rows} == {"fp32"}  # on fp32 weights, whatever the CPU: reproducible scores
    for key in ("geneval_acc", "geneval", "quality", "average", "geneval/colors"):
        assert rows[1][key] == rows[2][key], key  # the same adapter, prompts and seeds give the same row
    assert rows[1]["quality"] != rows[0]["quality"]  # the adapter's row is its own, not the base's again
    assert "| a |" in open(tmp_path / "eval" / "table.md").read()
    assert os.path.isfile(tmp_path / "eval" / "grid.png")
    with pytest.raises(ValueError, match="row name 'ema0.5' in --adapters has a '.'"):
        evaluate.main(["--model", tiny_model_dir, "--adapters", f"ema0.5={adapter}", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="adapter folder .*nope"):
        evaluate.main(["--model", tiny_model_dir, "--adapters", f"x={tmp_path / 'nope'}", "--out", str(tmp_path)])


def test_resume_from_a_checkpoint_of_another_lora_is_a_clear_error(tiny_model_dir, prompt_files, tmp_path):
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "run", "--epochs", "1"))
    with pytest.raises(ValueError, match="does not fit this model and LoRA"):
        stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "run", "--epochs", "2", "--resume",
                              "--lora-rank", "8"))


def test_sde_window_shares_a_group_start_and_trains_only_window_steps(tiny_model_dir, prompt_files, tmp_path):
    args = stage1.parse_args(tiny_args(tiny_model_dir, prompt_files, tmp_path, "--sde-window", "1", "--steps", "4"))
    args.rewards = stage1.parse_rewards(args.reward)
    args.rank, args.world, args.local_batch_size = 0, 1, args.train_batch_size
    bundle = training.load_model_from_args(args)
    args.score, args.eval_rewards = rewards.from_args(args, bundle)
    args.guidance, args.negative = 4.5, bundle.encode([""])
    policy = training.make_policy(bundle.transformer, 4, 8)
    batch = stage1.sample_epoch(policy, bundle, loading.load_prompts(prompt_files[0]), args.rewards, args,
                                random.Random(0), seed=0)
    (j,) = batch["trained_steps"]
    assert 0 <= j < 2  # the window lies in the first half
    states, groups = batch["states"], batch["groups"]
    same_group = torch.as_tensor(groups[:, None] == groups[None, :])
    for step in range(j + 1):  # identical until the window's noise, distinct after it within a group
        assert torch.equal(states[:4, step], states[:1, step].expand(4, *states.shape[2:]))
    assert not torch.equal(states[0, j + 1], states[1, j + 1]) and same_group[0, 1]
    assert not torch.equal(states[0, 0], states[4, 0])  # groups start apart
    log_probs = batch["log_probs"]
    assert (log_probs[:, [s for s in range(4) if s != j]] == 0).all() and (log_probs[:, j] != 0).all()
    _, _, ratio = stage1.policy_step_loss(policy, batch, torch.arange(4), j, torch.ones(4), args)
    assert torch.equal(ratio, torch.ones(4))


def test_nft_loss_gradient_minimum_and_optimality():
    torch.manual_seed(0)
    v_old, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    r = torch.tensor([0.0, 0.25, 0.5, 1.0])
    for beta in (1.0, 0.3):
        v = v_old.clone().requires_grad_(True)
        stage1.nft_loss(v, v_old, target, r, beta).sum().backward()
        # at v = v_old: 2 beta (2r - 1)(v_old - u), per dimension of the mean over 12 dimensions
        expected = 2 * beta * (2 * r - 1).view(-1, 1, 1, 1) * (v_old - target) / 12
        torch.testing.assert_close(v.grad, expected)
        assert v.grad[2].abs().max() < 1e-7  # r = 1/2: no signal (float rounding only)
        best = (v_old + (2 * r - 1).view(-1, 1, 1, 1) * (target - v_old) / beta).requires_grad_(True)
        stage1.nft_loss(best, v_old, target, r, beta).sum().backward()
        torch.testing.assert_close(best.grad, torch.zeros_like(best), atol=1e-6, rtol=0)
    np.testing.assert_allclose(stage1.optimality(np.array([-3.0, -0.5, 0.0, 0.5, 3.0])), [0, 0.25, 0.5, 0.75, 1])


def test_nft_kl_moves_the_minimum_towards_the_base_as_its_docstring_says():
    """nft_loss + kappa nft_kl, minimised by gradient descent, lands on the closed form; kappa = 0 is plain NFT."""
    torch.manual_seed(0)
    v_old, target, v_base = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    r, beta = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(-1, 1, 1, 1), 0.7
    for kappa in (0.0, 0.5, 4.0):
        v = v_old.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([v], lr=2.0)
        for _ in range(2000):
            optimizer.zero_grad()
            (stage1.nft_loss(v, v_old, target, r.flatten(), beta) + kappa * stage1.nft_kl(v, v_base)).sum().backward()
            optimizer.step()
        closed = (beta**2 * v_old + beta * (2 * r - 1) * (target - v_old) + kappa * v_base) / (beta**2 + kappa)
        torch.testing.assert_close(v.detach(), closed, atol=1e-4, rtol=0)
    torch.testing.assert_close(stage1.nft_kl(v_base + 2, v_base), torch.full((4,), 4.0))


def test_old_decay_ramps_linearly_then_holds():
    assert [stage1.old_decay(epoch, 0.5, 4) for epoch in (1, 2, 3, 5, 9)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert [stage1.old_decay(epoch, 0.5, 0) for epoch in (1, 2, 50)] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nft_epoch_fits_the_velocity_of_its_guidance(tiny_model_dir, guidance):
    """At the first update the policy is its sampling policy (v = v_old), so each sample's nft_loss is
    mean (v_old - u)^2 whatever r: the logged loss is the error of the velocity fitted, the CFG one
    with --nft-guidance w (a conditional-only fit gives another number on this random model)."""
    import argparse
    bundle = training.load_model(tiny_model_dir)
    policy = training.make_policy(bundle.transformer, rank=4, alpha=8)
    policy.add_adapter("old", policy.peft_config["student"])
    loading.freeze_all_but(policy, "student")
    embeds, pooled = bundle.encode(["a red circle", "a blue square"])
    x0 = torch.randn(2, *bundle.latent_shape(bundle.resolution), generator=torch.Generator().manual_seed(1))
    negative = bundle.encode([""])
    args = argparse.Namespace(nft_times=1, train_batch_size=2, world=1, rank=0, shift=3.0, train_bf16=False,
                              nft_beta=1.0, nft_guidance=guidance, negative=negative, max_grad_norm=1.0, ema=0.9,
                              nft_kl=0.0)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    stats = stage1.train_nft_epoch(policy, {"states": x0[:, None], "embeds": embeds, "pooled": pooled},
                                   np.array([1.0, -1.0]), np.array([True, True]), optimizer, args)
    torch.manual_seed(0)  # the same training times and noise as the epoch drew
    sigma = common.training_sigmas(2, 3.0)
    noise = torch.randn_like(x0)
    with torch.no_grad(), loading.use_adapter(policy, "old"):
        v_old = common.velocity(policy, common.forward_noise(x0, sigma, noise), sigma, embeds, pooled, guidance, negative)
    assert stats["updates"] == 1
    assert stats["loss"] == pytest.approx(((v_old - (noise - x0)) ** 2).flatten(1).mean(1).mean().item(), rel=1e-5)


def test_nft_epoch_adds_kappa_times_the_kl_to_the_base_with_the_adapter_disabled(tiny_model_dir):
    import argparse
    bundle = training.load_model(tiny_model_dir)
    policy = training.make_policy(bundle.transformer, rank=4, alpha=8)
    policy.add_adapter("old", policy.peft_config["student"])
    loading.freeze_all_but(policy, "student")
    with torch.no_grad():  # a student (and sampling policy) away from the base, so the KL is not zero
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    embeds, pooled = bundle.encode(["a red circle", "a blue square"])
    x0 = torch.randn(2, *bundle.latent_shape(bundle.resolution), generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(nft_times=1, train_batch_size=2, world=1, rank=0, shift=3.0, train_bf16=False,
                              nft_beta=1.0, nft_guidance=1.0, negative=bundle.encode([""]), max_grad_norm=1.0,
                              ema=0.9, nft_kl=0.5)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    torch.manual_seed(0)
    stats = stage1.train_nft_epoch(policy, {"states": x0[:, None], "embeds": embeds, "pooled": pooled},
                                   np.array([1.0, -1.0]), np.array([True, True]), optimizer, args)
    torch.manual_seed(0)
    sigma = common.training_sigmas(2, 3.0)
    x_sigma = common.forward_noise(x0, sigma, torch.randn_like(x0))
    with torch.no_grad(), loading.use_adapter(policy, "student"):
        v = common.velocity(policy, x_sigma, sigma, embeds, pooled, 1.0, None)
    with torch.no_grad(), loading.use_adapter(policy, None):
        v_base = common.velocity(policy, x_sigma, sigma, embeds, pooled, 1.0, None)
    kl = ((v - v_base) ** 2).flatten(1).mean(1).mean().item()
    assert kl > 1e-6 and stats["kl"] == pytest.approx(kl, rel=1e-5)
    args.nft_kl = 0.0
    torch.manual_seed(0)
    plain = stage1.train_nft_epoch(policy, {"states": x0[:, None], "embeds": embeds, "pooled": pooled},
                                   np.array([1.0, -1.0]), np.array([True, True]), optimizer, args)
    assert plain["kl"] == 0.0 and stats["loss"] == pytest.approx(plain["loss"] + 0.5 * kl, rel=1e-5)


def test_nft_objective_samples_odes_trains_lora_and_resumes_exactly(tiny_model_dir, prompt_files, tmp_path):
    # quality is continuous, so groups vary; a soft-updated sampling policy must be checkpointed to resume exactly
    nft = ("--objective", "nft", "--nft-times", "2", "--reward", "quality", "--nft-old-decay", "0.5")
    # (from epoch 3 on: until then "old" is the fresh LoRA a restart also begins with)
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "full", *nft, "--epochs", "3"))
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "part", *nft, "--epochs", "2"))
    stage1.main(tiny_args(tiny_model_dir, prompt_files, tmp_path / "part", *nft, "--epochs", "3", "--resume"))
    full = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    part = [json.loads(line) for line in open(tmp_path / "part" / "log.jsonl")]
    assert full[1]["updates"] > 0 and math.isfinite(full[1]["loss"]) and "ratio_min" not in full[1]
    for key in ("reward_mean", "loss", "updates", "eval"):
        assert part[3].get(key) == full[3].get(key), key
    hard = tmp_path / "hard"  # eta 0: epoch 2 samples with the student instead of the average of both epochs' starts
    stage1.main(tiny_args(tiny_model_dir, prompt_files, hard, *nft[:-2], "--epochs", "2", "--eval-every", "0"))
    hard = [json.loads(line) for line in open(hard / "log.jsonl")]
    assert hard[1]["reward_mean"] == full[1]["reward_mean"] and hard[1]["loss"] == full[1]["loss"]
    assert hard[2]["reward_mean"] != full[2]["reward_mean"]
    ramp = tmp_path / "ramp"  # --nft-old-ramp 2: eta 0.25 before epoch 2, between the two runs above
    stage1.main(tiny_args(tiny_model_dir, prompt_files, ramp, *nft, "--nft-old-ramp", "2", "--epochs", "2", "--eval-every", "0"))
    ramp = [json.loads(line) for line in open(ramp / "log.jsonl")]
    assert ramp[1]["reward_mean"] == full[1]["reward_mean"]
    assert ramp[2]["reward_mean"] not in (full[2]["reward_mean"], hard[2]["reward_mean"])
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # the published EMA moved


def test_eval_samples_per_prompt_repeats_prompts_with_new_seeds(tiny_model_dir, prompt_files, tmp_path, capsys):
    import eval as evaluate
    common_args = ["--model", tiny_model_dir, "--test-prompts", prompt_files[1], "--steps", "2"]
    evaluate.main([*common_args, "--samples-per-prompt", "3", "--out", str(tmp_path / "k3")])
    (three,) = json.load(open(tmp_path / "k3" / "eval.json"))
    assert three["samples_per_prompt"] == 3
    singles = []
    for seed in (0, 4, 8):  # 4 test prompts: sample k of prompt i has seed i + 4k, whatever the batch
        evaluate.main([*common_args, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}")])
        singles.append(json.load(open(tmp_path / f"s{seed}" / "eval.json"))[0])
    assert len({s["quality"] for s in singles}) == 3  # the seeds give different images
    for key in ("quality", "geneval"):  # equal up to float32 rounding: AVX-512 kernels round a batch of 12 and of 4 differently
        assert three[key] == pytest.approx(np.mean([s[key] for s in singles]), abs=1e-6), key
    assert "argument --samples-per-prompt: '0' is not a positive integer" in cli_error(
        evaluate.main, [*common_args, "--samples-per-prompt", "0", "--out", str(tmp_path / "k0")], capsys)


def test_nft_mix_trains_on_the_mixed_reward(tiny_model_dir, tmp_path, monkeypatch):
    """The nft-mix baseline: DiffusionNFT's update on GRPO-Mix's reward, 0.5 GenEval + 0.5 OCR per image
    (a reward that does not judge a prompt counts 0), with group advantages of that sum."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "g.jsonl").write_text("".join(json.dumps(m) + "\n" for m in miniature.world.all_geneval_items("colors")[:2]))
    (folder / "o.txt").write_text(miniature.world.ocr_prompt("AB") + "\n" + miniature.world.ocr_prompt("KEY") + "\n")
    seen = {}
    sample, train = stage1.sample_epoch, stage1.train_nft_epoch

    def keep_batch(*args, **kwargs):
        seen["batch"] = sample(*args, **kwargs)
        return seen["batch"]

    def keep_advantages(policy, batch, advantages, informative, optimizer, args):
        seen["advantages"] = advantages
        return train(policy, batch, advantages, informative, optimizer, args)
    monkeypatch.setattr(stage1, "sample_epoch", keep_batch)
    monkeypatch.setattr(stage1, "train_nft_epoch", keep_advantages)
    stage1.main(["--model", tiny_model_dir, "--reward", "geneval=0.5,ocr=0.5", "--objective", "nft",
                 "--train-prompts", f"{folder / 'g.jsonl'},{folder / 'o.txt'}", "--test-prompts", str(folder / "o.txt"),
                 "--prompts-per-epoch", "4", "--group-size", "2", "--steps", "2", "--train-batch-size", "4",
                 "--epochs", "1", "--eval-every", "0", "--lora-rank", "4", "--lora-alpha", "8", "--out", str(tmp_path / "run")])
    scores, groups = seen["batch"]["scores"], seen["batch"]["groups"]
    assert np.isnan(scores["ocr"]).any() and np.isnan(scores["geneval"]).any()  # both tasks in the batch
    mixed = 0.5 * np.nan_to_num(scores["geneval"]) + 0.5 * np.nan_to_num(scores["ocr"])
    np.testing.assert_allclose(seen["advantages"], stage1.group_advantages(mixed, groups)[0])


def test_mix_advantage_is_each_rewards_group_advantage_on_its_own_samples_weighted_and_summed():
    """--mix advantage (MixGRPO) by hand: GenEval scores only its two groups, OCR only its one; each reward's
    advantages use its own samples' global std; a group with no spread in a reward carries none of its signal."""
    scores = {"geneval": np.array([1.0, 0.0, 0.5, 0.5, np.nan, np.nan]),
              "ocr": np.array([np.nan, np.nan, np.nan, np.nan, 0.2, 0.8])}
    groups = [0, 0, 1, 1, 2, 2]
    advantages, informative = stage1.mixed_advantages(scores, {"geneval": 0.3, "ocr": 2.0}, groups)
    g_std = np.array([1.0, 0.0, 0.5, 0.5]).std() + 1e-4  # 0.35355...
    o_std = np.array([0.2, 0.8]).std() + 1e-4  # 0.3
    expected = [0.3 * 0.5 / g_std, -0.3 * 0.5 / g_std, 0.0, 0.0, 2.0 * -0.3 / o_std, 2.0 * 0.3 / o_std]
    np.testing.assert_allclose(advantages, expected, rtol=1e-12)
    assert informative.tolist() == [True, True, False, False, True, True]
    summed, _ = stage1.group_advantages(stage1.combine_rewards(scores, {"geneval": 0.3, "ocr": 2.0}), groups)
    assert not np.allclose(summed, expected)  # --mix sum normalises the summed reward instead: another rule


def test_mix_alternate_trains_one_task_per_epoch_on_its_own_prompts_and_reward(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "g.jsonl").write_text("".join(json.dumps(m) + "\n" for m in miniature.world.all_geneval_items("colors")[:2]))
    (folder / "o.txt").write_text(miniature.world.ocr_prompt("AB") + "\n" + miniature.world.ocr_prompt("KEY") + "\n")
    seen, sample = [], stage1.sample_epoch

    def keep(policy, bundle, items, rewards, args, rng, seed):
        seen.append(({'"' in p for p, _ in items}, dict(rewards)))
        return sample(policy, bundle, items, rewards, args, rng, seed)
    monkeypatch.setattr(stage1, "sample_epoch", keep)
    stage1.main(["--model", tiny_model_dir, "--reward", "geneval=0.5,ocr=0.5", "--mix", "alternate",
                 "--train-prompts", f"{folder / 'g.jsonl'},{folder / 'o.txt'}", "--test-prompts", str(folder / "o.txt"),
                 "--prompts-per-epoch", "2", "--group-size", "2", "--steps", "2", "--train-batch-size", "4",
                 "--epochs", "3", "--eval-every", "0", "--lora-rank", "4", "--lora-alpha", "8", "--out", str(tmp_path / "run")])
    assert seen == [({False}, {"geneval": 1.0}), ({True}, {"ocr": 1.0}), ({False}, {"geneval": 1.0})]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")][1:]
    assert ["reward_geneval" in r and "reward_ocr" not in r for r in log] == [True, False, True]
