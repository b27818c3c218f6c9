#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/sparse_attention.h"
#include "kernels/rope.h"
#include "model/checkpoint/config.h"
#include "model/checkpoint/safetensors.h"
#include "model/cuda/gemm.cuh"
#include "model/cuda/graph_cache.cuh"
#include "model/cuda/kv_copy.cuh"
#include "model/cuda/kv_transfer.cuh"
#include "model/cuda/llama_cuda.h"
#include "model/cuda/shard_group.cuh"
#include "model/llama_shapes.h"

namespace sparseaccel {
namespace {

// Rows of logits computed per LM-head GEMM when every position needs them.
constexpr int64_t kLogitsRowsPerGemm = 256;

// Captured decode steps kept: batch sizes x extents in use at once, with room to spare (one
// graph of an 8B model's step is a few hundred kernel nodes).
constexpr size_t kDecodeGraphs = 128;

// Decode attention's K/V extent for a step whose longest sequence has `length` positions:
// `length` rounded up to one of 8 values per octave (at least 256) and to whole blocks, so
// one captured graph serves many consecutive steps; the attention kernel reads each
// sequence's own length from the device and skips the rest of the extent.
int64_t DecodeExtent(int64_t length, int64_t block_tokens) {
  int64_t extent = 256;
  if (length > extent) {
    const int64_t octave = int64_t{1} << (63 - __builtin_clzll(static_cast<uint64_t>(length - 1)));
    const int64_t step = octave / 8;
    extent = (length + step - 1) / step * step;
  }
  return (extent + block_tokens - 1) / block_tokens * block_tokens;
}

// Rows [row0, row0 + rows) and columns [col0, col0 + cols) of a [shape[0]][shape[1]] tensor
// (a vector is one row); rows or cols < 0: all of them.
struct TensorSlice {
  int64_t row0 = 0, rows = -1;
  int64_t col0 = 0, cols = -1;
};

// Copies `slice` of tensor `name` (checked against `shape`) to `dst` as bf16 bits, rows packed.
absl::Status UploadTensor(const TensorStore& store, const std::string& name,
                          std::vector<int64_t> shape, uint16_t* dst, TensorSlice slice = {}) {
  ASSIGN_OR_RETURN(const TensorView* view, store.FindWithShape(name, shape));
  const int64_t full_rows = shape.size() == 2 ? shape[0] : 1;
  const int64_t full_cols = shape.back();
  if (slice.rows < 0) slice.rows = full_rows - slice.row0;
  if (slice.cols < 0) slice.cols = full_cols - slice.col0;
  std::vector<uint16_t> bits;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(view->data);
  if (view->dtype != DType::kBF16) {
    std::vector<float> f32(view->NumElements());
    RETURN_IF_ERROR(ConvertToF32(*view, absl::MakeSpan(f32)));
    bits.resize(f32.size());
    for (size_t i = 0; i < f32.size(); ++i) bits[i] = FloatToBf16(f32[i]);
    src = bits.data();
  }
  const size_t element = sizeof(uint16_t);
  CUDA_RETURN_IF_ERROR(cudaMemcpy2D(dst, slice.cols * element,
                                    src + slice.row0 * full_cols + slice.col0, full_cols * element,
                                    slice.cols * element, slice.rows, cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

struct LayerWeights {
  cuda::DeviceBuffer input_norm, post_norm;
  cuda::DeviceBuffer qkv;      // [q_rows + 2 * kv_rows][hidden]: q, k, v projections stacked.
  cuda::DeviceBuffer o;        // [hidden][q_rows]
  cuda::DeviceBuffer gate_up;  // [2 * intermediate][hidden]: gate then up.
  cuda::DeviceBuffer down;     // [hidden][intermediate]
};

// Total minus free memory of `device` (0 when it cannot be read); keeps the current device.
int64_t DeviceUsed(int device) {
  int current = 0;
  if (cudaGetDevice(&current) != cudaSuccess) return 0;
  if (current != device && cudaSetDevice(device) != cudaSuccess) return 0;
  size_t free_bytes = 0, total_bytes = 0;
  const bool read = cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess;
  if (current != device) cudaSetDevice(current);
  return read ? static_cast<int64_t>(total_bytes - free_bytes) : 0;
}

struct DeviceSequence {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

}  // namespace

struct LlamaCuda::State {
  // Ranks 1.. of a tensor-parallel engine (on rank 0 only) and the group that runs them (on
  // every rank); both empty on one GPU (options.gpus 0). Declared first: destroyed after this
  // rank's buffers.
  std::vector<std::unique_ptr<State>> peers;
  std::shared_ptr<ShardGroup> group;

  ModelConfig config;
  LlamaCudaOptions options;
  TensorParallelShard shard;  // This GPU's heads, KV heads and MLP rows (one GPU: all).
  int device = 0;
  int64_t q_width = 0;    // shard.heads * head_dim
  int64_t kv_width = 0;   // shard.kv_heads * head_dim
  int64_t qkv_width = 0;  // q_width + 2 * kv_width
  int64_t kv_row = 0;     // Every KV head: the row width of host stores and exporters.
  int64_t kv_offset = 0;  // The first of this shard's columns in those rows.

  mutable absl::Mutex mu;
  cudaStream_t stream = nullptr;
  std::unique_ptr<LtGemm> gemm;
  int64_t weight_bytes = 0;
  std::atomic<int64_t> peak_device_used{0};  // Read without `mu` (metrics scrapes).

  cuda::DeviceBuffer embed, lm_head, final_norm, inv_freq;
  std::vector<LayerWeights> layers;

  // Scratch, grown on demand and kept.
  cuda::DeviceBuffer ids;               // int32 [rows]
  cuda::DeviceBuffer positions;         // int32 [rows]
  cuda::DeviceBuffer residual;          // uint16_t [rows][hidden]
  cuda::DeviceBuffer normed;            // uint16_t [chunk][hidden]
  cuda::DeviceBuffer qkv;               // uint16_t [chunk][qkv_width]
  cuda::DeviceBuffer attn;              // uint16_t [chunk][q_width]
  cuda::DeviceBuffer gate_up;           // uint16_t [chunk][2 * intermediate]
  cuda::DeviceBuffer act;               // uint16_t [chunk][intermediate]
  cuda::DeviceBuffer k_layer, v_layer;  // uint16_t [tokens][kv_width]: one layer's K/V.
  // PrefillExport alternates k_layer/v_layer with these, so a layer computes while the previous
  // one is copied to the host; each pair's event marks the end of the copies out of it.
  cuda::DeviceBuffer k_spare, v_spare;
  cudaEvent_t layer_copied = nullptr, spare_copied = nullptr;
  cudaEvent_t layer_computed = nullptr;
  cudaStream_t copy_stream = nullptr;  // Device -> host K/V copies of PrefillExport.
  // Imported sequences (ImportSequence until FinishImport): their blocks, read by WriteKv
  // without `mu`, so received K/V upload while decode steps run.
  KvUploader uploader;
  absl::Mutex import_mu;
  struct Import {
    std::vector<int32_t> blocks;
    int64_t length = 0;
  };
  std::map<int64_t, Import> import_blocks ABSL_GUARDED_BY(import_mu);
  cuda::DeviceBuffer kv_f32;  // fp32 staging for host KvStores.
  cuda::DeviceBuffer logits;  // fp32 [rows][vocab]
  cuda::DeviceBuffer slots;   // int32 pool rows of a prefill.
  cuda::DeviceBuffer
      decode_meta;  // int32 per DecodeStep: tokens, positions, slots, lengths, tables.
  std::vector<int32_t> decode_host_meta;
  cuda::DeviceBuffer decode_workspace;
  // Captured decode steps by (batch, extent), and the buffer addresses they were captured with.
  GraphCache decode_graphs{kDecodeGraphs};
  std::vector<const void*> graph_buffers;
  cuda::DeviceBuffer sample_workspace;
  cuda::DeviceBuffer sampled;  // int32 [batch]

  // Sparse prefill: every layer's head patterns ([layer][head], on the device and the host)
  // and the index of the layer being prefilled.
  cuda::DeviceBuffer device_patterns;
  std::vector<std::vector<cuda::DeviceHeadPattern>> host_patterns;
  int64_t patterns_tokens = 0;  // The prompt length the uploaded patterns are for.
  cuda::DeviceBuffer index_workspace;
  SparsePrefillStats sparse_stats;

  // Paged pool: [layer][block * block_tokens + i][kv_width] for K and for V.
  cuda::DeviceBuffer k_pool, v_pool;
  int64_t pool_blocks = 0;
  std::vector<int32_t> free_blocks;
  std::map<int64_t, DeviceSequence> sequences;
  int64_t next_sequence_id = 1;

  ~State() {
    cudaSetDevice(device);
    for (cudaEvent_t event : {layer_copied, spare_copied, layer_computed}) {
      if (event) cudaEventDestroy(event);
    }
    if (copy_stream) cudaStreamDestroy(copy_stream);
    if (stream) cudaStreamDestroy(stream);
  }

  size_t Bf16Bytes(int64_t n) const { return static_cast<size_t>(n) * sizeof(uint16_t); }
  uint16_t* PoolK(int64_t layer) const {
    return k_pool.As<uint16_t>() + layer * pool_blocks * options.kv_block_tokens * kv_width;
  }
  uint16_t* PoolV(int64_t layer) const {
    return v_pool.As<uint16_t>() + layer * pool_blocks * options.kv_block_tokens * kv_width;
  }

  void SampleDeviceMemory() {
    const int64_t used = DeviceUsed(device);
    int64_t peak = peak_device_used.load();
    while (used > peak && !peak_device_used.compare_exchange_weak(peak, used)) {
    }
  }

  // Which kernels run a linear layer: cuBLASLt, or SmallBatchLinear (with SwiGLU and the
  // residual add fused) in decode steps of few sequences. Prefill stays on cuBLASLt, so
  // Prefill()'s last row and Forward()'s agree bit for bit.
  enum class LinearPath { kCublasLt, kSmallBatch };
  LinearPath DecodePath(int64_t batch) const {
    return batch <= options.small_batch_linear_rows ? LinearPath::kSmallBatch
                                                    : LinearPath::kCublasLt;
  }

  absl::Status Norm(uint16_t* x, int64_t rows, const cuda::DeviceBuffer& weight, uint16_t* out) {
    return cuda::AddRmsNorm(x, nullptr, weight.As<uint16_t>(), rows, config.hidden_size,
                            static_cast<float>(config.rms_norm_eps), out, stream);
  }

  // out = x w^T for `m` rows with `epilogue` (cuda::LinearEpilogue), on `path`; SwiGLU on the
  // cuBLASLt path goes through the gate_up scratch.
  absl::Status Project(const uint16_t* x, const cuda::DeviceBuffer& w, void* out, int64_t m,
                       int64_t n, int64_t k, cuda::LinearEpilogue epilogue, LinearPath path) {
    using cuda::LinearEpilogue;
    cuda::SmallBatchLinearArgs small{x, w.As<uint16_t>(), out, m, n, k, epilogue};
    if (path == LinearPath::kSmallBatch && cuda::SmallBatchLinearFits(small)) {
      return cuda::SmallBatchLinear(small, stream);
    }
    const bool accumulate = epilogue == LinearEpilogue::kAccumulateBf16;
    const cudaDataType_t type = epilogue == LinearEpilogue::kStoreF32 ? CUDA_R_32F : CUDA_R_16BF;
    if (epilogue != LinearEpilogue::kSwiGluBf16) {
      return gemm->Linear(x, w.As<uint16_t>(), out, type, m, n, k, accumulate, stream);
    }
    uint16_t* gate = gate_up.As<uint16_t>();
    RETURN_IF_ERROR(gemm->Linear(x, w.As<uint16_t>(), gate, type, m, n, k, false, stream));
    return cuda::SwiGlu(gate, gate + n / 2, m, n / 2, n, static_cast<uint16_t*>(out), stream);
  }

  // Chunk-sized scratch for `rows` rows.
  absl::Status ReserveChunk(int64_t rows) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(normed.Reserve(Bf16Bytes(rows * c.hidden_size)));
    RETURN_IF_ERROR(qkv.Reserve(Bf16Bytes(rows * qkv_width)));
    RETURN_IF_ERROR(attn.Reserve(Bf16Bytes(rows * q_width)));
    RETURN_IF_ERROR(gate_up.Reserve(Bf16Bytes(rows * 2 * shard.intermediate)));
    return act.Reserve(Bf16Bytes(rows * shard.intermediate));
  }

  // Final norm and LM head for rows [first_row, first_row + rows) of the residual stream
  // (rows <= kLogitsRowsPerGemm) into the device `logits` buffer, fp32: [rows][shard.vocab],
  // this shard's vocabulary columns.
  absl::Status DeviceLogits(int64_t first_row, int64_t rows,
                            LinearPath path = LinearPath::kCublasLt) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(logits.Reserve(static_cast<size_t>(rows * shard.vocab) * sizeof(float)));
    RETURN_IF_ERROR(normed.Reserve(Bf16Bytes(rows * c.hidden_size)));
    RETURN_IF_ERROR(Norm(residual.As<uint16_t>() + first_row * c.hidden_size, rows, final_norm,
                         normed.As<uint16_t>()));
    const cuda::DeviceBuffer& head = c.tie_word_embeddings ? embed : lm_head;
    return Project(normed.As<uint16_t>(), head, logits.As<float>(), rows, shard.vocab,
                   c.hidden_size, cuda::LinearEpilogue::kStoreF32, path);
  }

  // Logits of `rows` rows from `first_row`, appended to `out`. With a group every rank calls
  // it: rank 0 grows `out`, each rank copies its vocabulary columns in, and the next chunk
  // waits until all have.
  absl::Status Logits(int64_t first_row, int64_t rows, std::vector<float>* out) {
    const int64_t vocab = config.vocab_size;
    const size_t width = static_cast<size_t>(shard.vocab) * sizeof(float);
    for (int64_t r0 = 0; r0 < rows; r0 += kLogitsRowsPerGemm) {
      const int64_t m = std::min(kLogitsRowsPerGemm, rows - r0);
      absl::Status computed = DeviceLogits(first_row + r0, m);
      if (shard.rank == 0) out->resize(out->size() + m * vocab);
      RETURN_IF_ERROR(Barrier(std::move(computed)));
      float* rows_out = out->data() + out->size() - m * vocab + shard.first_vocab;
      absl::Status copied =
          cuda::CudaStatus(cudaMemcpy2DAsync(rows_out, vocab * sizeof(float), logits.As<float>(),
                                             width, width, m, cudaMemcpyDeviceToHost, stream),
                           "logits to the host");
      if (copied.ok()) copied = cuda::CudaStatus(cudaStreamSynchronize(stream), "logits");
      RETURN_IF_ERROR(Barrier(std::move(copied)));
    }
    return absl::OkStatus();
  }

  // The first half of a decoder layer on `m` rows of the residual stream `x`: the fused QKV
  // projection of the normed rows into `qkv_rows` ([m][qkv_width]), before RoPE.
  absl::Status NormAndProjectQkv(const LayerWeights& w, uint16_t* x, int64_t m, uint16_t* qkv_rows,
                                 LinearPath path = LinearPath::kCublasLt) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(Norm(x, m, w.input_norm, normed.As<uint16_t>()));
    return Project(normed.As<uint16_t>(), w.qkv, qkv_rows, m, qkv_width, c.hidden_size,
                   cuda::LinearEpilogue::kStoreBf16, path);
  }

  // NormAndProjectQkv, then RoPE on Q and K of the rows at device `row_positions`.
  absl::Status ProjectQkv(const LayerWeights& w, uint16_t* x, int64_t m,
                          const int32_t* row_positions, uint16_t* qkv_rows) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(NormAndProjectQkv(w, x, m, qkv_rows));
    return cuda::ApplyRope(qkv_rows, qkv_width, shard.heads, qkv_rows + q_width, qkv_width,
                           shard.kv_heads, m, c.head_dim, row_positions, inv_freq.As<float>(),
                           stream);
  }

