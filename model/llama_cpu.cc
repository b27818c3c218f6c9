#include "model/llama_cpu.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/parallel.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "model/checkpoint/config.h"
#include "model/checkpoint/safetensors.h"
#include "model/llama_shapes.h"

namespace sparseaccel {

// All weights in fp32, HF layout: projections [out_features][in_features].
struct LlamaCpu::Weights {
  // One tensor-parallel shard of a layer (LlamaCpuOptions::tensor_parallel).
  struct Shard {
    std::vector<float> q, k, v;   // The shard's heads' rows: [rows][hidden].
    std::vector<float> o;         // Its heads' columns: [hidden][q rows].
    std::vector<float> gate, up;  // Its intermediate rows: [rows][hidden].
    std::vector<float> down;      // Its intermediate columns: [hidden][rows].
  };
  struct Layer {
    std::vector<float> input_norm, post_attention_norm;
    std::vector<Shard> shards;
  };
  // Shard `t` of a layer's projections, from the full HF tensors in `full`.
  static Shard ShardOf(const Shard& full, const ModelConfig& c, const TensorParallelShard& t);
  std::vector<float> embed;  // [vocab][hidden]
  std::vector<float> final_norm;
  std::vector<float> lm_head;  // Empty when tied to `embed`.
  std::vector<Layer> layers;
  std::vector<float> inv_freq;

  const float* LmHead() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
};

namespace {

absl::Status LoadTensor(const TensorStore& store, const std::string& name,
                        std::vector<int64_t> shape, std::vector<float>* out) {
  ASSIGN_OR_RETURN(const TensorView* view, store.FindWithShape(name, shape));
  out->resize(view->NumElements());
  return ConvertToF32(*view, absl::MakeSpan(*out));
}

// c[m][n] = a[m][k] . w[n][k]^T  (a row-major activation times an HF [out][in] weight).
void MatMulTransposedWeight(const float* a, int64_t m, int64_t k, const float* w, int64_t n,
                            float* c) {
  if (m == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, w, k, 0.0f, c, n);
}

// The residual connection: x[i] += delta[i].
void AddInPlace(const float* delta, int64_t count, float* x) {
#pragma omp parallel for schedule(static) if (count >= kMinParallelWork)
  for (int64_t i = 0; i < count; ++i) x[i] += delta[i];
}

// The in-process all-reduce of the shards' partial outputs, in shard order: the first partial
// is taken as it is (so one shard adds exactly what an unsharded layer adds), later ones added.
void AllReduceInto(int64_t shard, std::vector<float>* partial, std::vector<float>* sum) {
  if (shard == 0) {
    sum->swap(*partial);
    partial->resize(sum->size());
    return;
  }
  AddInPlace(partial->data(), static_cast<int64_t>(partial->size()), sum->data());
}

// Columns [first, first + count) of a row-major [rows][cols] matrix, as [rows][count]. A block
// of whole rows is the one-row case: ColumnSlice(m, 1, rows * cols, first_row * cols, ...).
std::vector<float> ColumnSlice(const std::vector<float>& m, int64_t rows, int64_t cols,
                               int64_t first, int64_t count) {
  std::vector<float> out(rows * count);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(&m[r * cols + first], count, &out[r * count]);
  }
  return out;
}

}  // namespace

LlamaCpu::Weights::Shard LlamaCpu::Weights::ShardOf(const Shard& full, const ModelConfig& c,
                                                    const TensorParallelShard& t) {
  const int64_t hidden = c.hidden_size, d = c.head_dim;
  const int64_t q_rows = t.heads * d, kv_rows = t.kv_heads * d;
  const auto rows = [&](const std::vector<float>& m, int64_t count) {
    return ColumnSlice(m, 1, static_cast<int64_t>(m.size()), t.rank * count * hidden,
                       count * hidden);
  };
  Shard shard;
  shard.q = rows(full.q, q_rows);
  shard.k = rows(full.k, kv_rows);
  shard.v = rows(full.v, kv_rows);
  shard.gate = rows(full.gate, t.intermediate);
  shard.up = rows(full.up, t.intermediate);
  shard.o = ColumnSlice(full.o, hidden, q_rows * t.count, t.first_head() * d, q_rows);
  shard.down =
      ColumnSlice(full.down, hidden, c.intermediate_size, t.first_intermediate(), t.intermediate);
  return shard;
}

LlamaCpu::LlamaCpu() = default;
LlamaCpu::~LlamaCpu() = default;

