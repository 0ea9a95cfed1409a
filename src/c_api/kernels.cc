// The C ABI's kernels (include/kvmem/c_api.h): AppendKv, the device running batch, decode
// and extend. Without CUDA (KVMEM_WITH_CUDA unset) each returns UNIMPLEMENTED.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kvmem/c_api.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "src/c_api/c_api_internal.h"

#ifdef KVMEM_WITH_CUDA
#include "kvmem/attention.h"
#include "kvmem/device_running_batch.h"
#include "kvmem/extend_attention.h"
#endif

using kvmem::c_api::CheckCache;
using kvmem::c_api::Guard;
using kvmem::c_api::Null;

#ifdef KVMEM_WITH_CUDA

struct kvmem_device_running_batch {
  std::unique_ptr<kvmem::DeviceRunningBatch> mirror;
};

struct kvmem_decode_workspace {
  std::unique_ptr<kvmem::DecodeWorkspace> ws;
  // The last plan was a paged running batch's: the page table is the mirror's.
  bool planned_running_paged = false;
};

struct kvmem_extend_workspace {
  std::unique_ptr<kvmem::ExtendWorkspace> ws;
};

namespace kvmem::c_api {
namespace {

absl::Status CheckOnDevice(const KvCache& cache) {
  if (cache.config().device != DeviceKind::kCuda) {
    return absl::FailedPreconditionError(
        "the cache is on the host backend: kernels need a cache created with device = cuda");
  }
  return absl::OkStatus();
}

absl::StatusOr<AttentionShape> Shape(const KvCacheConfig& config,
                                     const kvmem_attention_options* o) {
  if (absl::Status s = CheckStructSize(o, "options"); !s.ok()) return s;
  AttentionShape shape;
  shape.num_q_heads = o->num_q_heads;
  shape.num_kv_heads = config.num_kv_heads;
  shape.head_dim = config.head_dim;
  shape.kv_dtype = config.dtype;
  shape.scale = o->scale;
  shape.window_left = o->window_left;
  return shape;
}

// Checks that ws was made for this cache's layout and that the layer exists.
absl::Status CheckLayer(const KvCache& cache, Layout ws_layout, int32_t layer) {
  const KvCacheConfig& config = cache.config();
  if (config.layout != ws_layout) {
    return absl::FailedPreconditionError("the workspace was made for a cache of the other layout");
  }
  if (layer < 0 || layer >= config.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("layer ", layer, " out of range [0, ", config.num_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckPlanArrays(const int32_t* table, int32_t batch, int64_t table_stride,
                             Layout layout) {
  if (batch < 0) return absl::InvalidArgumentError(absl::StrCat("batch ", batch, " < 0"));
  if (layout == Layout::kPaged && table_stride < 0) {
    return absl::InvalidArgumentError(absl::StrCat("table_stride ", table_stride, " < 0"));
  }
  const int64_t entries = layout == Layout::kPaged ? int64_t{batch} * table_stride : batch;
  return CheckArray(table, entries, "table");
}

}  // namespace
}  // namespace kvmem::c_api

extern "C" {

kvmem_status kvmem_append_kv(kvmem_cache* cache, int32_t first_layer, int32_t num_layers,
                             const void* k, const void* v, int64_t token_stride,
                             int64_t layer_stride, const int64_t* slots, int64_t num_tokens,
                             kvmem_stream stream) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    const KvCache& c = *cache->cache;
    if (absl::Status s = c_api::CheckOnDevice(c); !s.ok()) return s;
    const KvCacheConfig& config = c.config();
    if (num_layers < 1 || num_layers > kMaxAppendLayers) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_layers ", num_layers, ": must be in [1, ", kMaxAppendLayers, "]"));
    }
    if (first_layer < 0 || first_layer > config.num_layers - num_layers) {
      return absl::OutOfRangeError(absl::StrCat("layers [", first_layer, ", ",
                                                int64_t{first_layer} + num_layers,
                                                ") out of range [0, ", config.num_layers, ")"));
    }
    if (num_tokens < 0) return absl::InvalidArgumentError("num_tokens < 0");
    if (token_stride < 0 || layer_stride < 0) return absl::InvalidArgumentError("stride < 0");
    if (num_tokens > 0 && (k == nullptr || v == nullptr || slots == nullptr)) {
      return Null(k == nullptr ? "k" : v == nullptr ? "v" : "slots");
    }
    AttentionShape shape;
    shape.num_q_heads = config.num_kv_heads;
    shape.num_kv_heads = config.num_kv_heads;
    shape.head_dim = config.head_dim;
    shape.kv_dtype = config.dtype;
    NewKv src;
    src.k = k;
    src.v = v;
    src.token_stride = token_stride;
    src.layer_stride = layer_stride;
    src.slots = slots;
    src.num_tokens = num_tokens;
    const BatchMetadata none;
    if (config.layout == Layout::kPaged) {
      std::vector<PagedKv> views;
      for (int32_t l = first_layer; l < first_layer + num_layers; ++l) {
        absl::StatusOr<PagedKv> view = c.PagedView(l, none);
        if (!view.ok()) return view.status();
        views.push_back(*view);
      }
      return AppendKv<PagedKv>(shape, views, src, stream);
    }
    std::vector<VirtualKv> views;
    for (int32_t l = first_layer; l < first_layer + num_layers; ++l) {
      absl::StatusOr<VirtualKv> view = c.VirtualView(l, none);
      if (!view.ok()) return view.status();
      views.push_back(*view);
    }
    return AppendKv<VirtualKv>(shape, views, src, stream);
  });
}