  // Copies the K and V of `m` rows of `qkv_rows` to rows [first, first + m) of k_layer/v_layer.
  absl::Status StoreKv(const uint16_t* qkv_rows, int64_t first, int64_t m) {
    RETURN_IF_ERROR(CopyRows(qkv_rows + q_width, qkv_width, nullptr,
                             k_layer.As<uint16_t>() + first * kv_width, kv_width, nullptr, m,
                             kv_width, stream));
    return CopyRows(qkv_rows + q_width + kv_width, qkv_width, nullptr,
                    v_layer.As<uint16_t>() + first * kv_width, kv_width, nullptr, m, kv_width,
                    stream);
  }

  // The second half: the output projection of `attn` added to `x`, then the MLP block, `x`
  // updated in place. With a group, each shard's partial projection is summed over the GPUs
  // in `x` itself: rank 0 adds its partial to the residual, the others store theirs, and the
  // all-reduce leaves x + every partial on each GPU (on one rank, what one GPU computes).
  absl::Status OutputAndMlp(const LayerWeights& w, uint16_t* x, int64_t m,
                            LinearPath path = LinearPath::kCublasLt) {
    using cuda::LinearEpilogue;
    const ModelConfig& c = config;
    const LinearEpilogue partial =
        shard.rank == 0 ? LinearEpilogue::kAccumulateBf16 : LinearEpilogue::kStoreBf16;
    RETURN_IF_ERROR(Project(attn.As<uint16_t>(), w.o, x, m, c.hidden_size, q_width, partial, path));
    RETURN_IF_ERROR(SumOverShards(x, m * c.hidden_size));
    RETURN_IF_ERROR(Norm(x, m, w.post_norm, normed.As<uint16_t>()));
    RETURN_IF_ERROR(Project(normed.As<uint16_t>(), w.gate_up, act.As<uint16_t>(), m,
                            2 * shard.intermediate, c.hidden_size, LinearEpilogue::kSwiGluBf16,
                            path));
    RETURN_IF_ERROR(Project(act.As<uint16_t>(), w.down, x, m, c.hidden_size, shard.intermediate,
                            partial, path));
    return SumOverShards(x, m * c.hidden_size);
  }

