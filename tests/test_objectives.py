"""Each stage's training step against its stated objective (docs/method.md), the reference computed by hand,
step by step and trajectory by trajectory, with its own KL formula and its own guided forward passes."""
import json
import math
import os

import numpy as np
import pytest
import torch

import stage3_opd as stage3
from test_stage3 import adapters, prompt_files, setup_policy, stage3_args  # noqa: F401 (fixtures)


def hand_kl(v_student, v_other, sigma, sigma_next, sigma_1, a, weighting):
    """M3 written out: (|D| / 2) (c / s)^2 ||v_s - v_o||^2 (paper) or (|D| / 2) ||v_s - v_o||^2 (flat)."""
    sigma, sigma_next, sigma_1 = float(sigma), float(sigma_next), float(sigma_1)
    s = a * math.sqrt(sigma / (1 - (sigma_1 if sigma == 1 else sigma)))
    c = 1 + s**2 * (1 - sigma) / (2 * sigma)
    weight = abs(sigma_next - sigma) / 2 * ((c / s) ** 2 if weighting == "paper" else 1.0)
    return weight * ((v_student.float() - v_other.float()) ** 2).sum()


def guided(policy, x, sigma, embeds, pooled, negative, w):
    """v_u + w (v_c - v_u) by two plain forward passes of one sample (M0)."""
    def forward(e, p):
        return policy(hidden_states=x[None], timestep=torch.tensor([1000 * float(sigma)]), encoder_hidden_states=e,
                      pooled_projections=p, return_dict=False)[0][0]
    v_cond = forward(embeds[None], pooled[None])
    return v_cond if w == 1 else forward(*negative) + w * (v_cond - forward(*negative))


def test_stage3_update_is_the_gradient_of_the_routed_kl_plus_mar_and_logs_its_parts(tiny_model_dir, adapters):
    """One update of train_on_rollouts (pathwise, two chunks, two steps per pass, guidance per task, MAR with its
    own weighting) against L = mean_i mean_j [KL_j(student || teacher_R(c_i)) + lambda KL_j(student || anchor)]
    (M3-M5): the same value, the same gradient (SGD with lr 1 makes the update minus the gradient), and the
    logged KL to each task's teacher averaged over that task's trajectories only."""
    torch.manual_seed(0)
    bundle, policy, teacher_of, anchor_name, args = setup_policy(tiny_model_dir, adapters, adapters["quality"])
    args.guidance, args.mar_lambda, args.mar_kl_weighting = {"geneval": 1.0, "ocr": 3.0}, 0.5, "flat"
    args.train_batch_size, args.steps_per_pass, args.updates_per_epoch, args.max_grad_norm = 2, 2, 1, 1e9
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".student.lora_B" in n:
                p.normal_(0, 0.01)
    picked = [("a red circle", None), ("two blue squares", None), ('a sign that says "AB"', None),
              ("a green triangle", None)]
    batch = stage3.sample_epoch(policy, bundle, picked, {"geneval": 1, "ocr": 1}, args, seed=0)
    v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]],
                                                  anchor_name, args)
    student = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in student.items()}

    states, sigmas, steps = batch["states"], batch["sigmas"], len(batch["sigmas"]) - 1
    loss, per_task, anchor_sum = 0.0, {"geneval": [], "ocr": []}, 0.0
    for i, route in enumerate(batch["routes"]):
        teacher_sum = 0.0
        for j in range(steps):
            v = guided(policy, states[i, j], sigmas[j], batch["embeds"][i], batch["pooled"][i], args.negative,
                       float(batch["guidance"][i]))
            kl_t = hand_kl(v, v_teacher[i, j], sigmas[j], sigmas[j + 1], sigmas[1], args.noise_level, "paper")
            kl_a = hand_kl(v, v_anchor[i, j], sigmas[j], sigmas[j + 1], sigmas[1], args.noise_level, "flat")
            loss = loss + (kl_t + args.mar_lambda * kl_a) / steps / len(picked)
            teacher_sum, anchor_sum = teacher_sum + kl_t.item() / steps, anchor_sum + kl_a.item() / steps
        per_task[route].append(teacher_sum)
    reference = torch.autograd.grad(loss, list(student.values()))

    stats = stage3.train_on_rollouts(policy, batch, v_teacher, v_anchor, torch.optim.SGD(student.values(), lr=1.0), args)
    assert stats["updates"] == 1
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert stats["kl_teacher_geneval"] == pytest.approx(sum(per_task["geneval"]) / 3, rel=1e-4)  # 3 GenEval prompts
    assert stats["kl_teacher_ocr"] == pytest.approx(per_task["ocr"][0], rel=1e-4)  # the one OCR prompt
    assert stats["kl_anchor"] == pytest.approx(anchor_sum / len(picked), rel=1e-4)
    norm = math.sqrt(sum((g**2).sum().item() for g in reference))
    assert norm > 0
    for (name, p), g in zip(student.items(), reference):
        update = before[name] - p.detach()
        torch.testing.assert_close(update, g, rtol=1e-3, atol=1e-5 * norm)


