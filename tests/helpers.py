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
