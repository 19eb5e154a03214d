import os
import string
import sys

# The suite is the CPU contract (fp32 weights, bit-exact resumes, CI's machine), so a GPU stays hidden from
# it (set before torch is imported): every `--device` default would otherwise be cuda with bf16 weights.
# tests/test_gpu.py checks the CUDA path where one is present: FLOW_OPD_GPU_TESTS=1 python -m pytest tests/test_gpu.py
if os.environ.get("FLOW_OPD_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHIPPED_BASE = os.path.join(ROOT, "miniature", "base")

import training  # noqa: E402
import miniature.model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised miniature model (small width), saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    transformer, text_encoder, tokenizer, scheduler = miniature.model.build_model(width=64, depth=2, head_dim=32, text_width=64)
    miniature.model.save_model(str(folder), transformer, text_encoder, tokenizer, scheduler)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir):
    return training.load_model(tiny_model_dir)


@pytest.fixture
def rng():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny diffusers StableDiffusion3Pipeline folder in the real layout (two CLIP encoders with a
    local tokenizer, T5 absent, a tiny VAE), standing in for SD3.5-Medium."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd3") / "pipeline"
    tokenizer = miniature.model.build_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=miniature.model.MAX_TOKENS, projection_dim=16, eos_token_id=3))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.06)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(),
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIPModel + CLIPProcessor (character-level tokenizer built here), saved like PickScore."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + '"':
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("pickscore")
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(folder)
    return str(folder)


def cli_error(main, argv, capsys):
    """Runs an entry point as its command line does (training.run_cli): asserts exit status 2 and a single
    `error: ...` line on stderr, and returns that line."""
    with pytest.raises(SystemExit) as stop:
        training.run_cli(lambda: main(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err
