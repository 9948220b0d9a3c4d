"""Write a readable report of a quickstart (or any) run: loss curve, sample grids, the metrics table, FD-vs-CLIP plot.

    python pipeline/report.py --run runs/quickstart/run --samples runs/quickstart/samples --eval runs/quickstart/eval \\
        --out runs/quickstart/report.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def loss_curve(metrics_file: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for line in metrics_file.read_text().splitlines():  # a resumed run may log a step twice: keep the last
        row = json.loads(line)
        rows[row["step"]] = row
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, [rows[s]["loss"] for s in steps])
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run folder")
    p.add_argument("--samples", help="output folder of pipeline/sample.py")
    p.add_argument("--eval", help="output folder of pipeline/evaluate.py run")
    p.add_argument("--out", required=True, help="the report (.md); figures are written beside it")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = lambda path: os.path.relpath(path, out.parent)  # noqa: E731
    run = Path(args.run)
    lines = ["# Quickstart report", ""]
    meta = json.loads((run / "model" / "config.json").read_text())
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
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
                  f"(`logging.sample_every`), one grid per step, top to bottom.", "", f"![training]({rel(progress)})",
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
        lines += attribute_table(res)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
