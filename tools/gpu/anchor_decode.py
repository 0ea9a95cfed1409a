#!/usr/bin/env python3
"""Anchors for `kvbench decode`: torch SDPA decode on contiguous KV, same machine, same run.

Shapes D1 of docs/benchmarks.md with the default model shape (32 query heads / 8 KV
heads, head_dim 128, bf16): q [B, 32, 1, 128], k / v [B, 8, ctx, 128] (GQA through
enable_gqa, so the bytes read are those of kvmem's kernels). Backends: cuDNN and flash.
Median of CUDA-event-timed runs after a warm-up, rotating over enough input copies
(>= 200 MB) that L2 never holds them. Bytes = 2 x B x ctx x 8 x 128 x 2.

usage: python3 tools/gpu/anchor_decode.py [--reps N] [--repeat N] [--batch B] [--backend NAME]
(--repeat, default 2: rounds over the shapes in one process, like kvbench decode; quote
the last round: a process's first shapes can run slower in every launch, on either side;
--batch: only the D1 shapes of that batch, like kvbench decode --batch; --backend: cudnn
or flash only)
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
D1 = [(1, 4096), (16, 4096), (64, 4096), (128, 4096), (8, 32768), (1, 131072)]
ROTATE_BYTES = 200 << 20


def median_us(fn, sets, warmup, reps):
    for r in range(warmup):
        fn(r % sets)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        fn(r % sets)
        ends[r].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    return times[reps // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--backend", choices=["cudnn", "flash"], default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"anchor device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    runs = [(backend, name, b, ctx) for _ in range(max(1, args.repeat))
            for backend, name in [(SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")]
            for b, ctx in D1
            if (args.batch == 0 or b == args.batch) and args.backend in (None, name)]
    for backend, name, b, ctx in runs:
        nbytes = 2 * b * ctx * KV_HEADS * HEAD_DIM * 2
        sets = min(32, max(2, math.ceil(ROTATE_BYTES / nbytes)))
        qs = [torch.randn(b, Q_HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
        ks = [torch.randn(b, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
        vs = [torch.randn(b, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(sets)]

        def step(i):
            F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=True)

        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qs[0], ks[0], vs[0], enable_gqa=True)[:4]
                us = median_us(step, sets, args.warmup, args.reps)
            # Checked once against fp32 attention on the first 4 requests.
            g = Q_HEADS // KV_HEADS
            q32 = qs[0][:4].float()
            k32 = ks[0][:4].float().repeat_interleave(g, 1)
            v32 = vs[0][:4].float().repeat_interleave(g, 1)
            ref = torch.softmax(q32 @ k32.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1) @ v32
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            del q32, k32, v32, ref
            print(f"ANCHOR {name:6s} B={b:<4d} ctx={ctx:<6d} {us:9.1f} us  {nbytes / us * 1e-3:7.0f} GB/s"
                  f"  (rel err {rel:.1e})", flush=True)
        except Exception as e:  # an unsupported shape or backend is reported, not fatal
            print(f"ANCHOR {name:6s} B={b:<4d} ctx={ctx:<6d} unsupported: {str(e).splitlines()[0][:100]}",
                  flush=True)
        del qs, ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
