"""The math of M1 (the SDE step with log-probability) and M3 (the per-step KL)."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import common

NOISE = 0.7


def sigmas(n=10):
    return common.sampling_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), n)


def test_noise_level_zero_is_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    s = sigmas()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float32)
    for j, t in enumerate(scheduler.timesteps):
        v = torch.randn_like(x)
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        ours, log_prob, mean, _ = common.sde_step(x, v, s[j], s[j + 1], s[1], noise_level=0.0)
        assert log_prob is None
        assert torch.equal(ours, expected), f"step {j}"
        assert torch.equal(mean, x + v * (s[j + 1] - s[j]))
        x = ours


@pytest.mark.parametrize("j", [0, 1, 5, 9])
def test_mean_and_std_follow_m1(j):
    s = sigmas()
    sigma, sigma_next = float(s[j]), float(s[j + 1])
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    _, _, mean, step_std = common.sde_step(x, v, sigma, sigma_next, s[1], NOISE)
    sigma_safe = float(s[1]) if sigma == 1 else sigma
    std = NOISE * math.sqrt(sigma / (1 - sigma_safe))
    delta = sigma_next - sigma
    expected = x * (1 + std**2 / (2 * sigma) * delta) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * delta
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
    assert step_std.flatten()[0].item() == pytest.approx(std * math.sqrt(-delta), rel=1e-6)


def test_samples_have_the_stated_mean_and_variance():
    s = sigmas()
    x = torch.randn(1, 3, 4, 4).expand(40000, 3, 4, 4)
    v = torch.randn(1, 3, 4, 4).expand_as(x)
    torch.manual_seed(1)
    x_next, _, _, _ = common.sde_step(x, v, s[3], s[4], s[1], NOISE)
    sigma, delta = float(s[3]), float(s[4] - s[3])  # M1 by hand, not the call's own mean and std
    std = NOISE * math.sqrt(sigma / (1 - sigma))
    mean = x[0] * (1 + std**2 / (2 * sigma) * delta) + v[0] * (1 + std**2 * (1 - sigma) / (2 * sigma)) * delta
    step_std = std * math.sqrt(-delta)
    torch.testing.assert_close(x_next.mean(0), mean, atol=4 * step_std / 200 + 1e-3, rtol=0)
    assert x_next.std(0).mean().item() == pytest.approx(step_std, rel=0.01)


def test_log_prob_equals_torch_normal_mean_over_dims():
    s = sigmas()
    x, v = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    for j in (0, 4, 9):
        x_next, log_prob, mean, step_std = common.sde_step(x, v, s[j], s[j + 1], s[1], NOISE)
        expected = torch.distributions.Normal(mean, step_std).log_prob(x_next).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_per_sample_sigmas_match_scalar_sigmas():
    s = sigmas()
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x)
    batched = common.sde_step(x, v, torch.stack([s[2], s[6]]), torch.stack([s[3], s[7]]), s[1], NOISE, noise)
    for i, j in enumerate((2, 6)):
        single = common.sde_step(x[i:i + 1], v[i:i + 1], s[j], s[j + 1], s[1], NOISE, noise[i:i + 1])
        torch.testing.assert_close(batched[0][i:i + 1], single[0])
        torch.testing.assert_close(batched[1][i:i + 1], single[1])


def test_recomputed_log_prob_of_a_stored_transition_is_identical(tiny_bundle):
    """Fully on-policy, the PPO ratio exp(new - old) is exactly 1."""
    b = tiny_bundle
    s = common.sampling_sigmas(b.scheduler, 4)
    embeds, pooled = b.encode(["a photo of a red circle", 'a sign that says "K7"'])
    out = common.rollout(b.transformer, embeds, pooled, b.latent_shape(b.resolution), s, seeds=[3, 4],
                         noise_level=NOISE)
    for j in range(4):
        with torch.no_grad():
            v = common.velocity(b.transformer, out["states"][:, j], s[j], embeds, pooled)
        _, log_prob, _, _ = common.sde_step(out["states"][:, j], v, s[j], s[j + 1], s[1], NOISE,
                                            x_next=out["states"][:, j + 1])
        assert torch.equal(log_prob, out["log_probs"][:, j]), f"step {j}"


def test_rollout_is_reproducible_and_independent_of_batch(tiny_bundle):
    b = tiny_bundle
    s = common.sampling_sigmas(b.scheduler, 3)
    prompts = ["a photo of two squares", "a photo of a blue triangle", 'a sign that says "AB"']
    embeds, pooled = b.encode(prompts)
    negative = b.encode([""])
    shape = b.latent_shape(b.resolution)
    first = common.rollout(b.transformer, embeds, pooled, shape, s, [7, 8, 9], NOISE, 4.5, negative, b.decode)
    again = common.rollout(b.transformer, embeds, pooled, shape, s, [7, 8, 9], NOISE, 4.5, negative, b.decode)
    alone = common.rollout(b.transformer, embeds[1:2], pooled[1:2], shape, s, [8], NOISE, 4.5, negative, b.decode)
    assert torch.equal(first["states"], again["states"])
    torch.testing.assert_close(alone["states"][0], first["states"][1], rtol=1e-4, atol=1e-4)
    assert first["states"].shape == (3, 4, *shape) and first["log_probs"].shape == (3, 3)
    assert first["images"].shape == (3, 3, b.resolution, b.resolution)
    assert 0 <= first["images"].min() and first["images"].max() <= 1
    other = common.rollout(b.transformer, embeds, pooled, shape, s, [1, 2, 3], NOISE, 4.5, negative, b.decode)
    assert not torch.equal(first["states"][:, -1], other["states"][:, -1])


def test_cfg_helper_combines_the_two_predictions(tiny_bundle):
    b = tiny_bundle
    embeds, pooled = b.encode(["a photo of a circle"] * 2)
    negative = b.encode([""])
    x = torch.randn(2, *b.latent_shape(b.resolution))
    with torch.no_grad():
        cond = common.velocity(b.transformer, x, 0.5, embeds, pooled)
        uncond = common.velocity(b.transformer, x, 0.5, *(t.expand(2, *t.shape[1:]) for t in negative))
        guided = common.velocity(b.transformer, x, 0.5, embeds, pooled, 3.0, negative)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # one scale per sample: each row is that row's single-scale velocity
        per_sample = common.velocity(b.transformer, x, 0.5, embeds, pooled, torch.tensor([1.0, 3.0]), negative)
        all_one = common.velocity(b.transformer, x, 0.5, embeds, pooled, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(per_sample, torch.stack([cond[0], guided[1]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_one, cond, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        common.velocity(b.transformer, x, 0.5, embeds, pooled, 3.0, None)


# ---------------------------------------------------------------------------------------------- M3

@pytest.mark.parametrize("j", [0, 3, 9])
def test_paper_kl_equals_torch_kl_of_the_two_gaussian_steps(j):
    s = sigmas()
    x, v_student, v_teacher = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    _, _, mean_s, std = common.sde_step(x, v_student, s[j], s[j + 1], s[1], NOISE)
    _, _, mean_t, _ = common.sde_step(x, v_teacher, s[j], s[j + 1], s[1], NOISE)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_s.double(), std.double()),
        torch.distributions.Normal(mean_t.double(), std.double())).sum(dim=(1, 2, 3))
    ours = common.step_kl(v_student, v_teacher, s[j], s[j + 1], s[1], NOISE, "paper")
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-6)
    # the velocity form of M3: (|D| / 2) (c / s)^2 ||v_s - v_t||^2
    sigma, delta = float(s[j]), float(s[j + 1] - s[j])
    std_j = float(common.sde_std(s[j], s[j + 1], s[1], NOISE))
    c = 1 + std_j**2 * (1 - sigma) / (2 * sigma)
    velocity_form = abs(delta) / 2 * (c / std_j) ** 2 * ((v_student - v_teacher) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(ours, velocity_form, rtol=1e-4, atol=1e-6)


def test_code_kl_is_paper_kl_times_delta_over_dims():
    s = sigmas()
    v_student, v_teacher = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    for j in range(10):
        paper = common.step_kl(v_student, v_teacher, s[j], s[j + 1], s[1], NOISE, "paper")
        code = common.step_kl(v_student, v_teacher, s[j], s[j + 1], s[1], NOISE, "code")
        torch.testing.assert_close(code, paper * abs(float(s[j + 1] - s[j])) / 48, rtol=1e-5, atol=1e-8)


def test_flat_weighting_is_the_time_integrated_velocity_l2_and_the_paper_weight_spans_orders_of_magnitude():
    import stage3_opd
    s = sigmas()
    v_student, v_teacher = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    unit_weights = []
    for j in range(10):
        delta = abs(float(s[j + 1] - s[j]))
        flat = common.step_kl(v_student, v_teacher, s[j], s[j + 1], s[1], NOISE, "flat")
        torch.testing.assert_close(flat, delta / 2 * ((v_student - v_teacher) ** 2).sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-8)
        paper = common.step_kl(v_student, v_teacher, s[j], s[j + 1], s[1], NOISE, "paper")
        sigma = float(s[j])
        std = NOISE * math.sqrt(sigma / (1 - (float(s[1]) if sigma == 1 else sigma)))  # M1's s_j, by hand
        c = 1 + std**2 * (1 - sigma) / (2 * sigma)
        torch.testing.assert_close(flat, paper * (std / c) ** 2, rtol=1e-5, atol=1e-8)  # M3: flat = KL (s/c)^2
        assert stage3_opd.kl_unit(s[j], s[j + 1], 48, "flat", s[1], NOISE) == pytest.approx((std / c) ** 2, rel=1e-5)
        unit_weights.append(float(common.step_kl(torch.ones(1, 1), torch.zeros(1, 1), s[j], s[j + 1], s[1], NOISE)))
    # the paper's KL weighs a unit velocity error at the last steps far above the first (why --kl-weighting flat)
    assert max(unit_weights[-2:]) > 100 * unit_weights[0]


def test_kl_is_zero_for_identical_velocities_and_positive_otherwise():
    s = sigmas()
    v = torch.randn(3, 3, 4, 4)
    for weighting in ("paper", "code", "flat"):
        assert torch.equal(common.step_kl(v, v.clone(), s[2], s[3], s[1], NOISE, weighting), torch.zeros(3))
        assert (common.step_kl(v, v + 0.1, s[2], s[3], s[1], NOISE, weighting) > 0).all()
    with pytest.raises(ValueError, match="weighting"):
        common.step_kl(v, v, s[2], s[3], s[1], NOISE, "l2")