  // The all-reduce of OutputAndMlp (nothing on one GPU).
  absl::Status SumOverShards(uint16_t* x, int64_t count) {
    return group == nullptr ? absl::OkStatus() : group->AllReduceBf16(shard.rank, x, count, stream);
  }

  // What every rank of a tensor-parallel call passes at the same points (ShardGroup::Barrier):
  // `status` itself on one GPU.
  absl::Status Barrier(absl::Status status) {
    return group == nullptr ? status : group->Barrier(std::move(status));
  }

  // The layer's attention operands: Q in the fused QKV rows `qkv_rows`, K/V in
  // k_layer/v_layer, output in `attn`.
  cuda::AttentionOperands LayerOperands(const uint16_t* qkv_rows) const {
    cuda::AttentionOperands x;
    x.q = qkv_rows;
    x.q_stride = qkv_width;
    x.k = k_layer.As<uint16_t>();
    x.v = v_layer.As<uint16_t>();
    x.kv_stride = kv_width;
    x.out = attn.As<uint16_t>();
    x.out_stride = q_width;
    x.num_heads = shard.heads;
    x.num_kv_heads = shard.kv_heads;
    x.head_dim = config.head_dim;
    return x;
  }

  // Dense causal attention of `m` queries (rows of `qkv_rows`) at positions [n_kv - m, n_kv)
  // over k_layer/v_layer rows [0, n_kv), into `attn`.
  absl::Status DenseAttention(const uint16_t* qkv_rows, int64_t m, int64_t n_kv) {
    return cuda::PrefillAttention(cuda::PrefillAttentionArgs{LayerOperands(qkv_rows), m, n_kv},
                                  stream);
  }

