"""kvmem as the KV cache and the attention of a Hugging Face transformers model.

kvmem holds every layer's K and V; its kernels compute attention: ``append_kv`` writes the
new tokens' K/V at the locations ``extend_batch`` gave, the decode kernel attends for
requests that add one token (planned from the cache's running batch, read through its
device mirror) and the extend kernel for the others (prefill, chunked prefill). The
model's own code computes everything else (projections, RoPE, norms, MLP, sampling).

Two ways in (docs/integrations.md):

* :class:`KvmemRunner`, the engine's way: requests by id, ragged batches packed into one
  forward without padding, ``fork`` to share a prompt among several sequences without
  copying its K/V, out-of-memory as :class:`kvmem.OutOfMemoryError` with nothing changed.
* :class:`KvmemCache`, a ``transformers.Cache`` for ``model.generate(...,
  past_key_values=KvmemCache(runner))``: padded batches (pad tokens are never stored),
  greedy, sampling and beam search (beams reordered by ``fork``, no copy).

A model kvmem cannot run (MLA, logit soft-capping, attention sinks, cross-attention, a
layer type other than full or sliding attention, a head_dim without a kernel, a dtype
other than bfloat16 / float16, a model not on a CUDA device) is refused when the runner is
made, with :class:`UnsupportedModelError` naming the feature; nothing falls back silently.
"""

import dataclasses
import itertools
import threading
import time

import numpy as np
import torch

import kvmem
from ..errors import FailedPreconditionError, InvalidArgumentError, UnimplementedError

ATTENTION = "kvmem"
HEAD_DIMS = (64, 128, 256)
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_LAYER_TYPES = ("full_attention", "sliding_attention")
_state = threading.local()  # the step of the forward in flight on this thread


class UnsupportedModelError(UnimplementedError):
    """The model uses an attention feature kvmem's kernels do not implement."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What kvmem needs of a model: its attention shape, dtype and per-layer windows
    (0: full attention; w: a query attends to the w most recent positions, itself
    included)."""
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    windows: tuple
    device: torch.device


def inspect_model(model):
    """The model's :class:`ModelSpec`, or :class:`UnsupportedModelError` naming the first
    feature kvmem does not support."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = f"{type(model).__name__} (model_type {getattr(text, 'model_type', '?')!r})"

    def refuse(feature):
        raise UnsupportedModelError(f"{name}: {feature} is not supported by kvmem's attention")

    if getattr(config, "is_encoder_decoder", False):
        refuse("an encoder-decoder model (cross-attention)")
    for key in ("kv_lora_rank", "q_lora_rank"):
        if getattr(text, key, None):
            refuse(f"multi-head latent attention (MLA; config.{key}={getattr(text, key)})")
    for key in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(text, key, None):
            refuse(f"attention logit soft-capping (config.{key}={getattr(text, key)})")
    layers = int(text.num_hidden_layers)
    q_heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or q_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // q_heads)
    if head_dim not in HEAD_DIMS:
        refuse(f"head_dim {head_dim} (kernels exist for {', '.join(map(str, HEAD_DIMS))})")
    if q_heads % kv_heads:
        refuse(f"{q_heads} query heads over {kv_heads} KV heads (not a whole group)")
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * layers
    windows = []
    for i, kind in enumerate(layer_types):
        if kind not in _LAYER_TYPES:
            refuse(f"layer type {kind!r} (layer {i}; kvmem runs {' and '.join(_LAYER_TYPES)})")
        windows.append(int(text.sliding_window) if kind == "sliding_attention" else 0)
    if "sliding_attention" not in layer_types and getattr(text, "sliding_window", None) and \
            getattr(text, "use_sliding_window", True):
        windows = [int(text.sliding_window)] * layers  # Mistral: one window for every layer
    for mod_name, mod in model.named_modules():
        if getattr(mod, "sinks", None) is not None:
            refuse(f"attention sinks ({mod_name}.sinks)")
    dtype = model.dtype
    if dtype not in _DTYPES:
        refuse(f"dtype {dtype} (kernels run torch.bfloat16 and torch.float16)")
    device = next(model.parameters()).device
    if device.type != "cuda":
        refuse(f"a model on {device} (kvmem's kernels run on a CUDA device)")
    return ModelSpec(layers, q_heads, kv_heads, head_dim, _DTYPES[dtype], tuple(windows), device)


def register():
    """Registers kvmem's attention (and its mask function) with transformers under the
    name ``"kvmem"``. Idempotent."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, kvmem_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers: masks are built without the interface
        return
    AttentionMaskInterface.register(ATTENTION, _padding_mask)


