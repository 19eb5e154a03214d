"""The published EMA (per optimizer update, bias-corrected, with the weights its docstring states), the lr schedule
and the widened student (--extra-rank, --extra-targets)."""
import argparse
import math

import pytest
import torch

import loading
import training


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_ema_after_n_updates_weighs_the_students_as_documented_and_the_start_zero(tiny_model_dir, decay):
    policy = training.make_policy(training.load_model(tiny_model_dir).transformer, 4, 8)
    student = {n: p for n, p in policy.named_parameters() if ".student." in n}
    optimizer = torch.optim.AdamW(list(student.values()), lr=0.0)  # steps are counted, weights set by hand
    start = {n: p.detach().clone() for n, p in student.items()}
    states, n_updates = [], 5
    for k in range(1, n_updates + 1):
        with torch.no_grad():
            for p in student.values():
                p.normal_(0, 1)
                p.grad = torch.zeros_like(p)
        optimizer.step()
        states.append({n: p.detach().clone() for n, p in student.items()})
        training.update_published_ema(policy, optimizer, decay)
    weights = [(1 - decay) * decay ** (n_updates - k) / (1 - decay ** n_updates) for k in range(1, n_updates + 1)]
    assert sum(weights) == pytest.approx(1.0)
    ema = {n.replace(".ema.", ".student."): p for n, p in policy.named_parameters() if ".ema." in n}
    for name in student:
        expected = sum(w * s[name] for w, s in zip(weights, states))  # the start's weight: 0
        torch.testing.assert_close(ema[name], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ema[name], start[name])


def test_ema_decay_is_the_bias_corrected_recursion():
    assert training.ema_decay(0.9, 1) == 0.0  # the first update replaces the start
    assert training.ema_decay(0.9, 2) == pytest.approx(0.9 * 0.1 / (1 - 0.81))
    assert training.ema_decay(0.9, 1000) == pytest.approx(0.9)  # a long run: the plain EMA
    assert training.ema_decay(0.0, 7) == 0.0


def test_cosine_lr_schedule_starts_at_lr_halves_midway_and_ends_near_zero():
    lrs = [training.epoch_lr(1e-3, "cosine", e, 16) for e in range(1, 17)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[8] == pytest.approx(0.5e-3)  # epoch E/2 + 1
    assert lrs[-1] == pytest.approx(1e-3 * (1 - math.cos(math.pi / 16)) / 2) and lrs[-1] < 0.01e-3
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert training.epoch_lr(1e-3, "constant", 16, 16) == 1e-3


def test_set_epoch_lr_sets_every_group_of_the_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    args = argparse.Namespace(lr=2e-3, lr_schedule="cosine", epochs=4)
    assert training.set_epoch_lr(optimizer, args, 3) == pytest.approx(1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3])


def test_widened_student_starts_as_its_init_and_trains_its_new_components(tiny_model_dir, tmp_path):
    bundle = training.load_model(tiny_model_dir)
    cold = loading.add_lora(bundle.transformer, 4, 8, ("to_q", "to_k", "to_v", "to_out.0"), name="student")
    with torch.no_grad():
        for name, p in cold.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)  # a non-zero function, like a cold start's
    loading.save_adapter(cold, "student", str(tmp_path / "cold"))
    x = torch.randn(2, *bundle.latent_shape(bundle.resolution))
    embeds, pooled = bundle.encode(["a red circle", "a blue square"])
    t = torch.tensor([500.0, 200.0])

    def velocity(model):
        with torch.no_grad():
            return model(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t).sample

    expected = velocity(cold)
    wide = training.make_policy(training.load_model(tiny_model_dir).transformer, init=str(tmp_path / "cold"),
                                extra_rank=12, extra_targets=("attn.add_k_proj",))
    config = wide.peft_config["student"]
    assert (config.r, config.lora_alpha / config.r) == (16, 8 / 4)  # rank grown, scale alpha / r kept
    assert set(wide.peft_config) == {"student", "ema"}
    torch.testing.assert_close(velocity(wide), expected, atol=1e-5, rtol=1e-5)
    student = {n: p for n, p in wide.named_parameters() if ".student." in n}
    b = next(p for n, p in student.items() if ".to_q.lora_B." in n)
    assert b.shape[1] == 16 and b.requires_grad and torch.all(b[:, 4:] == 0) and b[:, :4].abs().sum() > 0
    new_b = next(p for n, p in student.items() if ".add_k_proj.lora_B." in n)  # a new layer, starting at 0
    assert new_b.requires_grad and torch.all(new_b == 0)
    out = wide(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t).sample
    out.square().mean().backward()
    assert b.grad[:, 4:].abs().sum() > 0 and new_b.grad.abs().sum() > 0  # the new components and layers learn
    with pytest.raises(loading.UserError, match=r"extra rank 3 .* expected --init"):
        training.make_policy(training.load_model(tiny_model_dir).transformer, 4, 8, extra_rank=3)
    with pytest.raises(loading.UserError, match=r"\['attn.no_such_proj'\] name no layer"):
        training.make_policy(training.load_model(tiny_model_dir).transformer, init=str(tmp_path / "cold"),
                             extra_targets=("attn.no_such_proj",))
