"""Stage 3's estimators (M4) against analytic gradients, on a tiny Gaussian policy whose velocity
(hence step mean) is linear in theta: v_theta(x) = theta + 0.5 x, teacher v_T(x) = t - 0.3 x.

With the states fixed, KL_j(x_j) is a closed-form quadratic in theta whose gradient is linear in x_j,
so the expected "local" gradient E[sum_j grad KL_j(x_j)] is the gradient at E[x_j] (analytic). The
gradient of the whole path's KL, E_theta[sum_j KL_j(x_j)], adds how theta moves the later states;
with Gaussian steps E[KL_1(x_1)] = KL_1(mu_0(theta)) + a theta-free variance term (analytic too).
"""
import math

import pytest
import torch

import common
import stage3_opd as stage3

D = 6
SIGMAS = torch.tensor([1.0, 0.6, 0.0])  # two steps; the first uses sigma~ = sigma_1 (M1)
NOISE = 0.7
THETA0 = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.2], dtype=torch.float64).float()
T = torch.tensor([0.6, 0.1, -0.3, 0.4, 0.0, -0.5])
X0 = torch.tensor([0.5, -1.0, 0.2, 0.8, -0.3, 0.1])


def student(theta, x):
    return theta + 0.5 * x


def teacher(x):
    return T - 0.3 * x


def step_constants(j):
    """M1's s_j, c_j and D_j for this module's sigmas, by hand (the analytic side never calls common)."""
    sigma, sigma_next = float(SIGMAS[j]), float(SIGMAS[j + 1])
    s = NOISE * math.sqrt(sigma / (1 - (float(SIGMAS[1]) if sigma == 1 else sigma)))
    return s, 1 + s**2 * (1 - sigma) / (2 * sigma), sigma_next - sigma, sigma


def kl(theta, x, j, weighting):
    """M3 written out: paper (|D|/2)(c/s)^2 ||dv||^2, code mean_d (c D dv)^2 / (2 s^2), flat (|D|/2) ||dv||^2."""
    s, c, delta, _ = step_constants(j)
    dv = student(theta, x) - teacher(x)
    if weighting == "code":
        return ((c * delta * dv) ** 2).mean(-1) / (2 * s**2)
    return abs(delta) / 2 * ((c / s) ** 2 if weighting == "paper" else 1.0) * (dv ** 2).sum(-1)


def simulate(theta, n, generator):
    """n trajectories from X0: states (n, 3, D) and the sampling-time log-probs (n, 2), no grad."""
    x = X0.expand(n, D).clone()
    states, log_probs = [x], []
    with torch.no_grad():
        for j in range(2):
            noise = torch.randn(n, D, generator=generator)
            x, log_prob, _, _ = common.sde_step(x, student(theta, x), SIGMAS[j], SIGMAS[j + 1], SIGMAS[1], NOISE, noise)
            states.append(x)
            log_probs.append(log_prob)
    return torch.stack(states, 1), torch.stack(log_probs, 1)


def estimator_gradient(objective, states, log_probs, weighting, gamma=0.0, steps=(0, 1)):
    """grad_theta of the Stage-3 loss (summed over `steps`) on the given trajectories, via stage3's functions."""
    theta = THETA0.clone().requires_grad_(True)
    advantages = None
    if objective == "ppo":
        rewards = torch.stack([stage3.sampled_log_ratio(states[:, j], states[:, j + 1], teacher(states[:, j]),
                                                        log_probs[:, j], SIGMAS, j, NOISE)
                               * stage3.kl_unit(SIGMAS[j], SIGMAS[j + 1], D, weighting, SIGMAS[1], NOISE) for j in range(2)], 1)
        advantages = stage3.reward_to_go(rewards, gamma)
    total = 0
    for j in steps:
        x = states[:, j]
        loss, _, _ = stage3.opd_step_loss(objective, student(theta, x), teacher(x), x, states[:, j + 1], log_probs[:, j],
                                          None if advantages is None else advantages[:, j], SIGMAS[j], SIGMAS[j + 1],
                                          SIGMAS[1], NOISE, weighting, clip_range=0.2)
        total = total + loss
    total.backward()
    return theta.grad