def _use_kvmem_attention(model):
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION)
    else:
        model.config._attn_implementation = ATTENTION


class _Padding:
    """What kvmem's mask function hands its attention: the 2D padding mask (True: a real
    token), from which a padded batch's real new tokens are read. kvmem needs no 4D mask:
    causality and windows follow from each request's positions."""

    def __init__(self, mask):
        self.mask = mask


def _padding_mask(*args, attention_mask=None, **kwargs):
    return None if attention_mask is None else _Padding(attention_mask)


class _Step:
    """One forward's plan: the requests in kernel order (decode rows first), their new
    tokens' locations and, for a padded batch, where the real tokens sit."""

    serial = itertools.count(1)

    def __init__(self, ids, counts, before, decode_n, slots, gather):
        self.id = next(_Step.serial)
        self.ids = ids
        self.counts = counts
        self.before = before
        self.decode_n = decode_n  # the first decode_n requests add one token each
        self.slots = slots  # int64 CUDA tensor, one location per new token
        self.gather = gather  # None: tokens are packed request after request


@dataclasses.dataclass
class Timings:
    """Host seconds spent in kvmem's calls, by kind (the serving benchmark's profile)."""
    bookkeeping: float = 0.0  # extend_batch, running batch, plans, free, fork
    kernels: float = 0.0  # append_kv, decode, extend launches (host side)

    def reset(self):
        self.bookkeeping = self.kernels = 0.0


