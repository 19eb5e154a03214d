"""The method's pieces against references derived independently of the code (docs/method.md): the
flow-matching loss and its sigmas against hand-written formulas and diffusers' scheduler (M0), the M1 SDE
against the exact marginals of Gaussian data, PPO clipping against a hand-written surrogate (M2/M4), and the
real OCR reward (M8) on a rendered sign."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image, ImageDraw, ImageFont

import common
import rewards
import stage3_opd as stage3


class Recorder(torch.nn.Module):
    """A stand-in transformer that returns a fixed velocity and records its inputs."""

    def __init__(self, output):
        super().__init__()
        self.output, self.inputs = output, []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False, **kw):
        self.inputs.append((hidden_states.clone(), timestep.clone()))
        return (self.output.expand_as(hidden_states).clone(),)


def test_flow_matching_loss_is_the_mse_to_noise_minus_data_at_the_linear_interpolant():
    torch.manual_seed(0)
    x0, noise, v = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    model = Recorder(v)
    loss = common.flow_matching_loss(model, x0, torch.zeros(3, 1, 8), torch.zeros(3, 8), sigma=sigma, noise=noise)
    x_sigma, timestep = model.inputs[0]
    s = sigma.view(3, 1, 1, 1)
    torch.testing.assert_close(x_sigma, (1 - s) * x0 + s * noise)  # x_sigma = (1 - sigma) x0 + sigma eps
    torch.testing.assert_close(timestep, 1000 * sigma)
    torch.testing.assert_close(loss, ((v - (noise - x0)) ** 2).mean())  # target eps - x0, not x0 - eps


def test_a_model_predicting_noise_minus_data_has_zero_loss_and_the_opposite_sign_does_not():
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    exact = common.flow_matching_loss(Recorder(noise - x0), x0, torch.zeros(2, 1, 8), torch.zeros(2, 8),
                                      sigma=torch.tensor([0.3, 0.7]), noise=noise)
    flipped = common.flow_matching_loss(Recorder(x0 - noise), x0, torch.zeros(2, 1, 8), torch.zeros(2, 8),
                                        sigma=torch.tensor([0.3, 0.7]), noise=noise)
    assert exact.item() == 0.0 and flipped.item() > 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shift_and_sampling_sigmas_match_diffusers_scheduler(shift):
    """diffusers spaces N sigmas linearly from 1 to its (shifted) smallest training sigma, shifts them, and
    appends 0; by hand: sigma' = shift sigma / (1 + (shift - 1) sigma)."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)
    linear = torch.linspace(1.0, shifted(1 / 1000), 10)
    reference = torch.cat([shifted(linear), torch.zeros(1)])
    torch.testing.assert_close(common.shift_sigmas(linear, shift), reference[:-1])
    torch.testing.assert_close(common.sampling_sigmas(FlowMatchEulerDiscreteScheduler(shift=shift), 10), reference)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(scheduler.sigmas.float(), reference)


def test_training_sigmas_are_shifted_logit_normal():
    torch.manual_seed(1)
    sigma = common.training_sigmas(200_000, 3.0)
    unshifted = sigma / (3.0 - 2.0 * sigma)  # the inverse of sigma' = 3 s / (1 + 2 s)
    logit = torch.log(unshifted / (1 - unshifted))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1.0) < 0.01  # N(0, 1) before the shift
    assert 0 < sigma.min() and sigma.max() < 1 and (sigma.median() - 0.75).abs() < 0.01  # shift(0.5) = 0.75


