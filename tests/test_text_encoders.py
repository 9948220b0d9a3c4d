"""Tiny randomly initialised OpenCLIP and Hugging Face CLIP text encoders, saved and loaded as local files."""

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tests.helpers import write_hf_tokenizer
from models.text_encoders import (CachedTextEncoder, HFCLIPTextEncoder, OpenCLIPTextEncoder, TextEncoderConfig,
                                  build_text_encoder)

LONG = " ".join(["a small red triangle at the top left on a light blue background"] * 8)


@pytest.fixture(scope="module")
def openclip_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("openclip")
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip", pretrained=None)
    path = d / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfclip")
    write_hf_tokenizer(d)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407)
    CLIPTextModel(cfg).save_pretrained(d)
    return d


def test_openclip_loads_local_file_and_matches_open_clip(openclip_file):
    path, ref = openclip_file
    enc = OpenCLIPTextEncoder("tiny-test-clip", pretrained=str(path))
    out = enc.encode(["a red circle", ""])
    assert out["tokens"].shape == (2, 77, 32) and out["pooled"].shape == (2, 24)
    assert out["mask"].dtype == torch.bool and out["mask"][1].sum() == 2 and out["mask"][0].sum() == 5
    # the pooled embedding equals OpenCLIP's own encode_text on the same weights
    text = open_clip.get_tokenizer("tiny-test-clip")(["a red circle", ""])
    torch.testing.assert_close(out["pooled"], ref.eval().encode_text(text), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    enc.train()
    assert not enc.training


def test_hf_clip_loads_local_directory(hf_dir):
    enc = HFCLIPTextEncoder(str(hf_dir))
    out = enc.encode(["a red circle", ""])
    assert out["tokens"].shape == (2, 77, 32) and out["pooled"].shape == (2, 32)
    assert out["mask"][1].sum() == 2 and out["mask"][0].sum() == 5
    ref = CLIPTextModel.from_pretrained(hf_dir)
    ids = CLIPTokenizer.from_pretrained(hf_dir)(["a red circle"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(out["pooled"][:1], ref(input_ids=ids).pooler_output, atol=1e-5, rtol=1e-5)
    assert enc.encode(["a blue square"])["tokens"].sub(out["tokens"][:1]).abs().max() > 0


@pytest.mark.parametrize("which", ["openclip", "hf"])
def test_long_caption_is_truncated_with_a_warning(which, openclip_file, hf_dir, caplog):
    enc = (OpenCLIPTextEncoder("tiny-test-clip", str(openclip_file[0])) if which == "openclip"
           else HFCLIPTextEncoder(str(hf_dir)))
    with caplog.at_level(logging.WARNING, logger="models.text_encoders"):
        out = enc.encode([LONG, "short"])
    assert enc.num_truncated == 1
    assert any("1 of 2 captions were longer" in r.message for r in caplog.records)
    assert out["mask"][0].all()  # the truncated caption fills the whole context


def test_build_from_config(openclip_file, hf_dir):
    assert build_text_encoder(TextEncoderConfig("openclip", "tiny-test-clip", str(openclip_file[0]))).dim == 32
    assert build_text_encoder(TextEncoderConfig("hf_clip", str(hf_dir))).dim == 32
    with pytest.raises(ValueError, match="unknown text encoder kind 't5'; allowed values: openclip, hf_clip"):
        build_text_encoder(TextEncoderConfig("t5", "x"))


def test_building_is_quiet_and_random_weights_are_said_once(openclip_file, caplog):
    """OpenCLIP's own INFO lines and its "initialized randomly" (printed even when weights are loaded right after) are
    hidden; a random tower is an INFO line for the demo's custom architecture and a warning for a named model."""
    caplog.set_level(logging.DEBUG)
    build_text_encoder(TextEncoderConfig("openclip", "tiny-test-clip", str(openclip_file[0])))
    assert not [r for r in caplog.records if r.name == "root"], [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if "random" in r.getMessage()]
    caplog.clear()
    toy = Path(__file__).resolve().parents[1] / "launch" / "configs" / "clip" / "toy-clip.json"
    build_text_encoder(TextEncoderConfig("openclip", "toy-clip", config_file=str(toy)))
    said = [r for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO] and not [r for r in caplog.records if r.name == "root"]
    caplog.clear()
    build_text_encoder(TextEncoderConfig("openclip", "tiny-test-clip"))
    said = [r for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING] and "text_encoder.pretrained" in said[0].getMessage()


def test_missing_files_and_unknown_names(tmp_path, openclip_file):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenCLIPTextEncoder("tiny-test-clip", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="unknown OpenCLIP model 'ViT-Z-99'"):
        OpenCLIPTextEncoder("ViT-Z-99")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFCLIPTextEncoder(str(tmp_path / "missing_dir") + "/")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        HFCLIPTextEncoder("openai/clip-vit-not-in-cache")


def test_checkpoint_that_does_not_match_the_config(tmp_path, openclip_file):
    sd = {k: v for k, v in open_clip.create_model("tiny-test-clip").state_dict().items()}
    sd["token_embedding.weight"] = torch.zeros(100, 32)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="could not load OpenCLIP"):
        OpenCLIPTextEncoder("tiny-test-clip", str(tmp_path / "bad.safetensors"))


def test_caption_cache_round_trip_and_identity(tmp_path, openclip_file, hf_dir):
    enc = OpenCLIPTextEncoder("tiny-test-clip", str(openclip_file[0]))
    cache = CachedTextEncoder(enc)
    calls = []
    orig = enc.encode
    enc.encode = lambda caps: calls.append(list(caps)) or orig(caps)
    a = cache.encode(["red", "blue", "red"])
    b = cache.encode(["blue", "green"])
    assert calls == [["red", "blue"], ["green"]]  # each caption is encoded once
    torch.testing.assert_close(a["tokens"][1], b["tokens"][0])
    torch.testing.assert_close(a["pooled"], orig(["red", "blue", "red"])["pooled"], atol=2e-3, rtol=2e-3)  # fp16 storage
    cache.save(tmp_path / "emb.safetensors")
    fresh = CachedTextEncoder(enc)
    fresh.load(tmp_path / "emb.safetensors")
    torch.testing.assert_close(fresh.encode(["green"])["tokens"], b["tokens"][1:])
    other = CachedTextEncoder(HFCLIPTextEncoder(str(hf_dir)))
    with pytest.raises(ValueError, match="recompute it"):
        other.load(tmp_path / "emb.safetensors")


def test_unet_runs_on_encoder_output(openclip_file):
    from models import build_model

    enc = OpenCLIPTextEncoder("tiny-test-clip", str(openclip_file[0]))
    unet = build_model("tiny", context_dim=enc.dim, pooled_dim=enc.pooled_dim)
    out = unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), enc.encode(["a", "b"]))
    assert out.shape == (2, 3, 16, 16)