class KvmemRunner:
    """A model with kvmem as its KV cache and attention. Requests are named by integer
    ids; :meth:`forward` runs one step for any mix of requests (prefill chunks, decode
    tokens) packed without padding.

    Keywords other than those named go to :class:`kvmem.KvCache` (``arrangement``,
    ``chunk_tokens``, ...). ``max_step_tokens`` bounds the tokens of one forward that are
    not decode tokens (the extend kernel's workspace).
    """

    def __init__(self, model, *, layout="paged", page_tokens=16, memory_budget_bytes,
                 max_requests=256, max_context=None, max_step_tokens=16384, **cache_config):
        self.spec = spec = inspect_model(model)
        _use_kvmem_attention(model)
        self.model = model
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        if max_context is None:
            max_context = int(getattr(text, "max_position_embeddings", 0) or 8192)
        config = dict(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                      head_dim=spec.head_dim, dtype=spec.dtype, layout=layout,
                      max_requests=max_requests, max_context=max_context,
                      memory_budget_bytes=memory_budget_bytes,
                      device=f"cuda:{spec.device.index or 0}")
        if layout == "paged":
            config["page_tokens"] = page_tokens
        config.update(cache_config)
        self.cache = kvmem.KvCache(**config)
        self.mirror = kvmem.DeviceRunningBatch(self.cache)
        self.max_requests = max_requests
        self.max_step_tokens = max_step_tokens
        self.lengths = {}  # id -> tokens stored
        self.timings = Timings()
        # The fence of every free: one event, recorded again at each free. kvmem queries a
        # fence until it completes, so the event must outlive the pages it guards; a later
        # record on the same stream completes after the earlier work, so reusing one event
        # only ever delays reuse, never hastens it.
        self._fence = torch.cuda.Event()
        self._running = None  # the ids of the running batch (the decode rows), in order
        self._decode_ws = {}  # (window_left, scale) -> [DecodeWorkspace, planned step id]
        self._extend_ws = {}
        self._auto_ids = itertools.count(1 << 60)

    # ---- requests ---------------------------------------------------------------------
    def add(self, request_id):
        t = time.perf_counter()
        self.cache.add_request(request_id)
        self.lengths[request_id] = 0
        self.timings.bookkeeping += time.perf_counter() - t

    def fork(self, parent, child):
        """``child`` starts with ``parent``'s tokens, sharing their K/V (no copy)."""
        t = time.perf_counter()
        self.cache.fork(parent, child)
        self.lengths[child] = self.lengths[parent]
        self.timings.bookkeeping += time.perf_counter() - t

    def free(self, ids):
        """Ends requests; their pages are reused once the kernels queued so far on the
        current stream are done (a fence recorded now)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not ids:
            return
        t = time.perf_counter()
        self._fence.record()
        self.cache.free(ids, fence=self._fence)
        for i in ids:
            del self.lengths[i]
        self._running = None  # freed members leave the running batch
        self.timings.bookkeeping += time.perf_counter() - t

    def truncate(self, request_id, new_length):
        self.cache.truncate(request_id, new_length)
        self.lengths[request_id] = new_length

    def length(self, request_id):
        return self.lengths[request_id]

    def new_id(self):
        """An id no caller uses (KvmemCache's rows)."""
        return next(self._auto_ids)

    def close(self):
        """Ends the cache (after the kernels queued on the current stream)."""
        torch.cuda.current_stream().synchronize()
        self.mirror.close()
        for table in (self._decode_ws, self._extend_ws):
            for ws, _ in table.values():
                ws.close()
            table.clear()
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- one step -----------------------------------------------------------------------
    def forward(self, ids, tokens, *, all_logits=False):
        """Adds ``tokens[i]`` (a sequence of token ids, at least one) to request ``ids[i]``
        and runs the model on them in one forward. Returns the logits of each request's
        last new token, [len(ids), vocab] in the order of ``ids`` (``all_logits``: a list
        of [len(tokens[i]), vocab] tensors). :class:`kvmem.OutOfMemoryError` when the
        cache cannot hold the new tokens: nothing changed, so the caller preempts and
        retries."""
        ids = [int(i) for i in ids]
        if len(ids) != len(tokens):
            raise InvalidArgumentError(f"{len(ids)} ids and {len(tokens)} token lists")
        counts = [len(t) for t in tokens]
        if not ids or min(counts) < 1:
            raise InvalidArgumentError("every request needs at least one new token")
        for i in ids:
            if i not in self.lengths:
                raise kvmem.NotFoundError(f"request {i}: not added to this runner")
        # Kernel order: requests adding one token after a cached prefix first (decode).
        decode = [k for k, c in enumerate(counts) if c == 1 and self.lengths[ids[k]] > 0]
        in_decode = set(decode)
        order = decode + [k for k in range(len(ids)) if k not in in_decode]
        oids = [ids[k] for k in order]
        ocounts = np.array([counts[k] for k in order], np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(tokens[k] for k in order), np.int64,
                           count=int(ocounts.sum()))
        step = self._begin(oids, ocounts, len(decode), None)
        dev = self.spec.device
        try:
            before = np.repeat(np.array(step.before, np.int64), ocounts)
            starts = np.repeat(np.cumsum(ocounts) - ocounts, ocounts)
            positions = before + np.arange(flat.shape[0]) - starts
            input_ids = torch.from_numpy(flat).to(dev, non_blocking=True)[None]
            position_ids = torch.from_numpy(positions).to(dev, non_blocking=True)[None]
            keep = 0 if all_logits else torch.from_numpy(np.cumsum(ocounts) - 1).to(dev)
            _state.step = (self, step)
            try:
                out = self.model(input_ids=input_ids, position_ids=position_ids,
                                 use_cache=False, logits_to_keep=keep)
            finally:
                _state.step = None
        except BaseException:
            self._rollback(step)
            raise
        logits = out.logits[0]
        inverse = np.empty(len(order), np.int64)
        inverse[np.array(order)] = np.arange(len(order))
        if all_logits:
            pieces = torch.split(logits, ocounts.tolist())
            return [pieces[k] for k in inverse]
        return logits[torch.from_numpy(inverse).to(dev)]

    def _begin(self, oids, ocounts, decode_n, gather):
        """Memory for the new tokens (all or nothing) and the step's plan."""
        t = time.perf_counter()
        before = [self.lengths[i] for i in oids]
        locs = self.cache.extend_batch(oids, ocounts)
        for i, c in zip(oids, ocounts):
            self.lengths[i] += int(c)
        slots = torch.from_numpy(locs).to(self.spec.device, non_blocking=True)
        step = _Step(oids, ocounts, before, decode_n, slots, gather)
        try:
            if decode_n:
                members = tuple(oids[:decode_n])
                if members != self._running:
                    self._running = None
                    self.cache.set_running_batch(np.array(members, np.uint64))
                    self._running = members
                self.mirror.upload()
            if decode_n < len(oids):
                n = int(ocounts[decode_n:].sum())
                if n > self.max_step_tokens:
                    raise InvalidArgumentError(
                        f"{n} prefill tokens in one step, more than max_step_tokens="
                        f"{self.max_step_tokens}")
        except BaseException:
            self._rollback(step)
            raise
        self.timings.bookkeeping += time.perf_counter() - t
        return step

    def _rollback(self, step):
        self.cache.truncate_batch(step.ids, step.before)
        for i, b in zip(step.ids, step.before):
            self.lengths[i] = b

    def _workspace(self, step, table, window_left, scale, decode):
        key = (window_left, scale)
        entry = table.get(key)
        if entry is None:
            if decode:
                ws = kvmem.DecodeWorkspace(self.cache, self.spec.num_q_heads,
                                           max_batch=self.max_requests, scale=scale,
                                           window_left=window_left)
            else:
                ws = kvmem.ExtendWorkspace(self.cache, self.spec.num_q_heads,
                                           max_batch=self.max_requests,
                                           max_new_tokens=self.max_step_tokens, scale=scale,
                                           window_left=window_left)
            entry = table[key] = [ws, 0]
        ws = entry[0]
        if entry[1] != step.id:  # plan once per step, shared by every layer
            if decode:
                ws.plan_running_batch()
            else:
                n = step.decode_n
                ids = step.ids[n:]
                prefix = np.array(step.before[n:], np.int32)
                fresh = np.asarray(step.counts[n:], np.int32)
                ws.plan(prefix, fresh, self._table(ids))
            entry[1] = step.id
        return ws

    def _table(self, ids):
        if self.cache.layout != "paged":
            return np.array([self.cache.row(i) for i in ids], np.int32)
        rows = [self.cache.block_table(i) for i in ids]
        table = np.zeros((len(ids), max(len(r) for r in rows)), np.int32)
        for k, r in enumerate(rows):
            table[k, :len(r)] = r
        return table

    def _attend(self, step, module, query, key, value, scaling, kwargs):
        """One layer: append the new K/V, then decode and extend attention."""
        for name in ("softcap", "s_aux"):
            if kwargs.get(name) is not None:
                raise UnsupportedModelError(f"attention argument {name} is not supported by "
                                            "kvmem's attention")
        layer = module.layer_idx
        b, h, t, d = query.shape
        kv = key.shape[1]
        if step.gather is None:  # packed request after request: [b, heads, t, d] -> [b*t, ...]
            q = query.transpose(1, 2).reshape(b * t, h, d).contiguous()
            k = key.transpose(1, 2).reshape(b * t, kv, d).contiguous()
            v = value.transpose(1, 2).reshape(b * t, kv, d).contiguous()
        else:
            q = query.transpose(1, 2).reshape(b * t, h, d)[step.gather].contiguous()
            k = key.transpose(1, 2).reshape(b * t, kv, d)[step.gather].contiguous()
            v = value.transpose(1, 2).reshape(b * t, kv, d)[step.gather].contiguous()
        window = kwargs.get("sliding_window")
        window_left = int(window) - 1 if window else -1
        scale = float(scaling) if scaling else 0.0
        clock = time.perf_counter()
        kvmem.append_kv(self.cache, layer, k, v, step.slots)
        out = torch.empty_like(q)
        n = step.decode_n
        if n:
            ws = self._workspace(step, self._decode_ws, window_left, scale, True)
            ws.decode(layer, q[:n], out[:n],
                      mirror=self.mirror if self.cache.layout == "paged" else None)
        if n < len(step.ids):
            ws = self._workspace(step, self._extend_ws, window_left, scale, False)
            ws.extend(layer, q[n:], out[n:])
        self.timings.kernels += time.perf_counter() - clock
        if step.gather is None:
            return out.view(b, t, h, d), None
        full = out.new_zeros(b * t, h, d)
        full[step.gather] = out
        return full.view(b, t, h, d), None


def kvmem_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    """transformers' attention interface (registered as ``"kvmem"``): query [b, heads, t,
    d], key / value [b, kv_heads, t, d] of the new tokens; returns [b, t, heads, d]."""
    if dropout and module.training:
        raise UnsupportedModelError("attention dropout in training mode: kvmem's attention "
                                    "is for inference (call model.eval())")
    active = getattr(_state, "step", None)
    if active is None:
        cache = getattr(_state, "cache", None)
        if cache is None:
            raise FailedPreconditionError(
                "kvmem attention ran without a kvmem step: call KvmemRunner.forward, or "
                "pass past_key_values=KvmemCache(runner) to the model")
        active = cache._step_for(module, query, attention_mask)
    runner, step = active
    return runner._attend(step, module, query, key, value, scaling, kwargs)


def _cache_base():
    from transformers import Cache
    return Cache


class KvmemCache(_cache_base()):
    """A ``transformers.Cache`` over a :class:`KvmemRunner`, for ``model.generate`` and
    direct forwards with ``past_key_values``: batch row r is a kvmem request. Pad tokens
    (zeros of the attention mask) are never stored. Beam search reorders rows by forking
    (the beams share their K/V; no copy). ``close()`` frees the rows (also on garbage
    collection)."""

    is_compileable = False

    def __init__(self, runner):
        try:
            super().__init__(layers=[])
        except TypeError:  # a transformers whose Cache takes no layers
            super().__init__()
        self.runner = runner
        self.ids = None
        self.seen = 0  # columns of the batch seen so far, pads included
        self._step = None
        self._step_layer = -1

    # transformers calls update() right before each layer's attention: it marks this
    # cache as the one the attention reads, and a new forward at layer 0.
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        _state.cache = self
        if layer_idx <= self._step_layer or self._step is None:
            self._step = None
        self._step_layer = layer_idx
        return key_states, value_states

    def _step_for(self, module, query, attention_mask):
        _state.cache = None
        if self._step is not None:
            return self._step
        runner = self.runner
        b, _, t, _ = query.shape
        if self.ids is None:
            self.ids = [runner.new_id() for _ in range(b)]
            for i in self.ids:
                runner.add(i)
        if len(self.ids) != b:
            raise InvalidArgumentError(f"a batch of {b} rows on a KvmemCache of {len(self.ids)}")
        mask = attention_mask.mask if isinstance(attention_mask, _Padding) else None
        if mask is not None:
            valid = mask[:, -t:].to(torch.bool)
            counts = valid.sum(1).cpu().numpy().astype(np.int64)
            gather = None if bool(valid.all()) else valid.reshape(-1).nonzero().squeeze(1)
        else:
            counts = np.full(b, t, np.int64)
            gather = None
        keep = counts > 0
        if not keep.all():  # rows with no real new token take no part in this step
            raise UnimplementedError("a step in which a row adds no token (all padding)")
        decode = t == 1 and all(runner.lengths[i] > 0 for i in self.ids)
        self._step = (runner, runner._begin(list(self.ids), counts, b if decode else 0, gather))
        self.seen += t
        return self._step

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def get_mask_sizes(self, query, layer_idx=0):
        q = query if isinstance(query, int) else query.shape[0]
        return self.seen + q, 0

    def get_max_cache_shape(self, layer_idx=0):
        return -1

    def get_max_length(self, layer_idx=None):
        return -1

    def get_query_offset(self, layer_idx=0):
        return self.seen

    @property
    def batch_size(self):
        return -1 if self.ids is None else len(self.ids)

    @property
    def is_linear(self):
        return [False] * self.runner.spec.num_layers

    @property
    def is_croppable(self):
        return False

    @property
    def is_sliding(self):
        return [False] * self.runner.spec.num_layers

    @property
    def is_initialized(self):
        return self.ids is not None

    def __len__(self):
        return self.runner.spec.num_layers

    def reorder_cache(self, beam_idx):
        """Row r continues row beam_idx[r] (beam search): forks, then frees the old rows."""
        if self.ids is None:
            return
        sources = [self.ids[int(j)] for j in beam_idx.tolist()]
        fresh = [self.runner.new_id() for _ in sources]
        done = []
        try:
            for src, dst in zip(sources, fresh):
                self.runner.fork(src, dst)
                done.append(dst)
        except BaseException:
            self.runner.free(done)
            raise
        self.runner.free(self.ids)
        self.ids = fresh

    def batch_select_indices(self, indices):
        if self.ids is None:
            return
        keep = [self.ids[int(j)] for j in indices.tolist()]
        self.runner.free([i for i in self.ids if i not in set(keep)])
        self.ids = keep

    def batch_repeat_interleave(self, repeats):
        if self.ids is None:
            return
        self.reorder_cache(torch.arange(len(self.ids)).repeat_interleave(repeats))

    def crop(self, max_length):
        raise UnimplementedError("KvmemCache.crop (assisted decoding): use KvmemRunner.truncate")

    def close(self):
        if self.ids is not None:
            self.runner.free(self.ids)
            self.ids = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def generate(runner, prompts, max_new_tokens, *, num_sequences=1, do_sample=False,
             temperature=1.0, generator=None, first_id=0):
    """Generates ``max_new_tokens`` tokens for each prompt (lists of token ids), with
    ``num_sequences`` sequences per prompt that share the prompt's K/V through ``fork``.
    Greedy unless ``do_sample``. Returns a list (per prompt) of lists (per sequence) of
    token lists. Request ids ``first_id``, ``first_id + 1``, ... are used and freed."""
    n = len(prompts)
    parents = [first_id + k for k in range(n)]
    for p in parents:
        runner.add(p)
    rows = []
    try:
        logits = runner.forward(parents, prompts)
        rows = list(parents)
        for k, p in enumerate(parents):
            for s in range(1, num_sequences):
                child = first_id + n + k * (num_sequences - 1) + s - 1
                runner.fork(p, child)
                rows.append(child)
        owner = [k for k in range(n)] + [k for k in range(n) for _ in range(1, num_sequences)]
        logits = logits[torch.tensor(owner, device=logits.device)]
        out = [[] for _ in rows]
        for step in range(max_new_tokens):
            nxt = _choose(logits, do_sample, temperature, generator)
            for r, tok in enumerate(nxt):
                out[r].append(tok)
            if step + 1 == max_new_tokens:
                break
            logits = runner.forward(rows, [[tok] for tok in nxt])
    finally:
        runner.free(rows if rows else parents)
    result = [[] for _ in range(n)]
    for r, k in enumerate(owner):
        result[k].append(out[r])
    return result


def _choose(logits, do_sample, temperature, generator):
    if not do_sample:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
