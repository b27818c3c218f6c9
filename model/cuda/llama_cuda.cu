#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/sparse_attention.h"
#include "kernels/rope.h"
#include "model/checkpoint/config.h"
#include "model/cuda/cuda_util.cuh"
#include "model/cuda/gemm.cuh"
#include "model/cuda/graph_cache.cuh"
#include "model/cuda/kv_copy.cuh"
#include "model/cuda/kv_transfer.cuh"
#include "model/cuda/llama_cuda.h"
#include "model/checkpoint/safetensors.h"

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

uint16_t F32ToBf16Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN.
  bits += 0x7fffu + ((bits >> 16) & 1u);                  // Round to nearest even.
  return static_cast<uint16_t>(bits >> 16);
}

// Copies tensor `name` (checked against `shape`) to `dst` as uint16_t.
absl::Status UploadTensor(const TensorStore& store, const std::string& name,
                          std::vector<int64_t> shape, uint16_t* dst) {
  ASSIGN_OR_RETURN(const TensorView* view, store.FindWithShape(name, shape));
  if (view->dtype == DType::kBF16) {
    CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, view->data, view->num_bytes, cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }
  std::vector<float> f32(view->NumElements());
  RETURN_IF_ERROR(ConvertToF32(*view, absl::MakeSpan(f32)));
  std::vector<uint16_t> bits(f32.size());
  for (size_t i = 0; i < f32.size(); ++i) bits[i] = F32ToBf16Bits(f32[i]);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(dst, bits.data(), bits.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

struct LayerWeights {
  DeviceBuffer input_norm, post_norm;
  DeviceBuffer qkv;      // [q_rows + 2 * kv_rows][hidden]: q, k, v projections stacked.
  DeviceBuffer o;        // [hidden][q_rows]
  DeviceBuffer gate_up;  // [2 * intermediate][hidden]: gate then up.
  DeviceBuffer down;     // [hidden][intermediate]
};

struct DeviceSequence {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

}  // namespace

struct LlamaCuda::State {
  ModelConfig config;
  LlamaCudaOptions options;
  int64_t q_width = 0;    // heads * head_dim
  int64_t kv_width = 0;   // kv_heads * head_dim
  int64_t qkv_width = 0;  // q_width + 2 * kv_width

  mutable absl::Mutex mu;
  cudaStream_t stream = nullptr;
  std::unique_ptr<LtGemm> gemm;
  int64_t weight_bytes = 0;
  std::atomic<int64_t> peak_device_used{0};  // Read without `mu` (metrics scrapes).

  DeviceBuffer embed, lm_head, final_norm, inv_freq;
  std::vector<LayerWeights> layers;

  // Scratch, grown on demand and kept.
  DeviceBuffer ids;               // int32 [rows]
  DeviceBuffer positions;         // int32 [rows]
  DeviceBuffer residual;          // uint16_t [rows][hidden]
  DeviceBuffer normed;            // uint16_t [chunk][hidden]
  DeviceBuffer qkv;               // uint16_t [chunk][qkv_width]
  DeviceBuffer attn;              // uint16_t [chunk][q_width]
  DeviceBuffer gate_up;           // uint16_t [chunk][2 * intermediate]
  DeviceBuffer act;               // uint16_t [chunk][intermediate]
  DeviceBuffer k_layer, v_layer;  // uint16_t [tokens][kv_width]: one layer's K/V.
  // PrefillExport alternates k_layer/v_layer with these, so a layer computes while the previous
  // one is copied to the host; each pair's event marks the end of the copies out of it.
  DeviceBuffer k_spare, v_spare;
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
  DeviceBuffer kv_f32;       // fp32 staging for host KvStores.
  DeviceBuffer logits;       // fp32 [rows][vocab]
  DeviceBuffer slots;        // int32 pool rows of a prefill.
  DeviceBuffer decode_meta;  // int32 per DecodeStep: tokens, positions, slots, lengths, tables.
  std::vector<int32_t> decode_host_meta;
  DeviceBuffer decode_workspace;
  // Captured decode steps by (batch, extent), and the buffer addresses they were captured with.
  GraphCache decode_graphs{kDecodeGraphs};
  std::vector<const void*> graph_buffers;
  DeviceBuffer sample_workspace;
  DeviceBuffer sampled;  // int32 [batch]

  // Sparse prefill: every layer's head patterns ([layer][head], on the device and the host)
  // and the index of the layer being prefilled.
  DeviceBuffer device_patterns;
  std::vector<std::vector<cuda::DeviceHeadPattern>> host_patterns;
  int64_t patterns_tokens = 0;  // The prompt length the uploaded patterns are for.
  DeviceBuffer index_workspace;
  SparsePrefillStats sparse_stats;

  // Paged pool: [layer][block * block_tokens + i][kv_width] for K and for V.
  DeviceBuffer k_pool, v_pool;
  int64_t pool_blocks = 0;
  std::vector<int32_t> free_blocks;
  std::map<int64_t, DeviceSequence> sequences;
  int64_t next_sequence_id = 1;

  ~State() {
    for (cudaEvent_t event : {layer_copied, spare_copied, layer_computed}) {
      if (event) cudaEventDestroy(event);
    }
    if (copy_stream) cudaStreamDestroy(copy_stream);
    if (stream) cudaStreamDestroy(stream);
  }

  size_t Bf16Bytes(int64_t n) const { return static_cast<size_t>(n) * sizeof(uint16_t); }
  uint16_t* PoolK(int64_t layer) const {
    return k_pool.as<uint16_t>() + layer * pool_blocks * options.kv_block_tokens * kv_width;
  }
  uint16_t* PoolV(int64_t layer) const {
    return v_pool.as<uint16_t>() + layer * pool_blocks * options.kv_block_tokens * kv_width;
  }

  void SampleDeviceMemory() {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      const int64_t used = static_cast<int64_t>(total_bytes - free_bytes);
      int64_t peak = peak_device_used.load();
      while (used > peak && !peak_device_used.compare_exchange_weak(peak, used)) {
      }
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

  absl::Status Norm(uint16_t* x, int64_t rows, const DeviceBuffer& weight, uint16_t* out) {
    return cuda::AddRmsNorm(x, nullptr, weight.as<uint16_t>(), rows, config.hidden_size,
                            static_cast<float>(config.rms_norm_eps), out, stream);
  }

  // out = x w^T for `m` rows with `epilogue` (cuda::LinearEpilogue), on `path`; SwiGLU on the
  // cuBLASLt path goes through the gate_up scratch.
  absl::Status Project(const uint16_t* x, const DeviceBuffer& w, void* out, int64_t m, int64_t n,
                       int64_t k, cuda::LinearEpilogue epilogue, LinearPath path) {
    using cuda::LinearEpilogue;
    cuda::SmallBatchLinearArgs small{x, w.as<uint16_t>(), out, m, n, k, epilogue};
    if (path == LinearPath::kSmallBatch && cuda::SmallBatchLinearFits(small)) {
      return cuda::SmallBatchLinear(small, stream);
    }
    const bool accumulate = epilogue == LinearEpilogue::kAccumulateBf16;
    const cudaDataType_t type = epilogue == LinearEpilogue::kStoreF32 ? CUDA_R_32F : CUDA_R_16BF;
    if (epilogue != LinearEpilogue::kSwiGluBf16) {
      return gemm->Linear(x, w.as<uint16_t>(), out, type, m, n, k, accumulate, stream);
    }
    uint16_t* gate = gate_up.as<uint16_t>();
    RETURN_IF_ERROR(gemm->Linear(x, w.as<uint16_t>(), gate, type, m, n, k, false, stream));
    return cuda::SwiGlu(gate, gate + n / 2, m, n / 2, n, static_cast<uint16_t*>(out), stream);
  }

  // Chunk-sized scratch for `rows` rows.
  absl::Status ReserveChunk(int64_t rows) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(normed.Reserve(Bf16Bytes(rows * c.hidden_size)));
    RETURN_IF_ERROR(qkv.Reserve(Bf16Bytes(rows * qkv_width)));
    RETURN_IF_ERROR(attn.Reserve(Bf16Bytes(rows * q_width)));
    RETURN_IF_ERROR(gate_up.Reserve(Bf16Bytes(rows * 2 * c.intermediate_size)));
    return act.Reserve(Bf16Bytes(rows * c.intermediate_size));
  }

  // Final norm and LM head for rows [first_row, first_row + rows) of the residual stream
  // (rows <= kLogitsRowsPerGemm) into the device `logits` buffer, fp32.
  absl::Status DeviceLogits(int64_t first_row, int64_t rows,
                            LinearPath path = LinearPath::kCublasLt) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(logits.Reserve(static_cast<size_t>(rows * c.vocab_size) * sizeof(float)));
    RETURN_IF_ERROR(normed.Reserve(Bf16Bytes(rows * c.hidden_size)));
    RETURN_IF_ERROR(Norm(residual.as<uint16_t>() + first_row * c.hidden_size, rows, final_norm,
                         normed.as<uint16_t>()));
    const DeviceBuffer& head = c.tie_word_embeddings ? embed : lm_head;
    return Project(normed.as<uint16_t>(), head, logits.as<float>(), rows, c.vocab_size,
                   c.hidden_size, cuda::LinearEpilogue::kStoreF32, path);
  }

  // Logits of `rows` rows from `first_row`, appended to `out`.
  absl::Status Logits(int64_t first_row, int64_t rows, std::vector<float>* out) {
    const int64_t vocab = config.vocab_size;
    for (int64_t r0 = 0; r0 < rows; r0 += kLogitsRowsPerGemm) {
      const int64_t m = std::min(kLogitsRowsPerGemm, rows - r0);
      RETURN_IF_ERROR(DeviceLogits(first_row + r0, m));
      const size_t old_size = out->size();
      out->resize(old_size + m * vocab);
      // Pageable destination: returns once the copy is done.
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->data() + old_size, logits.as<float>(),
                                           m * vocab * sizeof(float), cudaMemcpyDeviceToHost,
                                           stream));
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }

  // The first half of a decoder layer on `m` rows of the residual stream `x`: the fused QKV
  // projection of the normed rows into `qkv_rows` ([m][qkv_width]), before RoPE.
  absl::Status NormAndProjectQkv(const LayerWeights& w, uint16_t* x, int64_t m, uint16_t* qkv_rows,
                                 LinearPath path = LinearPath::kCublasLt) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(Norm(x, m, w.input_norm, normed.as<uint16_t>()));
    return Project(normed.as<uint16_t>(), w.qkv, qkv_rows, m, qkv_width, c.hidden_size,
                   cuda::LinearEpilogue::kStoreBf16, path);
  }

  // NormAndProjectQkv, then RoPE on Q and K of the rows at device `row_positions`.
  absl::Status ProjectQkv(const LayerWeights& w, uint16_t* x, int64_t m,
                          const int32_t* row_positions, uint16_t* qkv_rows) {
    const ModelConfig& c = config;
    RETURN_IF_ERROR(NormAndProjectQkv(w, x, m, qkv_rows));
    return cuda::ApplyRope(qkv_rows, qkv_width, c.num_attention_heads, qkv_rows + q_width,
                           qkv_width, c.num_key_value_heads, m, c.head_dim, row_positions,
                           inv_freq.as<float>(), stream);
  }

  // Copies the K and V of `m` rows of `qkv_rows` to rows [first, first + m) of k_layer/v_layer.
  absl::Status StoreKv(const uint16_t* qkv_rows, int64_t first, int64_t m) {
    RETURN_IF_ERROR(CopyRows(qkv_rows + q_width, qkv_width, nullptr,
                             k_layer.as<uint16_t>() + first * kv_width, kv_width, nullptr, m,
                             kv_width, stream));
    return CopyRows(qkv_rows + q_width + kv_width, qkv_width, nullptr,
                    v_layer.as<uint16_t>() + first * kv_width, kv_width, nullptr, m, kv_width,
                    stream);
  }

  // The second half: the output projection of `attn` added to `x`, then the MLP block, `x`
  // updated in place.
  absl::Status OutputAndMlp(const LayerWeights& w, uint16_t* x, int64_t m,
                            LinearPath path = LinearPath::kCublasLt) {
    using cuda::LinearEpilogue;
    const ModelConfig& c = config;
    RETURN_IF_ERROR(Project(attn.as<uint16_t>(), w.o, x, m, c.hidden_size, q_width,
                            LinearEpilogue::kAccumulateBf16, path));
    RETURN_IF_ERROR(Norm(x, m, w.post_norm, normed.as<uint16_t>()));
    RETURN_IF_ERROR(Project(normed.as<uint16_t>(), w.gate_up, act.as<uint16_t>(), m,
                            2 * c.intermediate_size, c.hidden_size, LinearEpilogue::kSwiGluBf16,
                            path));
    return Project(act.as<uint16_t>(), w.down, x, m, c.hidden_size, c.intermediate_size,
                   LinearEpilogue::kAccumulateBf16, path);
  }

  // The layer's attention operands: Q in the fused QKV rows `qkv_rows`, K/V in
  // k_layer/v_layer, output in `attn`.
  cuda::AttentionOperands LayerOperands(const uint16_t* qkv_rows) const {
    cuda::AttentionOperands x;
    x.q = qkv_rows;
    x.q_stride = qkv_width;
    x.k = k_layer.as<uint16_t>();
    x.v = v_layer.as<uint16_t>();
    x.kv_stride = kv_width;
    x.out = attn.as<uint16_t>();
    x.out_stride = q_width;
    x.num_heads = config.num_attention_heads;
    x.num_kv_heads = config.num_key_value_heads;
    x.head_dim = config.head_dim;
    return x;
  }

  // Dense causal attention of `m` queries (rows of `qkv_rows`) at positions [n_kv - m, n_kv)
  // over k_layer/v_layer rows [0, n_kv), into `attn`.
  absl::Status DenseAttention(const uint16_t* qkv_rows, int64_t m, int64_t n_kv) {
    return cuda::PrefillAttention(cuda::PrefillAttentionArgs{LayerOperands(qkv_rows), m, n_kv},
                                  stream);
  }

  // Checks `sparse` against the model and uploads its patterns for prompts of `num_tokens`
  // (PatternAtLength), ordered on `stream`.
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
      for (const HeadPattern& head : sparse.heads[l]) {
        absl::StatusOr<cuda::DeviceHeadPattern> pattern =
            cuda::ToDevicePattern(PatternAtLength(head, num_tokens, sparse.budget_tokens));
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
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_patterns.as<void>(), all.data(),
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
    uint16_t* qkv_all = qkv.as<uint16_t>();
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t m = std::min(chunk, n - c0);
      RETURN_IF_ERROR(ProjectQkv(layers[l], residual.as<uint16_t>() + c0 * c.hidden_size, m,
                                 positions.as<int32_t>() + c0, qkv_all + c0 * qkv_width));
      RETURN_IF_ERROR(StoreKv(qkv_all + c0 * qkv_width, c0, m));
    }
    if (observer != nullptr) {
      RETURN_IF_ERROR(
          (*observer)(LlamaCuda::DeviceLayerQkv{l, n, qkv_all, qkv_width, k_layer.as<uint16_t>(),
                                                v_layer.as<uint16_t>(), kv_width, stream}));
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t m = std::min(chunk, n - c0);
        RETURN_IF_ERROR(DenseAttention(qkv_all + c0 * qkv_width, m, c0 + m));
        RETURN_IF_ERROR(OutputAndMlp(layers[l], residual.as<uint16_t>() + c0 * c.hidden_size, m));
      }
      return absl::OkStatus();
    }
    cuda::SparseIndexArgs index_args;
    index_args.q = qkv_all;
    index_args.q_stride = qkv_width;
    index_args.k = k_layer.as<uint16_t>();
    index_args.k_stride = kv_width;
    index_args.num_tokens = n;
    index_args.num_heads = c.num_attention_heads;
    index_args.num_kv_heads = c.num_key_value_heads;
    index_args.head_dim = c.head_dim;
    index_args.patterns = device_patterns.as<cuda::DeviceHeadPattern>() + l * c.num_attention_heads;
    index_args.host_patterns = &host_patterns[l];
    const size_t workspace_bytes = cuda::SparseIndexWorkspaceBytes(index_args);
    RETURN_IF_ERROR(index_workspace.Reserve(workspace_bytes));
    cuda::DeviceSparseIndex index;
    RETURN_IF_ERROR(cuda::BuildSparseIndex(index_args, index_workspace.as<void>(), workspace_bytes,
                                           &index, stream));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t m = std::min(chunk, n - c0);
      const cuda::SparseAttentionArgs a{LayerOperands(qkv_all), c0 / kBlockSize,
                                        (m + kBlockSize - 1) / kBlockSize, index};
      RETURN_IF_ERROR(cuda::SparseAttention(a, stream));
      RETURN_IF_ERROR(OutputAndMlp(layers[l], residual.as<uint16_t>() + c0 * c.hidden_size, m));
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
    std::vector<int32_t> host_positions(n);
    for (int64_t i = 0; i < n; ++i) host_positions[i] = static_cast<int32_t>(start + i);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids.as<int32_t>(), tokens.data(), n * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, stream));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(positions.as<int32_t>(), host_positions.data(),
                                         n * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    RETURN_IF_ERROR(cuda::EmbeddingGather(ids.as<int32_t>(), n, embed.as<uint16_t>(), c.vocab_size,
                                          c.hidden_size, residual.as<uint16_t>(), stream));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      RETURN_IF_ERROR(before_layer(l));
      if (two_pass) {
        RETURN_IF_ERROR(TwoPassLayer(l, n, chunk, observer));
      } else {
        for (int64_t c0 = 0; c0 < n; c0 += chunk) {
          // The chunk's K/V go to rows [start + c0, start + c0 + m) of the layer buffer; its
          // queries attend to every row up to their own.
          const int64_t m = std::min(chunk, n - c0);
          uint16_t* x = residual.as<uint16_t>() + c0 * c.hidden_size;
          RETURN_IF_ERROR(
              ProjectQkv(layers[l], x, m, positions.as<int32_t>() + c0, qkv.as<uint16_t>()));
          RETURN_IF_ERROR(StoreKv(qkv.as<uint16_t>(), start + c0, m));
          RETURN_IF_ERROR(DenseAttention(qkv.as<uint16_t>(), m, start + c0 + m));
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

  absl::Status CheckTokens(absl::Span<const int32_t> tokens, int64_t start) const {
    RETURN_IF_ERROR(CheckTokenIds(tokens, config.vocab_size));
    if (start < 0 || start + static_cast<int64_t>(tokens.size()) > config.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("positions [", start, ", ", start + tokens.size(),
                       ") beyond max_position_embeddings ", config.max_position_embeddings));
    }
    return absl::OkStatus();
  }

  // Copies K or V rows [first, first + count) between a host KvLayerView and the device
  // buffer `layer_buffer` (uint16_t, contiguous), through fp32 staging.
  absl::Status HostRowsToDevice(const std::vector<float*>& blocks, int64_t block_tokens,
                                int64_t first, int64_t count, uint16_t* layer_buffer) {
    if (count == 0) return absl::OkStatus();
    RETURN_IF_ERROR(kv_f32.Reserve(static_cast<size_t>(count * kv_width) * sizeof(float)));
    for (int64_t p = first; p < first + count;) {
      const int64_t in_block = std::min(block_tokens - p % block_tokens, first + count - p);
      const float* src = blocks[p / block_tokens] + (p % block_tokens) * kv_width;
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(kv_f32.as<float>() + (p - first) * kv_width, src,
                                           in_block * kv_width * sizeof(float),
                                           cudaMemcpyHostToDevice, stream));
      p += in_block;
    }
    return cuda::F32ToBf16(kv_f32.as<float>(), count * kv_width, layer_buffer + first * kv_width,
                           stream);
  }

  absl::Status DeviceRowsToHost(const uint16_t* layer_buffer, int64_t first, int64_t count,
                                const std::vector<float*>& blocks, int64_t block_tokens) {
    if (count == 0) return absl::OkStatus();
    RETURN_IF_ERROR(kv_f32.Reserve(static_cast<size_t>(count * kv_width) * sizeof(float)));
    RETURN_IF_ERROR(cuda::Bf16ToF32(layer_buffer + first * kv_width, count * kv_width,
                                    kv_f32.as<float>(), stream));
    for (int64_t p = first; p < first + count;) {
      const int64_t in_block = std::min(block_tokens - p % block_tokens, first + count - p);
      float* dst = blocks[p / block_tokens] + (p % block_tokens) * kv_width;
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, kv_f32.as<float>() + (p - first) * kv_width,
                                           in_block * kv_width * sizeof(float),
                                           cudaMemcpyDeviceToHost, stream));
      p += in_block;
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }

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
  absl::Status UploadSlots(const DeviceSequence& seq, int64_t length, DeviceBuffer* out) {
    std::vector<int32_t> rows(length);
    for (int64_t p = 0; p < length; ++p) {
      rows[p] =
          static_cast<int32_t>(seq.blocks[p / options.kv_block_tokens] * options.kv_block_tokens +
                               p % options.kv_block_tokens);
    }
    RETURN_IF_ERROR(out->Reserve(length * sizeof(int32_t)));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->as<int32_t>(), rows.data(), length * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, stream));
    return absl::OkStatus();
  }
};

