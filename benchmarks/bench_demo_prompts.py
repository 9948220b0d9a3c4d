"""Does the demo follow its prompts? Train the demo config under variants of the diffusion settings on a quickstart's
toy shards and toy CLIP, evaluate each on the held-out captions, and print per-attribute accuracy (shape, colour,
size, position, background, all five) per guidance scale beside the CLIP score and Fréchet distance.

    bash launch/quickstart.sh                                     # once: toy shards, held-out shards, toy CLIP
    python benchmarks/bench_demo_prompts.py --quickstart runs/quickstart --out runs/bench_prompts [--steps 1500]

About 10 minutes per variant on a 2-core CPU (1500 steps + 256 images × 3 guidance scales); finished variants are
reused when run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name → run-config overrides on top of launch/configs/demo.yaml
    "epsilon": ["diffusion.prediction=epsilon", "diffusion.zero_terminal_snr=false"],
    "v": ["diffusion.prediction=v", "diffusion.zero_terminal_snr=false"],
    "v + zero terminal SNR": ["diffusion.prediction=v", "diffusion.zero_terminal_snr=true"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", default="runs/quickstart", help="a quickstart's output folder (its shards and CLIP)")
    p.add_argument("--out", default="runs/bench_prompts", help="one run and evaluation per variant under here")
    p.add_argument("--steps", type=int, default=1500, help="training steps per variant")
    p.add_argument("--images", type=int, default=256, help="held-out captions per guidance scale")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="which variants")
    args = p.parse_args(argv)
    qs, out = Path(args.quickstart), Path(args.out)
    shards = json.loads((qs / "toy_shards" / "manifest.json").read_text())["shards_pattern"]
    clip = qs / "toy_clip.safetensors"
    held_out = str(qs / "held_out" / "00000.tar")
    rows = []
    for name in args.variants:
        folder = out / name.replace(" ", "_").replace("+", "plus")
        if not (folder / "run" / "model" / "config.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "pipeline" / "train.py"), "--config",
                            str(ROOT / "launch" / "configs" / "demo.yaml"), "--output-dir", str(folder / "run"),
                            "--max-steps", str(args.steps), f"data.shards={shards}", f"text_encoder.pretrained={clip}",
                            "logging.tracker=none", "logging.sample_every=0", *VARIANTS[name]], check=True)
        if not (folder / "eval" / "results.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "pipeline" / "evaluate.py"), "run", "--model",
                            str(folder / "run" / "model"), "--captions", held_out, "--ref", held_out, "--num-images",
                            str(args.images), "--guidance", "1", "3", "5", "--steps", "25", "--fd-features", "clip",
                            "--clip-model", f"openclip:toy-clip:{clip}", "--clip-config",
                            str(ROOT / "launch" / "configs" / "clip" / "toy-clip.json"), "--out", str(folder / "eval")],
                           check=True)
        res = json.loads((folder / "eval" / "results.json").read_text())
        rows += [(name, r) for r in res["results"]] + [("real held-out images", res["real"])] * (name == args.variants[-1])
    attrs = ["shape", "colour", "size", "position", "background", "all"]
    print("| variant | guidance | FD (toy-CLIP features) | CLIP score | " + " | ".join(attrs) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(attrs))
    for name, r in rows:
        fd = f"{r['fd_clip']:.1f}" if "fd_clip" in r else "—"
        g = f"{r['guidance']:g}" if "guidance" in r else "—"
        print(f"| {name} | {g} | {fd} | {r['clip_score']:.1f} | " +
              " | ".join(f"{100 * r[f'attr_{a}']:.0f}%" for a in attrs) + " |")


if __name__ == "__main__":
    main()
