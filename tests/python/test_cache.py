"""kvmem.KvCache on the host backend: configuration, every error class, the batch calls,
random operation sequences checked with check_invariants, the running batch."""
import random

import numpy as np
import pytest

import kvmem
from kvmem import _lib

LAYOUTS = ["paged", "virtual"]


def small(layout="paged", **kw):
    config = dict(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", layout=layout,
                  page_tokens=16, max_requests=8, max_context=256, host_granularity=4096,
                  memory_budget_bytes=1 << 20)
    config.update(kw)
    return kvmem.KvCache(**config)


def test_version_and_library():
    assert kvmem.__version__ == "0.2.0"
    assert kvmem.library_path()
    assert kvmem.has_cuda() in (True, False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_round_trip(layout):
    with small(layout, chunk_tokens=0, page_placement="lowest_first") as c:
        cfg = c.config
        assert cfg["layout"] == layout
        assert cfg["num_layers"] == 2 and cfg["head_dim"] == 16 and cfg["dtype"] == "float16"
        assert cfg["max_context"] == 256 and cfg["device"] == "host"
        assert cfg["page_placement"] == "lowest_first"
        assert "layout=" + layout in repr(c)
    assert "closed" in repr(c)
    with pytest.raises(kvmem.InvalidArgumentError, match="closed"):
        c.add_request(1)


def test_bad_configs():
    with pytest.raises(TypeError, match="unknown keyword"):
        small(num_layer=3)
    with pytest.raises(kvmem.InvalidArgumentError, match="dtype"):
        small(dtype="int4")
    with pytest.raises(kvmem.InvalidArgumentError, match="layout"):
        small(layout="ring")
    with pytest.raises(kvmem.InvalidArgumentError, match="device"):
        small(device="tpu")
    with pytest.raises(kvmem.InvalidArgumentError, match="integer"):
        small(num_layers=2.5)
    with pytest.raises(kvmem.InvalidArgumentError, match="range"):
        small(max_requests=1 << 40)
    # Checked by the library: the Status message names the field.
    with pytest.raises(kvmem.InvalidArgumentError, match="num_layers") as e:
        small(num_layers=0)
    assert e.value.code == 3 and e.value.code_name == "INVALID_ARGUMENT"
    assert isinstance(e.value, ValueError)
    with pytest.raises(kvmem.InvalidArgumentError, match="budget"):
        small(memory_budget_bytes=4096)
    with pytest.raises(kvmem.InvalidArgumentError):
        small(host_granularity=12345)


def test_every_code_has_its_class():
    names = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
             "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
             "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
             "UNAUTHENTICATED"]
    classes = set()
    for code in range(1, 17):
        assert _lib.status_name(code).decode() == names[code]
        e = kvmem.error_for_code(code, "message")
        assert isinstance(e, kvmem.Error) and e.code == code and e.code_name == names[code]
        assert str(e) == names[code] + ": message"
        classes.add(type(e))
    assert len(classes) == 16
    assert kvmem.error_for_code(8, "x").__class__ is kvmem.OutOfMemoryError
    assert isinstance(kvmem.error_for_code(99, "x"), kvmem.UnknownError)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_errors_leave_the_cache_unchanged(layout):
    with small(layout, memory_budget_bytes=128 << 10) as c:
        c.add_request(1)
        c.extend(1, 10)
        before = c.stats
        with pytest.raises(kvmem.NotFoundError, match="7"):
            c.extend(7, 1)
        with pytest.raises(kvmem.NotFoundError):
            c.free(7)
        with pytest.raises(kvmem.NotFoundError):
            c.length(7)
        with pytest.raises(kvmem.AlreadyExistsError):
            c.add_request(1)
        with pytest.raises(kvmem.OutOfRangeError):
            c.extend(1, 247)  # past max_context 256
        with pytest.raises(kvmem.OutOfRangeError):
            c.truncate(1, 11)
        with pytest.raises(kvmem.OutOfRangeError):
            c.layer(2)
        with pytest.raises(kvmem.InvalidArgumentError):
            c.extend_batch([1], [-1])
        with pytest.raises(kvmem.InvalidArgumentError):
            c.extend_batch([1, 1], [1, 1])  # an id twice
        with pytest.raises(kvmem.InvalidArgumentError, match="entries"):
            c.extend_batch([1], [1, 2])
        with pytest.raises(kvmem.InvalidArgumentError):
            c.extend_batch([1], [3], out=np.empty(2, np.int64))
        with pytest.raises(kvmem.InvalidArgumentError):
            c.extend_batch(["a"], [3])
        with pytest.raises(kvmem.NotFoundError):
            c.extend_batch([1, 9], [2, 2])  # all or nothing
        if layout == "virtual":
            c.set_running_batch([1])
            with pytest.raises(kvmem.FailedPreconditionError):
                c.pack_running_batch()
        assert c.length(1) == 10
        after = c.stats
        for f in ("num_requests", "logical_tokens", "held_bytes", "pages_used", "pages_free"):
            assert getattr(after, f) == getattr(before, f), f
        c.check_invariants()
        # Out of memory (or of rows): its own class, nothing changed.
        ids = list(range(10, 17))
        for i in ids:
            c.add_request(i)
        with pytest.raises(kvmem.OutOfMemoryError):
            c.add_request(100)
        before = c.stats
        with pytest.raises(kvmem.OutOfMemoryError) as e:
            c.extend_batch(ids, [256] * len(ids))
        assert isinstance(e.value, MemoryError) and e.value.code_name == "RESOURCE_EXHAUSTED"
        assert all(c.length(i) == 0 for i in ids)
        assert c.stats.held_bytes == before.held_bytes
        c.check_invariants()