kvmem_status kvmem_device_running_batch_create(const kvmem_cache* cache,
                                               kvmem_device_running_batch** out) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (out == nullptr) return Null("out");
    if (absl::Status s = c_api::CheckOnDevice(*cache->cache); !s.ok()) return s;
    const KvCacheConfig& config = cache->cache->config();
    const int64_t pt = config.page_tokens;
    const int64_t stride =
        config.layout == Layout::kPaged ? (config.max_context + pt - 1) / pt : 0;
    absl::StatusOr<std::unique_ptr<DeviceRunningBatch>> m =
        DeviceRunningBatch::Create(config.max_requests, stride);
    if (!m.ok()) return m.status();
    auto handle = std::make_unique<kvmem_device_running_batch>();
    handle->mirror = *std::move(m);
    *out = handle.release();
    return absl::OkStatus();
  });
}

void kvmem_device_running_batch_destroy(kvmem_device_running_batch* mirror) {
  try {
    delete mirror;
  } catch (...) {
  }
}

kvmem_status kvmem_device_running_batch_upload(kvmem_device_running_batch* mirror,
                                               kvmem_cache* cache, kvmem_stream stream) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (mirror == nullptr) return Null("mirror");
    const kvmem::RunningBatchView host = cache->cache->RunningBatch();
    if (host.max_batch == 0) {
      return absl::FailedPreconditionError("the cache has no running batch: set one first");
    }
    if (absl::Status s = cache->cache->TakeRunningBatchChanges(&cache->changes); !s.ok()) {
      return s;
    }
    return mirror->mirror->Upload(host, cache->changes, stream);
  });
}

kvmem_status kvmem_device_running_batch_view(const kvmem_device_running_batch* mirror,
                                             kvmem_running_batch* out) {
  return Guard([&]() -> absl::Status {
    if (mirror == nullptr) return Null("mirror");
    const kvmem::RunningBatchView d = mirror->mirror->view();
    kvmem_running_batch c;
    std::memset(&c, 0, sizeof(c));
    c.size = d.size;
    c.max_batch = d.max_batch;
    c.max_seq_len = d.max_seq_len;
    c.seq_lens = d.seq_lens;
    c.row_ids = d.row_ids;
    c.page_table = d.page_table;
    c.page_table_stride = d.page_table_stride;
    c.last_page_len = d.last_page_len;
    return kvmem::c_api::CopyOut(c, out, "out");
  });
}

