"""Stage 2 (docs/method.md M6) against references computed here: the merges against the dense sum of the
teachers' dW (its best rank-r truncation by Eckart-Young, TIES written out, DARE at density 1), teacher
sampling against each teacher run alone, and the SFT fit against its own data."""
import types

import pytest
import torch

import common
import loading
import stage2_coldstart as stage2
import training
from test_stage3 import adapters, delta_weights, merged_deltas, relative_error, teacher_deltas  # noqa: F401 (fixture)


def truncated(matrix, rank):
    """The best rank-`rank` approximation of `matrix` in Frobenius norm (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def merge(tiny_model_dir, adapters, tmp_path, rule, *extra):
    out = tmp_path / rule
    stage2.main(["merge", "--model", tiny_model_dir, "--teachers", f"geneval={adapters['geneval']},ocr={adapters['ocr']}",
                 "--weights", "0.7,0.3", "--rule", rule, *extra, "--out", str(out)])
    return merged_deltas(tiny_model_dir, str(out / "adapter"))


def test_svd_merge_is_the_best_rank_r_truncation_of_the_weighted_delta_sum(tiny_model_dir, adapters, tmp_path):
    expected = teacher_deltas(tiny_model_dir, adapters, (0.7, 0.3))
    merged = merge(tiny_model_dir, adapters, tmp_path, "svd")  # rank 4 = one teacher's, of a rank-8 sum
    best = {n: truncated(e, 4).float() for n, e in expected.items()}
    assert relative_error(merged, best) < 1e-4
    assert relative_error(merged, expected) > 1e-2  # the truncation does lose something: the check has teeth


def hand_ties(deltas, weights, density):
    """TIES-merging (Yadav et al. 2023) written out: keep each task's top `density` entries by magnitude, elect
    each entry's sign by the total of the trimmed tasks, average the weighted entries that agree with it."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    weighted = stacked * torch.tensor(weights).view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_ties_merge_is_ties_of_the_dense_deltas_refactored_to_the_sum_of_ranks(tiny_model_dir, adapters, tmp_path):
    g, o = teacher_deltas(tiny_model_dir, adapters, (1.0, 0.0)), teacher_deltas(tiny_model_dir, adapters, (0.0, 1.0))
    merged = merge(tiny_model_dir, adapters, tmp_path, "ties", "--density", "0.5")
    expected = {n: truncated(hand_ties([g[n], o[n]], [0.7, 0.3], 0.5), 8).float() for n in g}
    assert relative_error(merged, expected) < 1e-3
    assert relative_error(merged, teacher_deltas(tiny_model_dir, adapters, (0.7, 0.3))) > 0.1  # not the plain sum


def test_dare_at_density_one_drops_nothing_and_is_the_weighted_sum(tiny_model_dir, adapters, tmp_path):
    with pytest.warns(UserWarning, match="no pruning will be performed"):  # peft says so at density 1
        model = stage2.merge_peft(training.load_model(tiny_model_dir).transformer,
                                  {"geneval": adapters["geneval"], "ocr": adapters["ocr"]}, [0.7, 0.3], "dare", density=1.0)
    assert relative_error(delta_weights(model, "merged"), teacher_deltas(tiny_model_dir, adapters, (0.7, 0.3))) < 1e-4
    sparse = merge(tiny_model_dir, adapters, tmp_path / "half", "dare", "--density", "0.5")
    assert all(torch.isfinite(d).all() for d in sparse.values())
    assert relative_error(sparse, teacher_deltas(tiny_model_dir, adapters, (0.7, 0.3))) > 0.1  # it did drop


