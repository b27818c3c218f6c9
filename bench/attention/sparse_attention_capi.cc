// A C interface to one layer of the GPU attention kernels, loaded by sparse_attention_bench.py
// (ctypes) so that ours and torch SDPA run on the same tensors in the same process. Tensors are
// device pointers to bf16 rows: q [n][heads][head_dim], k and v [n][kv_heads][head_dim], out
// like q. Functions return 0 on success, or -1 with the error text in `error`.

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/sparse_attention.h"
#include "kernels/sparse/pattern_config.h"
#include "kernels/sparse/sparse_index.h"

namespace {

using sparseaccel::HeadPattern;
using sparseaccel::SparseIndex;
namespace cuda = sparseaccel::cuda;

int Fail(const absl::Status& status, char* error, int error_len) {
  if (error != nullptr && error_len > 0) {
    std::strncpy(error, std::string(status.message()).c_str(), error_len - 1);
    error[error_len - 1] = 0;
  }
  return -1;
}

// Q, K, V and the output, bf16 rows of [heads][head_dim] and [kv_heads][head_dim].
cuda::AttentionOperands Operands(const void* q, const void* k, const void* v, void* out,
                                 int64_t heads, int64_t kv_heads, int64_t head_dim) {
  cuda::AttentionOperands x;
  x.q = static_cast<const uint16_t*>(q);
  x.q_stride = heads * head_dim;
  x.k = static_cast<const uint16_t*>(k);
  x.v = static_cast<const uint16_t*>(v);
  x.kv_stride = kv_heads * head_dim;
  x.out = static_cast<uint16_t*>(out);
  x.out_stride = heads * head_dim;
  x.num_heads = heads;
  x.num_kv_heads = kv_heads;
  x.head_dim = head_dim;
  return x;
}

}  // namespace

struct SaLayer {
  int64_t n = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<cuda::DeviceHeadPattern> host_patterns;
  cuda::DeviceBuffer patterns, workspace;
  cuda::DeviceSparseIndex index;
  std::vector<SparseIndex> host_index;  // Filled by sa_index_stats.
};

extern "C" {

// patterns: [heads][7] int64: kind (0 dense, 1 A-shape, 2 vertical-slash, 3 block-sparse),
// sink, window, vertical, slash, last_q, top_k. Returns null on error.
SaLayer* sa_create(int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim,
                   const int64_t* patterns, char* error, int error_len) {
  auto layer = std::make_unique<SaLayer>();
  layer->n = n;
  layer->heads = heads;
  layer->kv_heads = kv_heads;
  layer->head_dim = head_dim;
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t* p = patterns + h * 7;
    if (p[0] < 0 || p[0] > 3) {
      Fail(absl::InvalidArgumentError("pattern kind must be 0..3"), error, error_len);
      return nullptr;
    }
    HeadPattern pattern;
    pattern.kind = static_cast<HeadPattern::Kind>(p[0]);
    pattern.sink = p[1];
    pattern.window = p[2];
    pattern.vertical_slash = {p[3], p[4], p[5]};
    pattern.top_k = p[6];
    absl::StatusOr<cuda::DeviceHeadPattern> device = cuda::ToDevicePattern(pattern);
    if (!device.ok()) {
      Fail(device.status(), error, error_len);
      return nullptr;
    }
    layer->host_patterns.push_back(*device);
  }
  absl::StatusOr<cuda::DeviceBuffer> buffer = cuda::ToDevice(layer->host_patterns);
  if (!buffer.ok()) {
    Fail(buffer.status(), error, error_len);
    return nullptr;
  }
  layer->patterns = std::move(*buffer);
  cuda::SparseIndexArgs args;
  args.num_tokens = n;
  args.num_heads = heads;
  args.num_kv_heads = kv_heads;
  args.head_dim = head_dim;
  args.host_patterns = &layer->host_patterns;
  buffer = cuda::DeviceBuffer::Allocate(cuda::SparseIndexWorkspaceBytes(args));
  if (!buffer.ok()) {
    Fail(buffer.status(), error, error_len);
    return nullptr;
  }
  layer->workspace = std::move(*buffer);
  return layer.release();
}

