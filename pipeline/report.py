"""Write a readable report of a quickstart (or any) run: loss curve, sample grids, the metrics table, FD-vs-CLIP plot.

    python pipeline/report.py --run runs/quickstart/run --samples runs/quickstart/samples --eval runs/quickstart/eval \\
        [--latent-run RUN --latent-samples DIR --latent-eval DIR] --out runs/quickstart/report.md

With ``--latent-*``, a second run (in a VAE's latent space) is reported beside the first: training time, time per
step, images/s and the evaluation's numbers side by side, then its samples and attribute table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def training_rows(metrics_file: Path, key: str = "loss") -> dict[int, dict]:
    """metrics.jsonl's lines that hold ``key`` (the training log lines; validation lines hold val_loss), by step; a
    resumed run may log a step twice: the last one is kept."""
    rows = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if key in row:
            rows[row["step"]] = row
    return rows


def loss_curve(metrics_file: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = training_rows(metrics_file)
    val = training_rows(metrics_file, "val_loss")
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, [rows[s]["loss"] for s in steps], label="training")
    if val:
        ax.plot(sorted(val), [val[s]["val_loss"] for s in sorted(val)], "o-", label="validation (fixed t, ε)")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (ε-MSE)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def labelled_grid(samples: Path, out: Path, scale: int = 4) -> Path:
    """The sample grid for viewing: every image enlarged ``scale``× (nearest neighbour: the pixels as generated), rows
    numbered by prompt, columns labelled by guidance scale."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = [json.loads(line) for line in (samples / "metadata.jsonl").read_text().splitlines()]
    prompts = sorted({r["prompt_index"] for r in rows})
    cols = sorted({(r["guidance"], r["image_index"]) for r in rows})
    first = Image.open(samples / rows[0]["file"])
    tile, pad, top, left = first.width * scale, 4, 18, 28
    grid = Image.new("RGB", (left + len(cols) * (tile + pad), top + len(prompts) * (tile + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (g, i) in enumerate(cols):
        draw.text((left + c * (tile + pad) + 2, 3), f"w={g:g}" + (f" #{i + 1}" if i else ""), fill="black", font=font)
    where = {(r["prompt_index"], r["guidance"], r["image_index"]): r["file"] for r in rows}
    for y, p in enumerate(prompts):
        draw.text((6, top + y * (tile + pad) + tile // 2 - 6), f"{p + 1}.", fill="black", font=font)
        for c, (g, i) in enumerate(cols):
            img = Image.open(samples / where[(p, g, i)]).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
            grid.paste(img, (left + c * (tile + pad), top + y * (tile + pad)))
    grid.save(out)
    return out


def training_grids(run: Path, out: Path, scale: int = 3) -> Path | None:
    """The training run's sample grids (fixed prompts, fixed seed) one under the other, enlarged, labelled by step."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    paths = sorted((run / "samples").glob("step_*.png"))
    if not paths:
        return None
    grids = [Image.open(p).convert("RGB") for p in paths]
    grids = [g.resize((g.width * scale, g.height * scale), Image.Resampling.NEAREST) for g in grids]
    left = 70
    canvas = Image.new("RGB", (left + max(g.width for g in grids), sum(g.height + 6 for g in grids)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for path, g in zip(paths, grids):
        draw.text((4, y + g.height // 2 - 6), f"step {int(path.stem.split('_')[1])}", fill="black", font=font)
        canvas.paste(g, (left, y))
        y += g.height + 6
    canvas.save(out)
    return out


def attribute_table(res: dict) -> list[str]:
    """Per-attribute accuracy (toy captions only): the share of images whose shape, colour, size, position and
    background, read back from the pixels, are what the caption asks for."""
    from metrics.toy_attributes import ATTRIBUTES

    rows = [(f"{r['guidance']:g}", r) for r in res["results"] if "attr_all" in r]
    if res.get("real") and "attr_all" in res["real"]:
        rows.append(("real held-out images", res["real"]))
    if not rows:
        return []
    names = [*ATTRIBUTES, "all"]
    lines = ["### Does each image follow its caption?", "",
             "Each attribute read back from the pixels of each image (metrics/toy_attributes.py; 100% on real toy "
             "images) and compared with its caption; *all* = every attribute right. Chance: shape 25%, colour 14%, "
             "size 50%, position 20%, background 25%.", "",
             "| guidance | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for label, r in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * r[f'attr_{a}']:.0f}%" for a in names) + " |")
    return lines + [""]


def likelihood_lines(res: dict) -> list[str]:
    """The evaluation job's likelihood row (``--likelihood N``), if it has one."""
    nll = res.get("likelihood")
    if not nll:
        return []
    parts = []
    if "bits_per_dim" in nll:
        parts.append(f"{nll['bits_per_dim']:.3f} ± {nll['bits_per_dim_stderr'] or 0:.3f} bits/dim through the "
                     f"probability-flow ODE ({nll['ode']['trace']}, rtol {nll['ode']['rtol']:g})")
    if "elbo_bits_per_dim" in nll:
        parts.append(f"≤ {nll['elbo_bits_per_dim']:.3f} ± {nll['elbo_bits_per_dim_stderr'] or 0:.3f} by the ELBO "
                     f"(KL terms: {nll['elbo']['kl_terms']})")
    latent = "latents" in nll["space"]
    return ["## Likelihood", "", f"{nll['num_images']} held-out images, conditioned on {nll['conditioning']}: "
            + "; ".join(parts) + f" (± one standard error over images). Space: {nll['space']}"
            + (" (a density of continuous values: it can be negative)." if latent else "."), ""]


def training_time(run: Path) -> tuple[float, int]:
    """(seconds, steps) of a run's training, from its logged images/s per window (sampling and checkpoints
    included, as they were in the window's wall time)."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ckpts = sorted((run / "checkpoints").glob("step_*/data"))
    world = len(list(ckpts[-1].glob("rank*.json"))) if ckpts else 1
    per_step = cfg["optim"]["batch_size"] * cfg["optim"]["grad_accum"] * world
    rows = training_rows(run / "metrics.jsonl")
    seconds, prev = 0.0, 0
    for step in sorted(rows):
        seconds += (step - prev) * per_step / rows[step]["images_per_s"]
        prev = step
    return seconds, prev


def comparison(runs: list[tuple[str, Path, Path | None]]) -> list[str]:
    """Pixel space beside latent space: cost and quality of each run at guidance 3 (or the closest scale)."""
    lines = ["| run | images | U-Net input | steps | U-Net training | + VAE training | s/step | images/s | "
             "Fréchet distance | CLIP score | all attributes right |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, run, ev in runs:
        meta = json.loads((run / "model" / "config.json").read_text())
        seconds, steps = training_time(run)
        vae = meta.get("autoencoder")
        size = meta["resolution"] // (2 ** (len(json.loads((run / "model" / "vae" / "config.json").read_text())
                                                 ["block_out_channels"]) - 1)) if vae else meta["resolution"]
        last = training_rows(run / "metrics.jsonl")[steps]
        vae_seconds = None
        if vae and Path(vae.get("source", "")).joinpath("training.json").is_file():  # a VAE trained by train_vae.py
            vae_seconds = json.loads(Path(vae["source"]).joinpath("training.json").read_text()).get("seconds")
        extra = f"{vae_seconds / 60:.1f} min" if vae_seconds else "—"
        row = f"| {label} | {meta['resolution']} px | {meta['model']['in_channels']}×{size}² | {steps} | " \
              f"{seconds / 60:.1f} min | {extra} | {seconds / max(steps, 1):.3f} | {last['images_per_s']:.0f} |"
        if ev is not None:
            res = json.loads((ev / "results.json").read_text())
            r = min(res["results"], key=lambda r: abs(r["guidance"] - 3))
            attr = f"{100 * r['attr_all']:.0f}%" if "attr_all" in r else "—"
            row += f" {r[res['fd_metric']]:.2f} (w={r['guidance']:g}) | {r['clip_score']:.1f} | {attr} |"
        else:
            row += " — | — | — |"
        lines.append(row)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run folder")
    p.add_argument("--samples", help="output folder of pipeline/sample.py")
    p.add_argument("--eval", help="output folder of pipeline/evaluate.py run")
    p.add_argument("--latent-run", help="a latent-space run to report beside --run")
    p.add_argument("--latent-samples", help="pipeline/sample.py output of the latent run")
    p.add_argument("--latent-eval", help="pipeline/evaluate.py run output of the latent run")
    p.add_argument("--latent-note", default="", help="a sentence on how the latent run was made (e.g. the VAE)")
    p.add_argument("--out", required=True, help="the report (.md); figures are written beside it")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = lambda path: os.path.relpath(path, out.parent)  # noqa: E731
    run = Path(args.run)
    lines = ["# Quickstart report", ""]
    meta = json.loads((run / "model" / "config.json").read_text())
    rows = training_rows(run / "metrics.jsonl")
    last = rows[max(rows)]
    import yaml

    size = yaml.safe_load((run / "config.yaml").read_text())["model"]["size"]
    lines += [f"Training: `{run}` — {meta['step']} steps of the `{size}` U-Net at "
              f"{meta['resolution']} px; final loss {last['loss']:.4f}; {last['images_per_s']:.0f} images/s; "
              f"data wait {100 * last['data_wait_fraction']:.0f}%; caption dropout {last['caption_dropout_rate']:.3f}.",
              "", f"![loss curve]({rel(loss_curve(run / 'metrics.jsonl', out.parent / 'loss.png'))})", ""]
    if args.samples:
        samples = Path(args.samples)
        rows = [json.loads(line) for line in (samples / "metadata.jsonl").read_text().splitlines()]
        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
        scales = sorted({r["guidance"] for r in rows})
        lines += ["## Samples", "", f"Rows: prompts; columns: guidance {', '.join(f'{g:g}' for g in scales)} "
                  f"(× {len({r['image_index'] for r in rows})} seeds); sampler {rows[0]['sampler']}, "
                  f"{rows[0]['steps']} steps.", ""]
        lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
        lines += ["", f"![samples]({rel(labelled_grid(samples, out.parent / 'samples_labelled.png'))})", "",
                  f"(The grid at its own size: `{rel(samples / 'grid.png')}`.)", ""]
    progress = training_grids(run, out.parent / "training_grids.png")
    if progress:
        lines += ["## During training", "", "The training run's fixed prompts at a fixed seed "
                  "(`logging.sample_every`), one grid per step, top to bottom.", "", f"![training]({rel(progress)})",
                  ""]
    if args.eval:
        res = json.loads((Path(args.eval) / "results.json").read_text())
        fd = res["fd_metric"]
        fd_label = "FID" if fd == "fid" else f"Fréchet distance on {res['fd_features']} features (not FID)"
        lines += ["## Metrics", "", f"{res['num_images']} held-out captions per guidance scale; reference: "
                  f"`{res['reference']}`; CLIP score by `{res['clip_model']}`; {fd_label}; precision/recall "
                  f"{res['precision_recall']}.", "",
                  "| guidance | " + ("FID" if fd == "fid" else "Fréchet distance (CLIP features)") +
                  " | CLIP score | mean cosine | precision | recall |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in res["results"]:
            lines.append(f"| {r['guidance']:g} | {r[fd]:.3f} | {r['clip_score']:.2f} | {r['clip_cosine_mean']:.4f} | "
                         f"{r.get('precision', float('nan')):.3f} | {r.get('recall', float('nan')):.3f} |")
        real = res.get("real")
        if real:
            lines.append(f"| real held-out images | — | {real['clip_score']:.2f} | {real['clip_cosine_mean']:.4f} | — | — |")
        text = meta["text_encoder"]
        own = text.get("pretrained") and str(text["pretrained"]) in res["clip_model"]
        if own:
            lines += ["", "The CLIP that scores is the one whose text tower conditions the U-Net (the toy data has no "
                      "other): fine for comparing guidance scales and runs of this demo, not an independent judge — "
                      "the real images' row says what a perfect model scores with it, and the attribute table below "
                      "judges from the pixels alone."]
        lines += ["", f"![FD vs CLIP]({rel(Path(args.eval) / 'fid_vs_clip.png')})", ""]
        lines += likelihood_lines(res)
        lines += attribute_table(res)
    if args.latent_run:
        lrun = Path(args.latent_run)
        lines += ["## Latent diffusion beside pixel space", "", args.latent_note, "",
                  *comparison([("pixel space", run, Path(args.eval) if args.eval else None),
                               ("latent space", lrun, Path(args.latent_eval) if args.latent_eval else None)]), "",
                  "Training time is the logged images/s over each window (sample grids and checkpoints included). "
                  "The Fréchet distances use each run's own held-out images at its own resolution as reference.", ""]
        if args.latent_samples:
            grid = labelled_grid(Path(args.latent_samples), out.parent / "latent_samples_labelled.png", scale=2)
            lines += ["### Latent run: samples", "", f"![latent samples]({rel(grid)})", ""]
        if args.latent_eval:
            lines += [line.replace("## Likelihood", "### Latent run: likelihood") for line in
                      likelihood_lines(json.loads((Path(args.latent_eval) / "results.json").read_text()))]
            lines += [line.replace("### Does each image follow its caption?", "### Latent run: does each image follow "
                                   "its caption?") for line in
                      attribute_table(json.loads((Path(args.latent_eval) / "results.json").read_text()))]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
