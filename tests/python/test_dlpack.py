"""DLPack views of a host cache's memory: no copy (same address), the shapes and strides
the kernels use, data written at the cache's locations seen through them (also after the
cache itself copies a shared page), lifetimes, and no leak over thousands of caches."""
import ctypes
import gc
import os

import numpy as np
import pytest

import kvmem
from kvmem import _dlpack

LAYOUTS = [("paged", {}), ("paged", {"page_tokens": 1}), ("virtual", {}),
           ("virtual", {"chunk_tokens": 1}), ("virtual", {"arrangement": "per_layer"})]
IDS = ["paged16", "paged1", "virtual-chunks", "virtual-tokens", "virtual-per-layer"]


def small(layout, dtype="float16", **kw):
    config = dict(num_layers=3, num_kv_heads=2, head_dim=16, dtype=dtype, layout=layout,
                  page_tokens=16, max_requests=8, max_context=256, host_granularity=4096,
                  memory_budget_bytes=2 << 20)
    config.update(kw)
    return kvmem.KvCache(**config)


@pytest.mark.parametrize("layout,extra", LAYOUTS, ids=IDS)
def test_views_are_the_cache_memory(layout, extra):
    with small(layout, **extra) as c:
        c.add_request(1)
        locs = c.extend_batch([1], [40])
        for layer in range(3):
            view = c.layer(layer)
            k = np.asarray(view.k)  # writable (numpy < 2.1 makes DLPack imports read-only)
            v = np.asarray(view.v)
            assert np.from_dlpack(view.k).__array_interface__["data"][0] == view.k.data_ptr
            assert k.__array_interface__["data"][0] == view.k.data_ptr  # no copy
            assert k.dtype == np.float16 and k.shape[-2:] == (2, 16)
            assert k.strides[-1] == 2
            if layout == "paged":
                assert k.shape[1:] == (view.page_tokens, 2, 16)
            idx = c.kv_slot_index(locs)
            tokens = np.arange(40 * 32, dtype=np.float16).reshape(40, 2, 16) + layer
            k[idx] = tokens
            v[idx] = -tokens
            # A second export sees the data; so does the accessor's arithmetic.
            k2 = np.from_dlpack(c.k(layer))
            np.testing.assert_array_equal(k2[idx], tokens)
            np.testing.assert_array_equal(np.from_dlpack(c.v(layer))[idx], -tokens)
            for i in (0, 17, 39):
                off = (int(locs[i]) // view.page_tokens * view.page_stride +
                       int(locs[i]) % view.page_tokens * view.token_stride) if layout == "paged" \
                    else (int(locs[i]) // view.max_context * view.row_stride +
                          (int(locs[i]) % view.max_context) * view.token_stride +
                          ((int(locs[i]) % view.max_context) >> view.chunk_shift) * view.chunk_gap)
                addr = view.k.data_ptr + 2 * off
                cell = np.frombuffer((ctypes.c_uint16 * 32).from_address(addr),
                                     dtype=np.uint16).view(np.float16)
                np.testing.assert_array_equal(cell, tokens[i].reshape(-1))
        c.check_invariants()


@pytest.mark.parametrize("layout,extra", LAYOUTS, ids=IDS)
def test_data_copied_by_the_cache(layout, extra):
    # A fork shares the parent's tokens; the child's first write into the shared, partly
    # filled last page makes the cache copy it (copy on write). The child's tokens, read at
    # its own locations, are the parent's data.
    with small(layout, **extra) as c:
        c.add_request(1)
        locs = c.extend_batch([1], [21])
        k = np.asarray(c.k(1))
        data = (np.arange(21 * 32).reshape(21, 2, 16) % 1000).astype(np.float16)
        k[c.kv_slot_index(locs)] = data
        c.fork(1, 2)
        c.extend(2, 3)
        child = c.req_to_token(2)
        if layout == "paged":
            assert c.stats.cow_copies >= (1 if extra.get("page_tokens", 16) > 1 else 0)
        np.testing.assert_array_equal(np.from_dlpack(c.k(1))[c.kv_slot_index(child[:21])], data)
        c.check_invariants()


def test_bfloat16_as_bits_and_versioned_capsules():
    with small("paged", dtype="bfloat16") as c:
        k = c.k(0)
        assert k.dtype == "bfloat16"
        # numpy has no bfloat16 (numpy 1.24 fails with SystemError, later ones cleanly).
        with pytest.raises((BufferError, TypeError, RuntimeError, ValueError, SystemError)):
            np.from_dlpack(k)
        bits = np.from_dlpack(k.view("uint16"))
        assert bits.dtype == np.uint16 and bits.__array_interface__["data"][0] == k.data_ptr
        assert k.__dlpack_device__() == (1, 0)
        # DLPack 1.0 capsules for consumers that ask for them.
        cap = k.__dlpack__(max_version=(1, 0))
        assert "dltensor_versioned" in repr(cap)
        before = _dlpack.live_exports()
        del cap
        gc.collect()
        assert _dlpack.live_exports() == before - 1  # unconsumed: the destructor cleaned up


def test_exports_keep_the_cache_alive():
    c = small("paged")
    c.add_request(1)
    locs = c.extend_batch([1], [5])
    k = np.asarray(c.k(0))
    k[c.kv_slot_index(locs)] = 3
    d = np.from_dlpack(c.k(0))
    assert _dlpack.exports_of(c) == 2
    c.close()  # deferred: the numpy array still points into the pool
    assert float(k[c.kv_slot_index(locs)].sum()) == 5 * 32 * 3
    with pytest.raises(kvmem.InvalidArgumentError):
        c.extend(1, 1)
    with pytest.raises(BufferError):
        c_k = kvmem.Array(c, 1, (1,), (1,), "float16")
        c_k.__dlpack__()
    assert float(d[c.kv_slot_index(locs)].sum()) == 5 * 32 * 3
    del k, d
    gc.collect()
    assert _dlpack.exports_of(c) == 0


def test_tensor_info_reads_any_dlpack_tensor():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t = _dlpack.tensor_info(a)
    assert t.ptr == a.__array_interface__["data"][0]
    assert t.shape == (2, 3, 4) and t.strides == (12, 4, 1) and t.dtype == "float32"
    assert t.contiguous()
    t = _dlpack.tensor_info(a[:, :, ::2])
    assert not t.contiguous()
    with pytest.raises(kvmem.InvalidArgumentError):
        _dlpack.tensor_info([1, 2])


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("layout", ["paged", "virtual"])
def test_no_leak_over_thousands_of_caches(layout):
    def cycle():
        with small(layout) as c:
            c.add_request(1)
            c.set_running_batch([1])
            locs = c.extend_batch([1], [20])
            k = np.asarray(c.k(0))
            k[c.kv_slot_index(locs)] = 1
            np.from_dlpack(c.v(0))
            np.from_dlpack(c.running_batch().seq_lens)
            c.free([1])
            c.check_invariants()
    for _ in range(200):  # warm up allocator pools and caches
        cycle()
    gc.collect()
    rss, fds, exports = _rss_kib(), _fds(), _dlpack.live_exports()
    for _ in range(2000):
        cycle()
    gc.collect()
    assert _fds() == fds
    assert _dlpack.live_exports() == exports
    grown = _rss_kib() - rss
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 2000 caches"
