"""Shared test helpers."""

import json
from pathlib import Path

import open_clip


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
