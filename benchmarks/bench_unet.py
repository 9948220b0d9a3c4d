"""One training step (forward + backward + AdamW) of our U-Net vs diffusers' UNet2DConditionModel.

Matched parameter count (printed), resolution and batch; caption tokens (B, 77, 512) as the conditioning; the same
optimizer (fused AdamW, as the training job uses) and the same precision and memory format for both models.
Throughput is measured in this process, alternating the two models. Memory is measured in a fresh child process
per model, two ways: the peak of live tensor bytes during one step (PyTorch's profiler memory timeline, the CPU
analogue of ``torch.cuda.max_memory_allocated``; deterministic) and the peak RSS growth over the first two steps,
polled every 2 ms (what the OS sees; median of 3, glibc's mmap threshold pinned — see ``peak_mib``). Also prints model FLOPs per image (torch.utils.flop_counter) so GPU MFU =
FLOPs/image × images/s / peak FLOP/s.

With ``--device cuda`` the steps are timed between CUDA synchronisations and memory is ``torch.cuda.max_memory_allocated``
over one step after warm-up (in this process; no RSS column), and MFU is printed against ``--peak-tflops``.

    python benchmarks/bench_unet.py [--sizes tiny small] [--precisions fp32 bf16] [--channels-last] [--compile]
                                    [--steps 5] [--device cpu|cuda] [--batch 16] [--res 32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import build_model


# UNet2DConditionModel's `attention_head_dim` is the number of heads, not their width (diffusers issue #2011; passing
# `num_attention_heads` is refused). Per level, as many heads as give our head width: 32 channels for tiny, 64 for small.
HEADS = {"tiny": (1, 2, 2), "small": (1, 2, 3, 4)}


def diffusers_model(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "tiny":  # ~ our tiny: 32/64/64 channels, 1 block per level, cross-attention at the lowest level
        return UNet2DConditionModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=512,
            attention_head_dim=HEADS["tiny"], norm_num_groups=16)
    # reduced small: 64/128/192/256 channels, 2 blocks per level, attention at levels 1-3
    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 192, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=512, attention_head_dim=HEADS["small"])


OURS_SMALL_BASE = 72  # the small recipe at 0.56 width: 35.0M vs diffusers 36.2M (--ours-base changes it)


def ours_model(kind: str):
    if kind == "tiny":
        return build_model("tiny")
    # from the environment, so that the spawned memory-measuring children see --ours-base too
    return build_model("small", base_channels=int(os.environ.get("BENCH_OURS_BASE", OURS_SMALL_BASE)))


def make(which: str, kind: str):
    m = ours_model(kind) if which == "ours" else diffusers_model(kind)
    if which == "ours":
        return m, lambda x, t, c: m(x, t, c)
    return m, lambda x, t, c: m(x, t, encoder_hidden_states=c["tokens"]).sample


def batch(b, res, device="cpu"):
    g = torch.Generator().manual_seed(0)
    cond = {"tokens": torch.randn(b, 77, 512, generator=g), "mask": torch.ones(b, 77, dtype=torch.bool),
            "pooled": torch.randn(b, 512, generator=g)}
    x, t = torch.randn(b, 3, res, res, generator=g), torch.randint(0, 1000, (b,), generator=g)
    return x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()}


def setup(which, kind, b, res, channels_last, compile_=False, device="cpu"):
    m, fn = make(which, kind)
    m = m.to(device)
    x, t, c = batch(b, res, device)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if compile_:
        m.compile()  # in place, as train.compile does (inductor)
    return m, fn, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), (x, t, c)


def train_step(fn, opt, data, precision):
    with torch.autocast(data[0].device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = fn(*data).float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _peak_child(which, kind, b, res, precision, channels_last, compile_, q):
    """(peak live tensor MiB during a step, peak RSS growth MiB over the first two steps)."""
    import threading

    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(2)
    _, fn, opt, data = setup(which, kind, b, res, channels_last, compile_)
    if compile_:  # compile outside the measured window (the parent's compilation left the graphs in inductor's cache)
        train_step(fn, opt, data, precision)
    proc = psutil.Process()
    base = proc.memory_info().rss  # the model and the batch are in memory; no step has run
    peak, done = [base], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    for _ in range(2):
        train_step(fn, opt, data, precision)
    done.set()
    poller.join()
    # gradients and optimizer state exist from here on, as in training: the timeline counts them from its start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        train_step(fn, opt, data, precision)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_memory_timeline(os.path.join(tmp, "mem.raw.json"), device="cpu")
        with open(os.path.join(tmp, "mem.raw.json")) as f:
            _, sizes = json.load(f)
    totals = [sum(s) for s in sizes]  # bytes live (by category) at each allocation event
    q.put(((max(totals) - totals[0]) / 2**20, (peak[0] - base) / 2**20))


def cuda_peak_mib(fn, opt, data, precision):
    """Peak CUDA memory allocated during one step after warm-up, above what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(fn, opt, data, precision)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def print_profile(which, fn, opt, data, precision, top):
    from torch.profiler import ProfilerActivity, profile

    cuda = data[0].device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        train_step(fn, opt, data, precision)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"-- {which}: top {top} by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def timed_step(fn, opt, data, precision):
    cuda = data[0].device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_step(fn, opt, data, precision)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_mib(*args, repeats=3):
    """(tensor peak, median RSS peak growth) in MiB, each run in a fresh spawned process.

    The children pin glibc's mmap threshold at 128 KiB: with its default adaptive threshold, freed activation
    blocks stay in the heap and the RSS peak depends on allocation history more than on live memory."""
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pool can deadlock
    runs, old = [], os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by the child's libc at start-up only
    try:
        for _ in range(repeats):
            q = ctx.Queue()
            p = ctx.Process(target=_peak_child, args=(*args, q))
            p.start()
            runs.append(q.get())
            p.join()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    return runs[0][0], statistics.median(r[1] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model and setting (after one warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--res", type=int, default=32, help="image resolution")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"], help="which comparisons")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="fp32, and/or bf16 autocast (uses AMX on CPUs that have it)")
    ap.add_argument("--channels-last", action="store_true", help="both models and inputs in channels_last")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile both models (inductor; minutes of compilation on a CPU before timing)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (cpu: 2 threads)")
    ap.add_argument("--ours-base", type=int, default=OURS_SMALL_BASE,
                    help="base width of our reduced small (72: matched parameters, heads of 72; 64: diffusers' widths "
                         "and heads of 64, with fewer parameters)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print each model's N most expensive kernels over one step (torch.profiler)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's dense bf16 peak for the MFU column (H100 SXM: 989; fp32 rows use it too)")
    args = ap.parse_args()
    os.environ["BENCH_OURS_BASE"] = str(args.ours_base)
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(2)
    fmt = ("channels_last" if args.channels_last else "NCHW") + (", compiled" if args.compile else "")
    for kind in args.sizes:
        best = {}
        for precision in args.precisions:
            runs = {w: setup(w, kind, args.batch, args.res, args.channels_last, args.compile, args.device)
                    for w in ("ours", "diffusers")}
            times = {w: [] for w in runs}
            for w, (m, fn, opt, data) in runs.items():
                train_step(fn, opt, data, precision)  # warm-up
            for _ in range(args.steps):  # alternate, so both see the same machine state
                for w, (m, fn, opt, data) in runs.items():
                    times[w].append(timed_step(fn, opt, data, precision))
            print(f"\n== {kind} @ {args.res}px, batch {args.batch}, {precision}, {fmt}, median of {args.steps} steps ==")
            res = {}
            for w, (m, _, opt, (x, t, c)) in runs.items():
                eager, eager_fn = make(w, kind)  # an eager copy: the FLOPs are the same
                eager.to(x.device)
                with FlopCounterMode(display=False) as fc:
                    eager_fn(x[:1], t[:1], {k: v[:1] for k, v in c.items()}).sum().backward()
                ips = args.batch / statistics.median(times[w])
                if cuda:  # in this process: CUDA's allocator statistics are exact and per process
                    tensor_mib, rss_mib = cuda_peak_mib(*runs[w][1:], precision), float("nan")
                else:
                    tensor_mib, rss_mib = peak_mib(w, kind, args.batch, args.res, precision, args.channels_last,
                                                   args.compile)
                flops = fc.get_total_flops()  # per image
                res[w] = (sum(p.numel() for p in m.parameters()), ips, tensor_mib, rss_mib, flops)
                best[w] = max(best.get(w, (0, "")), (ips, precision))
                extra = (f"MFU {100 * flops * ips / (args.peak_tflops * 1e12):5.2f}%" if cuda
                         else f"RSS peak +{rss_mib:6.0f} MiB")
                print(f"{w:10s} params {res[w][0] / 1e6:6.2f}M  {ips:8.2f} img/s  tensor peak {tensor_mib:6.0f} MiB  "
                      f"{extra}  train FLOPs/img {flops / 1e9:.2f} G")
            if args.profile:
                for w, (m, fn, opt, data) in runs.items():
                    print_profile(w, fn, opt, data, precision, args.profile)
            o, d = res["ours"], res["diffusers"]
            print(f"ratios ours/diffusers: params {o[0] / d[0]:.2f}  throughput {o[1] / d[1]:.2f}x  "
                  f"tensor memory {o[2] / d[2]:.2f}x" + ("" if cuda else f"  RSS memory {o[3] / d[3]:.2f}x"))
        if len(best) == 2 and len(args.precisions) > 1:
            (oi, op), (di, dp) = best["ours"], best["diffusers"]
            print(f"best setting of each: ours {oi:.1f} img/s ({op}) vs diffusers {di:.1f} img/s ({dp}): {oi / di:.2f}x")


if __name__ == "__main__":
    main()