kvmem_status kvmem_decode_workspace_create(const kvmem_cache* cache,
                                           const kvmem_attention_options* options,
                                           kvmem_decode_workspace** out) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (out == nullptr) return Null("out");
    if (absl::Status s = c_api::CheckOnDevice(*cache->cache); !s.ok()) return s;
    const KvCacheConfig& config = cache->cache->config();
    absl::StatusOr<AttentionShape> shape = c_api::Shape(config, options);
    if (!shape.ok()) return shape.status();
    DecodeOptions o;
    o.shape = *shape;
    o.layout = config.layout;
    o.max_batch = options->max_batch > 0 ? options->max_batch : config.max_requests;
    o.max_context = config.max_context;
    o.page_tokens = config.page_tokens;
    o.fixed_grid = options->fixed_grid != 0;
    o.pipeline_stages = options->pipeline_stages;
    absl::StatusOr<std::unique_ptr<DecodeWorkspace>> ws = DecodeWorkspace::Create(o);
    if (!ws.ok()) return ws.status();
    auto handle = std::make_unique<kvmem_decode_workspace>();
    handle->ws = *std::move(ws);
    *out = handle.release();
    return absl::OkStatus();
  });
}

void kvmem_decode_workspace_destroy(kvmem_decode_workspace* ws) {
  try {
    delete ws;
  } catch (...) {
  }
}

kvmem_status kvmem_decode_plan(kvmem_decode_workspace* ws, const int32_t* seq_lens, int32_t batch,
                               const int32_t* table, int64_t table_stride, kvmem_stream stream) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (ws == nullptr) return Null("ws");
    const Layout layout = ws->ws->options().layout;
    if (absl::Status s = c_api::CheckPlanArrays(table, batch, table_stride, layout); !s.ok()) {
      return s;
    }
    if (absl::Status s = c_api::CheckArray(seq_lens, batch, "seq_lens"); !s.ok()) return s;
    const auto lens = absl::MakeConstSpan(seq_lens, static_cast<size_t>(batch));
    absl::Status s =
        layout == Layout::kPaged
            ? ws->ws->PlanPaged(lens,
                                absl::MakeConstSpan(table, static_cast<size_t>(batch * table_stride)),
                                table_stride, stream)
            : ws->ws->PlanVirtual(lens, absl::MakeConstSpan(table, static_cast<size_t>(batch)),
                                  stream);
    if (s.ok()) ws->planned_running_paged = false;
    return s;
  });
}

kvmem_status kvmem_decode_plan_running_batch(kvmem_decode_workspace* ws, const kvmem_cache* cache,
                                             kvmem_stream stream) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (ws == nullptr) return Null("ws");
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (cache->cache->config().layout != ws->ws->options().layout) {
      return absl::FailedPreconditionError(
          "the workspace was made for a cache of the other layout");
    }
    const RunningBatchView batch = cache->cache->RunningBatch();
    if (batch.max_batch == 0) {
      return absl::FailedPreconditionError("the cache has no running batch: set one first");
    }
    absl::Status s = ws->ws->Plan(batch, stream);
    if (s.ok()) ws->planned_running_paged = ws->ws->options().layout == Layout::kPaged;
    return s;
  });
}

