#!/usr/bin/env python3
"""Anchors for kvbench prefill: torch SDPA causal attention on contiguous tensors.

Runs the P1 shapes of docs/benchmarks.md (B=1 L in {4096, 16384}; B=4 L=8192; 512 new
tokens on a 4096 cached prefix) with 32 q / 8 KV heads, head_dim 128, bf16, through the
flash (FA2) and cuDNN backends, and prints ms and TFLOP/s with the same FLOP convention
as kvbench prefill: 2 x B x q_heads x L x L x head_dim for a prefill; for the extend,
4 x q_heads x head_dim x attended pairs, with the causal mask aligned bottom-right (query
i of the 512 sees the 4096 prefix and new tokens 0..i), as kvmem's extend does.

GQA: K/V are [B, 8, L, D] with enable_gqa=True where the backend takes it; otherwise
they are repeated to 32 heads first (the same FLOPs; only the K/V bytes grow).

usage: python3 tools/gpu/anchor_prefill.py [--reps N] [--settle-ms N]
(--settle-ms, default 500: idle before each figure, as kvbench prefill does: the board's
power cap lowers the clock within tenths of a second at these rates, so without a pause a
figure depends on what ran before it)
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SHAPES = [("p4k", 1, 0, 4096), ("p16k", 1, 0, 16384), ("b4", 4, 0, 8192),
          ("extend", 1, 4096, 512)]
BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]


def flops(batch, prefix, new):
    hd = Q_HEADS * HEAD_DIM
    if prefix == 0:
        return 2.0 * batch * hd * new * new
    pairs = new * prefix + new * (new + 1) / 2
    return 4.0 * batch * hd * pairs


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run(batch, prefix, new, backend, reps, settle_ms):
    ctx = prefix + new
    dev = "cuda"
    q = torch.randn(batch, Q_HEADS, new, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    if prefix == 0:
        mask, causal = None, True
    else:
        from torch.nn.attention.bias import causal_lower_right
        mask, causal = causal_lower_right(new, ctx), False
    attempts = [("gqa", k, v, True)]
    rep = Q_HEADS // KV_HEADS
    attempts.append(("repeat", k.repeat_interleave(rep, 1).contiguous(),
                     v.repeat_interleave(rep, 1).contiguous(), False))
    last = None
    for how, kk, vv, gqa in attempts:
        def fn():
            with sdpa_kernel(backend):
                kwargs = {"enable_gqa": True} if gqa else {}
                return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=causal,
                                                      **kwargs)
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # backend refuses this combination: try the next
            last = e
            continue
        time.sleep(settle_ms / 1000)
        return median_ms(fn, reps), how
    raise RuntimeError(str(last).splitlines()[0] if last else "no attempt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--settle-ms", type=int, default=500)
    args = ap.parse_args()
    print(f"anchor_prefill: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"q_heads {Q_HEADS}, kv_heads {KV_HEADS}, head_dim {HEAD_DIM}, bf16; "
          f"median of {args.reps}")
    for tag, batch, prefix, new in SHAPES:
        for name, backend in BACKENDS:
            try:
                ms, how = run(batch, prefix, new, backend, args.reps, args.settle_ms)
                tf = flops(batch, prefix, new) / (ms * 1e-3) * 1e-12
                print(f"{tag:8s} B={batch} prefix={prefix:<5d} new={new:<5d} sdpa-{name:6s} "
                      f"({how:6s}) {ms:9.3f} ms {tf:7.1f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{tag:8s} sdpa-{name}: unavailable ({e})", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