  // Checks `sparse` against the model and uploads the patterns of this shard's heads for
  // prompts of `num_tokens` (PatternAtLength), ordered on `stream`.
  absl::Status UploadSparsePatterns(const SparseConfig& sparse, int64_t num_tokens) {
    const ModelConfig& c = config;
    if (sparse.num_layers != c.num_hidden_layers || sparse.num_heads != c.num_attention_heads) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparse config is for ", sparse.num_layers, " layers x ", sparse.num_heads,
          " heads; the model has ", c.num_hidden_layers, " x ", c.num_attention_heads));
    }
    bool shaped = static_cast<int64_t>(sparse.heads.size()) == c.num_hidden_layers;
    for (const std::vector<HeadPattern>& layer : sparse.heads) {
      shaped = shaped && static_cast<int64_t>(layer.size()) == c.num_attention_heads;
    }
    if (!shaped) return absl::InvalidArgumentError("sparse config: heads is not [layers][heads]");
    std::vector<cuda::DeviceHeadPattern> all;
    host_patterns.assign(c.num_hidden_layers, {});
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      for (int64_t h = shard.first_head(); h < shard.first_head() + shard.heads; ++h) {
        absl::StatusOr<cuda::DeviceHeadPattern> pattern = cuda::ToDevicePattern(
            PatternAtLength(sparse.heads[l][h], num_tokens, sparse.budget_tokens));
        if (!pattern.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("sparse config layer ", l, ": ", pattern.status().message()));
        }
        host_patterns[l].push_back(*pattern);
        all.push_back(*pattern);
      }
    }
    RETURN_IF_ERROR(device_patterns.Reserve(all.size() * sizeof(cuda::DeviceHeadPattern)));
    // From pageable memory: staged before the call returns, so `all` may go.
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_patterns.As<void>(), all.data(),
                                         all.size() * sizeof(cuda::DeviceHeadPattern),
                                         cudaMemcpyHostToDevice, stream));
    patterns_tokens = num_tokens;
    return absl::OkStatus();
  }

  // Whether a prompt of `n` tokens from position `start` takes the sparse path.
  bool UseSparse(int64_t start, int64_t n) const {
    return options.sparse.has_value() && start == 0 && n >= options.sparse->dense_below_tokens;
  }

  // One layer of a prefill of the whole prompt (`n` tokens from position 0, residual rows in
  // `residual`) in two passes over query chunks of `chunk` rows (a multiple of kBlockSize):
  // Q/K/V of every chunk, then attention, output projection and MLP chunk by chunk. Attention
  // is sparse over an index built from the whole prompt or, with an `observer` (calibration),
  // dense after the observer has seen the layer's Q/K/V.
  absl::Status TwoPassLayer(int64_t l, int64_t n, int64_t chunk,
                            const LlamaCuda::LayerQkvObserver* observer) {
    const ModelConfig& c = config;
    uint16_t* qkv_all = qkv.As<uint16_t>();
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t m = std::min(chunk, n - c0);
      RETURN_IF_ERROR(ProjectQkv(layers[l], residual.As<uint16_t>() + c0 * c.hidden_size, m,
                                 positions.As<int32_t>() + c0, qkv_all + c0 * qkv_width));
      RETURN_IF_ERROR(StoreKv(qkv_all + c0 * qkv_width, c0, m));
    }
    if (observer != nullptr) {
      RETURN_IF_ERROR(
          (*observer)(LlamaCuda::DeviceLayerQkv{l, n, qkv_all, qkv_width, k_layer.As<uint16_t>(),
                                                v_layer.As<uint16_t>(), kv_width, stream}));
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t m = std::min(chunk, n - c0);
        RETURN_IF_ERROR(DenseAttention(qkv_all + c0 * qkv_width, m, c0 + m));
        RETURN_IF_ERROR(OutputAndMlp(layers[l], residual.As<uint16_t>() + c0 * c.hidden_size, m));
      }
      return absl::OkStatus();
    }
    cuda::SparseIndexArgs index_args;
    index_args.q = qkv_all;
    index_args.q_stride = qkv_width;
    index_args.k = k_layer.As<uint16_t>();
    index_args.k_stride = kv_width;
    index_args.num_tokens = n;
    index_args.num_heads = shard.heads;
    index_args.num_kv_heads = shard.kv_heads;
    index_args.head_dim = c.head_dim;
    index_args.patterns = device_patterns.As<cuda::DeviceHeadPattern>() + l * shard.heads;
    index_args.host_patterns = &host_patterns[l];
    const size_t workspace_bytes = cuda::SparseIndexWorkspaceBytes(index_args);
    RETURN_IF_ERROR(index_workspace.Reserve(workspace_bytes));
    cuda::DeviceSparseIndex index;
    RETURN_IF_ERROR(cuda::BuildSparseIndex(index_args, index_workspace.As<void>(), workspace_bytes,
                                           &index, stream));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t m = std::min(chunk, n - c0);
      const cuda::SparseAttentionArgs a{LayerOperands(qkv_all), c0 / kBlockSize,
                                        (m + kBlockSize - 1) / kBlockSize, index};
      RETURN_IF_ERROR(cuda::SparseAttention(a, stream));
      RETURN_IF_ERROR(OutputAndMlp(layers[l], residual.As<uint16_t>() + c0 * c.hidden_size, m));
    }
    return absl::OkStatus();
  }

  // All layers for tokens at positions [start, start + n) of one sequence. Each layer's K/V
  // lives in k_layer/v_layer rows [0, start + n): `before_layer` fills rows [0, start),
  // `after_layer` takes the new rows. Leaves the final residual stream in `residual`. With an
  // `observer` (start 0 only), runs dense in two passes and shows it each layer's Q/K/V.
  absl::Status RunSequence(absl::Span<const int32_t> tokens, int64_t start,
                           const std::function<absl::Status(int64_t)>& before_layer,
                           const std::function<absl::Status(int64_t)>& after_layer,
                           const LlamaCuda::LayerQkvObserver* observer = nullptr) {
    const ModelConfig& c = config;
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t total = start + n;
    const bool sparse = observer == nullptr && UseSparse(start, n);
    const bool two_pass = sparse || observer != nullptr;
    // Sparse chunks start on boundaries of the pairs of query blocks the attention kernel
    // takes together (any query block would do; a split pair runs as two halves).
    constexpr int64_t kSparseChunkQuantum = 2 * kBlockSize;
    const int64_t chunk =
        two_pass
            ? std::max<int64_t>(kSparseChunkQuantum, std::min(n, options.prefill_chunk_tokens) /
                                                         kSparseChunkQuantum * kSparseChunkQuantum)
            : std::min(n, options.prefill_chunk_tokens);
    RETURN_IF_ERROR(ids.Reserve(n * sizeof(int32_t)));
    RETURN_IF_ERROR(positions.Reserve(n * sizeof(int32_t)));
    RETURN_IF_ERROR(residual.Reserve(Bf16Bytes(n * c.hidden_size)));
    RETURN_IF_ERROR(k_layer.Reserve(Bf16Bytes(total * kv_width)));
    RETURN_IF_ERROR(v_layer.Reserve(Bf16Bytes(total * kv_width)));
    RETURN_IF_ERROR(ReserveChunk(chunk));
    // Two passes keep the whole prompt's Q/K/V rows of a layer.
    if (two_pass) RETURN_IF_ERROR(qkv.Reserve(Bf16Bytes(n * qkv_width)));
    if (sparse && options.sparse->budget_tokens > 0 && patterns_tokens != n) {
      RETURN_IF_ERROR(UploadSparsePatterns(*options.sparse, n));
    }
    // Ids relative to this shard's vocabulary rows: the others gather zero rows, and the sum
    // over the shards is each token's embedding.
    std::vector<int32_t> host_ids(n), host_positions(n);
    for (int64_t i = 0; i < n; ++i) {
      host_ids[i] = static_cast<int32_t>(tokens[i] - shard.first_vocab);
      host_positions[i] = static_cast<int32_t>(start + i);
    }
    // From pageable memory: staged before the calls return.
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids.As<int32_t>(), host_ids.data(), n * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, stream));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(positions.As<int32_t>(), host_positions.data(),
                                         n * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    RETURN_IF_ERROR(cuda::EmbeddingGather(ids.As<int32_t>(), n, embed.As<uint16_t>(), shard.vocab,
                                          c.hidden_size, residual.As<uint16_t>(), stream));
    RETURN_IF_ERROR(SumOverShards(residual.As<uint16_t>(), n * c.hidden_size));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      RETURN_IF_ERROR(before_layer(l));
      if (two_pass) {
        RETURN_IF_ERROR(TwoPassLayer(l, n, chunk, observer));
      } else {
        for (int64_t c0 = 0; c0 < n; c0 += chunk) {
          // The chunk's K/V go to rows [start + c0, start + c0 + m) of the layer buffer; its
          // queries attend to every row up to their own.
          const int64_t m = std::min(chunk, n - c0);
          uint16_t* x = residual.As<uint16_t>() + c0 * c.hidden_size;
          RETURN_IF_ERROR(
              ProjectQkv(layers[l], x, m, positions.As<int32_t>() + c0, qkv.As<uint16_t>()));
          RETURN_IF_ERROR(StoreKv(qkv.As<uint16_t>(), start + c0, m));
          RETURN_IF_ERROR(DenseAttention(qkv.As<uint16_t>(), m, start + c0 + m));
          RETURN_IF_ERROR(OutputAndMlp(layers[l], x, m));
        }
      }
      RETURN_IF_ERROR(after_layer(l));
      SampleDeviceMemory();
    }
    if (start == 0 && observer == nullptr) {
      ++(sparse ? sparse_stats.sparse_prefills : sparse_stats.dense_prefills);
    }
    return absl::OkStatus();
  }

  // This state and its peers, by rank.
  std::vector<State*> Shards() {
    std::vector<State*> all = {this};
    for (const std::unique_ptr<State>& peer : peers) all.push_back(peer.get());
    return all;
  }

  // Runs `fn` on every shard at once (ShardGroup::Run), or on this one GPU.
  absl::Status OnEveryShard(const std::function<absl::Status(State&)>& fn) {
    if (group == nullptr) return fn(*this);
    return group->Run([&](int rank) { return fn(rank == 0 ? *this : *peers[rank - 1]); });
  }

  // The current one-layer K/V buffers of every shard, as PrefillExport copies them out.
  std::vector<DeviceKvColumns> ExportColumns() {
    std::vector<DeviceKvColumns> parts;
    for (State* t : Shards()) {
      parts.push_back(DeviceKvColumns{
          t->device, t->k_layer.As<uint16_t>(), t->v_layer.As<uint16_t>(), t->kv_width,
          t->kv_offset, t->stream, t->copy_stream, t->layer_computed, t->layer_copied});
    }
    return parts;
  }

  // `store`'s view of `layer` for positions [0, length), checked against the model's rows.
  absl::Status StoreLayer(KvStore& store, int64_t layer, int64_t length, KvLayerView* view) const {
    ASSIGN_OR_RETURN(*view, store.Layer(layer, length));
    if (view->row_size != kv_row) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV store row size ", view->row_size, ", model needs ", kv_row));
    }
    return absl::OkStatus();
  }

  absl::Status CheckTokens(absl::Span<const int32_t> tokens, int64_t start) const {
    RETURN_IF_ERROR(CheckTokenIds(tokens, config.vocab_size));
    if (start < 0 || start + static_cast<int64_t>(tokens.size()) > config.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("positions [", start, ", ", start + tokens.size(),
                       ") beyond max_position_embeddings ", config.max_position_embeddings));
    }
    return absl::OkStatus();
  }

  // Copies this shard's columns of K or V rows [first, first + count) between a host
  // KvLayerView (rows of kv_row) and the device buffer `layer_buffer` (rows of kv_width,
  // contiguous), through fp32 staging.
  absl::Status HostRowsToDevice(const std::vector<float*>& blocks, int64_t block_tokens,
                                int64_t first, int64_t count, uint16_t* layer_buffer) {
    if (count == 0) return absl::OkStatus();
    RETURN_IF_ERROR(kv_f32.Reserve(static_cast<size_t>(count * kv_width) * sizeof(float)));
    for (int64_t p = first; p < first + count;) {
      const int64_t in_block = std::min(block_tokens - p % block_tokens, first + count - p);
      const float* src = blocks[p / block_tokens] + (p % block_tokens) * kv_row + kv_offset;
      CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(kv_f32.As<float>() + (p - first) * kv_width,
                                             kv_width * sizeof(float), src, kv_row * sizeof(float),
                                             kv_width * sizeof(float), in_block,
                                             cudaMemcpyHostToDevice, stream));
      p += in_block;
    }
    return cuda::F32ToBf16(kv_f32.As<float>(), count * kv_width, layer_buffer + first * kv_width,
                           stream);
  }

  absl::Status DeviceRowsToHost(const uint16_t* layer_buffer, int64_t first, int64_t count,
                                const std::vector<float*>& blocks, int64_t block_tokens) {
    if (count == 0) return absl::OkStatus();
    RETURN_IF_ERROR(kv_f32.Reserve(static_cast<size_t>(count * kv_width) * sizeof(float)));
    RETURN_IF_ERROR(cuda::Bf16ToF32(layer_buffer + first * kv_width, count * kv_width,
                                    kv_f32.As<float>(), stream));
    for (int64_t p = first; p < first + count;) {
      const int64_t in_block = std::min(block_tokens - p % block_tokens, first + count - p);
      float* dst = blocks[p / block_tokens] + (p % block_tokens) * kv_row + kv_offset;
      CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(dst, kv_row * sizeof(float),
                                             kv_f32.As<float>() + (p - first) * kv_width,
                                             kv_width * sizeof(float), kv_width * sizeof(float),
                                             in_block, cudaMemcpyDeviceToHost, stream));
      p += in_block;
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }

  static absl::StatusOr<std::unique_ptr<State>> Create(const TensorStore& store,
                                                       const ModelConfig& c,
                                                       const LlamaCudaOptions& options,
                                                       const TensorParallelShard& shard,
                                                       int device);
  absl::Status ReservePool();
  absl::Status RunDecode(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens);
  absl::StatusOr<int64_t> CheckDecode(absl::Span<const int64_t> ids,
                                      absl::Span<const int32_t> tokens) const;
  cuda::PagedDecodeArgs DecodeAttentionShape(int64_t batch, int64_t extent) const;
  absl::Status ReserveDecode();
  absl::Status UploadDecodeMeta(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens,
                                int64_t table_stride);
  absl::Status EnqueueDecode(int64_t batch, int64_t extent);

  absl::StatusOr<int64_t> NewSequence(int64_t length) {
    const int64_t needed = (length + options.kv_block_tokens - 1) / options.kv_block_tokens;
    if (needed > static_cast<int64_t>(free_blocks.size())) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "device KV pool: ", needed, " blocks needed, ", free_blocks.size(), " free"));
    }
    DeviceSequence seq;
    seq.length = length;
    seq.blocks.assign(free_blocks.end() - needed, free_blocks.end());
    free_blocks.resize(free_blocks.size() - needed);
    const int64_t id = next_sequence_id++;
    sequences.emplace(id, std::move(seq));
    return id;
  }

  // Pool rows of positions [0, length) of `seq`, uploaded to `slots`.
  absl::Status UploadSlots(const DeviceSequence& seq, int64_t length, cuda::DeviceBuffer* out) {
    std::vector<int32_t> rows(length);
    for (int64_t p = 0; p < length; ++p) {
      rows[p] =
          static_cast<int32_t>(seq.blocks[p / options.kv_block_tokens] * options.kv_block_tokens +
                               p % options.kv_block_tokens);
    }
    RETURN_IF_ERROR(out->Reserve(length * sizeof(int32_t)));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->As<int32_t>(), rows.data(), length * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, stream));
    return absl::OkStatus();
  }
};

