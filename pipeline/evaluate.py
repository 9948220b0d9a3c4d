"""Evaluation: FID, CLIP score and precision/recall of a trained model across guidance scales, plus everyday metrics.

    python pipeline/evaluate.py run --model runs/demo/model --captions held_out.txt --num-images 1000 \\
        --guidance 1.5 3 5 8 --ref ref_stats.npz|REAL_IMAGES/|"shards/{000..009}.tar" --clip-model SPEC --out eval/
    python pipeline/evaluate.py fid A B [--inception-weights FILE] [--json]        # folders or .npz statistics
    python pipeline/evaluate.py clip-score --images DIR [--captions FILE] --clip-model SPEC [--json]
    python pipeline/evaluate.py ref-stats SOURCE --out FILE.npz                    # folder or shards → mu, sigma
    python pipeline/evaluate.py nll --model runs/demo/model --images HELD_OUT [--method ode|elbo|both] [--json]

`run` generates one image per held-out caption per guidance scale with the sampling code (split across processes
under `accelerate launch`; images already written are kept, so a second invocation generates nothing new), then
writes OUT/results.json, OUT/results.csv and OUT/fid_vs_clip.png. FID follows pytorch-fid exactly (same network,
weights file and preprocessing; float64 statistics; see metrics/fid.py). CLIP specs: a local Hugging Face CLIP
folder, hf:ORG/NAME (cache), or openclip:NAME[:PRETRAINED] (+ --clip-config JSON for a custom architecture).
Weights are never downloaded: a missing file is named, with where it was looked for and how to supply it.

`nll` gives held-out images' negative log-likelihood in bits/dim, with standard errors over images: through the
probability-flow ODE (adaptive solver, Hutchinson's trace estimator) and/or bounded by the ELBO (metrics/likelihood.py
says how 8-bit pixels are dequantised; a latent model's figure is of its latents, and says so). Conditioned on each
image's caption, or on "" with --unconditional; guidance is not a likelihood and is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.files import file_digest, read_json, write_csv, write_json_atomic  # noqa: E402
from data.folders import (captions_for_images, held_out_captions, is_shard_spec, labelled_images,  # noqa: E402
                          list_images, load_folder, load_shards)
from metrics.clip_score import CLIPScorer, summarize  # noqa: E402
from metrics.fid import FeatureStats, InceptionFeatures, frechet_distance, load_stats, save_stats  # noqa: E402
from metrics.prdc import precision_recall  # noqa: E402
from metrics.toy_attributes import attribute_accuracy  # noqa: E402

log = logging.getLogger("evaluate")


# --- images in, features out ---------------------------------------------------------------------------------------

def rank_world():
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def gather_rows(rows: list[tuple[int, np.ndarray]], world: int) -> np.ndarray:
    """Every rank's (index, feature) rows, gathered and put back in index order: the same array for any world size."""
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows = sorted(rows, key=lambda r: r[0])
    return np.stack([r[1] for r in rows]) if rows else np.zeros((0, 0))


def extract(extractor, images, batch_size: int, rank: int = 0, world: int = 1, desc="features") -> np.ndarray:
    """Features of (index, PIL image) pairs; this rank takes every world-th image; consecutive images of one size are
    batched (pytorch-fid's preprocessing: [0, 1] tensors at their own size)."""
    rows, batch = [], []

    def flush():
        if batch:
            feats = extractor([im for _, im in batch])
            rows.extend((i, f) for (i, _), f in zip(batch, feats.double().cpu().numpy()))
            batch.clear()

    for i, img in tqdm(images, desc=desc, unit="img", disable=rank != 0):
        if i % world != rank:
            continue
        if batch and (img.size != batch[0][1].size or len(batch) == batch_size):
            flush()
        batch.append((i, img))
    flush()
    return gather_rows(rows, world)


