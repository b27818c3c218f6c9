#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "kernels/rope.h"
#include "model/cuda/cuda_util.cuh"
#include "model/cuda/engine_kernels.cuh"
#include "model/cuda/gemm.cuh"
#include "model/llama_cuda.h"
#include "model/safetensors.h"

namespace sparseaccel {
namespace {

// Rows of logits computed per LM-head GEMM when every position needs them.
constexpr int64_t kLogitsRowsPerGemm = 256;

uint16_t F32ToBf16Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN.
  bits += 0x7fffu + ((bits >> 16) & 1u);                  // Round to nearest even.
  return static_cast<uint16_t>(bits >> 16);
}

// Copies tensor `name` (checked against `shape`) to `dst` as bf16.
absl::Status UploadTensor(const TensorStore& store, const std::string& name,
                          std::vector<int64_t> shape, bf16* dst) {
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
  int64_t peak_device_used = 0;

  DeviceBuffer embed, lm_head, final_norm, inv_freq;
  std::vector<LayerWeights> layers;

  // Scratch, grown on demand and kept.
  DeviceBuffer ids;               // int32 [rows]
  DeviceBuffer residual;          // bf16 [rows][hidden]
  DeviceBuffer normed;            // bf16 [chunk][hidden]
  DeviceBuffer qkv;               // bf16 [chunk][qkv_width]
  DeviceBuffer attn;              // bf16 [chunk][q_width]
  DeviceBuffer gate_up;           // bf16 [chunk][2 * intermediate]
  DeviceBuffer act;               // bf16 [chunk][intermediate]
  DeviceBuffer k_layer, v_layer;  // bf16 [tokens][kv_width]: one layer's K/V.
  DeviceBuffer kv_f32;            // fp32 staging for host KvStores.
  DeviceBuffer logits;            // fp32 [rows][vocab]
  DeviceBuffer slots;             // int32 pool rows of a prefill.
  DeviceBuffer decode_meta;  // int32 per DecodeStep: tokens, positions, slots, lengths, tables.
  DeviceBuffer partials;

  // Paged pool: [layer][block * block_tokens + i][kv_width] for K and for V.
  DeviceBuffer k_pool, v_pool;
  int64_t pool_blocks = 0;
  std::vector<int32_t> free_blocks;
  std::map<int64_t, DeviceSequence> sequences;
  int64_t next_sequence_id = 1;

  ~State() {
    if (stream) cudaStreamDestroy(stream);
  }

  size_t Bf16Bytes(int64_t n) const { return static_cast<size_t>(n) * sizeof(bf16); }
  bf16* PoolK(int64_t layer) const {
    return k_pool.as<bf16>() + layer * pool_blocks * options.kv_block_tokens * kv_width;
  }
  bf16* PoolV(int64_t layer) const {
    return v_pool.as<bf16>() + layer * pool_blocks * options.kv_block_tokens * kv_width;
  }

  void SampleDeviceMemory() {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      peak_device_used =
          std::max<int64_t>(peak_device_used, static_cast<int64_t>(total_bytes - free_bytes));
    }
  }

  absl::Status Linear(const bf16* x, const DeviceBuffer& w, void* out, int64_t m, int64_t n,
                      int64_t k, bool accumulate) {
    return gemm->Linear(x, w.as<bf16>(), out, CUDA_R_16BF, m, n, k, accumulate, stream);
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

  // Final norm and LM head for `rows` consecutive rows of the residual stream from `first_row`;
  // appends fp32 logits to `out`.
  absl::Status Logits(int64_t first_row, int64_t rows, std::vector<float>* out) {
    const ModelConfig& c = config;
    const int64_t per_gemm = std::min(rows, kLogitsRowsPerGemm);
    RETURN_IF_ERROR(logits.Reserve(static_cast<size_t>(per_gemm * c.vocab_size) * 4));
    RETURN_IF_ERROR(normed.Reserve(Bf16Bytes(per_gemm * c.hidden_size)));
    for (int64_t r0 = 0; r0 < rows; r0 += per_gemm) {
      const int64_t m = std::min(per_gemm, rows - r0);
      RETURN_IF_ERROR(RmsNorm(residual.as<bf16>() + (first_row + r0) * c.hidden_size, m,
                              c.hidden_size, final_norm.as<bf16>(),
                              static_cast<float>(c.rms_norm_eps), normed.as<bf16>(), stream));
      const DeviceBuffer& head = c.tie_word_embeddings ? embed : lm_head;
      RETURN_IF_ERROR(gemm->Linear(normed.as<bf16>(), head.as<bf16>(), logits.as<float>(),
                                   CUDA_R_32F, m, c.vocab_size, c.hidden_size, false, stream));
      const size_t old_size = out->size();
      out->resize(old_size + m * c.vocab_size);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->data() + old_size, logits.as<float>(),
                                           m * c.vocab_size * sizeof(float), cudaMemcpyDeviceToHost,
                                           stream));
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }

