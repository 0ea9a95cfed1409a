"""The kernels from Python on a CUDA cache, against torch's
scaled_dot_product_attention: append_kv, decode (planned from the running batch with its
device mirror, and from explicit tables) and ragged extend, GQA, both layouts, bf16 and
fp16; K/V seen through DLPack by torch without a copy; bad tensors rejected before launch.
Skips, saying why, without torch, without a CUDA build of libkvmem.so or without a GPU."""
import math

import numpy as np
import pytest

import kvmem

torch = pytest.importorskip("torch", reason="torch is not installed")
if not kvmem.has_cuda():
    pytest.skip("libkvmem.so was built without CUDA", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM, LAYERS = 2, 4, 128, 2
Q_HEADS = KV_HEADS * GROUP
CASES = [("paged", {"page_tokens": 16}), ("paged", {"page_tokens": 1}), ("virtual", {}),
         ("virtual", {"arrangement": "per_layer"})]
CASE_IDS = ["paged16", "paged1", "virtual", "virtual-per-layer"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def make_cache(layout, extra, dtype):
    return kvmem.KvCache(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         dtype=dtype, layout=layout, max_requests=8, max_context=1024,
                         memory_budget_bytes=512 << 20, device="cuda", **extra)


def tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == "bfloat16" else dict(atol=4e-3, rtol=4e-3)


def write_tokens(cache, ids, counts, kv, gen):
    """Extends `ids` by `counts`, writes random K/V for every layer with append_kv and
    remembers them per request in kv[id] = (k list per layer, v list per layer)."""
    tdtype = DTYPES[cache.dtype]
    locs = cache.extend_batch(ids, counts)
    total = int(sum(counts))
    if total == 0:
        return locs
    slots = torch.from_numpy(locs).cuda()
    for layer in range(LAYERS):
        k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(tdtype)
        v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(tdtype)
        kvmem.append_kv(cache, layer, k, v, slots)
        at = 0
        for i, n in zip(ids, counts):
            ks, vs = kv.setdefault(i, ([None] * LAYERS, [None] * LAYERS))
            piece_k, piece_v = k[at:at + n], v[at:at + n]
            ks[layer] = piece_k if ks[layer] is None else torch.cat([ks[layer], piece_k])
            vs[layer] = piece_v if vs[layer] is None else torch.cat([vs[layer], piece_v])
            at += n
    return locs


def sdpa(q, k, v, causal_offset=None):
    """q [n, Hq, D], k/v [L, Hkv, D] -> [n, Hq, D] in fp32, GQA by repeating K/V heads.
    causal_offset: query i sits at position causal_offset + i (None: sees every key)."""
    qf = q.float().transpose(0, 1).unsqueeze(0)                     # [1, Hq, n, D]
    kf = k.float().repeat_interleave(GROUP, dim=1).transpose(0, 1).unsqueeze(0)
    vf = v.float().repeat_interleave(GROUP, dim=1).transpose(0, 1).unsqueeze(0)
    mask = None
    if causal_offset is not None:
        n, length = q.shape[0], k.shape[0]
        mask = (torch.arange(length, device=q.device)[None, :] <=
                causal_offset + torch.arange(n, device=q.device)[:, None])
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask,
                                         scale=1.0 / math.sqrt(HEAD_DIM))
    return out.squeeze(0).transpose(0, 1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout,extra", CASES, ids=CASE_IDS)
def test_append_kv_writes_what_dlpack_shows(layout, extra, dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    with make_cache(layout, extra, dtype) as cache:
        kv = {}
        for i in (1, 2):
            cache.add_request(i)
        locs = write_tokens(cache, [1, 2], [37, 5], kv, gen)
        torch.cuda.synchronize()
        view = cache.layer(1)
        k_all = torch.from_dlpack(view.k)
        assert k_all.data_ptr() == view.k.data_ptr  # no copy
        assert k_all.device.type == "cuda" and k_all.dtype == DTYPES[dtype]
        assert tuple(k_all.stride()) == view.k.strides
        idx = tuple(torch.from_numpy(np.asarray(a)).cuda() for a in cache.kv_slot_index(locs))
        got_k = k_all[idx]
        got_v = torch.from_dlpack(view.v)[idx]
        want_k = torch.cat([kv[1][0][1], kv[2][0][1]])
        want_v = torch.cat([kv[1][1][1], kv[2][1][1]])
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout,extra", CASES, ids=CASE_IDS)
def test_decode_matches_sdpa(layout, extra, dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    tdtype = DTYPES[dtype]
    with make_cache(layout, extra, dtype) as cache:
        ids = [5, 6, 7, 8]
        for i in ids:
            cache.add_request(i)
        kv = {}
        write_tokens(cache, ids, [300, 1, 77, 520], kv, gen)
        cache.fork(7, 9)  # shares 7's pages; its first token copies the last one
        ids.append(9)
        kv[9] = ([t.clone() for t in kv[7][0]], [t.clone() for t in kv[7][1]])
        cache.set_running_batch(ids)
        mirror = kvmem.DeviceRunningBatch(cache)
        ws = kvmem.DecodeWorkspace(cache, Q_HEADS)
        ws_table = kvmem.DecodeWorkspace(cache, Q_HEADS)
        for step in range(3):
            write_tokens(cache, ids, [1] * len(ids), kv, gen)  # the decode step's own token
            mirror.upload()
            ws.plan_running_batch()
            lens = [cache.length(i) for i in ids]
            if layout == "paged":
                width = max(len(cache.block_table(i)) for i in ids)
                table = np.zeros((len(ids), width), np.int32)
                for b, i in enumerate(ids):
                    pages = cache.block_table(i)
                    table[b, :len(pages)] = pages
            else:
                table = np.array([cache.row(i) for i in ids], np.int32)
            ws_table.plan(lens, table)
            for layer in range(LAYERS):
                q = torch.randn(len(ids), Q_HEADS, HEAD_DIM, generator=gen, device="cuda").to(tdtype)
                out = torch.empty_like(q)
                out2 = torch.empty_like(q)
                kvmem.decode(ws, layer, q, out, mirror=mirror)
                ws_table.decode(layer, q, out2)
                torch.cuda.synchronize()
                for b, i in enumerate(ids):
                    want = sdpa(q[b:b + 1], kv[i][0][layer], kv[i][1][layer])
                    torch.testing.assert_close(out[b:b + 1].float(), want, **tol(dtype),
                                               msg=f"step {step} layer {layer} request {i}")
                assert torch.equal(out, out2), "mirror and explicit table differ"
        # The mirror's arrays are device memory torch can read without a copy.
        arrays = mirror.arrays()
        seq = torch.from_dlpack(arrays.seq_lens)
        assert seq.device.type == "cuda" and seq.data_ptr() == arrays.seq_lens.data_ptr
        assert seq[:len(ids)].tolist() == [cache.length(i) for i in ids]
        cache.check_invariants()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout,extra", CASES, ids=CASE_IDS)
def test_extend_matches_sdpa(layout, extra, dtype):
    gen = torch.Generator(device="cuda").manual_seed(3)
    tdtype = DTYPES[dtype]
    with make_cache(layout, extra, dtype) as cache:
        ids = [1, 2, 3]
        for i in ids:
            cache.add_request(i)
        kv = {}
        prefix = [0, 130, 47]
        write_tokens(cache, ids, prefix, kv, gen)
        fresh = [64, 9, 200]
        write_tokens(cache, ids, fresh, kv, gen)
        if layout == "paged":
            width = max(len(cache.block_table(i)) for i in ids)
            table = np.zeros((len(ids), width), np.int32)
            for b, i in enumerate(ids):
                pages = cache.block_table(i)
                table[b, :len(pages)] = pages
        else:
            table = np.array([cache.row(i) for i in ids], np.int32)
        ws = kvmem.ExtendWorkspace(cache, Q_HEADS, max_new_tokens=1024)
        ws.plan(prefix, fresh, table)
        total = sum(fresh)
        for layer in range(LAYERS):
            q = torch.randn(total, Q_HEADS, HEAD_DIM, generator=gen, device="cuda").to(tdtype)
            out = torch.empty_like(q)
            kvmem.extend(ws, layer, q, out)
            torch.cuda.synchronize()
            at = 0
            for b, i in enumerate(ids):
                want = sdpa(q[at:at + fresh[b]], kv[i][0][layer], kv[i][1][layer],
                            causal_offset=prefix[b])
                torch.testing.assert_close(out[at:at + fresh[b]].float(), want, **tol(dtype),
                                           msg=f"layer {layer} request {i}")
                at += fresh[b]


def test_bad_tensors_are_rejected_before_launch():
    with make_cache("paged", {"page_tokens": 16}, "bfloat16") as cache:
        cache.add_request(1)
        locs = cache.extend_batch([1], [4])
        slots = torch.from_numpy(locs).cuda()
        k = torch.zeros(4, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(kvmem.InvalidArgumentError, match="dtype"):
            kvmem.append_kv(cache, 0, k.half(), k.half(), slots)
        with pytest.raises(kvmem.InvalidArgumentError, match="CUDA"):
            kvmem.append_kv(cache, 0, k.cpu(), k, slots)
        with pytest.raises(kvmem.InvalidArgumentError, match="shape"):
            kvmem.append_kv(cache, 0, k, k[:3], slots)
        with pytest.raises(kvmem.InvalidArgumentError, match="int64"):
            kvmem.append_kv(cache, 0, k, k, slots.int())
        with pytest.raises(kvmem.OutOfRangeError):
            kvmem.append_kv(cache, LAYERS, k, k, slots)
        cache.set_running_batch([1])
        ws = kvmem.DecodeWorkspace(cache, Q_HEADS)
        ws.plan_running_batch()
        q = torch.zeros(1, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(kvmem.FailedPreconditionError, match="mirror"):
            ws.decode(0, q, torch.empty_like(q))  # a paged running batch needs its mirror
        mirror = kvmem.DeviceRunningBatch(cache)
        mirror.upload()
        wide = torch.zeros(1, Q_HEADS, 2 * HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(kvmem.InvalidArgumentError, match="contiguous"):
            ws.decode(0, wide[:, :, ::2], torch.empty_like(q), mirror=mirror)
        with pytest.raises(kvmem.InvalidArgumentError, match="shape"):
            ws.decode(0, q[:, :4], torch.empty_like(q), mirror=mirror)
        with pytest.raises(kvmem.InvalidArgumentError, match="dtype"):
            ws.decode(0, q.float(), torch.empty_like(q), mirror=mirror)
        ws.decode(0, q, torch.empty_like(q), mirror=mirror)  # the right tensors run
        torch.cuda.synchronize()
