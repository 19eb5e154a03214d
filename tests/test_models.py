"""Model bundles and LoRA adapters on one base model."""
import json
import os

import numpy as np
import pytest
import torch

import common
import loading
import training
import miniature.model
import miniature.world
import eval as evaluation
from conftest import SHIPPED_BASE


def _velocity(bundle, model=None, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, *bundle.latent_shape(bundle.resolution))
    embeds, pooled = bundle.encode(["a photo of a red circle", 'a sign that says "K7"'])
    with torch.no_grad():
        return common.velocity(model or bundle.transformer, x, 0.6, embeds, pooled)


def test_bundle_save_then_load_gives_identical_outputs(tiny_model_dir, tmp_path):
    first = training.load_model(tiny_model_dir)
    transformer, text_encoder = first.transformer, None
    # write the loaded bundle's weights again and reload: same prompts, same outputs, bit for bit
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerFast
    text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(tiny_model_dir, "text_encoder"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(tiny_model_dir, "tokenizer"))
    miniature.model.save_model(str(tmp_path / "copy"), transformer, text_encoder, tokenizer, first.scheduler)
    second = training.load_model(str(tmp_path / "copy"))
    assert torch.equal(_velocity(first), _velocity(second))
    for a, b in zip(first.encode(["a photo of two squares"]), second.encode(["a photo of two squares"])):
        assert torch.equal(a, b)


def test_save_model_is_atomic_over_an_existing_folder(tiny_model_dir, tmp_path, monkeypatch):
    target = tmp_path / "model"
    b = training.load_model(tiny_model_dir)
    from transformers import CLIPTextModelWithProjection
    text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(tiny_model_dir, "text_encoder"))
    miniature.model.save_model(str(target), b.transformer, text_encoder, miniature.model.build_tokenizer(), b.scheduler)
    before = sorted(os.listdir(target))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(b.scheduler, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        miniature.model.save_model(str(target), b.transformer, text_encoder, miniature.model.build_tokenizer(), b.scheduler)
    assert sorted(os.listdir(target)) == before
    assert training.load_model(str(target)).kind == "miniature"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


@pytest.mark.skipif(not os.path.isdir(SHIPPED_BASE), reason="the shipped base model is not in this checkout")
def test_shipped_base_loads_and_generates():
    bundle = training.load_model(SHIPPED_BASE)
    assert bundle.kind == "miniature" and bundle.resolution == 64
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED_BASE) for f in fs)
    assert size <= 20 * 2**20
    images = evaluation.sample_images(bundle, ["a photo of a red circle", 'a sign that says "K7"'], [0, 1], 6, 4.5)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert images.float().std() > 25  # a picture, not a flat field
    with open(os.path.join(SHIPPED_BASE, "README.md")) as f:
        card = f.read()
    assert "python -m lab pretrain" in card and "geneval_acc" in card


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load model .*expected a miniature model folder"):
        training.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="cannot load model"):
        training.load_model(str(tmp_path / "does" / "not" / "exist"))


# ---------------------------------------------------------------------------------------------- LoRA

def _randomise(peft_model, name, seed):
    """LoRA B starts at zero (the adapter is a no-op); give it random weights to see its effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if f".{name}." in param_name and "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_lora_student_teachers_switching_disabling_and_saving(tiny_model_dir, tmp_path):
    bundle = training.load_model(tiny_model_dir)
    base_v = _velocity(bundle)
    model = loading.add_lora(bundle.transformer, rank=4, alpha=8)
    assert torch.equal(_velocity(bundle, model), base_v)  # fresh LoRA: B = 0
    _randomise(model, "student", 0)
    student_v = _velocity(bundle, model)
    assert not torch.allclose(student_v, base_v)
    loading.save_adapter(model, "student", str(tmp_path / "teacher"))
    files = sorted(os.listdir(tmp_path / "teacher"))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or \
        {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    with open(tmp_path / "teacher" / "adapter_config.json") as f:
        assert json.load(f)["r"] == 4

    _randomise(model, "student", 1)  # the student moves on; the saved copy is now a "teacher"
    loading.load_adapter(model, str(tmp_path / "teacher"), "geneval")
    assert model.active_adapter == "student"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".student." in n for n in trainable)
    with torch.no_grad(), loading.use_adapter(model, "geneval"):
        teacher_v = _velocity(bundle, model)
    with torch.no_grad(), loading.use_adapter(model, None):
        disabled_v = _velocity(bundle, model)
    assert torch.equal(teacher_v, student_v)  # the teacher is exactly the saved adapter
    assert torch.equal(disabled_v, base_v)  # adapters disabled = the base model
    assert model.active_adapter == "student"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not torch.allclose(_velocity(bundle, model), teacher_v)

    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        loading.load_adapter(model, str(tmp_path / "missing"), "ocr")


def test_sd3_pipeline_folder_loads_as_a_bundle_and_samples(tiny_sd3_dir):
    bundle = training.load_model(tiny_sd3_dir)
    assert bundle.kind == "sd3" and bundle.resolution == 16 and bundle.latent_shape(16) == (4, 8, 8)
    embeds, pooled = bundle.encode(["a photo of a red circle", ""])
    assert embeds.shape[0] == 2 and embeds.shape[-1] == 32 and pooled.shape == (2, 32)
    sigmas = common.sampling_sigmas(bundle.scheduler, 2)
    out = common.rollout(bundle.transformer, embeds, pooled, bundle.latent_shape(16), sigmas, [0, 1], 0.7,
                         4.5, bundle.encode([""]), bundle.decode)
    assert out["images"].shape == (2, 3, 16, 16) and 0 <= out["images"].min() and out["images"].max() <= 1
    assert out["log_probs"].shape == (2, 2) and torch.isfinite(out["log_probs"]).all()


def test_pca_latent_decodes_near_exactly_so_scorers_read_decoded_renders():
    codec = miniature.model.fit_pca_codec(n_images=512)
    items = miniature.world.test_items()
    rng = __import__("random").Random(1)
    pixels = torch.from_numpy(np.stack([np.asarray(miniature.world.render(p, m, rng)) for p, m in items]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = miniature.model.pca_encode(pixels, codec)
    assert latents.shape == (len(items), 12, 16, 16)
    assert abs(latents.std().item() - 1) < 0.15  # about unit scale, like a VAE's scaling_factor
    decoded = miniature.model.pixels_to_images(miniature.model.pca_decode(latents, codec))
    scores = miniature.world.score(decoded, [p for p, _ in items], [m for _, m in items])
    assert np.nanmean(scores["geneval_acc"]) >= 0.95 and np.nanmean(scores["ocr"]) >= 0.95
    # exact on the span of the components: encode(decode(z)) == z
    torch.testing.assert_close(miniature.model.pca_encode(miniature.model.pca_decode(latents, codec), codec), latents,
                               rtol=1e-4, atol=1e-4)


def test_adapter_from_another_base_is_a_clear_error(tiny_model_dir, tiny_sd3_dir, tmp_path):
    other = training.load_model(tiny_sd3_dir)
    other_model = loading.add_lora(other.transformer, rank=4, alpha=8)
    loading.save_adapter(other_model, "student", str(tmp_path / "sd3_adapter"))
    model = loading.add_lora(training.load_model(tiny_model_dir).transformer, rank=4, alpha=8)
    with pytest.raises(ValueError, match="does not fit this base model.*expected an adapter trained on this base"):
        loading.load_adapter(model, str(tmp_path / "sd3_adapter"), "teacher")