def test_m1_sde_keeps_the_marginals_of_gaussian_data():
    """Data x0 ~ N(m, s0^2) per dimension. Then x_sigma = (1 - sigma) x0 + sigma eps is N((1 - sigma) m,
    (1 - sigma)^2 s0^2 + sigma^2), and the exact velocity E[eps - x0 | x_sigma = x] is linear in x. Sampling with
    the M1 SDE (noise level 0.7) from pure noise must visit those marginals at every sigma, within Monte-Carlo
    and discretisation error; a drift without its s^2 corrections does not."""
    m, s0, n = 1.5, 0.5, 200_000

    def exact_velocity(x, sigma):
        a = 1 - sigma
        var = a**2 * s0**2 + sigma**2
        centred = x - a * m
        return sigma / var * centred - (m + a * s0**2 / var * centred)

    steps = 800
    sigmas = common.sampling_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), steps)
    torch.manual_seed(0)
    x = torch.randn(n, 1)
    worst = 0.0
    for j in range(steps):
        v = exact_velocity(x, sigmas[j].item())
        x, _, _, _ = common.sde_step(x, v, sigmas[j], sigmas[j + 1], sigmas[1], 0.7)
        sigma = sigmas[j + 1].item()
        mean, var = (1 - sigma) * m, (1 - sigma) ** 2 * s0**2 + sigma**2
        if j >= steps // 10:  # the first step's sigma~ = sigma_1 (M1) puts ~9 % into the variance; it decays
            worst = max(worst, abs(x.mean().item() - mean) / math.sqrt(var), abs(x.var().item() / var - 1))
    assert worst < 0.03, worst  # measured 0.020; Monte-Carlo sd ~0.003, the rest is the discretisation
    assert abs(x.mean().item() - m) < 0.01 and abs(x.std().item() - s0) < 0.01


def test_ppo_clip_engages_the_gradient_vanishes_on_the_clipped_side_only():
    """M4 "ppo" (and M2's surrogate): max(-A r, -A clip(r, 1 - eps, 1 + eps)), written out by hand with the M1
    log-density (torch.distributions, mean over dimensions). At r = e^0.5 > 1 + eps the clip holds for A > 0
    (zero gradient) and not for A < 0 (the gradient of -A r)."""
    torch.manual_seed(0)
    dims, sigma, sigma_next, sigma_1, a, eps = 6, 0.6, 0.3, 0.9, 0.7, 0.2
    x, v_teacher = torch.randn(1, dims), torch.randn(1, dims)
    delta = sigma_next - sigma
    s = a * math.sqrt(sigma / (1 - sigma))
    step_std = s * math.sqrt(-delta)

    def mean(v):
        return x * (1 + s**2 / (2 * sigma) * delta) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * delta

    v0 = torch.randn(1, dims)
    x_next = mean(v0) + step_std * torch.randn(1, dims)
    old_log_prob = torch.distributions.Normal(mean(v0), step_std).log_prob(x_next).mean(1) - 0.5  # ratio e^0.5
    for advantage in (1.0, -1.0):
        v = v0.clone().requires_grad_(True)
        loss, _, ratio = stage3.opd_step_loss("ppo", v, v_teacher, x, x_next, old_log_prob, torch.tensor([advantage]),
                                              sigma, sigma_next, sigma_1, a, "paper", eps)
        loss.backward()
        v_ref = v0.clone().requires_grad_(True)
        r = torch.exp(torch.distributions.Normal(mean(v_ref), step_std).log_prob(x_next).mean(1) - old_log_prob)
        reference = torch.maximum(-advantage * r, -advantage * r.clamp(1 - eps, 1 + eps)).mean() * dims
        reference.backward()
        assert ratio.item() == pytest.approx(math.exp(0.5), rel=1e-5)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-4, atol=1e-6)
        assert (v.grad.abs().max() == 0) == (advantage > 0)  # clipped: no gradient; unclipped: -A grad r


def _sign(text, size=(256, 96)):
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((size[0] // 2, size[1] // 2), text, fill="black", font=ImageFont.load_default(size=40), anchor="mm")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255


def test_real_ocr_reads_a_rendered_sign_and_scores_it_by_m8():
    images = torch.cat([_sign("HELLO"), _sign("HELLO"), _sign("WORLD")])
    prompts = ['a sign that says "hello"', 'a sign that says "HELP"', 'a sign that says "hello"']
    out = rewards.ocr_rewards(images, prompts)
    # M8, by hand: "hello" is in the recognised "HELLO" (case-free) -> 1; "help" is 2 edits from "hello":
    # 1 - min(2, 4) / 4 = 0.5; "hello" is 4 substitutions from "world": 1 - min(4, 5) / 5 = 0.2
    np.testing.assert_allclose(out, [1.0, 0.5, 0.2])
