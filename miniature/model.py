"""The miniature model: a real diffusers SD3Transformer2DModel over a 16x16x12 PCA latent of the
miniature world's 64x64 renders, with a tiny CLIP text encoder and a local word-level tokenizer.
Built and pretrained by `python -m lab pretrain`; loaded by training.load_model like the real SD3.
"""
import json
import os
import random

import numpy as np
import torch

import common
import loading
from miniature.world import (GENEVAL_TAGS, NUMBERS, OCR_ALPHABET, SIZE, all_geneval_items, held_out_prompts, ocr_prompt,
                       render)


# ----------------------------------------------------------------------------------------------
# Tokenizer, latent codec, model


MAX_TOKENS = 16


SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[UNK]", "[EOS]"]  # EOS id 3, not 2: CLIP's pooled-token rule


def build_tokenizer():
    """A word-level tokenizer built locally: one token per vocabulary word, one per quoted character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for tag in GENEVAL_TAGS for m in all_geneval_items(tag) for w in m["prompt"].split()}
                   | set(ocr_prompt("").replace('"', " ").split()) | set(NUMBERS.values()))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words + ['"'] + sorted(set(OCR_ALPHABET + "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r'[a-z]+|[A-Z0-9]|"|[^a-zA-Z0-9"]+'), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=MAX_TOKENS)


def pca_encode(pixels, codec):
    """A linear, near-exact latent space: each f x f x 3 pixel patch (pixels in [-1, 1]) projected on
    k principal components, times a global scale: (B, 3, H, W) -> (B, k, H/f, W/f)."""
    f = int(codec["factor"])
    b, _, height, width = pixels.shape
    patches = pixels.float().permute(0, 2, 3, 1).reshape(b, height // f, f, width // f, f, 3)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(b, height // f, width // f, f * f * 3)
    return ((patches - codec["mean"]) @ codec["basis"].T * codec["scale"]).permute(0, 3, 1, 2)


def pca_decode(latents, codec):
    """Inverse of pca_encode (exact on the span of the components): (B, k, h, w) -> (B, 3, h f, w f)."""
    f = int(codec["factor"])
    b, _, h, w = latents.shape
    patches = latents.float().permute(0, 2, 3, 1) / codec["scale"] @ codec["basis"] + codec["mean"]
    return patches.reshape(b, h, w, f, f, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * f, w * f)


def pixels_to_images(x):
    """Pixels in [-1, 1] -> images in [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def fit_pca_codec(factor=4, channels=12, n_images=2048, seed=0):
    """The PCA latent space (common.pca_encode/pca_decode) fitted on pretraining renders."""
    import torch
    _, images = pretraining_batch(random.Random(seed), n_images, held_out_prompts())
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    codec = {"factor": torch.tensor(factor), "scale": torch.tensor(1.0)}
    patches = pixels.permute(0, 2, 3, 1).reshape(-1, SIZE // factor, factor, SIZE // factor, factor, 3)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(-1, factor * factor * 3)
    codec["mean"] = patches.mean(0)
    codec["basis"] = torch.linalg.svd(patches - codec["mean"], full_matrices=False)[2][:channels].contiguous()
    codec["scale"] = 1 / pca_encode(pixels, codec).std()
    return codec


def build_model(width=192, depth=6, head_dim=32, text_width=128, text_layers=2, patch=8, seed=0, channels=3, side=SIZE):
    """A randomly initialised miniature model: (transformer, text_encoder, tokenizer, scheduler)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=text_width // 32, max_position_embeddings=MAX_TOKENS,
        projection_dim=text_width, bos_token_id=1, eos_token_id=3, pad_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=side, patch_size=patch, in_channels=channels, out_channels=channels, num_layers=depth,
        attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=text_width,
        caption_projection_dim=width, pooled_projection_dim=text_width, pos_embed_max_size=side // patch,
        qk_norm="rms_norm")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return transformer, text_encoder, tokenizer, scheduler


def save_model(folder, transformer, text_encoder, tokenizer, scheduler, card=None, dtype=None, codec=None,
               eval_steps=20, guidance_scale=4.5):
    """Writes the folder that training.load_model reads, atomically. `dtype` casts the stored weights
    (bfloat16 halves the shipped size)."""
    import copy

    def write(tmp):
        from diffusers.utils import logging as diffusers_logging
        diffusers_logging.set_verbosity_error()  # .to(bf16) warns about fp32-kept modules; SD3 has none
        for name, module in (("transformer", transformer), ("text_encoder", text_encoder)):
            (copy.deepcopy(module).to(dtype) if dtype is not None else module).save_pretrained(os.path.join(tmp, name))
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        if codec is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in codec.items()}, os.path.join(tmp, "latent.safetensors"))
        with open(os.path.join(tmp, "miniature.json"), "w") as f:
            json.dump({"resolution": SIZE, "max_tokens": MAX_TOKENS, "space": "pixels" if codec is None else "pca",
                       "eval_steps": eval_steps, "guidance_scale": guidance_scale}, f, indent=1)
        if card:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card)
    loading.atomic_write_dir(folder, write)


# ----------------------------------------------------------------------------------------------
# Loading: a ModelBundle, as loading.load_sd3 gives for the real model


MINIATURE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # what the miniature results were trained with


def load_miniature(folder, device="cpu", dtype=torch.float32):
    """The miniature model: pixel-space SD3 transformer, tiny CLIP text encoder, exact decoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerFast
    with open(os.path.join(folder, "miniature.json")) as f:
        config = json.load(f)
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype).to(device)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype).to(device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, "tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    codec = None
    if config["space"] == "pca":
        from safetensors.torch import load_file
        codec = load_file(os.path.join(folder, "latent.safetensors"), device=str(device))

    @torch.no_grad()
    def encode(prompts):
        return encode_miniature(text_encoder, tokenizer, prompts, config["max_tokens"])

    @torch.no_grad()
    def decode(latents):
        return pixels_to_images(latents if codec is None else pca_decode(latents, codec))

    return loading.ModelBundle(transformer, scheduler, encode, decode, miniature_latent_shape(transformer, codec),
                       config["resolution"], "miniature", str(folder),
                       {"eval_steps": config["eval_steps"], "guidance_scale": config["guidance_scale"],
                        "lora_targets": MINIATURE_LORA_TARGETS, "eval_batch_size": 64, "decode_batch_size": 64})


def miniature_latent_shape(transformer, codec):
    """resolution -> (C, h, w): pixels, or the PCA latent at 1/factor of the resolution."""
    channels = transformer.config.in_channels
    factor = 1 if codec is None else int(codec["factor"])
    return lambda res: (channels, res // factor, res // factor)


def encode_miniature(text_encoder, tokenizer, prompts, max_tokens):
    """Prompt embeddings of the miniature model (differentiable: pretraining trains the encoder)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_tokens, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    out = text_encoder(ids)
    return out.last_hidden_state, out.text_embeds


# ----------------------------------------------------------------------------------------------
# Pretraining data and loss


def pretraining_batch(rng, batch_size, held_out):
    """Prompts from the whole miniature world except the held-out test compositions, half GenEval
    (a uniformly drawn tag), half OCR strings, with a correct render of each."""
    prompts, images = [], []
    while len(prompts) < batch_size:
        if rng.random() < 0.5:
            meta = rng.choice(all_geneval_items(rng.choice(GENEVAL_TAGS)))
            prompt = meta["prompt"]
        else:
            meta, prompt = None, ocr_prompt("".join(rng.choice(OCR_ALPHABET) for _ in range(rng.randint(1, 3))))
        if prompt in held_out:
            continue
        prompts.append(prompt)
        images.append(np.asarray(render(prompt, meta, rng)))
    return prompts, np.stack(images)


def rectified_flow_loss(transformer, text_encoder, tokenizer, x0, prompts, shift, bf16=True):
    """Pretraining's rectified-flow loss (common.flow_matching_loss) with the text encoder trained too."""
    import torch
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        embeds, pooled = encode_miniature(text_encoder, tokenizer, prompts, MAX_TOKENS)
    return common.flow_matching_loss(transformer, x0, embeds, pooled, shift, bf16)