class InceptionExtractor:
    def __init__(self, weights: str | None, device):
        self.net, self.device = InceptionFeatures(weights).to(device), device
        self.identity = self.net.identity

    def __call__(self, images) -> torch.Tensor:
        x = torch.stack([torch.from_numpy(np.array(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images])
        return self.net(x.to(self.device))


class CLIPImageExtractor:
    def __init__(self, scorer: CLIPScorer):
        self.scorer, self.identity = scorer, scorer.identity

    def __call__(self, images) -> torch.Tensor:
        return self.scorer.image_features(images, normalize=False)


def stats_of(source: str, extractor, batch_size: int, resolution: int | tuple[int, int] = 64, limit: int = 50_000,
             rank: int = 0, world: int = 1) -> tuple[FeatureStats, np.ndarray | None, Counter]:
    """(stats, features or None, skipped) of a folder, a shard spec or an .npz statistics file."""
    skipped: Counter = Counter()
    if source.endswith(".npz"):
        return load_stats(source), None, skipped
    if is_shard_spec(source):
        images = load_shards(source, resolution, limit, skipped)
    else:
        images = load_folder(list_images(source), skipped)
    feats = extract(extractor, images, batch_size, rank, world, desc=f"features of {Path(source).name}")
    if len(feats) < 2:
        raise ValueError(f"{source}: fewer than 2 readable images (skipped: {dict(skipped)})")
    return FeatureStats.of(feats), feats, skipped


# --- captions ------------------------------------------------------------------------------------------------------

# --- subcommands ---------------------------------------------------------------------------------------------------

def cmd_fid(args) -> dict:
    rank, world, state = rank_world()
    extractor = InceptionExtractor(args.inception_weights, state.device)
    a, _, skip_a = stats_of(args.a, extractor, args.batch_size, rank=rank, world=world)
    b, _, skip_b = stats_of(args.b, extractor, args.batch_size, rank=rank, world=world)
    return {"fid": frechet_distance(a, b), "n_a": a.n, "n_b": b.n, "skipped": dict(skip_a + skip_b),
            "features": extractor.identity}


def cmd_ref_stats(args) -> dict:
    rank, world, state = rank_world()
    extractor = InceptionExtractor(args.inception_weights, state.device)
    stats, _, skipped = stats_of(args.source, extractor, args.batch_size, args.resolution, args.max_images, rank, world)
    if state.is_main_process:
        save_stats(stats, args.out)
    return {"out": args.out, "n": stats.n, "skipped": dict(skipped), "features": extractor.identity}


def cmd_clip_score(args) -> dict:
    files = list_images(args.images)
    captions = captions_for_images(files, args.captions)
    scorer = CLIPScorer(args.clip_model, args.clip_config, args.allow_download)
    skipped: Counter = Counter()
    pairs = [(i, img) for i, img in load_folder(files, skipped)]
    cos = scorer.cosines([img for _, img in pairs], [captions[i] for i, _ in pairs], args.batch_size)
    return {**summarize(cos, scorer.identity), "skipped": dict(skipped)}


def likelihood(model, encoder, diffusion, vae, samples, opts, batch_size: int, rank: int, world: int, device,
               progress: bool = True) -> dict:
    """metrics.likelihood.dataset_bits over this job's processes (their per-image rows gathered)."""
    from metrics.likelihood import dataset_bits

    gather = None
    if world > 1:
        from accelerate.utils import gather_object as gather
    return dataset_bits(model, encoder, diffusion, vae, samples, opts, batch_size, rank, world, device, gather, progress)


def nll_settings(args, meta: dict, vae, conditioning: str) -> dict:
    """What a bits/dim figure means: the space it is measured in and how it was computed."""
    from metrics.likelihood import LOG2_127_5

    space = (f"latents of the VAE ({meta['model'].get('in_channels', 4)} channels at 1/{vae.factor} resolution): "
             "bits per latent dimension, not comparable with pixel-space figures" if vae is not None else
             f"8-bit pixels, uniformly dequantised (+log2(127.5) = {LOG2_127_5:.4f} bits for the scale to [-1, 1])")
    out = {"space": space, "conditioning": conditioning, "method": args.method, "seed": args.seed}
    if args.method in ("ode", "both"):
        out["ode"] = {"solver": args.solver, "rtol": args.rtol, "atol": args.atol, "start": "t=0 (the first "
                      "trained noise level)", "trace": "exact" if args.probes == 0 else
                      f"Hutchinson, {args.probes} {args.probe} probe(s) per image"}
    if args.method in ("elbo", "both"):
        t = args.elbo_timesteps
        out["elbo"] = {"kl_terms": "all" if t is None else f"{t} strata, one timestep each, weighted by size",
                       "variance": args.elbo_variance, "decoder": "continuous" if vae is not None else "discretised",
                       "convention": args.elbo_convention, "decoder_variance": "β̃₂ (clipped log-variance)" if
                       args.elbo_convention == "improved_diffusion" else "β₁", "x0_clipped":
                       args.elbo_convention == "improved_diffusion"}
    if args.method in ("ode", "both"):
        out["ode"]["convention"] = "score_sde-style: uniform dequantisation within each 8-bit bin" if vae is None \
            else "the latents' density (continuous)"
    return out


def check_convention(opts, vae):
    """Refused before anything is generated or measured: improved-diffusion's ELBO clips x̂₀ to the pixel range."""
    if vae is not None and opts.method in ("elbo", "both") and opts.elbo_convention == "improved_diffusion":
        raise ValueError("--elbo-convention improved_diffusion clips x̂₀ to the pixel range: it has no meaning for a "
                         "latent model (use ho2020)")


def likelihood_options(args):
    from metrics.likelihood import LikelihoodOptions

    return LikelihoodOptions(method=args.method, probes=args.probes, probe=args.probe, rtol=args.rtol, atol=args.atol,
                             solver=args.solver, elbo_timesteps=args.elbo_timesteps, elbo_variance=args.elbo_variance,
                             elbo_convention=args.elbo_convention, seed=args.seed)


def cmd_nll(args) -> dict:
    from pipeline.checkpoint import load_exported

    if args.guidance is not None:
        raise ValueError("--guidance does not apply to nll: the guided ε_u + w(ε_c − ε_u) is not the score of any "
                         "normalised density, so it has no likelihood. nll measures the conditional model (each "
                         "image's caption) or, with --unconditional, the unconditional one.")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    opts = likelihood_options(args)
    rank, world, state = rank_world()
    model, encoder, diffusion, vae, meta = load_exported(args.model, state.device)
    check_convention(opts, vae)
    skipped: Counter = Counter()
    samples = labelled_images(args.images, meta["resolution"], args.num_images, args.unconditional, args.captions,
                              skipped)
    conditioning = "unconditional (empty caption)" if args.unconditional else "each image's caption"
    log.info("likelihood of %d images by %s, conditioned on %s", len(samples), args.method, conditioning)
    result = likelihood(model, encoder, diffusion, vae, samples, opts, args.batch_size, rank, world, state.device,
                        progress=state.is_main_process)
    per_image = result.pop("images")
    if args.per_image and state.is_main_process:
        write_csv(per_image, Path(args.per_image))
    return {**result, **nll_settings(args, meta, vae, conditioning), "model": str(Path(args.model).resolve()),
            "model_step": meta["step"], "images": args.images, "skipped": dict(skipped)}


def cmd_run(args) -> dict:
    from pipeline.checkpoint import load_exported
    from pipeline.generate import image_seed
    from pipeline.generate import Job, guidance_options, output_size, run_jobs

    if args.likelihood < 0:
        raise ValueError(f"--likelihood is a number of images (0 = none), got {args.likelihood}")
    if args.likelihood and args.ref.endswith(".npz"):
        raise ValueError("--likelihood is measured on the reference images: give --ref as shards or a folder, not "
                         "an .npz of statistics (or run `evaluate.py nll` on held-out images)")
    likelihood_options(args)  # bad likelihood settings fail now, not after generating every image
    guided = guidance_options(args)
    rank, world, state = rank_world()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    captions = held_out_captions(args.captions, args.num_images)
    if len(captions) < args.num_images:
        log.warning("only %d captions for --num-images %d: using each once", len(captions), args.num_images)
    model, encoder, diffusion, vae, meta = load_exported(args.model, state.device)
    size = output_size(meta["resolution"], args.width, args.height, model, vae)  # (width, height) generated
    shape = meta["resolution"] if size == (meta["resolution"],) * 2 else size  # reference shards cropped alike
    if shape != meta["resolution"] and not is_shard_spec(args.ref):
        log.warning("--width/--height %dx%d: the reference %s is taken as it is (only shards are cropped to the "
                    "generated shape); give --ref as shards for a like-for-like FD", *size, args.ref)
    # what the images depend on: a folder made with other settings is refused, not silently reused (skip_existing)
    weights = next(Path(args.model) / n for n in ("unet_ema.safetensors", "unet.safetensors", "config.json")
                   if (Path(args.model) / n).is_file())  # (a model retrained in place to the same step differs here)
    settings = {"model": str(Path(args.model).resolve()), "model_step": meta["step"], "weights": file_digest(weights),
                "captions": hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:16],
                "width": size[0], "height": size[1], "sampler": args.sampler, "steps": args.steps, "seed": args.seed,
                "guidance_rescale": guided["rescale"],
                "guidance_interval": list(guided["interval"]) if guided["interval"] else None}
    for g in args.guidance:
        old_file = out / f"guidance_{g:g}" / "settings.json"
        if not old_file.is_file() and any((old_file.parent / "images").glob("*.png")):
            raise ValueError(f"{old_file.parent} holds images but no settings.json saying how they were made; give "
                             f"another --out, or delete that folder to regenerate")
        old = read_json(old_file) if old_file.is_file() else settings
        if old != settings:
            changed = ", ".join(f"{k}: {old.get(k)} → {v}" for k, v in settings.items() if old.get(k) != v)
            raise ValueError(f"{old_file.parent} holds images made with other settings ({changed}); give another "
                             f"--out, or delete that folder to regenerate")
    if args.likelihood:
        check_convention(likelihood_options(args), vae)
    nll_samples = None
    if args.likelihood:  # read (and captioned) before anything is generated: a bad reference fails now
        nll_samples = labelled_images(args.ref, meta["resolution"], args.likelihood, False, None, Counter())
    scorer = CLIPScorer(args.clip_model, args.clip_config, args.allow_download, state.device)
    extractor = CLIPImageExtractor(scorer) if args.fd_features == "clip" else \
        InceptionExtractor(args.inception_weights, state.device)
    fd_name = "fid" if args.fd_features == "inception" else "fd_clip"

    ref_stats, ref_feats, ref_skipped = stats_of(args.ref, extractor, args.batch_size, shape,
                                                 args.max_ref_images, rank, world)
    rows = []
    for g in args.guidance:
        folder = out / f"guidance_{g:g}"
        jobs = [Job(i, 0, c, "", image_seed(args.seed, i, 0), g) for i, c in enumerate(captions)]
        todo = sum(not (folder / "images" / j.name).is_file() for j in jobs)
        log.info("guidance %g: %d of %d images to generate", g, todo, len(jobs))
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / "settings.json", settings)
        records = run_jobs(jobs, model, encoder, diffusion, size, folder, args.sampler, args.steps,
                           args.batch_size, rank, world, skip_existing=True, progress=state.is_main_process, vae=vae,
                           **guided)
        if state.is_main_process:  # each image → its caption and seed (the images alone do not say)
            (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        state.wait_for_everyone()
        files = [folder / "images" / j.name for j in jobs]
        pairs = list(load_folder(files, Counter()))  # read once: for the features and for the CLIP score
        feats = extract(extractor, pairs, args.batch_size, rank, world, desc=f"features g={g:g}")
        row = {"guidance": g, "n": len(feats), fd_name: frechet_distance(FeatureStats.of(feats), ref_stats)}
        if state.is_main_process:
            row.update({k: v for k, v in summarize(scorer.cosines([im for _, im in pairs],
                                                                  [captions[i] for i, _ in pairs]),
                                                   scorer.identity).items() if k != "n"})
            if ref_feats is not None:
                row.update(precision_recall(ref_feats, feats, k=3, density_coverage=args.density_coverage))
            accuracy = attribute_accuracy([im for _, im in pairs], [captions[i] for i, _ in pairs])
            if accuracy is not None:  # toy captions: which attributes the images follow
                row.update({f"attr_{k}": v for k, v in accuracy.items()})
        rows.append(row)
        log.info("guidance %g: %s", g, {k: v for k, v in row.items() if k != "clip_model"})
    real = real_row(args.ref, shape, len(captions), scorer) if state.is_main_process else None
    nll = None
    if nll_samples:  # bits/dim of the reference images (held out)
        nll = likelihood(model, encoder, diffusion, vae, nll_samples, likelihood_options(args), args.batch_size, rank,
                         world, state.device, progress=state.is_main_process)
        nll = {**{k: v for k, v in nll.items() if k != "images"}, **nll_settings(args, meta, vae, "each image's caption")}
        log.info("likelihood of %d reference images: %s", nll["num_images"],
                 {k: v for k, v in nll.items() if "bits" in k})
    result = {"model": str(Path(args.model).resolve()), "model_step": meta["step"], "width": size[0],
              "height": size[1], "sampler": args.sampler, "steps": args.steps,
              "guidance_rescale": guided["rescale"], "guidance_interval": settings["guidance_interval"],
              "num_images": len(captions), "reference": args.ref, "reference_skipped": dict(ref_skipped),
              "fd_metric": fd_name, "fd_features": extractor.identity, "clip_model": scorer.identity,
              "precision_recall": "k=3 (Kynkäänniemi et al. 2019)" if ref_feats is not None else
              "not computed: the reference is an .npz without features", "results": rows, "real": real,
              "likelihood": nll}
    if state.is_main_process:
        (out / "results.json").write_text(json.dumps(result, indent=1))
        write_csv(rows, out / "results.csv")
        if nll is not None:
            write_csv([{k: v for k, v in nll.items() if not isinstance(v, dict)}], out / "likelihood.csv")
        plot(rows, fd_name, out / "fid_vs_clip.png", extractor.identity, scorer.identity)
    return result


def real_row(ref: str, resolution: int | tuple[int, int], limit: int, scorer) -> dict | None:
    """The same metrics for real images (the reference shards' own images and captions, as many as were generated):
    what a perfect model would score here. None when the reference is not shards."""
    if not is_shard_spec(ref):
        return None
    skipped: Counter = Counter()
    samples = list(load_shards(ref, resolution, limit, skipped, captions=True))
    if not samples:
        return None
    images, captions = [im for _, im, _ in samples], [c for _, _, c in samples]
    row = {"n": len(samples), **{k: v for k, v in summarize(scorer.cosines(images, captions), scorer.identity).items()
                                 if k != "n"}}
    accuracy = attribute_accuracy(images, captions)
    if accuracy is not None:
        row.update({f"attr_{k}": v for k, v in accuracy.items()})
    return row


def plot(rows: list[dict], fd_name: str, path: Path, fd_features: str, clip_model: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs, ys = [r["clip_score"] for r in rows], [r[fd_name] for r in rows]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"w={r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"CLIP score ({_short(clip_model)})")
    ax.set_ylabel("FID" if fd_name == "fid" else f"Fréchet distance on {_short(fd_features)} features")
    ax.set_title("Fréchet distance vs CLIP score across guidance scales", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _short(identity: str) -> str:
    """"openclip:toy-clip:/runs/x.safetensors" → "toy-clip"; "hf_clip:/weights/clip-vit" → "clip-vit"."""
    parts = identity.split(":")
    return Path(parts[1]).name if len(parts) > 1 else identity


def parse_args(argv=None):
    from pipeline.generate import add_guidance_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, clip=False, inception=True):
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("--batch-size", type=int, default=50, help="images per forward (does not change results)")
        if inception:
            sp.add_argument("--inception-weights", help="local FID Inception weights (default: the torch-hub cache)")
        if clip:
            sp.add_argument("--clip-model", required=True, help="HF CLIP folder, hf:ORG/NAME or openclip:NAME[:PRETRAINED]")
            sp.add_argument("--clip-config", help="OpenCLIP model-config JSON for a custom architecture")
            sp.add_argument("--allow-download", action="store_true", help="let Hugging Face fetch a missing hub model")

    sp = sub.add_parser("fid", help="FID between two image folders or .npz statistics files")
    sp.add_argument("a")
    sp.add_argument("b")
    common(sp)
    sp = sub.add_parser("ref-stats", help="Inception statistics (.npz: mu, sigma) of a folder or shards")
    sp.add_argument("source", help="image folder or shard spec")
    sp.add_argument("--out", required=True, help="output .npz (pytorch-fid's format)")
    sp.add_argument("--resolution", type=int, default=64, help="shards: resize/crop images to this size first")
    sp.add_argument("--max-images", type=int, default=50_000, help="shards: stop after this many images")
    common(sp)
    sp = sub.add_parser("clip-score", help="CLIP score of images against their captions")
    sp.add_argument("--images", required=True, help="image folder")
    sp.add_argument("--captions", help="JSONL of {file, caption} (default: same-named .txt beside each image)")
    common(sp, clip=True, inception=False)
    sp = sub.add_parser("run", help="generate for held-out captions at several guidance scales and score")
    sp.add_argument("--model", required=True, help="exported model folder (RUN/model)")
    sp.add_argument("--captions", required=True, help="held-out captions: .txt, .jsonl or shards")
    sp.add_argument("--num-images", type=int, default=1000, help="images per guidance scale (one per caption)")
    sp.add_argument("--guidance", type=float, nargs="+", default=[1.5, 3.0, 5.0, 8.0], help="guidance scales")
    sp.add_argument("--ref", required=True, help="reference: .npz statistics, image folder or shard spec")
    sp.add_argument("--max-ref-images", type=int, default=50_000, help="at most this many reference images")
    sp.add_argument("--fd-features", choices=["inception", "clip"], default="inception",
                    help="features of the Fréchet distance: Inception (FID) or the CLIP model's image tower")
    sp.add_argument("--density-coverage", action="store_true", help="also report density and coverage")
    sp.add_argument("--width", type=int, help="generate at this width in px (default: the training resolution); "
                    "reference shards are resized and cropped to the same shape")
    sp.add_argument("--height", type=int, help="generate at this height in px (default: the training resolution)")
    sp.add_argument("--sampler", default="ddim")
    sp.add_argument("--steps", type=int, default=50)
    add_guidance_args(sp)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="output folder (images per guidance, results.json/.csv, plot)")
    sp.add_argument("--likelihood", type=int, default=0, metavar="N",
                    help="also give bits/dim of the first N reference images (folder or shards; 0 = no)")
    likelihood_args(sp)
    common(sp, clip=True)
    sp = sub.add_parser("nll", help="negative log-likelihood of held-out images in bits/dim (ODE and/or ELBO)")
    sp.add_argument("--model", required=True, help="exported model folder (RUN/model)")
    sp.add_argument("--images", required=True, help="held-out images: a folder or a shard spec")
    sp.add_argument("--num-images", type=int, default=1000, help="at most this many images")
    sp.add_argument("--captions", help="folder: JSONL of {file, caption} (default: same-named .txt beside each image)")
    sp.add_argument("--unconditional", action="store_true", help="condition on the empty caption, not each image's")
    sp.add_argument("--per-image", metavar="CSV", help="also write every image's figures to this CSV")
    sp.add_argument("--seed", type=int, default=0, help="seeds dequantisation, probes and ELBO timesteps per image")
    sp.add_argument("--guidance", type=float, nargs="+", help="refused: a guided model has no likelihood")
    likelihood_args(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sp.add_argument("--batch-size", type=int, default=16, help="images per solve (does not change the figures' "
                    "meaning; the ODE's adaptive steps are shared by a batch)")
    return p.parse_args(argv)


def likelihood_args(sp) -> None:
    sp.add_argument("--method", choices=["ode", "elbo", "both"], default="both",
                    help="probability-flow ODE (a likelihood), ELBO (a bound), or both")
    sp.add_argument("--probes", type=int, default=1, help="ODE: Hutchinson probes per image (0 = exact trace: "
                    "one backward pass per dimension, small images only)")
    sp.add_argument("--probe", choices=["rademacher", "gaussian"], default="rademacher", help="ODE: probe distribution")
    sp.add_argument("--rtol", type=float, default=1e-5, help="ODE: the adaptive solver's relative tolerance")
    sp.add_argument("--atol", type=float, default=1e-5, help="ODE: the adaptive solver's absolute tolerance")
    sp.add_argument("--solver", default="dopri5", help="ODE: a torchdiffeq method (dopri5, bosh3, adaptive_heun, …)")
    sp.add_argument("--elbo-timesteps", type=int, default=None, metavar="K", help="ELBO: estimate the sum of the "
                    "T−1 KL terms from K strata, one timestep each (default: all of them, T network calls per image)")
    sp.add_argument("--elbo-variance", choices=["posterior", "beta"], default="posterior",
                    help="ELBO: reverse-step variance β̃_t (the sampler's) or β_t")
    sp.add_argument("--elbo-convention", choices=["ho2020", "improved_diffusion"], default="ho2020",
                    help="ELBO: decoder σ² = β₁ with x̂₀ as predicted (Ho et al. 2020), or σ² = β̃₂ with x̂₀ clipped "
                         "(what DDPM's and improved-diffusion's published bits/dim use; pixels only)")


COMMANDS = {"fid": cmd_fid, "ref-stats": cmd_ref_stats, "clip-score": cmd_clip_score, "run": cmd_run, "nll": cmd_nll}


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}") from None
    _, _, state = rank_world()
    if state.is_main_process:
        if args.json:
            print(json.dumps(result))
        else:
            print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