def test_failed_precondition_and_unavailable():
    with small("virtual") as c:
        c.add_request(1)
        with pytest.raises(kvmem.FailedPreconditionError):
            c.block_table(1)
        with pytest.raises(kvmem.FailedPreconditionError, match="host"):
            kvmem.DecodeWorkspace(c, 4)
        with pytest.raises(kvmem.FailedPreconditionError):
            kvmem.append_kv(c, 0, None, None, None)
        if not kvmem.has_cuda():
            # The C ABI's kernels in a build without CUDA.
            from ctypes import byref, c_void_p
            o = _lib.sized(_lib.AttentionOptions)
            _lib.attention_options_init(byref(o))
            with pytest.raises(kvmem.UnimplementedError, match="without CUDA"):
                _lib.check(_lib.decode_workspace_create(c.handle, byref(o), byref(c_void_p())))
    if not kvmem.has_cuda():
        with pytest.raises(kvmem.UnavailableError):
            small(device="cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_calls(layout):
    with small(layout) as c:
        ids = np.array([3, 1, 2], np.uint64)
        for i in ids:
            c.add_request(int(i))
        locs = c.extend_batch(ids, np.array([5, 0, 17]))
        assert locs.dtype == np.int64 and locs.shape == (22,)
        assert [c.length(i) for i in (3, 1, 2)] == [5, 0, 17]
        assert list(c.req_to_token(3)) == list(locs[:5])
        assert list(c.req_to_token(2)) == list(locs[5:])
        out = np.full(30, -7, np.int64)
        assert c.extend_batch([3, 2], [1, 1], out=out) is out and out[2] == -7
        c.truncate_batch([3, 2], [2, 9])
        assert c.length(3) == 2 and c.length(2) == 9
        assert c.fork(2, 20) >= 0 and c.length(20) == 9 and 20 in c
        c.free([3, 1])
        c.free(2, fence=None)
        assert 3 not in c and c.stats.num_requests == 1
        assert c.trim() >= 0
        c.check_invariants()
        if layout == "paged":
            assert list(c.block_table(20)) == [int(x) // 16 for x in c.req_to_token(20)[::16]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_operations_keep_the_invariants(layout):
    rng = random.Random(23 + len(layout))
    with small(layout, memory_budget_bytes=256 << 10) as c:
        model = {}  # id -> length
        next_id = 0
        for step in range(600):
            op = rng.choice(["add", "extend", "batch", "truncate", "fork", "free", "free_batch"])
            live = list(model)
            try:
                if op == "add" or not live:
                    c.add_request(next_id)
                    model[next_id] = 0
                    next_id += 1
                elif op == "extend":
                    i = rng.choice(live)
                    n = rng.randint(0, 40)
                    c.extend(i, n)
                    model[i] += n
                elif op == "batch":
                    ids = rng.sample(live, rng.randint(1, len(live)))
                    counts = [rng.randint(0, 20) for _ in ids]
                    c.extend_batch(ids, counts)
                    for i, n in zip(ids, counts):
                        model[i] += n
                elif op == "truncate":
                    i = rng.choice(live)
                    n = rng.randint(0, model[i])
                    c.truncate(i, n)
                    model[i] = n
                elif op == "fork":
                    parent = rng.choice(live)
                    c.fork(parent, next_id)
                    model[next_id] = model[parent]
                    next_id += 1
                elif op == "free":
                    i = rng.choice(live)
                    c.free(i)
                    del model[i]
                else:
                    ids = rng.sample(live, rng.randint(1, len(live)))
                    c.free(ids)
                    for i in ids:
                        del model[i]
            except (kvmem.OutOfMemoryError, kvmem.OutOfRangeError):
                pass  # no memory, no row or past max_context: nothing changed
            c.check_invariants()
            assert {i: c.length(i) for i in model} == model, step
            assert c.stats.num_requests == len(model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_running_batch(layout):
    with small(layout) as c:
        with pytest.raises(kvmem.InvalidArgumentError, match="set_running_batch"):
            c.running_batch()
        for i in (3, 1, 2):
            c.add_request(i)
        c.set_running_batch([3, 1, 2])
        c.extend_batch([3, 1, 2], [20, 1, 33])
        rb = c.running_batch()
        assert rb.size == 3 and rb.max_batch == 8 and rb.max_seq_len == 33
        lens = np.from_dlpack(rb.seq_lens)
        assert list(lens[:3]) == [20, 1, 33]
        assert list(np.from_dlpack(rb.row_ids)[:3]) == [c.row(3), c.row(1), c.row(2)]
        address = rb.seq_lens.data_ptr
        assert lens.__array_interface__["data"][0] == address  # no copy
        all_, _ = c.take_running_batch_changes()
        assert all_
        c.extend_batch([1], [16])
        assert lens[1] == 17  # the same memory, updated by the cache
        assert c.running_batch().seq_lens.data_ptr == address
        all_, entries = c.take_running_batch_changes()
        assert not all_
        if layout == "paged":
            assert len(entries) >= 1
            table = np.from_dlpack(rb.page_table)
            assert table.shape == (8, 16)
            assert list(table[2, :3]) == list(c.block_table(2))
            assert list(np.from_dlpack(rb.last_page_len)[:3]) == [4, 1, 1]
            indptr, indices, last = c.pack_running_batch()
            ip = np.from_dlpack(indptr)
            assert list(ip) == [0, 2, 4, 7]
            assert list(np.from_dlpack(indices)[4:7]) == list(c.block_table(2))
        else:
            assert rb.page_table is None and rb.last_page_len is None
            with pytest.raises(kvmem.FailedPreconditionError):
                c.pack_running_batch()
        with pytest.raises(kvmem.InvalidArgumentError):
            c.set_running_batch(list(range(100, 109)))  # more than max_requests
        del lens