LlamaCuda::LlamaCuda(std::unique_ptr<State> state) : state_(std::move(state)) {}
LlamaCuda::~LlamaCuda() = default;

namespace {

// Layer `i`'s projections of `shard` (model/llama_shapes.h) from `store`; adds their bytes to
// `bytes`.
absl::Status UploadLayer(const TensorStore& store, const ModelConfig& c,
                         const TensorParallelShard& shard, int64_t i, LayerWeights* w,
                         int64_t* bytes) {
  const std::string p = absl::StrCat("model.layers.", i, ".");
  const int64_t h = c.hidden_size, d = c.head_dim, inter = c.intermediate_size;
  const int64_t q_rows = shard.heads * d, kv_rows = shard.kv_heads * d;
  const int64_t q_full = c.num_attention_heads * d, kv_full = c.num_key_value_heads * d;
  const TensorSlice q_slice{shard.first_head() * d, q_rows, 0, -1};
  const TensorSlice kv_slice{shard.first_kv_head() * d, kv_rows, 0, -1};
  const TensorSlice mlp_rows{shard.first_intermediate(), shard.intermediate, 0, -1};
  const auto sized = [&](cuda::DeviceBuffer* buffer, int64_t elements) {
    *bytes += elements * static_cast<int64_t>(sizeof(uint16_t));
    return buffer->Reserve(elements * sizeof(uint16_t));
  };
  RETURN_IF_ERROR(sized(&w->input_norm, h));
  RETURN_IF_ERROR(sized(&w->post_norm, h));
  RETURN_IF_ERROR(sized(&w->qkv, (q_rows + 2 * kv_rows) * h));
  RETURN_IF_ERROR(sized(&w->o, h * q_rows));
  RETURN_IF_ERROR(sized(&w->gate_up, 2 * shard.intermediate * h));
  RETURN_IF_ERROR(sized(&w->down, h * shard.intermediate));
  uint16_t* qkv = w->qkv.As<uint16_t>();
  uint16_t* gate_up = w->gate_up.As<uint16_t>();
  RETURN_IF_ERROR(
      UploadTensor(store, p + "input_layernorm.weight", {h}, w->input_norm.As<uint16_t>()));
  RETURN_IF_ERROR(
      UploadTensor(store, p + "post_attention_layernorm.weight", {h}, w->post_norm.As<uint16_t>()));
  RETURN_IF_ERROR(UploadTensor(store, p + "self_attn.q_proj.weight", {q_full, h}, qkv, q_slice));
  RETURN_IF_ERROR(
      UploadTensor(store, p + "self_attn.k_proj.weight", {kv_full, h}, qkv + q_rows * h, kv_slice));
  RETURN_IF_ERROR(UploadTensor(store, p + "self_attn.v_proj.weight", {kv_full, h},
                               qkv + (q_rows + kv_rows) * h, kv_slice));
  RETURN_IF_ERROR(UploadTensor(store, p + "self_attn.o_proj.weight", {h, q_full},
                               w->o.As<uint16_t>(), {0, -1, shard.first_head() * d, q_rows}));
  RETURN_IF_ERROR(UploadTensor(store, p + "mlp.gate_proj.weight", {inter, h}, gate_up, mlp_rows));
  RETURN_IF_ERROR(UploadTensor(store, p + "mlp.up_proj.weight", {inter, h},
                               gate_up + shard.intermediate * h, mlp_rows));
  return UploadTensor(store, p + "mlp.down_proj.weight", {h, inter}, w->down.As<uint16_t>(),
                      {0, -1, shard.first_intermediate(), shard.intermediate});
}

absl::Status CheckOptions(const LlamaCudaOptions& options) {
  if (options.prefill_chunk_tokens <= 0 || options.kv_block_tokens <= 0 ||
      options.kv_pool_tokens < 0 || options.max_decode_batch <= 0 ||
      options.max_decode_batch > kLogitsRowsPerGemm || options.small_batch_linear_rows < 0 ||
      options.small_batch_linear_rows > cuda::kSmallBatchLinearRows || options.gpus < 0) {
    return absl::InvalidArgumentError(
        "LlamaCudaOptions: sizes must be positive, max_decode_batch at most 256, "
        "small_batch_linear_rows 0 to 8, gpus at least 0");
  }
  if (options.gpus > 0 && options.kv_pool_tokens > 0) {
    return absl::InvalidArgumentError(
        "LlamaCudaOptions: a tensor-parallel engine (gpus > 0) prefills only; the device KV "
        "pool and decode steps run on one GPU (gpus 0)");
  }
  int devices = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&devices));
  if (options.gpus > devices) {
    return absl::InvalidArgumentError(
        absl::StrCat("LlamaCudaOptions: gpus ", options.gpus, ", this machine has ", devices));
  }
  return absl::OkStatus();
}

}  // namespace

// One GPU's part of the engine: weights of `shard`, streams, the pool and the sparse patterns,
// on the current device (`device`).
absl::StatusOr<std::unique_ptr<LlamaCuda::State>> LlamaCuda::State::Create(
    const TensorStore& store, const ModelConfig& c, const LlamaCudaOptions& options,
    const TensorParallelShard& shard, int device) {
  auto state = std::make_unique<State>();
  State& s = *state;
  s.config = c;
  s.options = options;
  s.shard = shard;
  s.device = device;
  s.q_width = shard.heads * c.head_dim;
  s.kv_width = shard.kv_heads * c.head_dim;
  s.qkv_width = s.q_width + 2 * s.kv_width;
  s.kv_row = c.num_key_value_heads * c.head_dim;
  s.kv_offset = shard.first_kv_head() * c.head_dim;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s.copy_stream, cudaStreamNonBlocking));
  for (cudaEvent_t* event : {&s.layer_copied, &s.spare_copied, &s.layer_computed}) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(event, cudaEventDisableTiming));
  }
  RETURN_IF_ERROR(s.uploader.Init());
  ASSIGN_OR_RETURN(s.gemm, LtGemm::Create());

  const int64_t h = c.hidden_size;
  // `elements` of `slice` of tensor `name` into `buffer`.
  auto alloc_upload = [&](cuda::DeviceBuffer* buffer, const std::string& name,
                          std::vector<int64_t> shape, int64_t elements,
                          TensorSlice slice) -> absl::Status {
    RETURN_IF_ERROR(buffer->Reserve(s.Bf16Bytes(elements)));
    s.weight_bytes += s.Bf16Bytes(elements);
    return UploadTensor(store, name, shape, buffer->As<uint16_t>(), slice);
  };
  // This shard's vocabulary rows of the embedding and of the LM head.
  const TensorSlice vocab_rows{shard.first_vocab, shard.vocab, 0, -1};
  RETURN_IF_ERROR(alloc_upload(&s.embed, "model.embed_tokens.weight", {c.vocab_size, h},
                               shard.vocab * h, vocab_rows));
  RETURN_IF_ERROR(alloc_upload(&s.final_norm, "model.norm.weight", {h}, h, {}));
  if (!c.tie_word_embeddings) {
    RETURN_IF_ERROR(
        alloc_upload(&s.lm_head, "lm_head.weight", {c.vocab_size, h}, shard.vocab * h, vocab_rows));
  }
  s.layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    RETURN_IF_ERROR(UploadLayer(store, c, shard, i, &s.layers[i], &s.weight_bytes));
  }
  const std::vector<float> inv_freq = RopeInverseFrequenciesOf(c);
  RETURN_IF_ERROR(s.inv_freq.Reserve(inv_freq.size() * sizeof(float)));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(s.inv_freq.As<float>(), inv_freq.data(),
                                  inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));
  RETURN_IF_ERROR(s.ReservePool());
  if (options.sparse.has_value()) {
    RETURN_IF_ERROR(s.UploadSparsePatterns(*options.sparse, options.sparse->budget_tokens));
  }
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  s.SampleDeviceMemory();
  return state;
}

