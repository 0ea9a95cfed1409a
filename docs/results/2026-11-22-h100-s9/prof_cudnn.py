# What cuDNN SDPA launches for the D1 decode shapes: kernel names, grids, blocks, shared
# memory, registers and CUPTI durations (torch.profiler), to compare against event timing.
import json, math, os, tempfile
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile, ProfilerActivity

dev = torch.device("cuda")
for b, ctx in [(16, 4096), (64, 4096), (8, 32768)]:
    sets = 2
    qs = [torch.randn(b, 32, 1, 128, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
    ks = [torch.randn(b, 8, ctx, 128, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
    vs = [torch.randn(b, 8, ctx, 128, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
    for backend, name in [(SDPBackend.CUDNN_ATTENTION, "cudnn")]:
        with sdpa_kernel(backend):
            for i in range(20):
                F.scaled_dot_product_attention(qs[i % 2], ks[i % 2], vs[i % 2], enable_gqa=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(20):
                    F.scaled_dot_product_attention(qs[i % 2], ks[i % 2], vs[i % 2], enable_gqa=True)
                torch.cuda.synchronize()
        path = tempfile.mktemp(suffix=".json")
        prof.export_chrome_trace(path)
        ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
        ev.sort(key=lambda e: e["ts"])
        kinds = {}
        for e in ev:
            a = e.get("args", {})
            key = (e["name"][:150], str(a.get("grid")), str(a.get("block")), a.get("shared memory"), a.get("registers per thread"))
            kinds.setdefault(key, []).append(e["dur"])
        print(f"== {name} B={b} ctx={ctx}: {len(ev)} kernels in 20 calls")
        for (n, g, bl, sm, rg), d in kinds.items():
            d = sorted(d)
            print(f"  {n}\n    grid {g} block {bl} smem {sm} regs {rg}: n={len(d)} dur median {d[len(d)//2]:.1f} us min {d[0]:.1f}")
        gaps = [ev[i + 1]["ts"] - (ev[i]["ts"] + ev[i]["dur"]) for i in range(len(ev) - 1)]
        if gaps:
            gaps.sort(); print(f"  gaps between kernels: median {gaps[len(gaps)//2]:.2f} us")
        os.remove(path)
    del qs, ks, vs
    torch.cuda.empty_cache()
