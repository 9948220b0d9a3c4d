"""Frozen CLIP text encoders behind one small interface (OpenCLIP and Hugging Face transformers).

``encoder.encode(captions)`` returns a dict the U-Net takes as ``cond``:
    tokens (B, L, D) float — the last hidden states of every token (L = the encoder's context, 77 for CLIP),
    mask   (B, L) bool     — True for real tokens (start, words, end), False for padding,
    pooled (B, P) float    — the pooled caption embedding (the end-of-text token, projected for OpenCLIP).
The empty caption "" is the unconditional input of classifier-free guidance. Captions longer than the context
are truncated, counted (``num_truncated``) and warned about. Nothing here downloads unless the user names a hub
model that is not in the local cache and allows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
KINDS = ("openclip", "hf_clip")


@contextlib.contextmanager
def quiet_open_clip():
    """OpenCLIP logs through the root logger: INFO lines for every model and tokenizer it builds, and "No pretrained
    weights loaded … initialized randomly" even when this project loads the weights right after. Hidden while it
    builds (errors still show); the callers say what matters: which weights, or that there are none."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


@dataclass
class TextEncoderConfig:
    """The text-encoder section of a run's config."""

    kind: str = "openclip"  # openclip | hf_clip
    name: str = "ViT-B-32"  # OpenCLIP model name, or a Hugging Face hub id / local directory
    pretrained: str | None = None  # OpenCLIP: a pretrained tag (from the local cache) or a local checkpoint file
    local_files_only: bool = True  # Hugging Face: never reach the hub
    # OpenCLIP: a local model-config JSON that defines `name` (a custom architecture); hf_clip with a Stable Diffusion
    # single file: a pipeline-like folder of configs (its text_encoder/config.json, tokenizer/)
    config_file: str | None = None
    weights: str | None = None  # a .safetensors of this encoder's own state dict (what training exports)
    seed: int = 0  # the initialisation seed when no pretrained weights are given (the same encoder on every rank)