  // All layers for tokens at positions [start, start + n) of one sequence. Each layer's K/V
  // lives in k_layer/v_layer rows [0, start + n): `before_layer` fills rows [0, start),
  // `after_layer` takes the new rows. Leaves the final residual stream in `residual`.
  absl::Status RunSequence(absl::Span<const int32_t> tokens, int64_t start,
                           const std::function<absl::Status(int64_t)>& before_layer,
                           const std::function<absl::Status(int64_t)>& after_layer) {
    const ModelConfig& c = config;
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t total = start + n;
    const int64_t chunk = std::min(n, options.prefill_chunk_tokens);
    const float eps = static_cast<float>(c.rms_norm_eps);
    RETURN_IF_ERROR(ids.Reserve(n * sizeof(int32_t)));
    RETURN_IF_ERROR(residual.Reserve(Bf16Bytes(n * c.hidden_size)));
    RETURN_IF_ERROR(k_layer.Reserve(Bf16Bytes(total * kv_width)));
    RETURN_IF_ERROR(v_layer.Reserve(Bf16Bytes(total * kv_width)));
    RETURN_IF_ERROR(ReserveChunk(chunk));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids.as<int32_t>(), tokens.data(), n * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, stream));
    RETURN_IF_ERROR(EmbeddingGather(ids.as<int32_t>(), n, embed.as<bf16>(), c.hidden_size,
                                    residual.as<bf16>(), stream));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const LayerWeights& w = layers[l];
      RETURN_IF_ERROR(before_layer(l));
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t m = std::min(chunk, n - c0);
        bf16* x = residual.as<bf16>() + c0 * c.hidden_size;
        RETURN_IF_ERROR(
            RmsNorm(x, m, c.hidden_size, w.input_norm.as<bf16>(), eps, normed.as<bf16>(), stream));
        RETURN_IF_ERROR(
            Linear(normed.as<bf16>(), w.qkv, qkv.as<bf16>(), m, qkv_width, c.hidden_size, false));
        RopeStoreArgs rope;
        rope.qkv = qkv.as<bf16>();
        rope.n = m;
        rope.qkv_stride = qkv_width;
        rope.num_heads = c.num_attention_heads;
        rope.num_kv_heads = c.num_key_value_heads;
        rope.head_dim = c.head_dim;
        rope.inv_freq = inv_freq.as<float>();
        rope.first_pos = start + c0;
        rope.first_slot = start + c0;
        rope.k_dst = k_layer.as<bf16>();
        rope.v_dst = v_layer.as<bf16>();
        RETURN_IF_ERROR(RopeAndStoreKv(rope, stream));
        PrefillAttentionArgs attention;
        attention.q = qkv.as<bf16>();
        attention.q_stride = qkv_width;
        attention.nq = m;
        attention.q_start = start + c0;
        attention.k = k_layer.as<bf16>();
        attention.v = v_layer.as<bf16>();
        attention.num_heads = c.num_attention_heads;
        attention.num_kv_heads = c.num_key_value_heads;
        attention.head_dim = c.head_dim;
        attention.out = attn.as<bf16>();
        RETURN_IF_ERROR(PrefillAttention(attention, stream));
        RETURN_IF_ERROR(Linear(attn.as<bf16>(), w.o, x, m, c.hidden_size, q_width, true));
        RETURN_IF_ERROR(
            RmsNorm(x, m, c.hidden_size, w.post_norm.as<bf16>(), eps, normed.as<bf16>(), stream));
        RETURN_IF_ERROR(Linear(normed.as<bf16>(), w.gate_up, gate_up.as<bf16>(), m,
                               2 * c.intermediate_size, c.hidden_size, false));
        RETURN_IF_ERROR(SwiGlu(gate_up.as<bf16>(), m, c.intermediate_size, act.as<bf16>(), stream));
        RETURN_IF_ERROR(
            Linear(act.as<bf16>(), w.down, x, m, c.hidden_size, c.intermediate_size, true));
      }
      RETURN_IF_ERROR(after_layer(l));
      SampleDeviceMemory();
    }
    return absl::OkStatus();
  }

  absl::Status CheckTokens(absl::Span<const int32_t> tokens, int64_t start) const {
    for (int32_t t : tokens) {
      if (t < 0 || t >= config.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " out of range [0, ", config.vocab_size, ")"));
      }
    }
    if (start < 0 || start + static_cast<int64_t>(tokens.size()) > config.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("positions [", start, ", ", start + tokens.size(),
                       ") beyond max_position_embeddings ", config.max_position_embeddings));
    }
    return absl::OkStatus();
  }

  // Copies K or V rows [first, first + count) between a host KvLayerView and the device
  // buffer `layer_buffer` (bf16, contiguous), through fp32 staging.
  absl::Status HostRowsToDevice(const std::vector<float*>& blocks, int64_t block_tokens,
                                int64_t first, int64_t count, bf16* layer_buffer) {
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
    return F32ToBf16(kv_f32.as<float>(), count * kv_width, layer_buffer + first * kv_width, stream);
  }

  absl::Status DeviceRowsToHost(const bf16* layer_buffer, int64_t first, int64_t count,
                                const std::vector<float*>& blocks, int64_t block_tokens) {
    if (count == 0) return absl::OkStatus();
    RETURN_IF_ERROR(kv_f32.Reserve(static_cast<size_t>(count * kv_width) * sizeof(float)));
    RETURN_IF_ERROR(
        Bf16ToF32(layer_buffer + first * kv_width, count * kv_width, kv_f32.as<float>(), stream));
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
      options.kv_pool_tokens < 0 || options.max_decode_batch <= 0) {
    return absl::InvalidArgumentError("LlamaCudaOptions: sizes must be positive");
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
  ASSIGN_OR_RETURN(s.gemm, LtGemm::Create());

  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  auto alloc_upload = [&](DeviceBuffer* buffer, const std::string& name,
                          std::vector<int64_t> shape) -> absl::Status {
    int64_t elements = 1;
    for (int64_t d : shape) elements *= d;
    RETURN_IF_ERROR(buffer->Reserve(s.Bf16Bytes(elements)));
    s.weight_bytes += s.Bf16Bytes(elements);
    return UploadTensor(*store, name, shape, buffer->as<bf16>());
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
    bf16* qkv = w.qkv.as<bf16>();
    RETURN_IF_ERROR(UploadTensor(*store, p + "self_attn.q_proj.weight", {s.q_width, h}, qkv));
    RETURN_IF_ERROR(
        UploadTensor(*store, p + "self_attn.k_proj.weight", {s.kv_width, h}, qkv + s.q_width * h));
    RETURN_IF_ERROR(UploadTensor(*store, p + "self_attn.v_proj.weight", {s.kv_width, h},
                                 qkv + (s.q_width + s.kv_width) * h));
    RETURN_IF_ERROR(alloc_upload(&w.o, p + "self_attn.o_proj.weight", {h, s.q_width}));
    RETURN_IF_ERROR(
        UploadTensor(*store, p + "mlp.gate_proj.weight", {inter, h}, w.gate_up.as<bf16>()));
    RETURN_IF_ERROR(UploadTensor(*store, p + "mlp.up_proj.weight", {inter, h},
                                 w.gate_up.as<bf16>() + inter * h));
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
          s.HostRowsToDevice(view.k_blocks, view.block_tokens, 0, start, s.k_layer.as<bf16>()));
      return s.HostRowsToDevice(view.v_blocks, view.block_tokens, 0, start, s.v_layer.as<bf16>());
    };
    auto after = [&](int64_t layer) -> absl::Status {
      RETURN_IF_ERROR(
          s.DeviceRowsToHost(s.k_layer.as<bf16>(), start, n, view.k_blocks, view.block_tokens));
      RETURN_IF_ERROR(
          s.DeviceRowsToHost(s.v_layer.as<bf16>(), start, n, view.v_blocks, view.block_tokens));
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
    return sink(DeviceLayerKv{layer, n, s.k_layer.as<bf16>(), s.v_layer.as<bf16>()});
  };
  RETURN_IF_ERROR(s.RunSequence(tokens, 0, before, after));
  if (last_logits != nullptr) {
    last_logits->clear();
    return s.Logits(n - 1, 1, last_logits);
  }
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
      RETURN_IF_ERROR(CopyRows(s.k_layer.as<bf16>(), nullptr, s.PoolK(layer), s.slots.as<int32_t>(),
                               n, s.kv_width, s.stream));
      return CopyRows(s.v_layer.as<bf16>(), nullptr, s.PoolV(layer), s.slots.as<int32_t>(), n,
                      s.kv_width, s.stream);
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
    RETURN_IF_ERROR(CopyRows(s.PoolK(l), from.as<int32_t>(), s.PoolK(l), s.slots.as<int32_t>(),
                             length, s.kv_width, s.stream));
    RETURN_IF_ERROR(CopyRows(s.PoolV(l), from.as<int32_t>(), s.PoolV(l), s.slots.as<int32_t>(),
                             length, s.kv_width, s.stream));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s.stream));
  return fork;
}