kvmem_status kvmem_decode(const kvmem_decode_workspace* ws, const kvmem_cache* cache,
                          int32_t layer, const kvmem_device_running_batch* mirror, const void* q,
                          void* out, kvmem_stream stream) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (ws == nullptr) return Null("ws");
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (q == nullptr || out == nullptr) return Null(q == nullptr ? "q" : "out");
    const Layout layout = ws->ws->options().layout;
    if (absl::Status s = c_api::CheckLayer(*cache->cache, layout, layer); !s.ok()) return s;
    if (ws->planned_running_paged && mirror == nullptr) {
      return absl::FailedPreconditionError(
          "the workspace planned a paged running batch: pass its device mirror, whose page "
          "table the kernel reads");
    }
    const BatchMetadata none;
    if (layout == Layout::kPaged) {
      absl::StatusOr<PagedKv> view = cache->cache->PagedView(layer, none);
      if (!view.ok()) return view.status();
      const PagedKv bound = mirror != nullptr ? mirror->mirror->Bind(*view) : ws->ws->Bind(*view);
      return DecodeAttention<PagedKv>(*ws->ws, bound, q, out, stream);
    }
    absl::StatusOr<VirtualKv> view = cache->cache->VirtualView(layer, none);
    if (!view.ok()) return view.status();
    const VirtualKv bound = mirror != nullptr ? mirror->mirror->Bind(*view) : ws->ws->Bind(*view);
    return DecodeAttention<VirtualKv>(*ws->ws, bound, q, out, stream);
  });
}

kvmem_status kvmem_extend_workspace_create(const kvmem_cache* cache,
                                           const kvmem_attention_options* options,
                                           kvmem_extend_workspace** out) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (out == nullptr) return Null("out");
    if (absl::Status s = c_api::CheckOnDevice(*cache->cache); !s.ok()) return s;
    const KvCacheConfig& config = cache->cache->config();
    absl::StatusOr<AttentionShape> shape = c_api::Shape(config, options);
    if (!shape.ok()) return shape.status();
    ExtendOptions o;
    o.shape = *shape;
    o.layout = config.layout;
    o.max_batch = options->max_batch > 0 ? options->max_batch : config.max_requests;
    if (options->max_new_tokens > 0) o.max_new_tokens = options->max_new_tokens;
    o.max_context = config.max_context;
    o.page_tokens = config.page_tokens;
    o.fixed_grid = options->fixed_grid != 0;
    o.max_ctas = options->max_ctas;
    absl::StatusOr<std::unique_ptr<ExtendWorkspace>> ws = ExtendWorkspace::Create(o);
    if (!ws.ok()) return ws.status();
    auto handle = std::make_unique<kvmem_extend_workspace>();
    handle->ws = *std::move(ws);
    *out = handle.release();
    return absl::OkStatus();
  });
}

void kvmem_extend_workspace_destroy(kvmem_extend_workspace* ws) {
  try {
    delete ws;
  } catch (...) {
  }
}

kvmem_status kvmem_extend_plan(kvmem_extend_workspace* ws, const int32_t* prefix_lens,
                               const int32_t* new_lens, int32_t batch, const int32_t* table,
                               int64_t table_stride, kvmem_stream stream) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (ws == nullptr) return Null("ws");
    const Layout layout = ws->ws->options().layout;
    if (absl::Status s = c_api::CheckPlanArrays(table, batch, table_stride, layout); !s.ok()) {
      return s;
    }
    if (absl::Status s = c_api::CheckArray(prefix_lens, batch, "prefix_lens"); !s.ok()) return s;
    if (absl::Status s = c_api::CheckArray(new_lens, batch, "new_lens"); !s.ok()) return s;
    const auto prefix = absl::MakeConstSpan(prefix_lens, static_cast<size_t>(batch));
    const auto fresh = absl::MakeConstSpan(new_lens, static_cast<size_t>(batch));
    if (layout == Layout::kPaged) {
      return ws->ws->PlanPaged(
          prefix, fresh, absl::MakeConstSpan(table, static_cast<size_t>(batch * table_stride)),
          table_stride, stream);
    }
    return ws->ws->PlanVirtual(prefix, fresh,
                               absl::MakeConstSpan(table, static_cast<size_t>(batch)), stream);
  });
}

