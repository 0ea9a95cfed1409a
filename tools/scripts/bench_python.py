#!/usr/bin/python3
"""Python's cost on top of the C ABI for the step's batch call (KvCache.extend_batch) at
batch size B: the same ExtendBatch timed through kvmem.KvCache (numpy arrays, and Python
lists) and through the bare C function with prepared arrays (ctypes' own call cost
included there), alternating step by step on one cache; medians. Host backend, one token per request per step, like a decode step.
  PYTHONPATH=src/python KVMEM_LIBRARY=build/libkvmem.so /usr/bin/python3 tools/scripts/bench_python.py
"""
import argparse
import time

import numpy as np

import kvmem
from kvmem import _lib


def run(batch, steps, layout, how):
    """Median us of the bare C call and of the Python call, alternating step by step on one
    cache so that both see the same states."""
    cache = kvmem.KvCache(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16",
                          layout=layout, max_requests=batch, max_context=steps + 16,
                          memory_budget_bytes=1 << 30)
    ids = np.arange(batch, dtype=np.uint64)
    for i in ids:
        cache.add_request(int(i))
    counts = np.ones(batch, np.int64)
    out = np.empty(batch, np.int64)
    ids_list, counts_list = ids.tolist(), counts.tolist()
    handle = cache.handle
    p_ids, p_counts, p_out = (a.__array_interface__["data"][0] for a in (ids, counts, out))
    calls = {
        "numpy": lambda: cache.extend_batch(ids, counts),
        "numpy+out": lambda: cache.extend_batch(ids, counts, out=out),
        "lists": lambda: cache.extend_batch(ids_list, counts_list),
    }
    call = calls[how]
    clock = time.perf_counter_ns
    c_ns, py_ns = [], []
    for step in range(steps):
        if step % 2 == 0:
            t0 = clock()
            _lib.check(_lib.extend_batch(handle, p_ids, p_counts, batch, p_out, batch))
            c_ns.append(clock() - t0)
        else:
            t0 = clock()
            call()
            py_ns.append(clock() - t0)
    cache.check_invariants()
    cache.close()
    return float(np.median(c_ns)) / 1000, float(np.median(py_ns)) / 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"kvmem {kvmem.__version__}, B={args.batch}, {args.steps} steps, best of {args.repeats}")
    for layout in ("paged", "virtual"):
        for how in ("numpy+out", "numpy", "lists"):
            runs = [run(args.batch, args.steps, layout, how) for _ in range(args.repeats)]
            c_us, py_us = min(runs, key=lambda r: r[1] - r[0])
            print(f"{layout:8s} {how:10s} C ABI {c_us:7.2f} us, Python {py_us:7.2f} us: "
                  f"Python adds {py_us - c_us:6.2f} us (median per step)")


if __name__ == "__main__":
    main()
