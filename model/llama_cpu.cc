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
#include "model/safetensors.h"

namespace sparseaccel {

// All weights in fp32, HF layout: projections [out_features][in_features].
struct LlamaCpu::Weights {
  struct Layer {
    std::vector<float> input_norm, post_attention_norm;
    std::vector<float> q, k, v, o;  // [rows][hidden] (o: [hidden][q rows])
    std::vector<float> gate, up, down;
  };
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

}  // namespace

LlamaCpu::LlamaCpu() = default;
LlamaCpu::~LlamaCpu() = default;

absl::StatusOr<std::unique_ptr<LlamaCpu>> LlamaCpu::Load(const std::string& model_dir) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::OpenDirectory(model_dir));
  auto model = std::unique_ptr<LlamaCpu>(new LlamaCpu());
  model->config_ = config;
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
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.q_proj.weight", {q_rows, c.hidden_size}, &l.q));
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.k_proj.weight", {kv_rows, c.hidden_size}, &l.k));
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.v_proj.weight", {kv_rows, c.hidden_size}, &l.v));
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "self_attn.o_proj.weight", {c.hidden_size, q_rows}, &l.o));
    RETURN_IF_ERROR(LoadTensor(*store, p + "mlp.gate_proj.weight",
                               {c.intermediate_size, c.hidden_size}, &l.gate));
    RETURN_IF_ERROR(
        LoadTensor(*store, p + "mlp.up_proj.weight", {c.intermediate_size, c.hidden_size}, &l.up));
    RETURN_IF_ERROR(LoadTensor(*store, p + "mlp.down_proj.weight",
                               {c.hidden_size, c.intermediate_size}, &l.down));
  }
  Llama3RopeScaling scaling;
  scaling.enabled = c.rope_scaling.type == RopeScaling::Type::kLlama3;
  scaling.factor = c.rope_scaling.factor;
  scaling.low_freq_factor = c.rope_scaling.low_freq_factor;
  scaling.high_freq_factor = c.rope_scaling.high_freq_factor;
  scaling.original_max_positions =
      static_cast<double>(c.rope_scaling.original_max_position_embeddings);
  w.inv_freq = RopeInverseFrequencies(c.head_dim, c.rope_theta, scaling);
  return model;
}

const ModelConfig& LlamaCpu::config() const { return config_; }

KvShape LlamaCpu::kv_shape() const {
  return KvShape{config_.num_hidden_layers, config_.num_key_value_heads, config_.head_dim};
}

void LlamaCpu::SetAttentionOverride(AttentionOverride* attention) { attention_ = attention; }

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
    for (int32_t token : chunk.tokens) {
      if (token < 0 || token >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", token, " outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    rows += static_cast<int64_t>(chunk.tokens.size());
  }
  const int64_t hidden = c.hidden_size, d = c.head_dim;
  const int64_t q_size = c.num_attention_heads * d, kv_size = c.num_key_value_heads * d;
  const AttentionShape attention_shape{c.num_attention_heads, c.num_key_value_heads, d};

  std::vector<float> x(rows * hidden), h(rows * hidden);
  std::vector<float> q(rows * q_size), k(rows * kv_size), v(rows * kv_size), attn(rows * q_size);
  std::vector<float> gate(rows * c.intermediate_size), up(rows * c.intermediate_size);
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
    const Weights::Layer& l = w.layers[layer];
    RmsNormCpu(x.data(), l.input_norm.data(), rows, hidden, c.rms_norm_eps, h.data());
    MatMulTransposedWeight(h.data(), rows, hidden, l.q.data(), q_size, q.data());
    MatMulTransposedWeight(h.data(), rows, hidden, l.k.data(), kv_size, k.data());
    MatMulTransposedWeight(h.data(), rows, hidden, l.v.data(), kv_size, v.data());
    ApplyRopeCpu(q.data(), rows, c.num_attention_heads, d, positions.data(), w.inv_freq.data());
    ApplyRopeCpu(k.data(), rows, c.num_key_value_heads, d, positions.data(), w.inv_freq.data());
    int64_t first_row = 0;
    for (const SequenceChunk& chunk : batch) {
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      ASSIGN_OR_RETURN(KvLayerView view, chunk.kv->Layer(layer, chunk.start_pos + n));
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
        ASSIGN_OR_RETURN(handled, attention_->Attend(layer, chunk_q, n, chunk.start_pos,
                                                     attention_shape, view, chunk_out));
      }
      if (!handled) {
        CausalAttentionCpu(chunk_q, n, chunk.start_pos, attention_shape, view, chunk_out);
      }
      RETURN_IF_ERROR(chunk.kv->LayerDone(layer, chunk.start_pos, n));
      first_row += n;
    }
    // x += attn . Wo^T
    MatMulTransposedWeight(attn.data(), rows, q_size, l.o.data(), hidden, h.data());
    AddInPlace(h.data(), rows * hidden, x.data());
    RmsNormCpu(x.data(), l.post_attention_norm.data(), rows, hidden, c.rms_norm_eps, h.data());
    MatMulTransposedWeight(h.data(), rows, hidden, l.gate.data(), c.intermediate_size, gate.data());
    MatMulTransposedWeight(h.data(), rows, hidden, l.up.data(), c.intermediate_size, up.data());
    SwiGluCpu(gate.data(), up.data(), rows * c.intermediate_size, gate.data());
    MatMulTransposedWeight(gate.data(), rows, c.intermediate_size, l.down.data(), hidden, h.data());
    AddInPlace(h.data(), rows * hidden, x.data());
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