kvmem_status kvmem_extend_attention(const kvmem_extend_workspace* ws, const kvmem_cache* cache,
                                    int32_t layer, const void* q, void* out, kvmem_stream stream) {
  return Guard([&]() -> absl::Status {
    using namespace kvmem;
    if (ws == nullptr) return Null("ws");
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (q == nullptr || out == nullptr) return Null(q == nullptr ? "q" : "out");
    const Layout layout = ws->ws->options().layout;
    if (absl::Status s = c_api::CheckLayer(*cache->cache, layout, layer); !s.ok()) return s;
    const BatchMetadata none;
    if (layout == Layout::kPaged) {
      absl::StatusOr<PagedKv> view = cache->cache->PagedView(layer, none);
      if (!view.ok()) return view.status();
      return ExtendAttention<PagedKv>(*ws->ws, ws->ws->Bind(*view), q, out, stream);
    }
    absl::StatusOr<VirtualKv> view = cache->cache->VirtualView(layer, none);
    if (!view.ok()) return view.status();
    return ExtendAttention<VirtualKv>(*ws->ws, ws->ws->Bind(*view), q, out, stream);
  });
}

}  // extern "C"

#else  // !KVMEM_WITH_CUDA

namespace {

absl::Status NoCuda() {
  return absl::UnimplementedError(
      "kvmem was built without CUDA: the kernels and the device running batch need a CUDA "
      "build (cmake -DKVMEM_CUDA=ON)");
}

}  // namespace

extern "C" {

kvmem_status kvmem_append_kv(kvmem_cache*, int32_t, int32_t, const void*, const void*, int64_t,
                             int64_t, const int64_t*, int64_t, kvmem_stream) {
  return Guard(NoCuda);
}
kvmem_status kvmem_device_running_batch_create(const kvmem_cache*,
                                               kvmem_device_running_batch** out) {
  return Guard(NoCuda);
}
void kvmem_device_running_batch_destroy(kvmem_device_running_batch*) {}
kvmem_status kvmem_device_running_batch_upload(kvmem_device_running_batch*, kvmem_cache*,
                                               kvmem_stream) {
  return Guard(NoCuda);
}
kvmem_status kvmem_device_running_batch_view(const kvmem_device_running_batch*,
                                             kvmem_running_batch*) {
  return Guard(NoCuda);
}
kvmem_status kvmem_decode_workspace_create(const kvmem_cache*, const kvmem_attention_options*,
                                           kvmem_decode_workspace**) {
  return Guard(NoCuda);
}
void kvmem_decode_workspace_destroy(kvmem_decode_workspace*) {}
kvmem_status kvmem_decode_plan(kvmem_decode_workspace*, const int32_t*, int32_t, const int32_t*,
                               int64_t, kvmem_stream) {
  return Guard(NoCuda);
}
kvmem_status kvmem_decode_plan_running_batch(kvmem_decode_workspace*, const kvmem_cache*,
                                             kvmem_stream) {
  return Guard(NoCuda);
}
kvmem_status kvmem_decode(const kvmem_decode_workspace*, const kvmem_cache*, int32_t,
                          const kvmem_device_running_batch*, const void*, void*, kvmem_stream) {
  return Guard(NoCuda);
}
kvmem_status kvmem_extend_workspace_create(const kvmem_cache*, const kvmem_attention_options*,
                                           kvmem_extend_workspace**) {
  return Guard(NoCuda);
}
void kvmem_extend_workspace_destroy(kvmem_extend_workspace*) {}
kvmem_status kvmem_extend_plan(kvmem_extend_workspace*, const int32_t*, const int32_t*, int32_t,
                               const int32_t*, int64_t, kvmem_stream) {
  return Guard(NoCuda);
}
kvmem_status kvmem_extend_attention(const kvmem_extend_workspace*, const kvmem_cache*, int32_t,
                                    const void*, void*, kvmem_stream) {
  return Guard(NoCuda);
}

}  // extern "C"

#endif  // KVMEM_WITH_CUDA

extern "C" kvmem_status kvmem_attention_options_init(kvmem_attention_options* options) {
  return Guard([&]() -> absl::Status {
    if (options == nullptr) return Null("options");
    std::memset(options, 0, sizeof(*options));
    options->struct_size = sizeof(*options);
    options->num_q_heads = 32;
    options->window_left = -1;
    return absl::OkStatus();
  });
}
