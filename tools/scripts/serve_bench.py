#!/usr/bin/env python3
"""The serving benchmark: a random-weight transformers model served three ways on one GPU
with one KV memory budget, the same requests each time (docs/integrations.md):

  kvmem     a continuous-batching loop over kvmem.integrations.transformers.KvmemRunner:
            admits while memory allows, prefills new requests in chunks beside the running
            batch's decode tokens (one forward per step), preempts the newest request on
            kvmem.OutOfMemoryError (recomputed later), finishes at the output length;
  cb        transformers' own continuous batching (init_continuous_batching, paged
            attention, its KV blocks sized to the same budget);
  generate  plain model.generate with its default cache, left-padded static batches of the
            largest size whose KV fits the budget.

Workload: kvstress's `chat` (prompt ~ lognormal(median 512, sigma 1.0), output ~
lognormal(median 192, sigma 0.8), clamped to --max-context), all requests queued at t=0.
Reported per engine: output tokens/s, time to first token and time per output token
percentiles, peak concurrent requests, KV bytes held and live; for kvmem also the host
time spent in kvmem's calls. --json writes the results (docs/benchmarks/serve.json).

    PYTHONPATH=src/python KVMEM_LIBRARY=build/libkvmem.so python3 tools/scripts/serve_bench.py
"""
import argparse
import collections
import json
import math
import sys
import time