absl::StatusOr<std::unique_ptr<LlamaCpu>> LlamaCpu::Load(const std::string& model_dir,
                                                         const LlamaCpuOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  const int64_t n = options.tensor_parallel;
  // Every shard has the same shape; shard 0 checks that `n` divides the model.
  RETURN_IF_ERROR(ShardOfModel(config, 0, n).status());
  ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::OpenDirectory(model_dir));
  auto model = std::unique_ptr<LlamaCpu>(new LlamaCpu());
  model->config_ = config;
  model->shards_ = n;
  model->weights_ = std::make_unique<Weights>();
  Weights& w = *model->weights_;
  const ModelConfig& c = config;
  const int64_t q_rows = c.num_attention_heads * c.head_dim;
  const int64_t kv_rows = c.num_key_value_heads * c.head_dim;
  RETURN_IF_ERROR(
      LoadTensor(*store, "model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, &w.embed));
  RETURN_IF_ERROR(LoadTensor(*store, "model.norm.weight", {c.hidden_size}, &w.final_norm));
  if (!c.tie_word_embeddings) {
    RETURN_IF_ERROR(
        LoadTensor(*store, "lm_head.weight", {c.vocab_size, c.hidden_size}, &w.lm_head));
  }
  w.layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    Weights::Layer& l = w.layers[i];
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "input_layernorm.weight", {c.hidden_size}, &l.input_norm));
    RETURN_IF_ERROR(LoadTensor(*store, p + "post_attention_layernorm.weight", {c.hidden_size},
                               &l.post_attention_norm));
    Weights::Shard full;
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.q_proj.weight", {q_rows, c.hidden_size}, &full.q));
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.k_proj.weight", {kv_rows, c.hidden_size}, &full.k));
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.v_proj.weight", {kv_rows, c.hidden_size}, &full.v));
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.o_proj.weight", {c.hidden_size, q_rows}, &full.o));
    RETURN_IF_ERROR(LoadTensor(*store, p + "mlp.gate_proj.weight",
                               {c.intermediate_size, c.hidden_size}, &full.gate));
    RETURN_IF_ERROR(LoadTensor(*store, p + "mlp.up_proj.weight",
                               {c.intermediate_size, c.hidden_size}, &full.up));
    RETURN_IF_ERROR(LoadTensor(*store, p + "mlp.down_proj.weight",
                               {c.hidden_size, c.intermediate_size}, &full.down));
    if (n == 1) {
      l.shards.push_back(std::move(full));
    } else {
      for (int64_t r = 0; r < n; ++r) {
        ASSIGN_OR_RETURN(const TensorParallelShard shard, ShardOfModel(c, r, n));
        l.shards.push_back(Weights::ShardOf(full, c, shard));
      }
    }
  }
  w.inv_freq = RopeInverseFrequenciesOf(c);
  return model;
}

const ModelConfig& LlamaCpu::config() const { return config_; }

KvShape LlamaCpu::kv_shape() const {
  return KvShape{config_.num_hidden_layers, config_.num_key_value_heads, config_.head_dim};
}

void LlamaCpu::SetAttentionOverride(AttentionOverride* attention) { attention_ = attention; }

// x += sum over shards of attention(RmsNorm(x)) . Wo_shard^T. Each shard writes its KV heads'
// slice of the cache rows and attends over it; LayerDone once every shard has written.
absl::Status LlamaCpu::AttentionBlock(int64_t layer, absl::Span<const SequenceChunk> batch,
                                      const std::vector<int64_t>& positions,
                                      std::vector<float>* x) {
  const ModelConfig& c = config_;
  const Weights::Layer& l = weights_->layers[layer];
  const int64_t rows = static_cast<int64_t>(positions.size()), hidden = c.hidden_size;
  const int64_t d = c.head_dim, heads = c.num_attention_heads / shards_;
  const int64_t kv_heads = c.num_key_value_heads / shards_;
  const int64_t q_size = heads * d, kv_size = kv_heads * d;
  const AttentionShape shape{heads, kv_heads, d};
  std::vector<float> h(rows * hidden), partial(rows * hidden), sum;
  std::vector<float> q(rows * q_size), k(rows * kv_size), v(rows * kv_size), attn(rows * q_size);
  RmsNormCpu(x->data(), l.input_norm.data(), rows, hidden, c.rms_norm_eps, h.data());
  for (int64_t s = 0; s < shards_; ++s) {
    const Weights::Shard& w = l.shards[s];
    MatMulTransposedWeight(h.data(), rows, hidden, w.q.data(), q_size, q.data());
    MatMulTransposedWeight(h.data(), rows, hidden, w.k.data(), kv_size, k.data());
    MatMulTransposedWeight(h.data(), rows, hidden, w.v.data(), kv_size, v.data());
    ApplyRopeCpu(q.data(), rows, heads, d, positions.data(), weights_->inv_freq.data());
    ApplyRopeCpu(k.data(), rows, kv_heads, d, positions.data(), weights_->inv_freq.data());
    int64_t first_row = 0;
    for (const SequenceChunk& chunk : batch) {
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      ASSIGN_OR_RETURN(const KvLayerView layer_view, chunk.kv->Layer(layer, chunk.start_pos + n));
      const KvLayerView view = KvHeadsView(layer_view, s * kv_heads, d);
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(view.KRow(chunk.start_pos + i), &k[(first_row + i) * kv_size],
                    kv_size * sizeof(float));
        std::memcpy(view.VRow(chunk.start_pos + i), &v[(first_row + i) * kv_size],
                    kv_size * sizeof(float));
      }
      const float* chunk_q = &q[first_row * q_size];
      float* chunk_out = &attn[first_row * q_size];
      bool handled = false;
      if (attention_ != nullptr) {
        ASSIGN_OR_RETURN(handled, attention_->Attend(layer, chunk_q, n, chunk.start_pos, shape,
                                                     view, chunk_out));
      }
      if (!handled) CausalAttentionCpu(chunk_q, n, chunk.start_pos, shape, view, chunk_out);
      first_row += n;
    }
    MatMulTransposedWeight(attn.data(), rows, q_size, w.o.data(), hidden, partial.data());
    AllReduceInto(s, &partial, &sum);
  }
  for (const SequenceChunk& chunk : batch) {
    RETURN_IF_ERROR(
        chunk.kv->LayerDone(layer, chunk.start_pos, static_cast<int64_t>(chunk.tokens.size())));
  }
  AddInPlace(sum.data(), rows * hidden, x->data());
  return absl::OkStatus();
}