absl::Status LlamaCuda::DecodeStep(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens,
                                   std::vector<float>* logits) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  const ModelConfig& c = s.config;
  const int64_t batch = static_cast<int64_t>(ids.size());
  if (batch == 0 || static_cast<int64_t>(tokens.size()) != batch) {
    return absl::InvalidArgumentError("DecodeStep needs one token per sequence");
  }
  if (batch > s.options.max_decode_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch ", batch, " above max_decode_batch ", s.options.max_decode_batch));
  }
  std::set<int64_t> distinct(ids.begin(), ids.end());
  if (static_cast<int64_t>(distinct.size()) != batch) {
    return absl::InvalidArgumentError("a sequence appears twice in one DecodeStep");
  }
  const int64_t bt = s.options.kv_block_tokens;
  int64_t blocks_needed = 0, table_stride = 1, max_length = 0;
  for (int64_t i = 0; i < batch; ++i) {
    auto it = s.sequences.find(ids[i]);
    if (it == s.sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", ids[i]));
    RETURN_IF_ERROR(s.CheckTokens(tokens.subspan(i, 1), it->second.length));
    const int64_t new_length = it->second.length + 1;
    blocks_needed += (new_length + bt - 1) / bt - static_cast<int64_t>(it->second.blocks.size());
    table_stride = std::max(table_stride, (new_length + bt - 1) / bt);
    max_length = std::max(max_length, new_length);
  }
  if (blocks_needed > static_cast<int64_t>(s.free_blocks.size())) {
    return absl::ResourceExhaustedError("device KV pool full");
  }
  // Host layout of decode_meta: tokens, positions, slots, lengths [batch] each, then tables.
  std::vector<int32_t> meta(4 * batch + batch * table_stride, 0);
  for (int64_t i = 0; i < batch; ++i) {
    DeviceSequence& seq = s.sequences[ids[i]];
    const int64_t pos = seq.length;
    if (pos / bt == static_cast<int64_t>(seq.blocks.size())) {
      seq.blocks.push_back(s.free_blocks.back());
      s.free_blocks.pop_back();
    }
    meta[i] = tokens[i];
    meta[batch + i] = static_cast<int32_t>(pos);
    meta[2 * batch + i] = static_cast<int32_t>(seq.blocks[pos / bt] * bt + pos % bt);
    meta[3 * batch + i] = static_cast<int32_t>(pos + 1);
    std::copy(seq.blocks.begin(), seq.blocks.end(), meta.begin() + 4 * batch + i * table_stride);
  }
  RETURN_IF_ERROR(s.decode_meta.Reserve(meta.size() * sizeof(int32_t)));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s.decode_meta.as<int32_t>(), meta.data(),
                                       meta.size() * sizeof(int32_t), cudaMemcpyHostToDevice,
                                       s.stream));
  const int32_t* d_tokens = s.decode_meta.as<int32_t>();
  const int32_t* d_positions = d_tokens + batch;
  const int32_t* d_slots = d_tokens + 2 * batch;
  const int32_t* d_lengths = d_tokens + 3 * batch;
  const int32_t* d_tables = d_tokens + 4 * batch;
  RETURN_IF_ERROR(s.residual.Reserve(s.Bf16Bytes(batch * c.hidden_size)));
  RETURN_IF_ERROR(s.ReserveChunk(batch));
  RETURN_IF_ERROR(s.partials.Reserve(
      DecodeAttentionPartialsBytes(batch, c.num_attention_heads, c.head_dim, max_length)));
  const float eps = static_cast<float>(c.rms_norm_eps);
  bf16* x = s.residual.as<bf16>();
  RETURN_IF_ERROR(EmbeddingGather(d_tokens, batch, s.embed.as<bf16>(), c.hidden_size, x, s.stream));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& w = s.layers[l];
    RETURN_IF_ERROR(RmsNorm(x, batch, c.hidden_size, w.input_norm.as<bf16>(), eps,
                            s.normed.as<bf16>(), s.stream));
    RETURN_IF_ERROR(s.Linear(s.normed.as<bf16>(), w.qkv, s.qkv.as<bf16>(), batch, s.qkv_width,
                             c.hidden_size, false));
    RopeStoreArgs rope;
    rope.qkv = s.qkv.as<bf16>();
    rope.n = batch;
    rope.qkv_stride = s.qkv_width;
    rope.num_heads = c.num_attention_heads;
    rope.num_kv_heads = c.num_key_value_heads;
    rope.head_dim = c.head_dim;
    rope.inv_freq = s.inv_freq.as<float>();
    rope.positions = d_positions;
    rope.slots = d_slots;
    rope.k_dst = s.PoolK(l);
    rope.v_dst = s.PoolV(l);
    RETURN_IF_ERROR(RopeAndStoreKv(rope, s.stream));
    DecodeAttentionArgs attention;
    attention.q = s.qkv.as<bf16>();
    attention.q_stride = s.qkv_width;
    attention.num_seqs = batch;
    attention.k_pool = s.PoolK(l);
    attention.v_pool = s.PoolV(l);
    attention.block_tables = d_tables;
    attention.table_stride = table_stride;
    attention.lengths = d_lengths;
    attention.max_length = max_length;
    attention.block_tokens = bt;
    attention.num_heads = c.num_attention_heads;
    attention.num_kv_heads = c.num_key_value_heads;
    attention.head_dim = c.head_dim;
    attention.partials = s.partials.as<float>();
    attention.out = s.attn.as<bf16>();
    RETURN_IF_ERROR(DecodeAttention(attention, s.stream));
    RETURN_IF_ERROR(s.Linear(s.attn.as<bf16>(), w.o, x, batch, c.hidden_size, s.q_width, true));
    RETURN_IF_ERROR(RmsNorm(x, batch, c.hidden_size, w.post_norm.as<bf16>(), eps,
                            s.normed.as<bf16>(), s.stream));
    RETURN_IF_ERROR(s.Linear(s.normed.as<bf16>(), w.gate_up, s.gate_up.as<bf16>(), batch,
                             2 * c.intermediate_size, c.hidden_size, false));
    RETURN_IF_ERROR(
        SwiGlu(s.gate_up.as<bf16>(), batch, c.intermediate_size, s.act.as<bf16>(), s.stream));
    RETURN_IF_ERROR(
        s.Linear(s.act.as<bf16>(), w.down, x, batch, c.hidden_size, c.intermediate_size, true));
  }
  for (int64_t id : ids) ++s.sequences[id].length;
  logits->clear();
  return s.Logits(0, batch, logits);
}

absl::Status LlamaCuda::EndSequence(int64_t id) {
  State& s = *state_;
  absl::MutexLock lock(&s.mu);
  auto it = s.sequences.find(id);
  if (it == s.sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
  s.free_blocks.insert(s.free_blocks.end(), it->second.blocks.begin(), it->second.blocks.end());
  s.sequences.erase(it);
  return absl::OkStatus();
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
  stats.peak_device_used = s.peak_device_used;
  return stats;
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

}  // namespace sparseaccel
