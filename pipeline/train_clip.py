"""Train a small OpenCLIP model contrastively on shards — the demo's evaluator, since no pretrained CLIP may be
downloaded (and a web CLIP would not know the toy domain anyway).

    python pipeline/train_clip.py --shards "toy_shards/{00000..00007}.tar" --out runs/toy_clip.safetensors

OpenCLIP's own model (``--model``, a config registered from ``--config-file``) and loss (``open_clip.loss.ClipLoss``,
the symmetric InfoNCE of Radford et al. 2021) over the project's loader; the result is a full OpenCLIP state dict
that loads as ``openclip:NAME:FILE`` in the evaluation job and as ``text_encoder.pretrained`` in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import DataConfig, Loader  # noqa: E402

log = logging.getLogger("train_clip")
ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="training shards (brace pattern, folder, …)")
    p.add_argument("--out", required=True, help="output .safetensors (full OpenCLIP state dict)")
    p.add_argument("--model", default="toy-clip", help="OpenCLIP model name")
    p.add_argument("--config-file", default=str(ROOT / "launch/configs/clip/toy-clip.json"),
                   help="OpenCLIP model-config JSON defining --model")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="captions must differ within a batch to be negatives")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import open_clip
    from safetensors.torch import save_file

    from models.text_encoders import quiet_open_clip

    open_clip.add_model_config(args.config_file)
    torch.manual_seed(args.seed)
    with quiet_open_clip():  # random initialisation is the point here
        model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
        tokenizer = open_clip.get_tokenizer(args.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    loader = Loader(DataConfig(shards=args.shards, resolution=size, num_workers=1, seed=args.seed), args.batch_size)
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    bar = tqdm(total=args.steps, desc="train toy CLIP", disable=not sys.stderr.isatty())
    for step, batch in zip(range(args.steps), loader):
        images = (batch.images.float() / 255 - mean) / std  # the same normalisation as OpenCLIP's preprocessing
        img, txt, scale = model(images, tokenizer(batch.captions))[:3]
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        if (step + 1) % 50 == 0:
            with torch.no_grad():
                acc = ((img @ txt.T).argmax(1) == torch.arange(len(img))).float().mean().item()
            log.info("step %d: contrastive loss %.3f, in-batch caption retrieval %.0f%%", step + 1, loss.item(), 100 * acc)
    bar.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp)
    Path(tmp).replace(args.out)
    log.info("saved %s (use openclip:%s:%s with --clip-config %s)", args.out, args.model, args.out, args.config_file)
    return args.out


if __name__ == "__main__":
    main()