void sa_destroy(SaLayer* layer) { delete layer; }

int64_t sa_workspace_bytes(const SaLayer* layer) { return layer->workspace.bytes(); }

// Builds the index from q and k on `stream`.
int sa_build_index(SaLayer* layer, const void* q, const void* k, void* stream, char* error,
                   int error_len) {
  cuda::SparseIndexArgs args;
  args.q = static_cast<const uint16_t*>(q);
  args.q_stride = layer->heads * layer->head_dim;
  args.k = static_cast<const uint16_t*>(k);
  args.k_stride = layer->kv_heads * layer->head_dim;
  args.num_tokens = layer->n;
  args.num_heads = layer->heads;
  args.num_kv_heads = layer->kv_heads;
  args.head_dim = layer->head_dim;
  args.patterns = layer->patterns.As<cuda::DeviceHeadPattern>();
  args.host_patterns = &layer->host_patterns;
  const absl::Status status = cuda::BuildSparseIndex(
      args, layer->workspace.As<void>(), layer->workspace.bytes(), &layer->index, stream);
  return status.ok() ? 0 : Fail(status, error, error_len);
}

// Attention over the last built index, all query blocks.
int sa_attend(SaLayer* layer, const void* q, const void* k, const void* v, void* out, void* stream,
              char* error, int error_len) {
  const cuda::SparseAttentionArgs args{
      Operands(q, k, v, out, layer->heads, layer->kv_heads, layer->head_dim), 0,
      layer->index.num_query_blocks, layer->index};
  const absl::Status status = cuda::SparseAttention(args, stream);
  return status.ok() ? 0 : Fail(status, error, error_len);
}

// Our dense causal kernel on the same layout.
int sa_dense(const void* q, const void* k, const void* v, void* out, int64_t n, int64_t heads,
             int64_t kv_heads, int64_t head_dim, void* stream, char* error, int error_len) {
  const cuda::PrefillAttentionArgs args{Operands(q, k, v, out, heads, kv_heads, head_dim), n, n};
  const absl::Status status = cuda::PrefillAttention(args, stream);
  return status.ok() ? 0 : Fail(status, error, error_len);
}

// Copies the last built index to the host (synchronising `stream`) and reports, per head,
// the kernel's tile cost relative to dense and, for heads below `density_heads`, the exact
// fraction of causal pairs selected (slower); -1 where not computed.
int sa_index_stats(SaLayer* layer, void* stream, int64_t density_heads, double* tile_cost,
                   double* density, char* error, int error_len) {
  absl::StatusOr<std::vector<SparseIndex>> host = cuda::CopyIndexToHost(layer->index, stream);
  if (!host.ok()) return Fail(host.status(), error, error_len);
  layer->host_index = std::move(*host);
  for (int64_t h = 0; h < layer->heads; ++h) {
    tile_cost[h] = sparseaccel::IndexTileCost(layer->host_index[h]);
    density[h] = h < density_heads ? sparseaccel::IndexDensity(layer->host_index[h]) : -1;
  }
  return 0;
}

// The selected keys of (head, query block) from the index copied by sa_index_stats, ascending;
// returns how many (at most `capacity` are written), or -1.
int64_t sa_block_keys(const SaLayer* layer, int64_t head, int64_t block, int32_t* keys,
                      int64_t capacity) {
  if (head < 0 || head >= static_cast<int64_t>(layer->host_index.size())) return -1;
  const SparseIndex& index = layer->host_index[head];
  if (block < 0 || block >= index.num_query_blocks) return -1;
  const std::vector<int64_t> selected = index.KeysOfBlock(block);
  for (int64_t i = 0; i < capacity && i < static_cast<int64_t>(selected.size()); ++i) {
    keys[i] = static_cast<int32_t>(selected[i]);
  }
  return static_cast<int64_t>(selected.size());
}

}  // extern "C"