import numpy as np


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256, help="requests in the workload")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-context", type=int, default=4096, help="prompt + output cap")
    p.add_argument("--kv-gib", type=float, default=1.0, help="KV memory budget (GiB)")
    p.add_argument("--layout", default="paged", choices=["paged", "virtual"])
    p.add_argument("--page-tokens", type=int, default=16)
    p.add_argument("--max-requests", type=int, default=256, help="kvmem: request rows")
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step")
    p.add_argument("--engines", default="kvmem,cb,generate",
                   help="comma-separated: kvmem, cb, generate")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def workload(n, seed, max_context):
    """kvstress's chat workload: (prompt tokens, output length) per request."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = int(np.clip(round(rng.lognormal(math.log(512), 1.0)), 1, max_context // 2))
        gen = int(np.clip(round(rng.lognormal(math.log(192), 0.8)), 1, max_context - prompt))
        out.append((rng.integers(0, 32000, prompt).tolist(), gen))
    return out


def build_model(args, torch, transformers, attn="sdpa"):
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate_size=int(args.hidden * 2.75),
        max_position_embeddings=args.max_context)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    return model.eval()


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summary(name, wall, reqs_done, first, last, counts, peak, held, live, extra=None):
    """first / last: per request, seconds from t0 to its first / last token."""
    tokens = int(sum(counts.values()))
    ttft = [first[i] for i in first]
    tpot = [(last[i] - first[i]) / (counts[i] - 1) for i in first if counts[i] > 1]
    row = {"engine": name, "requests": reqs_done, "output_tokens": tokens, "wall_s": wall,
           "output_tokens_per_s": tokens / wall if wall else 0.0,
           "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
           "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p90_ms": 1e3 * pct(tpot, 90),
           "tpot_p99_ms": 1e3 * pct(tpot, 99), "peak_running": peak,
           "peak_kv_held_bytes": held, "peak_kv_live_bytes": live}
    row.update(extra or {})
    return row


def run_kvmem(args, model, reqs, budget, torch, kt, kvmem):
    runner = kt.KvmemRunner(model, layout=args.layout, page_tokens=args.page_tokens,
                            memory_budget_bytes=budget, max_requests=args.max_requests,
                            max_context=args.max_context, max_step_tokens=args.chunk)
    spec = runner.spec
    per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2
    waiting = collections.deque(range(len(reqs)))
    tokens = {i: list(reqs[i][0]) for i in range(len(reqs))}  # prompt + generated
    prompt_len = {i: len(reqs[i][0]) for i in range(len(reqs))}
    done_len = {i: 0 for i in range(len(reqs))}  # tokens in the cache
    produced = {i: 0 for i in range(len(reqs))}
    admitted = []  # in admission order (preemption takes the newest)
    first, last = {}, {}
    peak = held = live = 0
    steps = preemptions = 0
    forward_s = 0.0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner.timings.reset()
    while waiting or admitted:
        # Admit while the prompts in flight fit in what the budget leaves.
        st = runner.cache.stats
        free_tokens = (budget - st.held_bytes) // per_token
        pending = sum(len(tokens[i]) - done_len[i] for i in admitted)
        while waiting and len(admitted) < args.max_requests:
            i = waiting[0]
            need = len(tokens[i]) + 16 * (len(admitted) + 1)
            if admitted and pending + need > free_tokens:
                break
            waiting.popleft()
            runner.add(i)
            admitted.append(i)
            pending += len(tokens[i])
        # One step: every prefilled request decodes one token; prefills take the chunk.
        ids, feed = [], []
        room = args.chunk
        for i in admitted:
            todo = len(tokens[i]) - done_len[i]
            if todo == 1:
                ids.append(i)
                feed.append(tokens[i][-1:])
            elif todo > 1 and room > 0:
                n = min(todo, room)
                room -= n
                ids.append(i)
                feed.append(tokens[i][done_len[i]:done_len[i] + n])
        try:
            t = time.perf_counter()
            logits = runner.forward(ids, feed)
            nxt = logits.argmax(-1).tolist()
            forward_s += time.perf_counter() - t
        except kvmem.OutOfMemoryError:
            if len(admitted) == 1:
                raise RuntimeError(f"request {admitted[0]} alone does not fit the KV budget")
            victim = admitted.pop()  # the newest: recomputed from its tokens later
            runner.free([victim])
            done_len[victim] = 0
            waiting.appendleft(victim)
            preemptions += 1
            continue
        steps += 1
        now = time.perf_counter() - t0
        finished = []
        for i, f, tok in zip(ids, feed, nxt):
            done_len[i] += len(f)
            if done_len[i] < len(tokens[i]):
                continue  # a prefill chunk that is not the last
            tokens[i].append(tok)
            produced[i] += 1
            first.setdefault(i, now)
            last[i] = now
            if produced[i] == reqs[i][1]:
                finished.append(i)
        st = runner.cache.stats
        peak = max(peak, len(admitted))
        held = max(held, st.held_bytes)
        live = max(live, st.live_bytes)
        if finished:
            runner.free(finished)
            gone = set(finished)
            admitted = [i for i in admitted if i not in gone]
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    counts = {i: produced[i] for i in produced}
    extra = {"steps": steps, "preemptions": preemptions, "layout": args.layout,
             "page_tokens": args.page_tokens if args.layout == "paged" else None,
             "kvmem_bookkeeping_s": runner.timings.bookkeeping,
             "kvmem_kernel_launch_s": runner.timings.kernels, "forward_s": forward_s,
             "kvmem_host_share": (runner.timings.bookkeeping + runner.timings.kernels) / wall}
    runner.close()
    return summary("kvmem", wall, len(first), first, last, counts, peak, held, live, extra)


def run_cb(args, model, reqs, budget, torch, transformers):
    """transformers' continuous batching with paged attention, KV blocks = the budget."""
    from transformers import GenerationConfig
    per_token = args.layers * 2 * args.kv_heads * args.head_dim * 2
    block = 32
    blocks = int(budget // (block * per_token))
    errors = []
    for impl in ("paged|sdpa", "sdpa_paged", "paged_attention"):
        try:
            model.set_attn_implementation(impl)
            break
        except Exception as e:  # the name differs between transformers versions
            errors.append(f"{impl}: {e}")
    else:
        raise RuntimeError("no paged attention implementation: " + "; ".join(errors))
    gen = GenerationConfig(max_new_tokens=max(r[1] for r in reqs), do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    kwargs = {}
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        fields = ContinuousBatchingConfig.__init__.__code__.co_varnames
        cbc = {k: v for k, v in (("num_blocks", blocks), ("block_size", block),
                                 ("max_batch_tokens", args.chunk)) if k in fields}
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**cbc)
    except ImportError:
        gen.num_blocks, gen.block_size, gen.max_batch_tokens = blocks, block, args.chunk
    manager = model.init_continuous_batching(generation_config=gen, **kwargs)
    if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
        manager.warmup()
    manager.start()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first, last, counts = {}, {}, {}
    streamed = True  # every token delivered as it comes: first-token times are real
    for i, (prompt, out_len) in enumerate(reqs):
        try:
            manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=out_len,
                                streaming=streamed)
        except TypeError:  # a transformers without streaming
            streamed = False
            manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=out_len)
    pending = len(reqs)
    while pending:
        res = manager.get_result(timeout=1)
        if res is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped")
            continue
        now = time.perf_counter() - t0
        i = int(str(res.request_id)[1:])
        n = len(res.generated_tokens)
        if n and i not in first:
            first[i] = now
        last[i] = now
        counts[i] = n
        if res.is_finished():
            pending -= 1
    wall = time.perf_counter() - t0
    peak = None
    metrics = getattr(getattr(manager, "batch_processor", None), "metrics", None)
    manager.stop(block=True)
    model.set_attn_implementation("sdpa")
    row = summary("transformers-cb", wall, len(counts), first, last, counts, peak,
                  blocks * block * per_token, None,
                  {"num_blocks": blocks, "block_size": block, "attn": impl,
                   "streamed": streamed})
    if not streamed:  # results came only at completion: no first-token times
        row["ttft_p50_s"] = row["ttft_p90_s"] = row["ttft_p99_s"] = None
        row["tpot_p50_ms"] = row["tpot_p90_ms"] = row["tpot_p99_ms"] = None
    del metrics
    return row