def test_a_non_finite_loss_takes_no_step_and_reports_nan(tiny_model_dir, adapters):
    bundle, policy, teacher_of, anchor_name, args = setup_policy(tiny_model_dir, adapters, adapters["quality"])
    args.updates_per_epoch = 1
    batch = stage3.sample_epoch(policy, bundle, [("a red circle", None), ('a sign that says "AB"', None)],
                                {"geneval": 1, "ocr": 1}, args, seed=0)
    v_teacher, v_anchor = stage3.guide_velocities(policy, batch, [teacher_of[r] for r in batch["routes"]],
                                                  anchor_name, args)
    v_teacher[1, 2, 0, 0, 0] = math.nan  # one bad number in one teacher velocity
    student = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in student.items()}
    optimizer = torch.optim.SGD(student.values(), lr=1.0)
    stats = stage3.train_on_rollouts(policy, batch, v_teacher, v_anchor, optimizer, args)
    assert math.isnan(stats["loss"]) and stats["updates"] == 0
    assert all(torch.equal(p.detach(), before[n]) for n, p in student.items())
    assert all(p.grad is None for p in student.values())  # nothing left to leak into the next update


def test_stage3_stops_after_max_bad_epochs_and_keeps_the_last_good_checkpoint(tiny_model_dir, adapters, prompt_files,
                                                                               tmp_path, monkeypatch):
    real = stage3.train_on_rollouts
    calls = []

    def bad_after_first(*args, **kwargs):
        calls.append(1)
        stats = real(*args, **kwargs)
        return stats if len(calls) == 1 else {**stats, "loss": math.nan}
    monkeypatch.setattr(stage3, "train_on_rollouts", bad_after_first)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="2 epochs in a row had a non-finite loss"):
        stage3.main(stage3_args(tiny_model_dir, adapters, prompt_files, out, "--epochs", "6", "--eval-every", "0",
                                "--max-bad-epochs", "2", "--save-every", "1"))
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "skipped_update" in r]
    assert [r["skipped_update"] for r in records] == [False, True, True]  # stopped at epoch 3 of 6
    checkpoint = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
    assert checkpoint["epoch"] == 1  # the bad epochs wrote none