absl::Status LlamaCuda::State::ReservePool() {
  if (options.kv_pool_tokens == 0) return absl::OkStatus();
  pool_blocks = (options.kv_pool_tokens + options.kv_block_tokens - 1) / options.kv_block_tokens;
  const size_t pool_bytes =
      Bf16Bytes(config.num_hidden_layers * pool_blocks * options.kv_block_tokens * kv_width);
  RETURN_IF_ERROR(k_pool.Reserve(pool_bytes));
  RETURN_IF_ERROR(v_pool.Reserve(pool_bytes));
  free_blocks.resize(pool_blocks);
  for (int64_t b = 0; b < pool_blocks; ++b) {
    free_blocks[b] = static_cast<int32_t>(pool_blocks - 1 - b);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LlamaCuda>> LlamaCuda::Load(const std::string& model_dir,
                                                           const LlamaCudaOptions& options) {
  RETURN_IF_ERROR(CheckOptions(options));
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::OpenDirectory(model_dir));
  const int64_t ranks = std::max<int64_t>(1, options.gpus);
  std::vector<std::unique_ptr<State>> shards;
  for (int64_t r = 0; r < ranks; ++r) {
    ASSIGN_OR_RETURN(const TensorParallelShard shard, ShardOfModel(config, r, ranks));
    const int device = static_cast<int>(r);
    if (options.gpus > 0) CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    absl::StatusOr<std::unique_ptr<State>> state =
        State::Create(*store, config, options, shard, device);
    // Back on device 0 whether or not the shard loaded.
    if (options.gpus > 0) CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
    ASSIGN_OR_RETURN(std::unique_ptr<State> loaded, std::move(state));
    shards.push_back(std::move(loaded));
  }
  std::unique_ptr<State> root = std::move(shards[0]);
  if (options.gpus > 0) {
    std::vector<int> devices;
    for (const std::unique_ptr<State>& shard : shards) devices.push_back(devices.size());
    ASSIGN_OR_RETURN(root->group, ShardGroup::Create(std::move(devices)));
    for (size_t r = 1; r < shards.size(); ++r) root->peers.push_back(std::move(shards[r]));
    for (std::unique_ptr<State>& peer : root->peers) peer->group = root->group;
  }
  return std::unique_ptr<LlamaCuda>(new LlamaCuda(std::move(root)));
}

const ModelConfig& LlamaCuda::config() const { return state_->config; }

KvShape LlamaCuda::kv_shape() const {
  const ModelConfig& c = state_->config;
  return KvShape{c.num_hidden_layers, c.num_key_value_heads, c.head_dim};
}

absl::Status LlamaCuda::Forward(absl::Span<const SequenceChunk> batch, std::vector<float>* logits) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  for (const SequenceChunk& chunk : batch) {
    if (chunk.kv == nullptr) return absl::InvalidArgumentError("chunk without a KV store");
    RETURN_IF_ERROR(s.CheckTokens(chunk.tokens, chunk.start_pos));
  }
  // Rank 0 looks up each layer's view of the store; every rank reads it between barriers.
  KvLayerView view;
  return s.OnEveryShard([&](State& t) -> absl::Status {
    const bool root = t.shard.rank == 0;
    for (const SequenceChunk& chunk : batch) {
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      if (n == 0) continue;
      const int64_t start = chunk.start_pos;
      auto before = [&](int64_t layer) -> absl::Status {
        RETURN_IF_ERROR(
            t.Barrier(root ? t.StoreLayer(*chunk.kv, layer, start + n, &view) : absl::OkStatus()));
        RETURN_IF_ERROR(t.HostRowsToDevice(view.k_blocks, view.block_tokens, 0, start,
                                           t.k_layer.As<uint16_t>()));
        return t.HostRowsToDevice(view.v_blocks, view.block_tokens, 0, start,
                                  t.v_layer.As<uint16_t>());
      };
      auto after = [&](int64_t layer) -> absl::Status {
        absl::Status copied = t.DeviceRowsToHost(t.k_layer.As<uint16_t>(), start, n, view.k_blocks,
                                                 view.block_tokens);
        if (copied.ok()) {
          copied.Update(t.DeviceRowsToHost(t.v_layer.As<uint16_t>(), start, n, view.v_blocks,
                                           view.block_tokens));
        }
        RETURN_IF_ERROR(t.Barrier(std::move(copied)));
        return t.Barrier(root ? chunk.kv->LayerDone(layer, start, n) : absl::OkStatus());
      };
      RETURN_IF_ERROR(t.RunSequence(chunk.tokens, start, before, after));
      if (chunk.logits == LogitsFor::kAll) RETURN_IF_ERROR(t.Logits(0, n, logits));
      if (chunk.logits == LogitsFor::kLast) RETURN_IF_ERROR(t.Logits(n - 1, 1, logits));
    }
    return absl::OkStatus();
  });
}

absl::Status LlamaCuda::Prefill(absl::Span<const int32_t> tokens, const LayerKvSink& sink,
                                std::vector<float>* last_logits) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  if (sink && s.group != nullptr) {
    return absl::FailedPreconditionError(
        "Prefill's device K/V sink needs one GPU (gpus 0); PrefillExport serves "
        "tensor-parallel engines");
  }
  RETURN_IF_ERROR(s.CheckTokens(tokens, 0));
  const int64_t n = static_cast<int64_t>(tokens.size());
  return s.OnEveryShard([&](State& t) -> absl::Status {
    auto before = [](int64_t) { return absl::OkStatus(); };
    auto after = [&](int64_t layer) -> absl::Status {
      if (!sink) return absl::OkStatus();
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(t.stream));
      return sink(DeviceLayerKv{layer, n, t.k_layer.As<uint16_t>(), t.v_layer.As<uint16_t>()});
    };
    RETURN_IF_ERROR(t.RunSequence(tokens, 0, before, after));
    if (last_logits == nullptr) return cuda::CudaStatus(cudaStreamSynchronize(t.stream), "prefill");
    if (t.shard.rank == 0) last_logits->clear();
    return t.Logits(n - 1, 1, last_logits);
  });
}

absl::Status LlamaCuda::PrefillExport(absl::Span<const int32_t> tokens, KvExporter* exporter,
                                      std::vector<float>* last_logits) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  if (exporter->dtype() != KvDtype::kBf16) {
    return absl::InvalidArgumentError("the GPU engine exports bf16 K/V only");
  }
  RETURN_IF_ERROR(s.CheckTokens(tokens, 0));
  const int64_t n = static_cast<int64_t>(tokens.size());
  return s.OnEveryShard([&](State& t) -> absl::Status {
    RETURN_IF_ERROR(t.k_spare.Reserve(t.Bf16Bytes(n * t.kv_width)));
    RETURN_IF_ERROR(t.v_spare.Reserve(t.Bf16Bytes(n * t.kv_width)));
    auto before = [&](int64_t layer) -> absl::Status {
      if (layer > 0) {
        std::swap(t.k_layer, t.k_spare);
        std::swap(t.v_layer, t.v_spare);
        std::swap(t.layer_copied, t.spare_copied);
      }
      // The copies out of this pair (two layers ago, or of the previous prompt) must be done
      // before the layer overwrites it.
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(t.stream, t.layer_copied, 0));
      return absl::OkStatus();
    };
    // Every shard has queued the layer before rank 0 queues the copies of all their columns,
    // and waits for those to be queued before it goes on.
    auto after = [&](int64_t layer) -> absl::Status {
      RETURN_IF_ERROR(t.Barrier(absl::OkStatus()));
      return t.Barrier(t.shard.rank == 0
                           ? ExportLayerRows(layer, s.ExportColumns(), n, t.kv_row, exporter)
                           : absl::OkStatus());
    };
    RETURN_IF_ERROR(t.RunSequence(tokens, 0, before, after));
    if (t.shard.rank == 0) last_logits->clear();
    return t.Logits(n - 1, 1, last_logits);
  });
}

std::unique_ptr<HostMemoryPinner> LlamaCuda::NewHostMemoryPinner() {
  return std::make_unique<CudaHostPinner>();
}

std::optional<DeviceMemoryStats> LlamaCuda::DeviceMemory() const {
  State& s = *state_;
  DeviceMemoryStats stats;
  for (const State* t : s.Shards()) {
    stats.used = std::max(stats.used, DeviceUsed(t->device));
    stats.peak_used = std::max(stats.peak_used, t->peak_device_used.load());
  }
  stats.peak_used = std::max(stats.used, stats.peak_used);
  stats.kv_pool = static_cast<int64_t>(s.k_pool.bytes() + s.v_pool.bytes());
  return stats;
}

void LlamaCuda::ResetDevicePeak() {
  for (State* t : state_->Shards()) t->peak_device_used = 0;
}

absl::Status LlamaCuda::ObservePrefill(absl::Span<const int32_t> tokens,
                                       const LayerQkvObserver& observer) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  if (!observer) return absl::InvalidArgumentError("ObservePrefill: no observer");
  if (s.group != nullptr) {
    return absl::FailedPreconditionError("ObservePrefill (the pattern search) runs on one GPU");
  }
  RETURN_IF_ERROR(s.CheckTokens(tokens, 0));
  auto nothing = [](int64_t) { return absl::OkStatus(); };
  RETURN_IF_ERROR(s.RunSequence(tokens, 0, nothing, nothing, &observer));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
  return absl::OkStatus();
}