def run_generate(args, model, reqs, budget, torch):
    """Static batches of the largest size whose padded KV fits the budget."""
    per_token = args.layers * 2 * args.kv_heads * args.head_dim * 2
    longest = max(len(p) for p, _ in reqs) + max(o for _, o in reqs)
    batch = max(1, int(budget // (longest * per_token)))
    first, last, counts = {}, {}, {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, len(reqs), batch):
        part = list(range(start, min(start + batch, len(reqs))))
        width = max(len(reqs[i][0]) for i in part)
        new = max(reqs[i][1] for i in part)
        ids = torch.zeros(len(part), width, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for r, i in enumerate(part):
            p = reqs[i][0]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        now = time.perf_counter() - t0
        for i in part:  # the batch returns together: every request's tokens arrive at once
            first[i] = last[i] = now
            counts[i] = reqs[i][1]
    wall = time.perf_counter() - t0
    row = summary("generate", wall, len(counts), first, last, counts, batch,
                  batch * longest * per_token, None, {"batch": batch})
    row["tpot_p50_ms"] = row["tpot_p90_ms"] = row["tpot_p99_ms"] = None
    return row


def main():
    args = parse()
    import torch
    import transformers

    import kvmem
    from kvmem.integrations import transformers as kt
    reqs = workload(args.requests, args.seed, args.max_context)
    budget = int(args.kv_gib * (1 << 30))
    model = build_model(args, torch, transformers)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvmem": kvmem.__version__,
            "model": f"Llama {args.layers} layers, hidden {args.hidden}, {args.heads} query / "
                     f"{args.kv_heads} KV heads, head_dim {args.head_dim}, bf16, random weights",
            "workload": f"chat, {args.requests} requests at t=0, seed {args.seed}, "
                        f"max_context {args.max_context}",
            "kv_budget_bytes": budget,
            "prompt_tokens": sum(len(p) for p, _ in reqs),
            "output_tokens": sum(o for _, o in reqs), "results": []}
    print(json.dumps({k: v for k, v in info.items() if k != "results"}, indent=1), flush=True)
    for engine in args.engines.split(","):
        try:
            if engine == "kvmem":
                row = run_kvmem(args, model, reqs, budget, torch, kt, kvmem)
            elif engine == "cb":
                row = run_cb(args, model, reqs, budget, torch, transformers)
            elif engine == "generate":
                row = run_generate(args, model, reqs, budget, torch)
            else:
                raise SystemExit(f"unknown engine {engine!r}")
        except Exception as e:  # a peer that fails is reported, not hidden
            import traceback
            traceback.print_exc()
            row = {"engine": engine, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(row), flush=True)
        info["results"].append(row)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