// x += sum over shards of SwiGLU(RmsNorm(x) . Wgate^T, . Wup^T) . Wdown_shard^T.
void LlamaCpu::MlpBlock(int64_t layer, std::vector<float>* x) {
  const ModelConfig& c = config_;
  const Weights::Layer& l = weights_->layers[layer];
  const int64_t hidden = c.hidden_size, rows = static_cast<int64_t>(x->size()) / hidden;
  const int64_t inter = c.intermediate_size / shards_;
  std::vector<float> h(rows * hidden), partial(rows * hidden), sum;
  std::vector<float> gate(rows * inter), up(rows * inter);
  RmsNormCpu(x->data(), l.post_attention_norm.data(), rows, hidden, c.rms_norm_eps, h.data());
  for (int64_t s = 0; s < shards_; ++s) {
    const Weights::Shard& w = l.shards[s];
    MatMulTransposedWeight(h.data(), rows, hidden, w.gate.data(), inter, gate.data());
    MatMulTransposedWeight(h.data(), rows, hidden, w.up.data(), inter, up.data());
    SwiGluCpu(gate.data(), up.data(), rows * inter, gate.data());
    MatMulTransposedWeight(gate.data(), rows, inter, w.down.data(), hidden, partial.data());
    AllReduceInto(s, &partial, &sum);
  }
  AddInPlace(sum.data(), rows * hidden, x->data());
}

absl::Status LlamaCpu::Forward(absl::Span<const SequenceChunk> batch, std::vector<float>* logits) {
  const ModelConfig& c = config_;
  const Weights& w = *weights_;
  // Validate everything before touching any KV store.
  int64_t rows = 0;
  for (const SequenceChunk& chunk : batch) {
    if (chunk.kv == nullptr) return absl::InvalidArgumentError("chunk without a KV store");
    if (chunk.start_pos < 0 ||
        chunk.start_pos + static_cast<int64_t>(chunk.tokens.size()) > c.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("positions ", chunk.start_pos, "..",
                       chunk.start_pos + static_cast<int64_t>(chunk.tokens.size()),
                       " exceed max_position_embeddings ", c.max_position_embeddings));
    }
    RETURN_IF_ERROR(CheckTokenIds(chunk.tokens, c.vocab_size));
    rows += static_cast<int64_t>(chunk.tokens.size());
  }
  if (attention_ != nullptr && shards_ > 1) {
    return absl::FailedPreconditionError("an attention override needs tensor_parallel 1");
  }
  const int64_t hidden = c.hidden_size;
  std::vector<float> x(rows * hidden);
  std::vector<int64_t> positions(rows);
  {
    int64_t r = 0;
    for (const SequenceChunk& chunk : batch) {
      for (size_t i = 0; i < chunk.tokens.size(); ++i, ++r) {
        positions[r] = chunk.start_pos + static_cast<int64_t>(i);
        std::memcpy(&x[r * hidden], &w.embed[chunk.tokens[i] * hidden], hidden * sizeof(float));
      }
    }
  }
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    RETURN_IF_ERROR(AttentionBlock(layer, batch, positions, &x));
    MlpBlock(layer, &x);
  }
  // Final norm and LM head only for the rows that need logits.
  std::vector<int64_t> logit_rows;
  {
    int64_t r = 0;
    for (const SequenceChunk& chunk : batch) {
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      if (chunk.logits == LogitsFor::kAll) {
        for (int64_t i = 0; i < n; ++i) logit_rows.push_back(r + i);
      } else if (chunk.logits == LogitsFor::kLast && n > 0) {
        logit_rows.push_back(r + n - 1);
      }
      r += n;
    }
  }
  const int64_t out_rows = static_cast<int64_t>(logit_rows.size());
  std::vector<float> selected(out_rows * hidden);
  for (int64_t i = 0; i < out_rows; ++i) {
    std::memcpy(&selected[i * hidden], &x[logit_rows[i] * hidden], hidden * sizeof(float));
  }
  RmsNormCpu(selected.data(), w.final_norm.data(), out_rows, hidden, c.rms_norm_eps,
             selected.data());
  const size_t base = logits->size();
  logits->resize(base + out_rows * c.vocab_size);
  MatMulTransposedWeight(selected.data(), out_rows, hidden, w.LmHead(), c.vocab_size,
                         logits->data() + base);
  return absl::OkStatus();
}

}  // namespace sparseaccel