absl::StatusOr<int64_t> LlamaCuda::StartSequence(absl::Span<const int32_t> prompt,
                                                 std::vector<float>* last_logits) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  if (s.pool_blocks == 0) return absl::FailedPreconditionError("no device KV pool configured");
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  RETURN_IF_ERROR(s.CheckTokens(prompt, 0));
  const int64_t n = static_cast<int64_t>(prompt.size());
  ASSIGN_OR_RETURN(int64_t id, s.NewSequence(n));
  const DeviceSequence& seq = s.sequences[id];
  auto prefill = [&]() -> absl::Status {
    RETURN_IF_ERROR(s.UploadSlots(seq, n, &s.slots));
    auto before = [](int64_t) { return absl::OkStatus(); };
    auto after = [&](int64_t layer) -> absl::Status {
      const int64_t w = s.kv_width;
      RETURN_IF_ERROR(CopyRows(s.k_layer.As<uint16_t>(), w, nullptr, s.PoolK(layer), w,
                               s.slots.As<int32_t>(), n, w, s.stream));
      return CopyRows(s.v_layer.As<uint16_t>(), w, nullptr, s.PoolV(layer), w,
                      s.slots.As<int32_t>(), n, w, s.stream);
    };
    RETURN_IF_ERROR(s.RunSequence(prompt, 0, before, after));
    if (last_logits != nullptr) {
      last_logits->clear();
      RETURN_IF_ERROR(s.Logits(n - 1, 1, last_logits));
    }
    return cuda::CudaStatus(cudaStreamSynchronize(s.stream), "prefill");
  };
  const absl::Status status = prefill();
  if (!status.ok()) {
    s.free_blocks.insert(s.free_blocks.end(), seq.blocks.begin(), seq.blocks.end());
    s.sequences.erase(id);
    return status;
  }
  return id;
}

absl::StatusOr<int64_t> LlamaCuda::ForkSequence(int64_t id) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  auto it = s.sequences.find(id);
  if (it == s.sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
  const int64_t length = it->second.length;
  ASSIGN_OR_RETURN(int64_t fork, s.NewSequence(length));
  cuda::DeviceBuffer from;
  RETURN_IF_ERROR(s.UploadSlots(s.sequences[id], length, &from));
  RETURN_IF_ERROR(s.UploadSlots(s.sequences[fork], length, &s.slots));
  for (int64_t l = 0; l < s.config.num_hidden_layers; ++l) {
    const int64_t w = s.kv_width;
    RETURN_IF_ERROR(CopyRows(s.PoolK(l), w, from.As<int32_t>(), s.PoolK(l), w,
                             s.slots.As<int32_t>(), length, w, s.stream));
    RETURN_IF_ERROR(CopyRows(s.PoolV(l), w, from.As<int32_t>(), s.PoolV(l), w,
                             s.slots.As<int32_t>(), length, w, s.stream));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
  return fork;
}

// The model's decode attention shape for `batch` sequences over K/V extents of `extent`.
cuda::PagedDecodeArgs LlamaCuda::State::DecodeAttentionShape(int64_t batch, int64_t extent) const {
  cuda::PagedDecodeArgs shape;
  shape.num_seqs = batch;
  shape.max_seq_len = extent;
  shape.num_heads = shard.heads;
  shape.num_kv_heads = shard.kv_heads;
  shape.head_dim = config.head_dim;
  return shape;
}

// Checks a decode step's sequences and tokens; returns the longest sequence's length after
// the step.
absl::StatusOr<int64_t> LlamaCuda::State::CheckDecode(absl::Span<const int64_t> ids,
                                                      absl::Span<const int32_t> tokens) const {
  const int64_t batch = static_cast<int64_t>(ids.size());
  if (batch == 0 || static_cast<int64_t>(tokens.size()) != batch) {
    return absl::InvalidArgumentError("DecodeStep needs one token per sequence");
  }
  if (batch > options.max_decode_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch ", batch, " above max_decode_batch ", options.max_decode_batch));
  }
  std::set<int64_t> distinct(ids.begin(), ids.end());
  if (static_cast<int64_t>(distinct.size()) != batch) {
    return absl::InvalidArgumentError("a sequence appears twice in one DecodeStep");
  }
  const int64_t bt = options.kv_block_tokens;
  int64_t blocks_needed = 0, max_length = 0;
  for (int64_t i = 0; i < batch; ++i) {
    auto it = sequences.find(ids[i]);
    if (it == sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", ids[i]));
    RETURN_IF_ERROR(CheckTokens(tokens.subspan(i, 1), it->second.length));
    const int64_t new_length = it->second.length + 1;
    blocks_needed += (new_length + bt - 1) / bt - static_cast<int64_t>(it->second.blocks.size());
    max_length = std::max(max_length, new_length);
  }
  if (blocks_needed > static_cast<int64_t>(free_blocks.size())) {
    return absl::ResourceExhaustedError("device KV pool full");
  }
  return max_length;
}

// Sizes every buffer a decode step touches for the largest step (max_decode_batch sequences
// at max_position_embeddings), so their addresses, which captured graphs hold, stay put; drops
// the graphs when a prefill has grown (moved) one of them since.
absl::Status LlamaCuda::State::ReserveDecode() {
  const ModelConfig& c = config;
  const int64_t rows = options.max_decode_batch;
  const int64_t extent = DecodeExtent(c.max_position_embeddings, options.kv_block_tokens);
  cuda::PagedDecodeArgs shape = DecodeAttentionShape(1, extent);
  size_t workspace = 0;
  for (shape.num_seqs = 1; shape.num_seqs <= rows; ++shape.num_seqs) {
    workspace = std::max(workspace, cuda::PagedDecodeWorkspaceBytes(shape));
  }
  RETURN_IF_ERROR(decode_workspace.Reserve(workspace));
  RETURN_IF_ERROR(
      decode_meta.Reserve((4 + extent / options.kv_block_tokens) * rows * sizeof(int32_t)));
  RETURN_IF_ERROR(residual.Reserve(Bf16Bytes(rows * c.hidden_size)));
  RETURN_IF_ERROR(ReserveChunk(rows));
  RETURN_IF_ERROR(logits.Reserve(static_cast<size_t>(rows * c.vocab_size) * sizeof(float)));
  const std::vector<const void*> buffers = {
      decode_workspace.As<void>(), decode_meta.As<void>(), residual.As<void>(),
      normed.As<void>(),           qkv.As<void>(),         attn.As<void>(),
      gate_up.As<void>(),          act.As<void>(),         logits.As<void>()};
  if (buffers != graph_buffers) {
    decode_graphs.Clear();
    graph_buffers = buffers;
  }
  return absl::OkStatus();
}

// Takes the pool block each sequence's new position needs and uploads the step's decode_meta:
// tokens, positions, pool slots and lengths after the step ([batch] each), then the block
// tables ([batch][table_stride], zero past a sequence's blocks).
absl::Status LlamaCuda::State::UploadDecodeMeta(absl::Span<const int64_t> ids,
                                                absl::Span<const int32_t> tokens,
                                                int64_t table_stride) {
  const int64_t batch = static_cast<int64_t>(ids.size());
  const int64_t bt = options.kv_block_tokens;
  decode_host_meta.assign(4 * batch + batch * table_stride, 0);
  int32_t* meta = decode_host_meta.data();
  for (int64_t i = 0; i < batch; ++i) {
    DeviceSequence& seq = sequences[ids[i]];
    const int64_t pos = seq.length;
    if (pos / bt == static_cast<int64_t>(seq.blocks.size())) {
      seq.blocks.push_back(free_blocks.back());
      free_blocks.pop_back();
    }
    meta[i] = tokens[i];
    meta[batch + i] = static_cast<int32_t>(pos);
    meta[2 * batch + i] = static_cast<int32_t>(seq.blocks[pos / bt] * bt + pos % bt);
    meta[3 * batch + i] = static_cast<int32_t>(pos + 1);
    std::copy(seq.blocks.begin(), seq.blocks.end(), meta + 4 * batch + i * table_stride);
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(decode_meta.As<int32_t>(), meta,
                                       decode_host_meta.size() * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

// Enqueues a decode step of `batch` sequences over K/V extents of `extent` positions, from
// decode_meta to the logits in `logits`: the work a decode graph captures. Only launches.
absl::Status LlamaCuda::State::EnqueueDecode(int64_t batch, int64_t extent) {
  const ModelConfig& c = config;
  const int32_t* d_tokens = decode_meta.As<int32_t>();
  const int32_t* d_positions = d_tokens + batch;
  const int32_t* d_slots = d_tokens + 2 * batch;
  cuda::PagedDecodeArgs a = DecodeAttentionShape(batch, extent);
  a.q_stride = qkv_width;
  a.block_tables = d_tokens + 4 * batch;
  a.max_blocks_per_seq = extent / options.kv_block_tokens;
  a.seq_lens = d_tokens + 3 * batch;
  a.block_tokens = options.kv_block_tokens;
  a.workspace = decode_workspace.As<void>();
  a.out = attn.As<uint16_t>();
  a.out_stride = q_width;
  uint16_t* x = residual.As<uint16_t>();
  const LinearPath path = DecodePath(batch);
  RETURN_IF_ERROR(cuda::EmbeddingGather(d_tokens, batch, embed.As<uint16_t>(), shard.vocab,
                                        c.hidden_size, x, stream));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    uint16_t* q = qkv.As<uint16_t>();
    RETURN_IF_ERROR(NormAndProjectQkv(layers[l], x, batch, q, path));
    RETURN_IF_ERROR(cuda::RopeAndStoreKv(q, qkv_width, shard.heads, shard.kv_heads, batch,
                                         c.head_dim, d_positions, inv_freq.As<float>(), d_slots,
                                         PoolK(l), PoolV(l), stream));
    a.q = q;
    a.k_pool = PoolK(l);
    a.v_pool = PoolV(l);
    RETURN_IF_ERROR(cuda::PagedDecodeAttention(a, stream));
    RETURN_IF_ERROR(OutputAndMlp(layers[l], x, batch, path));
  }
  return DeviceLogits(0, batch, path);
}

// One token for each sequence `ids[i]`, all in one batch; leaves the logits in the device
// `logits` buffer ([ids.size()][vocab_size]). The step runs as a captured graph per (batch,
// extent) unless LlamaCudaOptions::decode_graphs is off; both run the same launches.
absl::Status LlamaCuda::State::RunDecode(absl::Span<const int64_t> ids,
                                         absl::Span<const int32_t> tokens) {
  ASSIGN_OR_RETURN(const int64_t max_length, CheckDecode(ids, tokens));
  RETURN_IF_ERROR(ReserveDecode());
  const int64_t batch = static_cast<int64_t>(ids.size());
  const int64_t extent = DecodeExtent(max_length, options.kv_block_tokens);
  // Imported K/V still uploading land before the step reads the pool.
  RETURN_IF_ERROR(uploader.OrderBefore(stream));
  RETURN_IF_ERROR(UploadDecodeMeta(ids, tokens, extent / options.kv_block_tokens));
  auto enqueue = [&] { return EnqueueDecode(batch, extent); };
  RETURN_IF_ERROR(options.decode_graphs ? decode_graphs.Launch({batch, extent}, stream, enqueue)
                                        : enqueue());
  for (int64_t id : ids) ++sequences[id].length;
  return absl::OkStatus();
}

absl::Status LlamaCuda::DecodeStep(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens,
                                   std::vector<float>* logits) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  RETURN_IF_ERROR(s.RunDecode(ids, tokens));
  const int64_t vocab = s.config.vocab_size;
  logits->resize(ids.size() * vocab);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(logits->data(), s.logits.As<float>(),
                                       logits->size() * sizeof(float), cudaMemcpyDeviceToHost,
                                       s.stream));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
  return absl::OkStatus();
}

absl::Status LlamaCuda::DecodeAndSample(absl::Span<const int64_t> ids,
                                        absl::Span<const int32_t> tokens,
                                        absl::Span<const SamplingParams> params,
                                        absl::Span<const uint64_t> steps,
                                        std::vector<int32_t>* next) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  const int64_t batch = static_cast<int64_t>(ids.size());
  if (static_cast<int64_t>(params.size()) != batch || static_cast<int64_t>(steps.size()) != batch) {
    return absl::InvalidArgumentError("DecodeAndSample needs params and steps per sequence");
  }
  RETURN_IF_ERROR(s.RunDecode(ids, tokens));
  const int64_t vocab = s.config.vocab_size;
  RETURN_IF_ERROR(s.sample_workspace.Reserve(cuda::SampleTokensWorkspaceBytes(batch, vocab)));
  RETURN_IF_ERROR(s.sampled.Reserve(batch * sizeof(int32_t)));
  RETURN_IF_ERROR(cuda::SampleTokens(s.logits.As<float>(), batch, vocab, params.data(),
                                     steps.data(), s.sample_workspace.As<void>(),
                                     s.sampled.As<int32_t>(), s.stream));
  next->resize(batch);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(next->data(), s.sampled.As<int32_t>(),
                                       batch * sizeof(int32_t), cudaMemcpyDeviceToHost, s.stream));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
  return absl::OkStatus();
}