def test_teacher_samples_draw_each_task_with_its_own_teacher(tiny_model_dir, adapters):
    bundle = training.load_model(tiny_model_dir)
    model = stage2.evaluation.load_adapters(bundle.transformer, [("geneval", adapters["geneval"]), ("ocr", adapters["ocr"])])
    items = {"geneval": [("a red circle", None), ("two blue squares", None)], "ocr": [('a sign that says "AB"', None)]}
    args = types.SimpleNamespace(rank=0, world=1)
    latents, prompts = stage2.teacher_samples(bundle, model, {"geneval": "geneval", "ocr": "ocr"}, items, 2, 3, 2.0,
                                              seed=5, args=args)
    assert sorted(prompts[:2]) == ["a red circle", "two blue squares"] and prompts[2] == 'a sign that says "AB"'
    sigmas = common.sampling_sigmas(bundle.scheduler, 3)
    for k, (prompt, task) in enumerate(zip(prompts, ["geneval", "geneval", "ocr"])):
        seed = 5 + (k if task == "geneval" else 0)
        for adapter, should_match in ((task, True), ({"geneval": "ocr", "ocr": "geneval"}[task], False)):
            with loading.use_adapter(model, adapter):
                embeds, pooled = bundle.encode([prompt])
                alone = common.rollout(model, embeds, pooled, bundle.latent_shape(bundle.resolution), sigmas, [seed],
                                       0.0, 2.0, bundle.encode([""]))["states"][0, -1]
            assert torch.allclose(latents[k], alone, atol=1e-4) == should_match, (prompt, adapter)


def test_sft_fit_lowers_its_loss_and_the_student_reproduces_the_samples(tiny_model_dir, adapters, monkeypatch):
    """fit_adapter on one teacher sample per prompt: the flow-matching loss falls, and the fitted student's ODE
    from fresh noise ends nearer each prompt's sample than the base's does (M6's SFT reproduces its data)."""
    torch.manual_seed(0)
    bundle = training.load_model(tiny_model_dir)
    model = stage2.evaluation.load_adapters(bundle.transformer, [("teacher", adapters["geneval"])])
    shape, prompts = bundle.latent_shape(bundle.resolution), ["a red circle", 'a sign that says "AB"']
    embeds, pooled = bundle.encode(prompts)
    sigmas = common.sampling_sigmas(bundle.scheduler, 20)
    with torch.no_grad(), loading.use_adapter(model, "teacher"):
        targets = common.rollout(model, embeds, pooled, shape, sigmas, [1, 2], 0.0)["states"][:, -1]
    args = types.SimpleNamespace(fit_guidance=None, lr=3e-2, train_steps=300, batch_size=8, micro_batch_size=None,
                                 rank=0, world=1, seed=0, train_bf16=False, max_grad_norm=1.0, ema=0.0)
    log = stage2.fit_adapter(bundle, model, targets, prompts, (8, 16, ["to_q", "to_k", "to_v", "to_out.0"]), args,
                             guidance=1.0)
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (log[:20], log[-20:]))
    distance = {}
    for adapter in ("student", None):
        with torch.no_grad(), loading.use_adapter(model, adapter):
            final = common.rollout(model, embeds, pooled, shape, sigmas, [11, 12], 0.0)["states"][:, -1]
        distance[adapter] = ((final - targets) ** 2).mean().item()
    # the tiny test model has little capacity (measured: loss 2.17 -> 2.11, distance 2.32 -> 2.21); a fit to the
    # wrong target (x0 - eps) moves the samples away instead
    assert last < 0.99 * first, (first, last)
    assert distance["student"] < 0.97 * distance[None], distance


def test_fit_guidance_is_the_scale_the_fit_trains_at(tiny_model_dir, monkeypatch):
    bundle = training.load_model(tiny_model_dir)
    model = loading.add_lora(bundle.transformer, 4, 8, name="base_probe")
    scales, real = [], common.flow_matching_loss
    monkeypatch.setattr(common, "flow_matching_loss", lambda *a, **k: scales.append(a[6]) or real(*a, **k))
    args = types.SimpleNamespace(fit_guidance=3.0, lr=1e-3, train_steps=2, batch_size=2, micro_batch_size=None,
                                 rank=0, world=1, seed=0, train_bf16=False, max_grad_norm=1.0, ema=0.0)
    stage2.fit_adapter(bundle, model, torch.zeros(1, *bundle.latent_shape(bundle.resolution)), ["a red circle"],
                       (4, 8, ["to_q"]), args, guidance=4.5)  # the samples' guidance, overridden by --fit-guidance
    assert scales == [3.0, 3.0]