LlamaCuda::LlamaCuda(std::unique_ptr<State> state) : state_(std::move(state)) {}
LlamaCuda::~LlamaCuda() = default;

absl::StatusOr<std::unique_ptr<LlamaCuda>> LlamaCuda::Load(const std::string& model_dir,
                                                           const LlamaCudaOptions& options) {
  if (options.prefill_chunk_tokens <= 0 || options.kv_block_tokens <= 0 ||
      options.kv_pool_tokens < 0 || options.max_decode_batch <= 0 ||
      options.max_decode_batch > kLogitsRowsPerGemm || options.small_batch_linear_rows < 0 ||
      options.small_batch_linear_rows > cuda::kSmallBatchLinearRows) {
    return absl::InvalidArgumentError(
        "LlamaCudaOptions: sizes must be positive, max_decode_batch at most 256, "
        "small_batch_linear_rows 0 to 8");
  }
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::OpenDirectory(model_dir));
  auto state = std::make_unique<State>();
  State& s = *state;
  const ModelConfig& c = config;
  s.config = config;
  s.options = options;
  s.q_width = c.num_attention_heads * c.head_dim;
  s.kv_width = c.num_key_value_heads * c.head_dim;
  s.qkv_width = s.q_width + 2 * s.kv_width;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s.copy_stream, cudaStreamNonBlocking));
  for (cudaEvent_t* event : {&s.layer_copied, &s.spare_copied, &s.layer_computed}) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(event, cudaEventDisableTiming));
  }
  RETURN_IF_ERROR(s.uploader.Init());
  ASSIGN_OR_RETURN(s.gemm, LtGemm::Create());

  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  auto alloc_upload = [&](DeviceBuffer* buffer, const std::string& name,
                          std::vector<int64_t> shape) -> absl::Status {
    int64_t elements = 1;
    for (int64_t d : shape) elements *= d;
    RETURN_IF_ERROR(buffer->Reserve(s.Bf16Bytes(elements)));
    s.weight_bytes += s.Bf16Bytes(elements);
    return UploadTensor(*store, name, shape, buffer->as<uint16_t>());
  };
  RETURN_IF_ERROR(alloc_upload(&s.embed, "model.embed_tokens.weight", {c.vocab_size, h}));
  RETURN_IF_ERROR(alloc_upload(&s.final_norm, "model.norm.weight", {h}));
  if (!c.tie_word_embeddings) {
    RETURN_IF_ERROR(alloc_upload(&s.lm_head, "lm_head.weight", {c.vocab_size, h}));
  }
  s.layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& w = s.layers[i];
    RETURN_IF_ERROR(alloc_upload(&w.input_norm, p + "input_layernorm.weight", {h}));
    RETURN_IF_ERROR(alloc_upload(&w.post_norm, p + "post_attention_layernorm.weight", {h}));
    RETURN_IF_ERROR(w.qkv.Reserve(s.Bf16Bytes(s.qkv_width * h)));
    RETURN_IF_ERROR(w.gate_up.Reserve(s.Bf16Bytes(2 * inter * h)));
    s.weight_bytes += s.Bf16Bytes(s.qkv_width * h + 2 * inter * h);
    uint16_t* qkv = w.qkv.as<uint16_t>();
    RETURN_IF_ERROR(UploadTensor(*store, p + "self_attn.q_proj.weight", {s.q_width, h}, qkv));
    RETURN_IF_ERROR(
        UploadTensor(*store, p + "self_attn.k_proj.weight", {s.kv_width, h}, qkv + s.q_width * h));
    RETURN_IF_ERROR(UploadTensor(*store, p + "self_attn.v_proj.weight", {s.kv_width, h},
                                 qkv + (s.q_width + s.kv_width) * h));
    RETURN_IF_ERROR(alloc_upload(&w.o, p + "self_attn.o_proj.weight", {h, s.q_width}));
    RETURN_IF_ERROR(
        UploadTensor(*store, p + "mlp.gate_proj.weight", {inter, h}, w.gate_up.as<uint16_t>()));
    RETURN_IF_ERROR(UploadTensor(*store, p + "mlp.up_proj.weight", {inter, h},
                                 w.gate_up.as<uint16_t>() + inter * h));
    RETURN_IF_ERROR(alloc_upload(&w.down, p + "mlp.down_proj.weight", {h, inter}));
  }
  Llama3RopeScaling scaling;
  scaling.enabled = c.rope_scaling.type == RopeScaling::Type::kLlama3;
  scaling.factor = c.rope_scaling.factor;
  scaling.low_freq_factor = c.rope_scaling.low_freq_factor;
  scaling.high_freq_factor = c.rope_scaling.high_freq_factor;
  scaling.original_max_positions =
      static_cast<double>(c.rope_scaling.original_max_position_embeddings);
  const std::vector<float> inv_freq = RopeInverseFrequencies(c.head_dim, c.rope_theta, scaling);
  RETURN_IF_ERROR(s.inv_freq.Reserve(inv_freq.size() * sizeof(float)));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(s.inv_freq.as<float>(), inv_freq.data(),
                                  inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));

  if (options.kv_pool_tokens > 0) {
    s.pool_blocks =
        (options.kv_pool_tokens + options.kv_block_tokens - 1) / options.kv_block_tokens;
    const size_t pool_bytes =
        s.Bf16Bytes(c.num_hidden_layers * s.pool_blocks * options.kv_block_tokens * s.kv_width);
    RETURN_IF_ERROR(s.k_pool.Reserve(pool_bytes));
    RETURN_IF_ERROR(s.v_pool.Reserve(pool_bytes));
    s.free_blocks.resize(s.pool_blocks);
    for (int64_t b = 0; b < s.pool_blocks; ++b) {
      s.free_blocks[b] = static_cast<int32_t>(s.pool_blocks - 1 - b);
    }
  }
  if (options.sparse.has_value()) {
    RETURN_IF_ERROR(s.UploadSparsePatterns(*options.sparse, options.sparse->budget_tokens));
  }
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  s.SampleDeviceMemory();
  return std::unique_ptr<LlamaCuda>(new LlamaCuda(std::move(state)));
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
  for (const SequenceChunk& chunk : batch) {
    const int64_t n = static_cast<int64_t>(chunk.tokens.size());
    if (n == 0) continue;
    const int64_t start = chunk.start_pos;
    KvLayerView view;
    auto before = [&](int64_t layer) -> absl::Status {
      ASSIGN_OR_RETURN(view, chunk.kv->Layer(layer, start + n));
      if (view.row_size != s.kv_width) {
        return absl::InvalidArgumentError(
            absl::StrCat("KV store row size ", view.row_size, ", model needs ", s.kv_width));
      }
      RETURN_IF_ERROR(
          s.HostRowsToDevice(view.k_blocks, view.block_tokens, 0, start, s.k_layer.as<uint16_t>()));
      return s.HostRowsToDevice(view.v_blocks, view.block_tokens, 0, start,
                                s.v_layer.as<uint16_t>());
    };
    auto after = [&](int64_t layer) -> absl::Status {
      RETURN_IF_ERROR(
          s.DeviceRowsToHost(s.k_layer.as<uint16_t>(), start, n, view.k_blocks, view.block_tokens));
      RETURN_IF_ERROR(
          s.DeviceRowsToHost(s.v_layer.as<uint16_t>(), start, n, view.v_blocks, view.block_tokens));
      return chunk.kv->LayerDone(layer, start, n);
    };
    RETURN_IF_ERROR(s.RunSequence(chunk.tokens, start, before, after));
    if (chunk.logits == LogitsFor::kAll) RETURN_IF_ERROR(s.Logits(0, n, logits));
    if (chunk.logits == LogitsFor::kLast) RETURN_IF_ERROR(s.Logits(n - 1, 1, logits));
  }
  return absl::OkStatus();
}