absl::Status LlamaCuda::EndSequence(int64_t id) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  auto it = s.sequences.find(id);
  if (it == s.sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
  bool importing = false;
  {
    absl::MutexLock imports(&s.import_mu);
    importing = s.import_blocks.erase(id) > 0;
  }
  // An abandoned import's uploads must land before its blocks go to another sequence.
  const absl::Status uploaded = importing ? s.uploader.Synchronize() : absl::OkStatus();
  s.free_blocks.insert(s.free_blocks.end(), it->second.blocks.begin(), it->second.blocks.end());
  s.sequences.erase(it);
  return uploaded;
}

int64_t LlamaCuda::SequenceLength(int64_t id) const {
  absl::MutexLock lock(&state_->mu);
  auto it = state_->sequences.find(id);
  return it == state_->sequences.end() ? -1 : it->second.length;
}

CudaMemoryStats LlamaCuda::MemoryStats() const {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  CudaMemoryStats stats;
  stats.allocated = cuda::DeviceBytesHeld();
  stats.peak_allocated = cuda::PeakDeviceBytesHeld();
  for (State* t : s.Shards()) {
    t->SampleDeviceMemory();
    stats.weights = std::max(stats.weights, t->weight_bytes);
    stats.device_used = std::max(stats.device_used, DeviceUsed(t->device));
    stats.peak_device_used = std::max(stats.peak_device_used, t->peak_device_used.load());
  }
  return stats;
}

SparsePrefillStats LlamaCuda::SparseStats() const {
  absl::MutexLock lock(&state_->mu);
  return state_->sparse_stats;
}

DecodeGraphStats LlamaCuda::DecodeGraphs() const {
  absl::MutexLock lock(&state_->mu);
  return {state_->decode_graphs.captures(), static_cast<int64_t>(state_->decode_graphs.size())};
}

void LlamaCuda::ResetPeakMemory() {
  absl::MutexLock lock(&state_->mu);
  cuda::ResetPeakDeviceBytesHeld();
  for (State* t : state_->Shards()) t->peak_device_used = 0;
}

absl::Status LlamaCuda::Synchronize() {
  for (State* t : state_->Shards()) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(t->stream));
  }
  return absl::OkStatus();
}

int64_t LlamaCuda::kv_block_tokens() const { return state_->options.kv_block_tokens; }

int64_t LlamaCuda::kv_pool_blocks() const { return state_->pool_blocks; }

int64_t LlamaCuda::kv_block_bytes() const {
  const State& s = *state_;
  return 2 * s.config.num_hidden_layers *
         static_cast<int64_t>(s.Bf16Bytes(s.options.kv_block_tokens * s.kv_width));
}

absl::StatusOr<int64_t> LlamaCuda::ImportSequence(int64_t length) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  if (s.pool_blocks == 0) return absl::FailedPreconditionError("no device KV pool configured");
  if (length < 0 || length > s.config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("sequence length ", length, " outside [0, ",
                                                   s.config.max_position_embeddings, "]"));
  }
  ASSIGN_OR_RETURN(int64_t id, s.NewSequence(length));
  absl::MutexLock imports(&s.import_mu);
  s.import_blocks[id] = State::Import{s.sequences[id].blocks, length};
  return id;
}

absl::Status LlamaCuda::FinishImport(int64_t id) {
  State& s = *state_;
  {
    absl::MutexLock imports(&s.import_mu);
    if (s.import_blocks.erase(id) == 0) {
      return absl::NotFoundError(absl::StrCat("no sequence ", id, " being imported"));
    }
  }
  return s.uploader.Synchronize();
}

absl::Status LlamaCuda::WriteKv(int64_t id, int64_t layer, int64_t first, int64_t count,
                                KvDtype dtype, const void* k, const void* v) {
  State& s = *state_;
  const int64_t bt = s.options.kv_block_tokens;
  std::vector<int32_t> slots(std::max<int64_t>(count, 0));
  {
    absl::MutexLock imports(&s.import_mu);
    auto it = s.import_blocks.find(id);
    if (it == s.import_blocks.end()) {
      return absl::NotFoundError(absl::StrCat("no sequence ", id, " being imported"));
    }
    const std::vector<int32_t>& blocks = it->second.blocks;
    const int64_t length = it->second.length;
    if (layer < 0 || layer >= s.config.num_hidden_layers || first < 0 || count < 0 ||
        first + count > length) {
      return absl::InvalidArgumentError(absl::StrCat("KV rows out of range: layer ", layer,
                                                     " positions ", first, "+", count,
                                                     " of a sequence of ", length));
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t p = first + i;
      slots[i] = static_cast<int32_t>(blocks[p / bt] * bt + p % bt);
    }
  }
  return s.uploader.Upload(k, v, dtype, slots.data(), count, s.kv_width, s.PoolK(layer),
                           s.PoolV(layer));
}

}  // namespace sparseaccel