def test_stage1_update_is_the_gradient_of_the_clipped_surrogate_plus_beta_kl_with_clamped_advantages(tiny_model_dir):
    """One chunk of train_on_epoch against M2 written out: mean over informative trajectories i and trained steps j
    of max(-A_i rho_ij, -A_i clip(rho_ij, 1 - eps, 1 + eps)) + beta KL_j(theta || base), A clamped to
    +-adv_clip, a group with no reward spread left out; rho from torch.distributions' Normal with M1's mean, the
    KL in the released code's units, mean_d (mu_theta - mu_base)^2 / (2 s^2). The policy moved after sampling,
    so the ratios differ from 1 and the clip engages on some steps but not all."""
    import types
    import common
    import loading
    import stage1_grpo as stage1
    import training
    torch.manual_seed(0)
    bundle = training.load_model(tiny_model_dir)
    policy = training.make_policy(bundle.transformer, 4, 8)
    student = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in student.items():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    prompts = ["a red circle", "a red circle", "two blue squares", "two blue squares", "a green triangle",
               "a green triangle"]
    embeds, pooled = bundle.encode(prompts)
    sigmas = common.sampling_sigmas(bundle.scheduler, 3)
    a = 0.7
    batch = common.rollout_chunks(policy, embeds, pooled, bundle.latent_shape(bundle.resolution), sigmas,
                                  list(range(6)), 6, a, 1.0, None, None, bf16=False)
    batch.update(embeds=embeds, pooled=pooled, trained_steps=[0, 1])
    with torch.no_grad():  # off-policy now: the ratios move away from 1
        for n, p in student.items():
            p.add_(torch.randn_like(p) * 0.02)
    advantages = np.array([2.0, -0.3, 0.7, -2.0, 0.0, 0.0])  # the third group had no spread: not informative
    informative = np.array([True, True, True, True, False, False])
    args = types.SimpleNamespace(train_batch_size=6, world=1, rank=0, adv_clip=0.5, clip_range=8e-5, beta=0.3,
                                 kl_weighting="code", train_bf16=False, guidance=1.0, negative=None, noise_level=a,
                                 max_grad_norm=1e9, ema=0.9)
    before = {n: p.detach().clone() for n, p in student.items()}

    def mean_of_step(v, x, j):
        sigma, delta = float(sigmas[j]), float(sigmas[j + 1] - sigmas[j])
        s = a * math.sqrt(sigma / (1 - (float(sigmas[1]) if sigma == 1 else sigma)))
        return x * (1 + s**2 / (2 * sigma) * delta) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * delta, s, delta

    loss, clipped, terms = 0.0, 0, 0
    for i in range(4):
        adv = float(np.clip(advantages[i], -0.5, 0.5))
        for j in (0, 1):
            x, x_next = batch["states"][i, j], batch["states"][i, j + 1]
            t = torch.tensor([1000 * float(sigmas[j])])
            v = policy(hidden_states=x[None], timestep=t, encoder_hidden_states=embeds[i:i + 1],
                       pooled_projections=pooled[i:i + 1], return_dict=False)[0][0]
            with torch.no_grad(), loading.use_adapter(policy, None):
                v_base = policy(hidden_states=x[None], timestep=t, encoder_hidden_states=embeds[i:i + 1],
                                pooled_projections=pooled[i:i + 1], return_dict=False)[0][0]
            mean, s, delta = mean_of_step(v, x, j)
            log_prob = torch.distributions.Normal(mean, s * math.sqrt(-delta)).log_prob(x_next).mean()
            rho = torch.exp(log_prob - batch["log_probs"][i, j])
            surrogate = torch.maximum(-adv * rho, -adv * rho.clamp(1 - 8e-5, 1 + 8e-5))
            kl = ((mean - mean_of_step(v_base, x, j)[0]) ** 2).mean() / (2 * s**2)
            loss = loss + (surrogate + 0.3 * kl) / 4 / 2
            clipped += int(abs(rho.item() - 1) > 8e-5)
            terms += 1
    assert 0 < clipped < terms  # both sides of the clip are exercised
    reference = torch.autograd.grad(loss, list(student.values()))

    stats = stage1.train_on_epoch(policy, batch, advantages, informative, torch.optim.SGD(student.values(), lr=1.0), args)
    assert stats["updates"] == 1 and stats["loss"] == pytest.approx(loss.item(), rel=1e-4)
    norm = math.sqrt(sum((g**2).sum().item() for g in reference))
    assert norm > 0
    for (name, p), g in zip(student.items(), reference):
        torch.testing.assert_close(before[name] - p.detach(), g, rtol=1e-3, atol=2e-4 * norm)  # batched vs one by one


def test_stage1_non_finite_loss_takes_no_step(tiny_model_dir):
    import types
    import common
    import stage1_grpo as stage1
    import training
    bundle = training.load_model(tiny_model_dir)
    policy = training.make_policy(bundle.transformer, 4, 8)
    embeds, pooled = bundle.encode(["a red circle"] * 2)
    batch = common.rollout_chunks(policy, embeds, pooled, bundle.latent_shape(bundle.resolution),
                                  common.sampling_sigmas(bundle.scheduler, 2), [0, 1], 2, 0.7, 1.0, None, None, bf16=False)
    batch.update(embeds=embeds, pooled=pooled, trained_steps=[0])
    batch["log_probs"][1, 0] = math.nan  # one corrupted stored log-prob
    student = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in student.items()}
    args = types.SimpleNamespace(train_batch_size=2, world=1, rank=0, adv_clip=5.0, clip_range=0.2, beta=0.0,
                                 kl_weighting="code", train_bf16=False, guidance=1.0, negative=None, noise_level=0.7,
                                 max_grad_norm=1.0, ema=0.9)
    stats = stage1.train_on_epoch(policy, batch, np.array([1.0, -1.0]), np.array([True, True]),
                                  torch.optim.SGD(student.values(), lr=1.0), args)
    assert math.isnan(stats["loss"]) and stats["updates"] == 0
    assert all(torch.equal(p.detach(), before[n]) for n, p in student.items())