def monte_carlo(objective, weighting, gamma=0.0, steps=(0, 1), groups=40, per_group=2500):
    """Mean and standard error of the estimator's gradient over `groups` independent batches."""
    generator = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(groups):
        states, log_probs = simulate(THETA0, per_group, generator)
        grads.append(estimator_gradient(objective, states, log_probs, weighting, gamma, steps))
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / groups**0.5


def step0_mean(theta):
    """mu_0(theta): the mean of x_1 given X0 (M1), differentiable in theta."""
    s, _, delta, sigma = step_constants(0)
    x = X0[None]
    return x * (1 + s**2 / (2 * sigma) * delta) + student(theta, x) * (1 + s**2 * (1 - sigma) / (2 * sigma)) * delta


def local_gradient(weighting, steps=(0, 1)):
    """E[sum_j grad KL_j(x_j)] with the states fixed: the gradient at x_0 = X0 and x_1 = E[x_1] (linearity)."""
    theta = THETA0.clone().requires_grad_(True)
    expected = {0: X0[None], 1: step0_mean(THETA0).detach()}
    sum(kl(theta, expected[j], j, weighting).sum() for j in steps).backward()
    return theta.grad


def path_gradient(weighting):
    """grad E_theta[KL_0 + KL_1(x_1)]: x_1 ~ N(mu_0(theta), s^2 |D| I) and KL_1 is quadratic in x_1 with a
    theta-free curvature, so E[KL_1(x_1)] = KL_1(mu_0(theta)) + const."""
    theta = THETA0.clone().requires_grad_(True)
    (kl(theta, X0[None], 0, weighting) + kl(theta, step0_mean(theta), 1, weighting)).sum().backward()
    return theta.grad


def assert_matches(mean, stderr, expected, what):
    error = (mean - expected).abs()
    assert (error <= 4.5 * stderr + 1e-6).all(), f"{what}: MC {mean.tolist()} vs analytic {expected.tolist()} (se {stderr.tolist()})"
    assert stderr.norm() < 0.1 * expected.norm(), f"{what}: too noisy to tell ({stderr.norm():.3g} vs {expected.norm():.3g})"


@pytest.mark.parametrize("weighting", ["paper", "code", "flat"])
def test_pathwise_and_ppo_mean_gradients_equal_the_analytic_kl_gradient(weighting):
    expected = local_gradient(weighting)
    assert expected.norm() > 0.1
    mean, stderr = monte_carlo("pathwise", weighting)
    assert_matches(mean, stderr, expected, "pathwise")
    mean, stderr = monte_carlo("ppo", weighting)
    assert_matches(mean, stderr, expected, "ppo")


def test_single_step_pathwise_is_exactly_the_kl_gradient():
    states, log_probs = simulate(THETA0, 7, torch.Generator().manual_seed(1))
    grad = estimator_gradient("pathwise", states, log_probs, "paper", steps=(0,))
    torch.testing.assert_close(grad, local_gradient("paper", steps=(0,)))


def test_ppo_with_reward_to_go_gives_the_whole_path_gradient():
    local, path = local_gradient("paper"), path_gradient("paper")
    assert (path - local).norm() > 0.2 * path.norm()  # the two targets differ, so the check below can fail
    mean, stderr = monte_carlo("ppo", "paper", gamma=1.0, groups=40, per_group=5000)
    assert_matches(mean, stderr, path, "ppo gamma=1")


def test_paper_detached_has_zero_mean_gradient():
    expected = local_gradient("paper")
    mean, stderr = monte_carlo("paper-detached", "paper")
    assert (mean.abs() <= 4.5 * stderr + 1e-6).all(), mean
    assert mean.norm() < 0.1 * expected.norm()


def test_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(stage3.reward_to_go(rewards, 0.0), rewards)
    torch.testing.assert_close(stage3.reward_to_go(rewards, 0.5), torch.tensor([[1 + 1 + 1.0, 2 + 2.0, 4.0]]))


def test_sampled_log_ratio_is_an_unbiased_negative_kl():
    generator = torch.Generator().manual_seed(2)
    states, log_probs = simulate(THETA0, 200000, generator)
    ratio = stage3.sampled_log_ratio(states[:, 0], states[:, 1], teacher(states[:, 0]), log_probs[:, 0], SIGMAS, 0, NOISE)
    expected = -kl(THETA0, X0[None], 0, "paper")
    assert ratio.mean().item() == pytest.approx(expected.item(), abs=4 * ratio.std().item() / 200000**0.5)
