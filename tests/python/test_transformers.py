"""A transformers model on kvmem (kvmem.integrations.transformers) against the same model
on transformers' own SDPA attention with its DynamicCache: per-step logits under teacher
forcing for 256 steps and greedy generations, for two model shapes, both layouts and page
sizes 16 and 1, a batch of 8 prompts of ragged lengths 1-3000; forked sequences share their
prompt; model.generate with a KvmemCache; unsupported models refused by name.
Random, seeded weights built from a config (no downloads). Skips, saying why, without
torch, transformers, a CUDA build of libkvmem.so or a GPU."""
import numpy as np
import pytest

import kvmem

torch = pytest.importorskip("torch", reason="torch is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
if not kvmem.has_cuda():
    pytest.skip("libkvmem.so was built without CUDA", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

from kvmem.integrations import transformers as kt  # noqa: E402

PROMPT_LENS = [1, 9, 64, 333, 1000, 1777, 2500, 3000]
STEPS = 256
# The stated tolerance on logits: |kvmem - sdpa| <= atol + RTOL * |sdpa|, per dtype, where
# atol is the larger of ATOL and how far transformers' own eager attention is from its SDPA
# on the same teacher-forced inputs (measured in the same run): kvmem must be as close to
# SDPA as transformers' two paths are to each other. The paths differ in summation order.
TOL = {torch.bfloat16: (0.05, 0.02), torch.float16: (0.01, 0.01)}

SHAPES = {
    # 8 layers, hidden 1024, 16 query / 4 KV heads, head_dim 64 (Llama family)
    "llama-h1024-q16-kv4-d64": ("llama", dict(hidden_size=1024, num_hidden_layers=8,
                                              num_attention_heads=16, num_key_value_heads=4,
                                              head_dim=64, intermediate_size=2816)),
    # 28 query / 4 KV heads, head_dim 128 (Qwen2 family), 4 layers
    "qwen2-h3584-q28-kv4-d128": ("qwen2", dict(hidden_size=3584, num_hidden_layers=4,
                                               num_attention_heads=28, num_key_value_heads=4,
                                               intermediate_size=9728)),
}
LAYOUTS = {"paged16": dict(layout="paged", page_tokens=16),
           "paged1": dict(layout="paged", page_tokens=1),
           "virtual": dict(layout="virtual")}


def build_model(family, shape, dtype=torch.bfloat16, seed=0, attn="sdpa", **extra):
    cfg_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                 "mistral": transformers.MistralConfig}[family]
    config = cfg_class(vocab_size=32000, max_position_embeddings=8192, **shape, **extra)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model_class = {"llama": transformers.LlamaForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM,
                   "mistral": transformers.MistralForCausalLM}[family]
    with torch.device("cuda"):  # initialised on the GPU: seconds, not minutes
        return model_class(config).to(dtype=dtype).eval()


def prompts(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 32000, n).tolist() for n in PROMPT_LENS]


@torch.inference_mode()
def reference(model, prompt_list, steps):
    """transformers' own path (SDPA + DynamicCache) on the prompts as one left-padded
    batch, as model.generate runs it: the greedy tokens and the logits of every step,
    [steps + 1, vocab] per prompt (row 0: after the prompt)."""
    n, width = len(prompt_list), max(len(p) for p in prompt_list)
    ids = torch.zeros(n, width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompt_list):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    cache = transformers.DynamicCache()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    rows = [res.logits[:, -1].float()]
    toks = []
    for _ in range(steps):
        tok = rows[-1].argmax(-1)
        toks.append(tok)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device="cuda")], 1)
        pos = pos[:, -1:] + 1
        res = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        rows.append(res.logits[:, -1].float())
    toks_t = torch.stack(toks, 1)
    logits = torch.stack(rows, 1)
    toks = toks_t.tolist()
    return [(toks[r], logits[r]) for r in range(n)], (ids, toks_t)