def _looks_like_path(s: str) -> bool:
    """A filesystem path rather than a tag or hub id ("org/name" is a hub id)."""
    return s.startswith(("/", "./", "../", "~")) or s.endswith(("/", ".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


class TextEncoder(nn.Module):
    """Base class: frozen, in eval mode, ``encode`` under no_grad."""

    dim: int
    pooled_dim: int
    context_length: int
    identity: str  # names the weights, for caches of precomputed embeddings

    def __init__(self):
        super().__init__()
        self.num_truncated = 0

    def freeze(self):
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):  # stays in eval mode: a frozen encoder has no training behaviour
        return super().train(False)

    def _warn_truncated(self, n: int, total: int):
        if n:
            self.num_truncated += n
            log.warning("%d of %d captions were longer than the text encoder's context (%d tokens) and were "
                        "truncated (%d so far)", n, total, self.context_length, self.num_truncated)

    def _fingerprint(self) -> str:
        params = list(self.parameters())
        checksum = sum(float(p.detach().double().sum()) for p in params[:3] + params[-3:])
        return f"{sum(p.numel() for p in params)}:{checksum:.8e}"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an OpenCLIP model: any model name, with a pretrained tag or a local checkpoint file."""

    def __init__(self, name: str, pretrained: str | None = None):
        super().__init__()
        import open_clip

        if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
            raise FileNotFoundError(f"OpenCLIP checkpoint {pretrained!r} does not exist; pass the path of a local "
                                    "weights file (.safetensors, .pt, .bin) or a pretrained tag that is in the cache")
        if name not in open_clip.list_models():
            raise ValueError(f"unknown OpenCLIP model {name!r}; available: {', '.join(open_clip.list_models()[:12])}, … "
                             "(open_clip.list_models(); custom configs via open_clip.add_model_config)")
        try:
            with quiet_open_clip():
                model = open_clip.create_model(name, pretrained=pretrained)
        except RuntimeError as e:  # open_clip reports a checkpoint that does not match the config this way
            raise ValueError(f"could not load OpenCLIP {name!r} from {pretrained!r}: {e}") from e
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(tower, attr):
                raise ValueError(f"OpenCLIP model {name!r} has no CLIP-style text transformer ({attr} missing)")
        self.token_embedding, self.transformer, self.ln_final = tower.token_embedding, tower.transformer, tower.ln_final
        self.positional_embedding = tower.positional_embedding
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.text_projection = tower.text_projection
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        with quiet_open_clip():
            self.tokenizer = open_clip.get_tokenizer(name)
        self.context_length = self.positional_embedding.shape[0]
        self.dim = self.positional_embedding.shape[1]
        self.pooled_dim = self.text_projection.shape[1] if isinstance(self.text_projection, nn.Parameter) else (
            self.text_projection.out_features if isinstance(self.text_projection, nn.Linear) else self.dim)
        self.identity = f"openclip:{name}:{pretrained}:{self._fingerprint()}"
        del model
        self.freeze()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        captions = list(captions)
        if hasattr(self.tokenizer, "encode"):  # SimpleTokenizer: + start and end tokens
            self._warn_truncated(sum(len(self.tokenizer.encode(c)) + 2 > self.context_length for c in captions), len(captions))
        text = self.tokenizer(captions).to(self.device)  # (B, L), 0 = padding
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))  # (B, L, D)
        idx = text.argmax(-1) if self.pool_type == "argmax" else torch.full_like(text[:, 0], text.shape[1] - 1)
        pooled = x[torch.arange(len(x), device=x.device), idx]
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return {"tokens": x, "mask": text != 0, "pooled": pooled}


class HFCLIPTextEncoder(TextEncoder):
    """transformers' CLIPTextModel + CLIPTokenizer from local files: a ``save_pretrained`` folder (the tokenizer's
    files beside the model's), a Stable Diffusion pipeline folder (its text_encoder/ and tokenizer/), an SD 1.x/2.x
    single file (``models.stable_diffusion``; ``config_file``: a pipeline-like folder of configs for other shapes),
    or a hub id in the local cache.

    As Stable Diffusion's pipelines do, the attention mask reaches the model only when its config says
    ``use_attention_mask`` (SD's CLIP runs causally over the padding, and its U-Net attends to every token); the
    returned ``mask`` marks the real tokens either way."""

    def __init__(self, name: str, local_files_only: bool = True, config_file: str | None = None):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        from .stable_diffusion import SDError, is_sd_source, open_sd

        is_dir = Path(name).is_dir()
        if _looks_like_path(name) and not (is_dir or Path(name).is_file()):
            raise FileNotFoundError(f"Hugging Face CLIP {name!r} does not exist; pass a folder holding config.json, "
                                    "the weights and tokenizer files (save_pretrained), a Stable Diffusion folder or "
                                    "single file, or a hub id")
        try:
            if is_sd_source(name):
                self.model, self.tokenizer = open_sd(name, config_file).text_encoder()
            else:
                self.tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=local_files_only)
                self.model = CLIPTextModel.from_pretrained(name, local_files_only=local_files_only)
        except SDError as e:
            raise ValueError(str(e)) from None
        except OSError as e:
            raise FileNotFoundError(
                f"could not load Hugging Face CLIP text model {name!r} from local files ({e}). Download it once "
                f"with `huggingface-cli download {name}` or pass a local directory"
                + ("; or set text_encoder.local_files_only=false to allow a download" if local_files_only else "")) from e
        cfg = self.model.config
        self.use_mask = bool(getattr(cfg, "use_attention_mask", False))
        self.context_length = min(cfg.max_position_embeddings, self.tokenizer.model_max_length)
        self.dim = self.pooled_dim = cfg.hidden_size
        self.identity = f"hf_clip:{name}:{self._fingerprint()}"
        self.freeze()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        captions = list(captions)
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False)["input_ids"]]
        self._warn_truncated(sum(n > self.context_length for n in lengths), len(captions))
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.context_length,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"] if self.use_mask else None)
        return {"tokens": out.last_hidden_state, "mask": batch["attention_mask"].bool(), "pooled": out.pooler_output}

    def save(self, folder: Path) -> None:
        """The model and its tokenizer in one ``save_pretrained`` folder (what this class loads back)."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """Build the frozen encoder ``cfg`` names. With neither ``pretrained`` nor ``weights`` an OpenCLIP encoder is
    randomly initialised from ``seed`` (a warning says so): useful for the CPU demo, not for real training."""
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}; allowed values: {', '.join(KINDS)}")
    if cfg.weights and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"text_encoder.weights={cfg.weights!r} does not exist")
    if cfg.kind == "openclip":
        if cfg.config_file:
            import open_clip

            if not Path(cfg.config_file).is_file():
                raise FileNotFoundError(f"text_encoder.config_file={cfg.config_file!r} does not exist")
            open_clip.add_model_config(cfg.config_file)
        if not cfg.pretrained and not cfg.weights:
            # A custom architecture (config_file: the CPU demo's toy tower) is random by design; a named CLIP is not.
            (log.info if cfg.config_file else log.warning)(
                "text encoder %s has no pretrained weights: randomly initialised from seed %d%s", cfg.name, cfg.seed,
                " (the CPU demo's plan)" if cfg.config_file else "; set text_encoder.pretrained for real training")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            encoder = OpenCLIPTextEncoder(cfg.name, cfg.pretrained)
    else:
        encoder = HFCLIPTextEncoder(cfg.name, cfg.local_files_only, cfg.config_file)
    if cfg.weights:
        from safetensors.torch import load_file

        from safetensors import SafetensorError

        try:
            state = load_file(cfg.weights)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{cfg.weights} is damaged ({e})") from None
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"text_encoder.weights={cfg.weights!r} does not fit {cfg.name!r}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        encoder.identity = f"{cfg.kind}:{cfg.name}:{cfg.weights}:{encoder._fingerprint()}"
    return encoder


class CachedTextEncoder:
    """Memoises an encoder's outputs per caption (stored fp16), so training need not run the encoder every step.

    Keyed by the encoder's ``identity`` and the caption; ``save``/``load`` write a safetensors file that records
    the identity and refuses to load into a different encoder.
    """

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        missing = list(dict.fromkeys(c for c in captions if c not in self.store))
        if missing:
            out = self.encoder.encode(missing)
            for i, c in enumerate(missing):
                self.store[c] = (out["tokens"][i].half().cpu(), out["mask"][i].cpu(), out["pooled"][i].half().cpu())
        rows = [self.store[c] for c in captions]
        return {"tokens": torch.stack([r[0] for r in rows]).float(), "mask": torch.stack([r[1] for r in rows]),
                "pooled": torch.stack([r[2] for r in rows]).float()}

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        caps = list(self.store)
        tensors = {"tokens": torch.stack([self.store[c][0] for c in caps]),
                   "mask": torch.stack([self.store[c][1] for c in caps]).to(torch.uint8),
                   "pooled": torch.stack([self.store[c][2] for c in caps])}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={"encoder": self.encoder.identity, "captions": json.dumps(caps)})
        os.replace(tmp, path)  # atomic: an interrupted save leaves the previous file intact

    def load(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"caption-embedding cache {str(path)!r} does not exist")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            if meta.get("encoder") != self.encoder.identity:
                raise ValueError(f"caption-embedding cache {str(path)!r} was made by text encoder {meta.get('encoder')!r}, "
                                 f"not by the configured {self.encoder.identity!r}; recompute it")
            tokens, mask, pooled = f.get_tensor("tokens"), f.get_tensor("mask").bool(), f.get_tensor("pooled")
        for i, c in enumerate(json.loads(meta["captions"])):
            self.store[c] = (tokens[i], mask[i], pooled[i])
