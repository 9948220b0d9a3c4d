"""Shared test helpers."""

import contextlib
import json
import socket
from pathlib import Path

import open_clip


def free_port() -> int:
    """A port free now on localhost, for a launch's rendezvous (two launches on xdist's workers must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_hf_tokenizer(d: Path):
    """A real CLIP tokenizer offline: OpenCLIP ships the BPE vocabulary; write it in CLIPTokenizer's format to ``d``."""
    from transformers import CLIPTokenizer

    tok = open_clip.get_tokenizer("ViT-B-32")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in tok.encoder.items()}
    (d / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    tokenizer.save_pretrained(d)
    return tokenizer


def make_vae(folder: Path, latent_channels: int = 4, scaling_factor: float = 0.5, shift_factor=None, seed: int = 0,
             sample_size: int = 16):
    """A small random diffusers AutoencoderKL (3 levels: factor 4), saved with save_pretrained to ``folder``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=latent_channels,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, mid_block_add_attention=False,
                        sample_size=sample_size, scaling_factor=scaling_factor, shift_factor=shift_factor,
                        use_quant_conv=latent_channels == 4, use_post_quant_conv=latent_channels == 4)
    vae.save_pretrained(folder)
    return folder


def tiny_unet_config(version: str = "sd1") -> dict:
    """A tiny UNet2DConditionModel config of Stable Diffusion's shape (cross-attention at the finer levels, two
    layers per block: the LDM layout's index arithmetic is exercised), 32-wide tokens."""
    cfg = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16, 16],
           "layers_per_block": 2, "norm_num_groups": 4, "cross_attention_dim": 32, "attention_head_dim": 2,
           "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
    if version == "sd2":
        cfg.update(attention_head_dim=[1, 2, 2], use_linear_projection=True)
    return cfg


def make_sd(folder: Path, prediction: str = "epsilon", version: str = "sd1", seed: int = 0) -> Path:
    """A complete, tiny, random Stable Diffusion pipeline folder (diffusers layout), saved offline: the U-Net above,
    a 3-level VAE (factor 4), a 2-layer CLIPTextModel (quick_gelu for SD 1.x, gelu as OpenCLIP ViT-H for 2.x), CLIP's
    real tokenizer and a DDIMScheduler with SD's schedule."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.stable_diffusion import TOKENIZER_PAD, clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(version))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        sample_size=32, scaling_factor=0.6)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        hidden_act="gelu" if version == "sd2" else "quick_gelu"))
    for p in list(unet.parameters()) + list(vae.parameters()) + list(text.parameters()):
        with torch.no_grad():  # zero-initialised outputs would hide wrong key mappings: make every tensor random
            p.add_(torch.randn_like(p) * 0.02)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if prediction == "v" else prediction)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(TOKENIZER_PAD[version]),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


# `model.size=sd` shrunk to a test's size (diffusers' UNet2DConditionModel, two levels, cross-attention at the first)
TINY_SD_OVERRIDES = ["model.overrides.block_out_channels=[16, 32]", "model.overrides.layers_per_block=1",
                     "model.overrides.norm_num_groups=8", "model.overrides.attention_head_dim=2",
                     "model.overrides.down_block_types=[CrossAttnDownBlock2D, DownBlock2D]",
                     "model.overrides.up_block_types=[UpBlock2D, CrossAttnUpBlock2D]"]


@contextlib.contextmanager
def threads(n: int):
    """PyTorch's intra-op threads set to ``n`` inside: a reference computed in this process then runs the kernels a
    subprocess started with OMP_NUM_THREADS=n runs. On CPUs with AVX-512 FP16 / AMX, oneDNN's reductions split by
    thread count, so 2 threads and 1 differ in the last bits (amplified by adaptive ODE solvers)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