absl::Status LlamaCuda::Prefill(absl::Span<const int32_t> tokens, const LayerKvSink& sink,
                                std::vector<float>* last_logits) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  RETURN_IF_ERROR(s.CheckTokens(tokens, 0));
  const int64_t n = static_cast<int64_t>(tokens.size());
  auto before = [](int64_t) { return absl::OkStatus(); };
  auto after = [&](int64_t layer) -> absl::Status {
    if (!sink) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
    return sink(DeviceLayerKv{layer, n, s.k_layer.as<uint16_t>(), s.v_layer.as<uint16_t>()});
  };
  RETURN_IF_ERROR(s.RunSequence(tokens, 0, before, after));
  if (last_logits != nullptr) {
    last_logits->clear();
    return s.Logits(n - 1, 1, last_logits);
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
  return absl::OkStatus();
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
  RETURN_IF_ERROR(s.k_spare.Reserve(s.Bf16Bytes(n * s.kv_width)));
  RETURN_IF_ERROR(s.v_spare.Reserve(s.Bf16Bytes(n * s.kv_width)));
  auto before = [&](int64_t layer) -> absl::Status {
    if (layer > 0) {
      std::swap(s.k_layer, s.k_spare);
      std::swap(s.v_layer, s.v_spare);
      std::swap(s.layer_copied, s.spare_copied);
    }
    // The copies out of this pair (two layers ago, or of the previous prompt) must be done
    // before the layer overwrites it.
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(s.stream, s.layer_copied, 0));
    return absl::OkStatus();
  };
  auto after = [&](int64_t layer) {
    return ExportLayerRows(layer, s.k_layer.as<uint16_t>(), s.v_layer.as<uint16_t>(), n, s.kv_width,
                           s.stream, s.copy_stream, s.layer_computed, s.layer_copied, exporter);
  };
  RETURN_IF_ERROR(s.RunSequence(tokens, 0, before, after));
  last_logits->clear();
  return s.Logits(n - 1, 1, last_logits);
}

