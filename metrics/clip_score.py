"""CLIP score (Hessel et al. 2021): the cosine similarity of CLIP's image and caption embeddings.

Reported two ways, always with the model that produced them:
    clip_score       = max(100 · mean cos, 0)     (torchmetrics' convention: clamp after averaging)
    clip_cosine_mean = mean cos, unclamped          (as GigaGAN's protocol reports it)
Each model uses its own preprocessing (OpenCLIP's validation transform; Hugging Face's CLIPProcessor).

Model specs:
    /path/to/dir                       a Hugging Face CLIPModel folder (save_pretrained; processor files beside it)
    hf:ORG/NAME                        a Hugging Face hub id from the local cache (download only if allowed)
    openclip:NAME[:PRETRAINED]         OpenCLIP model NAME with a pretrained tag (from the cache) or a local file
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class CLIPScorer:
    def __init__(self, spec: str, config_file: str | None = None, allow_download: bool = False, device="cpu"):
        self.device = torch.device(device)
        self.spec = spec
        if spec.startswith("openclip:"):
            self._init_openclip(spec.split(":", 2)[1:], config_file)
        else:
            name = spec[3:] if spec.startswith("hf:") else spec
            if not spec.startswith("hf:") and not Path(name).is_dir():
                raise FileNotFoundError(f"CLIP model {spec!r}: not a local folder; use a Hugging Face CLIP folder, "
                                        f"hf:ORG/NAME (from the cache) or openclip:NAME[:PRETRAINED]")
            self._init_hf(name, allow_download)
        self.model.to(self.device).eval().requires_grad_(False)

    def _init_openclip(self, parts: list[str], config_file: str | None):
        import open_clip

        if config_file:
            open_clip.add_model_config(config_file)
        name, pretrained = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth"))) \
                and not Path(pretrained).is_file():
            raise FileNotFoundError(f"OpenCLIP weights {pretrained} do not exist")
        if pretrained is None:
            import logging

            logging.getLogger(__name__).warning("CLIP evaluator %s has no pretrained weights: randomly initialised "
                                                "(seed 0); its scores only test the plumbing", name)
        from models.text_encoders import quiet_open_clip

        with torch.random.fork_rng(devices=[]), quiet_open_clip():
            torch.manual_seed(0)  # a random evaluator must at least be the same one every time
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(name)
        self.kind, self.identity = "openclip", f"openclip:{name}:{pretrained}"

    def _init_hf(self, name: str, allow_download: bool):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name, local_files_only=not allow_download)
            self.processor = CLIPProcessor.from_pretrained(name, local_files_only=not allow_download)
        except OSError as e:
            raise FileNotFoundError(f"Hugging Face CLIP {name!r} is not available locally ({e}); pass a local folder "
                                    f"or allow a download") from None
        self.kind, self.identity = "hf_clip", f"hf_clip:{name}"

    @torch.no_grad()
    def image_features(self, images: list, normalize: bool = True) -> torch.Tensor:
        """PIL images → (N, D) embeddings (unit length if normalize)."""
        if self.kind == "openclip":
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
            f = self.model.encode_image(x)
        else:
            x = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            f = _tensor(self.model.get_image_features(pixel_values=x.to(self.device)))
        f = f.float()
        return f / f.norm(dim=-1, keepdim=True) if normalize else f

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        if self.kind == "openclip":
            f = self.model.encode_text(self.tokenizer(list(captions)).to(self.device))
        else:
            context = min(self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
            t = self.processor(text=list(captions), return_tensors="pt", padding=True, truncation=True,
                               max_length=context)
            f = _tensor(self.model.get_text_features(input_ids=t["input_ids"].to(self.device),
                                                     attention_mask=t["attention_mask"].to(self.device)))
        f = f.float()
        return f / f.norm(dim=-1, keepdim=True)

    def cosines(self, images: list, captions: list[str], batch_size: int = 64) -> np.ndarray:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = []
        for i in range(0, len(images), batch_size):
            img = self.image_features(images[i:i + batch_size])
            txt = self.text_features(captions[i:i + batch_size])
            out.append((img * txt).sum(-1).double().cpu())
        return torch.cat(out).numpy()


def _tensor(x):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if torch.is_tensor(x):
        return x
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(x, key, None) is not None:
            return getattr(x, key)
    raise TypeError(f"unexpected CLIP feature output {type(x)}")


def summarize(cosines: np.ndarray, identity: str) -> dict:
    mean = float(np.mean(cosines))
    return {"clip_score": max(100.0 * mean, 0.0), "clip_cosine_mean": mean, "clip_model": identity, "n": len(cosines)}