@torch.inference_mode()
def eager_excess(model, ids_and_tokens, ref, rtol):
    """How far transformers' other attention path (eager) is from SDPA on the same
    teacher-forced inputs: max of |eager - sdpa| - rtol |sdpa| over every step and prompt."""
    ids, toks = ids_and_tokens
    model.set_attn_implementation("eager")
    try:
        n, width = ids.shape
        mask = (torch.arange(width, device="cuda")[None] >=
                torch.tensor([width - len_ for len_ in PROMPT_LENS[:n]], device="cuda")[:, None])
        mask = mask.long()
        cache = transformers.DynamicCache()
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        worst = 0.0
        for step in range(toks.shape[1] + 1):
            got = res.logits[:, -1].float()
            want = torch.stack([ref[r][1][step] for r in range(n)])
            worst = max(worst, ((got - want).abs() - rtol * want.abs()).max().item())
            if step == toks.shape[1]:
                break
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device="cuda")], 1)
            pos = pos[:, -1:] + 1
            res = model(input_ids=toks[:, step:step + 1], attention_mask=mask, position_ids=pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        return worst
    finally:
        model.set_attn_implementation("sdpa")


_REFS = {}


def ref_for(shape_name, dtype):
    key = (shape_name, dtype)
    if key not in _REFS:
        family, shape = SHAPES[shape_name]
        model = build_model(family, shape, dtype)
        ref, inputs = reference(model, prompts(), STEPS)
        eager = eager_excess(model, inputs, ref, TOL[dtype][1])
        print(f"{shape_name} {dtype}: eager attention vs sdpa, worst excess {eager:.4g}")
        _REFS[key] = (model.state_dict(), ref, max(TOL[dtype][0], eager))
        del model
    return _REFS[key]


def kvmem_model(shape_name, dtype, state):
    family, shape = SHAPES[shape_name]
    model = build_model(family, shape, dtype, attn="sdpa")
    model.load_state_dict(state)
    return model


def budget_for(shape_name):
    return 2 << 30


CASES = [(s, d, l) for s in SHAPES for l in LAYOUTS
         for d in ([torch.bfloat16, torch.float16] if s.startswith("llama") else
                   [torch.bfloat16])]


@pytest.mark.parametrize("shape_name,dtype,layout", CASES,
                         ids=[f"{s}-{str(d)[6:]}-{l}" for s, d, l in CASES])
@torch.inference_mode()
def test_teacher_forced_logits_and_greedy_tokens(shape_name, dtype, layout):
    state, ref, atol = ref_for(shape_name, dtype)
    model = kvmem_model(shape_name, dtype, state)
    rtol = TOL[dtype][1]
    ps = prompts()
    with kt.KvmemRunner(model, memory_budget_bytes=budget_for(shape_name), max_requests=32,
                        max_context=4096, **LAYOUTS[layout]) as runner:
        ids = list(range(len(ps)))
        for i in ids:
            runner.add(i)
        logits = runner.forward(ids, ps).float()
        worst = 0.0
        for step in range(STEPS + 1):
            for i in ids:
                want = ref[i][1][step]
                err = ((logits[i] - want).abs() - rtol * want.abs()).max().item()
                worst = max(worst, err)
                assert err <= atol, (f"prompt {i} (length {PROMPT_LENS[i]}), step {step}: "
                                     f"|kvmem - sdpa| exceeds {atol} + {rtol}|sdpa| by {err - atol}")
            if step == STEPS:
                break
            logits = runner.forward(ids, [[ref[i][0][step]] for i in ids]).float()
        runner.cache.check_invariants()
        print(f"{shape_name} {dtype} {layout}: worst |kvmem - sdpa| - rtol|sdpa| = {worst:.4g}, "
              f"bound {atol:.4g}")
        runner.free(ids)
        assert runner.cache.stats.num_requests == 0

        # Greedy: kvmem's own tokens equal the reference's up to the first near tie.
        gen = kt.generate(runner, ps, STEPS, first_id=100)
        for i in ids:
            toks, rows = ref[i]
            for step, (a, b) in enumerate(zip(gen[i][0], toks)):
                top2 = rows[step].topk(2).values
                if (top2[0] - top2[1]).item() <= atol + rtol * top2[0].abs().item():
                    break  # a tie within the tolerance: either token is right
                assert a == b, f"prompt {i}: token {step} is {a}, the reference's {b}"


@torch.inference_mode()
def test_forked_sequences_share_the_prompt():
    state, ref, _ = ref_for("llama-h1024-q16-kv4-d64", torch.bfloat16)
    model = kvmem_model("llama-h1024-q16-kv4-d64", torch.bfloat16, state)
    p = prompts()[5]  # 1777 tokens: 111 full pages of 16 and a partial one
    with kt.KvmemRunner(model, memory_budget_bytes=1 << 30, max_requests=16, max_context=4096,
                        layout="paged", page_tokens=16) as runner:
        runner.add(0)
        runner.forward([0], [p])
        used = runner.cache.stats.pages_used
        for child in range(1, 4):
            runner.fork(0, child)
        assert runner.cache.stats.pages_used == used  # no page copied by the forks
        tok = ref[5][0][0]  # the reference's token, so that both run on the same input
        logits = runner.forward([0, 1, 2, 3], [[tok]] * 4)
        # Each sequence now owns a copy of the partial last page at most.
        assert runner.cache.stats.pages_used <= used + 4
        assert runner.cache.stats.pages_shared >= (len(p) // 16)
        for r in range(1, 4):
            assert torch.equal(logits[r], logits[0])
        assert torch.allclose(logits[0].float(), ref[5][1][1], atol=TOL[torch.bfloat16][0],
                              rtol=TOL[torch.bfloat16][1])
        runner.cache.check_invariants()
        sampled = kt.generate(runner, [p[:300]], 16, num_sequences=4, do_sample=True,
                              generator=torch.Generator("cuda").manual_seed(3), first_id=50)
        assert len(sampled[0]) == 4 and all(len(s) == 16 for s in sampled[0])


@pytest.mark.parametrize("layout", ["paged16", "virtual"])
@torch.inference_mode()
def test_model_generate_with_a_kvmem_cache(layout):
    """model.generate on a left-padded batch with past_key_values=KvmemCache: the tokens
    equal those of the same generate call with transformers' own cache and SDPA."""
    family, shape = SHAPES["llama-h1024-q16-kv4-d64"]
    ref_model = build_model(family, shape, torch.bfloat16)
    ps = [prompts()[k] for k in (1, 2, 3)]
    width = max(len(p) for p in ps)
    ids = torch.zeros(len(ps), width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for r, p in enumerate(ps):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                  pad_token_id=0)
    want = ref_model.generate(**kwargs, output_logits=True, return_dict_in_generate=True)
    model = kvmem_model("llama-h1024-q16-kv4-d64", torch.bfloat16, ref_model.state_dict())
    del ref_model
    with kt.KvmemRunner(model, memory_budget_bytes=1 << 30, max_requests=16, max_context=4096,
                        **LAYOUTS[layout]) as runner:
        cache = kt.KvmemCache(runner)
        got = model.generate(**kwargs, past_key_values=cache)
        stored = sorted(runner.length(i) for i in cache.ids)
        assert stored == sorted(len(p) + 31 for p in ps)  # pads never stored
        cache.close()
        assert runner.cache.stats.num_requests == 0
    atol, rtol = TOL[torch.bfloat16]
    for r in range(len(ps)):
        for step in range(32):
            top2 = want.logits[step][r].float().topk(2).values
            if (top2[0] - top2[1]).item() <= atol + rtol * top2[0].abs().item():
                break  # a tie within the tolerance: either token is right
            a, b = got[r, width + step].item(), want.sequences[r, width + step].item()
            assert a == b, f"row {r}: token {step} is {a}, the reference's {b}"


@torch.inference_mode()
def test_beam_search_with_a_kvmem_cache():
    """Beam search reorders the cache's rows by fork: the best beam equals the one of
    transformers' own cache, and no row is left behind."""
    family, shape = SHAPES["llama-h1024-q16-kv4-d64"]
    ref_model = build_model(family, dict(shape, num_hidden_layers=2), torch.bfloat16)
    ids = torch.tensor([prompts()[2]], device="cuda")
    kwargs = dict(input_ids=ids, max_new_tokens=8, num_beams=3, do_sample=False,
                  pad_token_id=0, early_stopping=True)
    want = ref_model.generate(**kwargs)
    model = build_model(family, dict(shape, num_hidden_layers=2), torch.bfloat16)
    model.load_state_dict(ref_model.state_dict())
    with kt.KvmemRunner(model, memory_budget_bytes=1 << 28, max_requests=16, max_context=4096,
                        layout="paged", page_tokens=16) as runner:
        cache = kt.KvmemCache(runner)
        got = model.generate(**kwargs, past_key_values=cache)
        runner.cache.check_invariants()
        cache.close()
        assert runner.cache.stats.num_requests == 0
    assert torch.equal(got, want), f"{got} vs {want}"


@torch.inference_mode()
def test_unsupported_models_are_refused_by_name():
    family, shape = SHAPES["llama-h1024-q16-kv4-d64"]
    small = dict(shape, num_hidden_layers=1)
    model = build_model(family, dict(small, head_dim=96, hidden_size=1536, num_attention_heads=16))
    with pytest.raises(kt.UnsupportedModelError, match="head_dim 96"):
        kt.KvmemRunner(model, memory_budget_bytes=1 << 28)
    model = build_model(family, small).float()
    with pytest.raises(kt.UnsupportedModelError, match="dtype torch.float32"):
        kt.KvmemRunner(model, memory_budget_bytes=1 << 28)
    model = build_model(family, small)
    model.config.kv_lora_rank = 512
    with pytest.raises(kt.UnsupportedModelError, match="multi-head latent attention"):
        kt.KvmemRunner(model, memory_budget_bytes=1 << 28)
    model.config.kv_lora_rank = None
    model.config.layer_types = ["chunked_attention"]
    with pytest.raises(kt.UnsupportedModelError, match="layer type 'chunked_attention'"):
        kt.KvmemRunner(model, memory_budget_bytes=1 << 28)


@torch.inference_mode()
def test_sliding_window_matches_sdpa():
    """Mistral with a 128-token window: kvmem's window_left equals transformers' window."""
    family, shape = SHAPES["llama-h1024-q16-kv4-d64"]
    ref_model = build_model("mistral", dict(shape, num_hidden_layers=2), torch.bfloat16,
                            sliding_window=128)
    ps = [prompts()[k] for k in (2, 3, 4)]
    ref, _ = reference(ref_model, ps, 8)
    model = build_model("mistral", dict(shape, num_hidden_layers=2), torch.bfloat16,
                        sliding_window=128)
    model.load_state_dict(ref_model.state_dict())
    atol, rtol = TOL[torch.bfloat16]
    with kt.KvmemRunner(model, memory_budget_bytes=1 << 28, max_requests=8, max_context=4096,
                        layout="paged", page_tokens=16) as runner:
        for i in range(3):
            runner.add(i)
        logits = runner.forward([0, 1, 2], ps).float()
        for step in range(9):
            for i in range(3):
                want = ref[i][1][step]
                assert ((logits[i] - want).abs() - rtol * want.abs()).max().item() <= atol
            if step < 8:
                logits = runner.forward([0, 1, 2], [[ref[i][0][step]] for i in range(3)]).float()


@torch.inference_mode()
def test_out_of_memory_changes_nothing():
    family, shape = SHAPES["llama-h1024-q16-kv4-d64"]
    model = build_model(family, dict(shape, num_hidden_layers=2))
    with kt.KvmemRunner(model, memory_budget_bytes=8 << 20, max_requests=8, max_context=8192,
                        layout="paged", page_tokens=16) as runner:
        runner.add(0)
        runner.forward([0], [list(range(100))])
        before = runner.cache.stats
        with pytest.raises(kvmem.OutOfMemoryError):
            runner.forward([0], [list(range(8000))])
        assert runner.length(0) == 100
        assert runner.cache.stats.pages_used == before.pages_used
        runner.cache.check_invariants()
        runner.forward([0], [[5]])
        assert runner.length(0) == 101