std::unique_ptr<HostMemoryPinner> LlamaCuda::NewHostMemoryPinner() {
  return std::make_unique<CudaHostPinner>();
}

std::optional<DeviceMemoryStats> LlamaCuda::DeviceMemory() const {
  const State& s = *state_;
  DeviceMemoryStats stats;
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
    stats.used = static_cast<int64_t>(total_bytes - free_bytes);
  }
  stats.peak_used = std::max(stats.used, s.peak_device_used.load());
  stats.kv_pool = static_cast<int64_t>(s.k_pool.bytes() + s.v_pool.bytes());
  return stats;
}

void LlamaCuda::ResetDevicePeak() { state_->peak_device_used = 0; }

absl::Status LlamaCuda::ObservePrefill(absl::Span<const int32_t> tokens,
                                       const LayerQkvObserver& observer) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  if (!observer) return absl::InvalidArgumentError("ObservePrefill: no observer");
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
      RETURN_IF_ERROR(CopyRows(s.k_layer.as<uint16_t>(), w, nullptr, s.PoolK(layer), w,
                               s.slots.as<int32_t>(), n, w, s.stream));
      return CopyRows(s.v_layer.as<uint16_t>(), w, nullptr, s.PoolV(layer), w,
                      s.slots.as<int32_t>(), n, w, s.stream);
    };
    RETURN_IF_ERROR(s.RunSequence(prompt, 0, before, after));
    if (last_logits != nullptr) {
      last_logits->clear();
      RETURN_IF_ERROR(s.Logits(n - 1, 1, last_logits));
    }
    return CudaStatus(cudaStreamSynchronize(s.stream), "prefill");
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
  DeviceBuffer from;
  RETURN_IF_ERROR(s.UploadSlots(s.sequences[id], length, &from));
  RETURN_IF_ERROR(s.UploadSlots(s.sequences[fork], length, &s.slots));
  for (int64_t l = 0; l < s.config.num_hidden_layers; ++l) {
    const int64_t w = s.kv_width;
    RETURN_IF_ERROR(CopyRows(s.PoolK(l), w, from.as<int32_t>(), s.PoolK(l), w,
                             s.slots.as<int32_t>(), length, w, s.stream));
    RETURN_IF_ERROR(CopyRows(s.PoolV(l), w, from.as<int32_t>(), s.PoolV(l), w,
                             s.slots.as<int32_t>(), length, w, s.stream));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
  return fork;
}

