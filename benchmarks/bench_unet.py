"""One training step (forward + backward + AdamW) of our U-Net vs diffusers' UNet2DConditionModel.

Matched parameter count (printed), resolution and batch; caption tokens (B, 77, 512) as the conditioning.
Throughput is measured in this process, alternating the two models; peak memory is the peak RSS growth of a
fresh child process per model (CPU has no allocator statistics). Also prints model FLOPs per image
(torch.utils.flop_counter) so GPU MFU = FLOPs/image × images/s / peak FLOP/s.

    python benchmarks/bench_unet.py [--steps 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import build_model


def diffusers_model(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "tiny":  # ~ our tiny: 32/64/64 channels, 1 block per level, cross-attention at the lowest level
        return UNet2DConditionModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=512,
            attention_head_dim=32, norm_num_groups=16)
    # reduced small: 64/128/192/256 channels, 2 blocks per level, attention at levels 1-3
    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 192, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=512, attention_head_dim=64)


def ours_model(kind: str):
    if kind == "tiny":
        return build_model("tiny")
    return build_model("small", base_channels=64)  # the small recipe at half width


def make(which: str, kind: str):
    m = ours_model(kind) if which == "ours" else diffusers_model(kind)
    if which == "ours":
        return m, lambda x, t, c: m(x, t, c)
    return m, lambda x, t, c: m(x, t, encoder_hidden_states=c["tokens"]).sample


def batch(b, res):
    g = torch.Generator().manual_seed(0)
    cond = {"tokens": torch.randn(b, 77, 512, generator=g), "mask": torch.ones(b, 77, dtype=torch.bool),
            "pooled": torch.randn(b, 512, generator=g)}
    return torch.randn(b, 3, res, res, generator=g), torch.randint(0, 1000, (b,), generator=g), cond


def train_step(fn, opt, x, t, c):
    loss = fn(x, t, c).float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _peak_child(which, kind, b, res, q):
    """Peak RSS growth over two training steps, polled every 2 ms (ru_maxrss would also count any peak reached
    while importing and building, before the steps start)."""
    import threading

    torch.set_num_threads(2)
    m, fn = make(which, kind)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x, t, c = batch(b, res)
    proc = psutil.Process()
    base = proc.memory_info().rss  # now, with the model and batch in memory
    peak, done = [base], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    for _ in range(2):
        train_step(fn, opt, x, t, c)
    done.set()
    poller.join()
    q.put((peak[0] - base) / 2**20)  # peak growth, MiB


def peak_mib(which, kind, b, res):
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pool can deadlock
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(which, kind, b, res, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model (after one warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--res", type=int, default=32, help="image resolution")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"], help="which comparisons")
    args = ap.parse_args()
    torch.set_num_threads(2)
    for kind in args.sizes:
        models = {w: make(w, kind) for w in ("ours", "diffusers")}
        opts = {w: torch.optim.AdamW(models[w][0].parameters(), lr=1e-4) for w in models}
        x, t, c = batch(args.batch, args.res)
        times = {w: [] for w in models}
        for w in models:
            train_step(models[w][1], opts[w], x, t, c)  # warm-up
        for _ in range(args.steps):  # alternate, so both see the same machine state
            for w in models:
                t0 = time.perf_counter()
                train_step(models[w][1], opts[w], x, t, c)
                times[w].append(time.perf_counter() - t0)
        print(f"\n== {kind} @ {args.res}px, batch {args.batch}, {args.steps} steps ==")
        res = {}
        for w, (m, fn) in models.items():
            with FlopCounterMode(display=False) as fc:
                fn(x[:1], t[:1], {k: v[:1] for k, v in c.items()}).sum().backward()
            step = sorted(times[w])[len(times[w]) // 2]
            res[w] = (sum(p.numel() for p in m.parameters()), args.batch / step, peak_mib(w, kind, args.batch, args.res),
                      fc.get_total_flops())
            print(f"{w:10s} params {res[w][0] / 1e6:6.2f}M  {res[w][1]:7.2f} img/s  peak +{res[w][2]:7.0f} MiB  "
                  f"train FLOPs/img {res[w][3] / 1e9:.2f} G")
        o, d = res["ours"], res["diffusers"]
        print(f"ratios ours/diffusers: params {o[0] / d[0]:.2f}  throughput {o[1] / d[1]:.2f}x  memory {o[2] / d[2]:.2f}x")


if __name__ == "__main__":
    main()