// The model's decode attention shape for `batch` sequences over K/V extents of `extent`.
cuda::PagedDecodeArgs LlamaCuda::State::DecodeAttentionShape(int64_t batch, int64_t extent) const {
  cuda::PagedDecodeArgs shape;
  shape.num_seqs = batch;
  shape.max_seq_len = extent;
  shape.num_heads = config.num_attention_heads;
  shape.num_kv_heads = config.num_key_value_heads;
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
      decode_workspace.as<void>(), decode_meta.as<void>(), residual.as<void>(),
      normed.as<void>(),           qkv.as<void>(),         attn.as<void>(),
      gate_up.as<void>(),          act.as<void>(),         logits.as<void>()};
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
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(decode_meta.as<int32_t>(), meta,
                                       decode_host_meta.size() * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

// Enqueues a decode step of `batch` sequences over K/V extents of `extent` positions, from
// decode_meta to the logits in `logits`: the work a decode graph captures. Only launches.
absl::Status LlamaCuda::State::EnqueueDecode(int64_t batch, int64_t extent) {
  const ModelConfig& c = config;
  const int32_t* d_tokens = decode_meta.as<int32_t>();
  const int32_t* d_positions = d_tokens + batch;
  const int32_t* d_slots = d_tokens + 2 * batch;
  cuda::PagedDecodeArgs a = DecodeAttentionShape(batch, extent);
  a.q_stride = qkv_width;
  a.block_tables = d_tokens + 4 * batch;
  a.max_blocks_per_seq = extent / options.kv_block_tokens;
  a.seq_lens = d_tokens + 3 * batch;
  a.block_tokens = options.kv_block_tokens;
  a.workspace = decode_workspace.as<void>();
  a.out = attn.as<uint16_t>();
  a.out_stride = q_width;
  uint16_t* x = residual.as<uint16_t>();
  const LinearPath path = DecodePath(batch);
  RETURN_IF_ERROR(cuda::EmbeddingGather(d_tokens, batch, embed.as<uint16_t>(), c.vocab_size,
                                        c.hidden_size, x, stream));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    uint16_t* q = qkv.as<uint16_t>();
    RETURN_IF_ERROR(NormAndProjectQkv(layers[l], x, batch, q, path));
    RETURN_IF_ERROR(cuda::RopeAndStoreKv(q, qkv_width, c.num_attention_heads, c.num_key_value_heads,
                                         batch, c.head_dim, d_positions, inv_freq.as<float>(),
                                         d_slots, PoolK(l), PoolV(l), stream));
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
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(logits->data(), s.logits.as<float>(),
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
  RETURN_IF_ERROR(cuda::SampleTokens(s.logits.as<float>(), batch, vocab, params.data(),
                                     steps.data(), s.sample_workspace.as<void>(),
                                     s.sampled.as<int32_t>(), s.stream));
  next->resize(batch);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(next->data(), s.sampled.as<int32_t>(),
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
  s.SampleDeviceMemory();
  CudaMemoryStats stats;
  stats.weights = s.weight_bytes;
  stats.allocated = g_device_allocated.load();
  stats.peak_allocated = g_device_peak_allocated.load();
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
    stats.device_used = static_cast<int64_t>(total_bytes - free_bytes);
  }
  stats.peak_device_used = s.peak_device_used.load();
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
  g_device_peak_allocated = g_device_allocated.load();
  state_->peak_device_used = 0;
}

absl::Status LlamaCuda::Synchronize() {
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(state_->stream));
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
